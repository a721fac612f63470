"""Every config of both bundles, parsed and instantiated in-process with ``monai.bundle.ConfigParser``
(no subprocess): ``device`` given as a string or left at its default, and ``synthetic_if_missing``.

The subprocess runs of the same configs are in test_bundle_*.py and test_distributed.py (marked slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from bundle_utils import REPO, TINY_NETWORK
from monai.bundle import ConfigParser

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.data import load_data_preset, write_synthetic_dataset
from monai_mae.engines import precision
from monai_mae.engines.precision import AutocastInferer
from monai_mae.model_file import save_model
from monai_mae.networks.vitseg import ViTSeg

TINY_UNETR = {"architecture": "unetr", "encoder#hidden_size": 48, "encoder#mlp_dim": 96, "encoder#num_heads": 4,
              "unetr#feature_size": 4}  # fmt: skip
TINY = {
    "mae_pretrain": {"roi_size": [16, 16, 16], "patch_size": [8, 8, 8], **TINY_NETWORK},
    "mae_finetune": {"roi_size": [32, 32, 32], **TINY_UNETR},
}
#: configs that rebuild the network and the preprocessing from the model file they load (``ckpt_path``)
FROM_MODEL_FILE = ("inference.json", "evaluate.json")
#: (bundle, config files layered in order, the workflow object that a run starts)
CONFIGS = [
    ("mae_pretrain", ["train.json"], "train#trainer"),
    ("mae_pretrain", ["train.json", "multi_gpu_train.json"], "train#trainer"),
    ("mae_pretrain", ["train.json", "mim_cnn.json"], "train#trainer"),
    ("mae_pretrain", ["train.json", "mim_cnn.json", "multi_gpu_train.json"], "train#trainer"),
    ("mae_pretrain", ["inference.json"], "evaluator"),
    ("mae_finetune", ["train.json"], "train#trainer"),
    ("mae_finetune", ["train.json", "multi_gpu_train.json"], "train#trainer"),
    ("mae_finetune", ["train.json", "evaluate.json"], "validate#evaluator"),
    ("mae_finetune", ["inference.json"], "evaluator"),
]
IDS = [f"{bundle}:{'+'.join(files)}" for bundle, files, _ in CONFIGS]


def _parser(bundle: str, files: list[str], **overrides) -> ConfigParser:
    """The configs layered as ``monai.bundle run --config_file "[...]"`` does, then the overrides (as ``--key value``)."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / f) for f in files])
    parser.update({"bundle_root": str(REPO / "bundles" / bundle), **overrides})
    return parser


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=2, num_validation=1, shape=(24, 24, 16), num_organs=2)
    return root


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny self-describing model files as the bundles write them, for the configs that load one."""
    root = tmp_path_factory.mktemp("models")
    preset = {**load_data_preset("ct"), "pixdim": None, "spatial_dims": 3, "in_channels": 1}  # as the bundles record it
    mae = MAEViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2, decoder_hidden_size=16,
                 decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2)  # fmt: skip
    seg = ViTSeg(1, 3, 32, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2, decoder_channels=[8, 8, 8])
    return {
        "mae_pretrain": save_model(mae, root / "mae.pt", data_preset={**preset, "roi_size": [16, 16, 16]}),
        "mae_finetune": save_model(
            seg, root / "seg.pt", data_preset={**preset, "roi_size": [32, 32, 32], "num_classes": 3}
        ),
    }


TINY_MIM = {"roi_size": [16, 16, 16], "patch_size": [8, 8, 8], "network_options": {"channels": [4, 8], "strides": [2]}}


def _tiny(bundle: str, files: list[str], model_files: dict[str, Path]) -> dict:
    if files[-1] in FROM_MODEL_FILE:  # the network and the crop size come from the file
        return {"ckpt_path": str(model_files[bundle])}
    if "mim_cnn.json" in files:
        return TINY_MIM
    return TINY[bundle]


@pytest.mark.parametrize("device", [None, "cpu"], ids=["default", "cpu"])
@pytest.mark.parametrize("bundle, files, workflow", CONFIGS, ids=IDS)
def test_every_config_runs_initialize_and_builds_its_workflow(
    bundle, files, workflow, device, dataset, tmp_path, single_process_group, model_files, monkeypatch
):
    """``--device cpu`` arrives as the string ``"cpu"``: every expression that needs a device object must cope.

    The default device is evaluated as on a machine without CUDA (on a GPU machine it is ``cuda:0``).
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    overrides = {"dataset_dir": str(dataset), "output_dir": str(tmp_path / "out"), "num_workers": 0,
                 **_tiny(bundle, files, model_files)}  # fmt: skip
    if device is not None:
        overrides["device"] = device
    parser = _parser(bundle, files, **overrides)
    for index in range(len(parser.get("initialize", []))):
        parser.get_parsed_content(f"initialize#{index}")
    engine = parser.get_parsed_content(workflow)
    assert engine.state.device == torch.device("cpu")
    assert engine.amp is False
    if "multi_gpu_train.json" in files:
        assert parser.get_parsed_content("backend") == "gloo" and dist.get_backend() == "gloo"
        assert isinstance(parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
    if "train.json" in files:
        assert parser.get_parsed_content("train#dataloader").pin_memory is False
    for index in range(len(parser.get("finalize", []))):  # closes the TensorBoard writer, ends the process group
        parser.get_parsed_content(f"finalize#{index}")


@pytest.mark.parametrize("bundle, files, workflow", CONFIGS, ids=IDS)
def test_amp_on_a_cpu_means_bf16_autocast_in_the_inferer(
    bundle, files, workflow, dataset, tmp_path, model_files, monkeypatch, single_process_group
):
    """``--amp true --device cpu``: MONAI's engines get ``amp=False`` (their autocast is CUDA-only), the inferer autocasts."""
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    overrides = {"dataset_dir": str(dataset), "output_dir": str(tmp_path / "out"), "num_workers": 0, "device": "cpu",
                 "amp": True, **_tiny(bundle, files, model_files)}  # fmt: skip
    parser = _parser(bundle, files, **overrides)
    for index in range(len(parser.get("initialize", []))):
        parser.get_parsed_content(f"initialize#{index}")
    engine = parser.get_parsed_content(workflow)
    assert engine.amp is False
    if (bundle, files) == ("mae_pretrain", ["inference.json"]):  # reconstructions stay fp32 (no amp setting)
        assert not isinstance(engine.inferer, AutocastInferer)
    else:
        assert isinstance(engine.inferer, AutocastInferer) and engine.inferer.dtype == torch.bfloat16
    if "validate#evaluator" in parser and workflow == "train#trainer":
        assert isinstance(parser.get_parsed_content("validate#evaluator").inferer, AutocastInferer)
    for index in range(len(parser.get("finalize", []))):
        parser.get_parsed_content(f"finalize#{index}")


@pytest.mark.parametrize("bundle, files, workflow", CONFIGS, ids=IDS)
def test_a_cuda_device_string_selects_nccl_amp_and_pinned_memory(bundle, files, workflow, model_files):
    """``--device cuda:1`` as a string: the device-dependent settings follow it (evaluated without a GPU)."""
    parser = _parser(bundle, files, device="cuda:1", **_tiny(bundle, files, model_files))
    expected = {"backend": "nccl", "amp": True, "train#dataloader#pin_memory": True}
    present = {key: value for key, value in expected.items() if key in parser}
    if "inference.json" not in files:
        assert set(present) >= {"amp", "train#dataloader#pin_memory"}
    assert {key: parser.get_parsed_content(key) for key in present} == present


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                             ((7, 5), torch.float16), ((7, 0), torch.float16)])  # fmt: skip
@pytest.mark.parametrize("bundle, files, workflow", CONFIGS, ids=IDS)
def test_every_autocasting_engine_names_the_dtype_of_amp_dtype(bundle, files, workflow, capability, dtype, model_files,
                                                               monkeypatch):  # fmt: skip
    """On ``cuda:0``: bf16 on GPUs with native bf16 (H100, A100), fp16 on V100 / T4 (bf16 there is emulated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    parser = _parser(bundle, files, device="cuda:0", **_tiny(bundle, files, model_files))
    engines = [key for key in (workflow, "validate#evaluator") if key in parser]
    autocasting = [key for key in engines if parser.get_parsed_content(f"{key}#amp") is True]
    for key in autocasting:
        assert parser.get_parsed_content(f"{key}#amp_kwargs") == {"dtype": dtype}, key
    if (bundle, files) == ("mae_pretrain", ["inference.json"]):  # reconstructions in fp32, no autocast at all
        assert autocasting == []
    else:
        assert workflow in autocasting
    if "train#handlers" in parser:  # the trainer's GradScaler: loss scaling for fp16 only
        scalers = [
            h for h in parser.get("train#handlers") if isinstance(h, dict) and h["_target_"].endswith("AmpGradScaler")
        ]
        assert len(scalers) == 1 and scalers[0]["dtype"] == "@amp_dtype"


@pytest.mark.parametrize("bundle, files, workflow", CONFIGS, ids=IDS)
def test_synthetic_data_only_for_the_bundle_default_dataset_dir(bundle, files, workflow, tmp_path):
    assert _parser(bundle, files).get_parsed_content("synthetic_if_missing") is True
    same = _parser(bundle, files, dataset_dir=str(REPO / "bundles" / bundle / "data"))
    assert same.get_parsed_content("synthetic_if_missing") is True
    named = _parser(bundle, files, dataset_dir=str(tmp_path / "my_ct"))
    assert named.get_parsed_content("synthetic_if_missing") is False
    checks = [re.search(r"ensure_(dataset|training_data)", str(e)) for e in named.get("initialize")]
    initialize = [i for i, found in enumerate(checks) if found]
    assert len(initialize) == 1
    if "multi_gpu_train.json" in files:  # the component asks torch.distributed for the rank: check its settings
        assert named.get("initialize")[initialize[0]]["synthetic_if_missing"] == "@synthetic_if_missing"
        return
    message = re.escape(f"dataset_dir {str(tmp_path / 'my_ct')!r} does not exist") + r".*--synthetic_if_missing True"
    with pytest.raises(RuntimeError, match="Failed to (evaluate|instantiate)") as error:  # how ConfigParser reports it
        named.get_parsed_content(f"initialize#{initialize[0]}")
    assert isinstance(error.value.__cause__, FileNotFoundError) and re.search(message, str(error.value.__cause__))
    assert not (tmp_path / "my_ct").exists()
    asked = _parser(bundle, files, dataset_dir=str(tmp_path / "my_ct"), synthetic_if_missing=True)
    assert asked.get_parsed_content("synthetic_if_missing") is True


@pytest.mark.parametrize("name", ["demo_pretrain_cpu", "demo_finetune_cpu"])
def test_demo_configs_ask_for_synthetic_data(name):
    """``make demo`` names its dataset folder (data/synthetic), so the demo configs must ask for the phantoms."""
    assert json.loads((REPO / "configs" / f"{name}.json").read_text())["synthetic_if_missing"] is True


def test_evaluate_refuses_a_preprocessed_dir(dataset, tmp_path, model_files):
    """``evaluate.json`` scores NIfTI volumes; a ``--preprocessed_dir`` would half-switch it, so it stops naming both."""
    files = ["train.json", "evaluate.json"]
    parser = _parser("mae_finetune", files, dataset_dir=str(dataset), output_dir=str(tmp_path / "out"),
                     preprocessed_dir=str(tmp_path / "pre"), **_tiny("mae_finetune", files, model_files))  # fmt: skip
    with pytest.raises(RuntimeError) as raised:  # MONAI's parser wraps the expression's error
        parser.get_parsed_content("initialize#0")
    assert isinstance(raised.value.__cause__, ValueError)
    assert "evaluate.json" in str(raised.value.__cause__) and f"preprocessed_dir='{tmp_path / 'pre'}'" in str(
        raised.value.__cause__
    )
    assert not (tmp_path / "out").exists()


def test_pretrain_loss_takes_the_visible_weight_and_refuses_it_with_the_cross_decoder(tmp_path):
    files = ["train.json"]
    parser = _parser("mae_pretrain", files, output_dir=str(tmp_path / "out"), visible_loss_weight=0.5)
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, MaskedReconstructionLoss) and loss.visible_weight == 0.5
    assert (
        _parser("mae_pretrain", files).get_parsed_content("loss").visible_weight == 1.0
    )  # the default follows finetune_architecture, "vitseg" by default (ViTSeg's recipe)
    for_unetr = _parser("mae_pretrain", files, finetune_architecture="unetr")
    assert for_unetr.get_parsed_content("loss").visible_weight == 0.0
    assert for_unetr.get_parsed_content("model_run")["finetune_architecture"] == "unetr"
    mim = _parser("mae_pretrain", ["train.json", "mim_cnn.json"])
    assert mim.get_parsed_content("loss").visible_weight == 0.0  # a CNN: the masked patches only
    assert mim.get_parsed_content("model_run")["finetune_architecture"] == "unet"
    assert (
        _parser("mae_pretrain", files, visible_loss_weight=0.0).get_parsed_content("loss").visible_weight == 0.0
    )  # the paper's
    crossed = _parser(
        "mae_pretrain", files, output_dir=str(tmp_path / "out"), visible_loss_weight=0.5, decoder_type="cross"
    )
    with pytest.raises(RuntimeError) as raised:  # MONAI's parser wraps the expression's error
        crossed.get_parsed_content("loss")
    assert isinstance(raised.value.__cause__, ValueError)
    assert "visible_loss_weight=0.5 needs decoder_type='self'" in str(raised.value.__cause__)


def test_finetune_nifti_chain_jitters_intensity_as_train_augment_says(tmp_path):
    files = ["train.json"]
    names = [
        type(t).__name__ for t in _parser("mae_finetune", files).get_parsed_content("train#preprocessing").transforms
    ]
    assert names[-3:] == [
        "RandScaleIntensityd",
        "RandShiftIntensityd",
        "EnsureTyped",
    ]  # default 0.1 / 0.1, after the flips
    scale, shift = _parser("mae_finetune", files).get_parsed_content("train#preprocessing").transforms[-3:-1]
    assert (scale.scaler.factors, shift.shifter.offsets) == ((-0.1, 0.1), (-0.1, 0.1))
    off = _parser(
        "mae_finetune", files, **{"train#augment": {"flip_prob": 0.1, "intensity_shift": 0.0, "intensity_scale": 0.0}}
    )
    names = [type(t).__name__ for t in off.get_parsed_content("train#preprocessing").transforms]
    assert "RandScaleIntensityd" not in names and "RandShiftIntensityd" not in names


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@pytest.mark.parametrize(
    "bundle, files",
    [
        ("mae_pretrain", ["inference.json"]),
        ("mae_finetune", ["inference.json"]),
        ("mae_finetune", ["train.json", "evaluate.json"]),
    ],
)
def test_a_network_setting_given_to_a_config_that_loads_a_model_file_is_checked_against_it(bundle, files, model_files):
    """``--network_def#hidden_size 192`` on inference/evaluate: checked against the file, not a config-parser error."""
    ckpt = {"ckpt_path": str(model_files[bundle]), "device": "cpu"}
    same = _parser(bundle, files, **ckpt, **{"network_def#hidden_size": 24})
    assert same.get_parsed_content("network_def").hidden_size == 24
    with pytest.raises(RuntimeError) as info:
        _parser(bundle, files, **ckpt, **{"network_def#hidden_size": 192}).get_parsed_content("network_def")
    assert isinstance(_root_cause(info.value), ValueError)
    assert re.search(r"hidden_size=192 \(given\) vs hidden_size=24 \(in '.*\.pt'\)", str(_root_cause(info.value)))
    with pytest.raises(RuntimeError) as info:
        _parser(bundle, files, **ckpt, **{"network_def#feature_size": 8}).get_parsed_content("network_def")
    assert re.search(r"\['feature_size'\] are not arguments recorded in '.*\.pt'", str(_root_cause(info.value)))


@pytest.mark.parametrize("bundle", ["mae_pretrain", "mae_finetune"])
def test_the_per_iteration_loss_log_is_off_while_the_progress_bar_is_on(bundle):
    """The progress bar and StatsHandler's per-iteration lines would interleave on the console."""
    handlers = _parser(bundle, ["train.json"]).config["train"]["handlers"]
    (index,) = [i for i, h in enumerate(handlers) if h["_target_"] == "monai.handlers.StatsHandler"]
    for progress_bar in (True, False):
        stats = _parser(bundle, ["train.json"], progress_bar=progress_bar).get_parsed_content(f"train#handlers#{index}")
        assert stats.iteration_log is (not progress_bar) and stats.epoch_log is True


def test_finetune_from_scratch_defaults_to_the_best_scratch_network(tmp_path):
    """No pretrained file: MONAI's UNet (the best scratch arm of benchmarks/pretrain_benefit.py); an MAE file: ViTSeg."""
    parser = _parser("mae_finetune", ["train.json"], output_dir=str(tmp_path / "out"), roi_size=[32, 32, 32])
    assert parser.get_parsed_content("architecture") == "unet"
    assert type(parser.get_parsed_content("network_def")).__name__ == "UNet"
    mae = MAEViT(1, 32, 16, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2)
    save_model(mae, tmp_path / "mae.pt")
    parser = _parser("mae_finetune", ["train.json"], pretrained_ckpt=str(tmp_path / "mae.pt"))
    assert parser.get_parsed_content("architecture") == "vitseg"


def test_vitseg_conv_skips_from_the_command_line_into_a_pretrained_vitseg(tmp_path):
    """``--vitseg#conv_skips true`` (parsed as the ``monai-mae`` command does) builds the hybrid; the MAE encoder loads."""
    from monai_mae import cli

    torch.manual_seed(0)
    mae = MAEViT(1, 32, 8, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2, cls_token=False, qkv_bias=True)
    save_model(mae, tmp_path / "mae.pt")
    args, extra = cli.build_parser().parse_known_args(
        ["finetune", "--data", "d", "--out", "o", "--vitseg#conv_skips", "true"]
    )
    settings = cli.bundle_call(args, extra).settings
    assert settings["vitseg#conv_skips"] is True
    common = dict(pretrained_ckpt=str(tmp_path / "mae.pt"), roi_size=[32, 32, 32], output_dir=str(tmp_path / "out"))
    plain = _parser("mae_finetune", ["train.json"], **common).get_parsed_content("network_def")
    assert plain.conv_skips is False and not hasattr(plain, "skip_stem")
    parser = _parser("mae_finetune", ["train.json"], **common, **{"vitseg#conv_skips": settings["vitseg#conv_skips"]})
    network = parser.get_parsed_content("pretrained_network")
    assert isinstance(network, ViTSeg) and network.conv_skips and network.init_args["conv_skips"] is True
    assert torch.equal(network.state_dict()["blocks.0.attn.qkv.weight"], mae.state_dict()["blocks.0.attn.qkv.weight"])


# --------------------------------------------------------------------------------------------------
# the configs read as lists of components: short lines, no inline choice on the data source
# --------------------------------------------------------------------------------------------------

#: the configs that the bundles run (metadata.json holds prose: changelog, description, references)
RUN_CONFIGS = sorted(p for p in REPO.glob("bundles/*/configs/*.json") if p.name != "metadata.json")


def _expressions(value) -> list[str]:
    """Every ``$`` expression in a parsed config, nested ones included."""
    if isinstance(value, dict):
        return [e for item in value.values() for e in _expressions(item)]
    if isinstance(value, list):
        return [e for item in value for e in _expressions(item)]
    return [value] if isinstance(value, str) and value.startswith("$") else []


def test_the_run_configs_are_all_found():
    names = {f"{p.parent.parent.name}/{p.name}" for p in RUN_CONFIGS}
    common = ("train.json", "multi_gpu_train.json", "inference.json")
    assert names == {f"mae_pretrain/{n}" for n in (*common, "mim_cnn.json")} | {
        f"mae_finetune/{n}" for n in (*common, "evaluate.json")
    }


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_no_config_line_is_longer_than_120_characters(path):
    long = [(number, len(line)) for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []


METADATA = sorted(REPO.glob("bundles/*/configs/metadata.json"))


@pytest.mark.parametrize("path", METADATA, ids=lambda p: p.parent.parent.name)
def test_metadata_holds_no_expression(path):
    assert _expressions(json.loads(path.read_text())) == []


@pytest.mark.parametrize("bundle", ["mae_pretrain", "mae_finetune"])
def test_train_json_chooses_no_data_source_inline(bundle):
    """``preprocessed_dir`` and ``gpu_augment`` pick components through ``_disabled_`` and small factories."""
    expressions = _expressions(json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text()))
    assert len(expressions) > 20  # the walk reaches nested expressions
    inline = [e for e in expressions if " if " in e and ("preprocessed_dir" in e or "gpu_augment" in e)]
    assert inline == []


def test_finetune_datalists_check_num_classes_against_the_labels(dataset, tmp_path):
    """Too few classes for the datalist's labels stops at the datalist, naming the setting, not inside the loss."""
    parser = _parser("mae_finetune", ["train.json"], dataset_dir=str(dataset), output_dir=str(tmp_path / "out"),
                     num_classes=2)  # fmt: skip
    for key in ("train#datalist", "validate#datalist"):
        with pytest.raises(RuntimeError) as raised:  # MONAI's parser wraps the error
            parser.get_parsed_content(key)
        assert isinstance(raised.value.__cause__, ValueError) and "set num_classes to 3" in str(raised.value.__cause__)
    parser = _parser("mae_finetune", ["train.json"], dataset_dir=str(dataset), output_dir=str(tmp_path / "out"))
    assert len(parser.get_parsed_content("validate#datalist")) == 1
    # by default the classes are the ones the datalist declares: background, organ_1, organ_2
    assert parser.get_parsed_content("num_classes") == 3
    assert parser.get_parsed_content("class_names") == ["organ_1", "organ_2"]
    assert parser.get_parsed_content("network_def").out_channels == 3
    elsewhere = _parser("mae_finetune", ["train.json"], dataset_dir=str(tmp_path / "none"), output_dir=str(tmp_path))
    assert elsewhere.get_parsed_content("num_classes") == 5  # nothing declared: the phantoms' 4 organs + background

"""Every network the bundles build trains every trainable parameter, and both bundles train under a 1-process
gloo ``DistributedDataParallel`` with ``find_unused_parameters=False`` (``freeze_encoder_epochs`` 0).

MONAI's ``UNETR`` blocks carry a ``norm_cross_attn`` that the forward pass never uses: DDP without the
unused-parameter scan then stops at the second iteration. The architectures come from
``monai_mae.networks.factory.ARCHITECTURES``, so a network added there is covered here; ``NETWORKS`` adds the
variants an option makes (ViTSeg with ``conv_skips``).
"""

from __future__ import annotations

import pytest
import torch
from bundle_utils import REPO, TINY_NETWORK
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.data import write_synthetic_dataset
from monai_mae.engines import AccumulationNoSync, freeze_unused_parameters
from monai_mae.model_file import build_network
from monai_mae.networks.factory import ARCHITECTURES, segmentation_network

#: tiny encoder settings per ViT architecture (UNETR fixes 12 layers and 16^3 patches); others use their defaults
TINY_ENCODER = {
    "vitseg": {"hidden_size": 24, "mlp_dim": 48, "num_layers": 2, "num_heads": 2, "patch_size": 8},
    "unetr": {"hidden_size": 24, "mlp_dim": 48, "num_heads": 2},
}
TINY_OPTIONS = {"vitseg": {"decoder_channels": [8, 8, 8]}, "unetr": {"feature_size": 4}}
#: every architecture, and the variants an option adds: name -> (architecture, options on top of TINY_OPTIONS)
NETWORKS = {**{a: (a, {}) for a in ARCHITECTURES}, "vitseg_conv_skips": ("vitseg", {"conv_skips": True})}
#: the MAE variants of mae_pretrain (its decoder_type setting), tiny
MAE_VARIANTS = {"self": {}, "cross": {"decoder_type": "cross"}, "cross-partial": {"decoder_type": "cross",
                "decoder_predict_ratio": 0.5}}  # fmt: skip


def _trainable_without_grad(network: torch.nn.Module) -> list[str]:
    return [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("name", NETWORKS)
def test_one_step_gives_every_trainable_parameter_of_a_segmentation_network_a_gradient(name):
    architecture, extra = NETWORKS[name]
    network = segmentation_network(architecture, 1, 3, 32, encoder=TINY_ENCODER.get(architecture),
                                   options={**TINY_OPTIONS.get(architecture, {}), **extra})  # fmt: skip
    network = freeze_unused_parameters(network)
    images, labels = torch.rand(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    DiceCELoss(to_onehot_y=True, softmax=True)(network(images), labels).backward()
    assert _trainable_without_grad(network) == []
    assert sum(p.requires_grad for p in network.parameters()) > 0


def test_freeze_unused_parameters_freezes_only_the_unused_cross_attention_norms():
    network = segmentation_network("unetr", 1, 3, 32, encoder=TINY_ENCODER["unetr"], options=TINY_OPTIONS["unetr"])
    before = {name for name, p in network.named_parameters() if p.requires_grad}
    frozen = before - {name for name, p in freeze_unused_parameters(network).named_parameters() if p.requires_grad}
    assert frozen == {f"vit.blocks.{i}.norm_cross_attn.{w}" for i in range(12) for w in ("weight", "bias")}
    assert "vit.blocks.0.norm_cross_attn.weight" in network.state_dict()  # MONAI's layout kept


@pytest.mark.parametrize("variant", MAE_VARIANTS)
def test_one_step_gives_every_trainable_parameter_of_the_mae_a_gradient(variant):
    mae = MAEViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2, decoder_hidden_size=16,
                 decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2, **MAE_VARIANTS[variant])  # fmt: skip
    mae = freeze_unused_parameters(mae)
    images = torch.rand(2, 1, 16, 16, 16)
    MaskedReconstructionLoss(8)(mae(images), images).backward()
    assert _trainable_without_grad(mae) == []


# ------------------------------------------------------------------------ 1-process gloo DDP runs
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=3, num_validation=1, shape=(32, 32, 32), num_organs=2)
    return root


def _run_ddp_bundle(bundle: str, overrides: dict, before_run=None) -> tuple[ConfigParser, dict, dict]:
    """train.json + multi_gpu_train.json in this process (world size 1, gloo); the weights before and after.

    ``before_run(trainer)`` is called before the run section (to attach test-only handlers).
    """
    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    parser.update({"bundle_root": str(configs.parent), **overrides})
    for index in range(len(parser.get("initialize"))):
        parser.get_parsed_content(f"initialize#{index}")
    network = parser.get_parsed_content("network")
    assert isinstance(network, torch.nn.parallel.DistributedDataParallel)
    assert network.find_unused_parameters is (overrides.get("freeze_encoder_epochs", 0) > 0)
    before = {k: v.clone() for k, v in network.module.state_dict().items()}
    if before_run is not None:
        before_run(parser.get_parsed_content("train#trainer"))
    for index in range(len(parser.get("run"))):
        parser.get_parsed_content(f"run#{index}")
    after = network.module.state_dict()
    for index in range(len(parser.get("finalize"))):
        parser.get_parsed_content(f"finalize#{index}")
    return parser, before, after


COMMON = dict(device="cpu", num_workers=0, max_epochs=1, batch_size=1, num_samples=1, val_interval=5,
              progress_bar=False, resume=False, warmup_epochs=1)  # fmt: skip


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("dynunet", "segresnet") else n for n in NETWORKS]
)  # the two costliest CNNs only in `make test`
def test_two_ddp_steps_of_mae_finetune(name, dataset, tmp_path, single_process_group):
    architecture, extra = NETWORKS[name]
    tiny = {f"encoder#{k}": v for k, v in TINY_ENCODER.get(architecture, {}).items()}
    tiny.update({f"{architecture}#{k}": v for k, v in {**TINY_OPTIONS.get(architecture, {}), **extra}.items()})
    overrides = {**COMMON, "dataset_dir": str(dataset), "output_dir": str(tmp_path / "out"), "num_classes": 3,
                 "architecture": architecture, "roi_size": [32, 32, 32], "freeze_encoder_epochs": 0, **tiny}  # fmt: skip
    parser, before, after = _run_ddp_bundle("mae_finetune", overrides)
    assert parser.get_parsed_content("train#trainer").state.iteration == 2
    trainable = {n for n, p in parser.get_parsed_content("pretrained_network").named_parameters() if p.requires_grad}
    assert all(any(n.startswith(f"{m}.") for n in trainable) for m in ("skip_stem", "skip_fuse")) == bool(extra)
    assert trainable and all(not torch.equal(before[n], after[n]) for n in trainable if n.endswith("weight"))
    rebuilt = build_network(tmp_path / "out" / "models" / "model.pt")  # as evaluate.json / inference.json do
    assert {k: getattr(rebuilt, "init_args", {}).get(k) for k in extra} == extra


@pytest.mark.parametrize("variant", MAE_VARIANTS)
def test_two_ddp_steps_of_mae_pretrain(variant, dataset, tmp_path, single_process_group):
    overrides = {**COMMON, "dataset_dir": str(dataset), "output_dir": str(tmp_path / "out"), "roi_size": [16, 16, 16],
                 "patch_size": [8, 8, 8], "visible_loss_weight": 0.0, **TINY_NETWORK,
                 **{f"{k}": v for k, v in MAE_VARIANTS[variant].items()}}  # fmt: skip
    parser, before, after = _run_ddp_bundle("mae_pretrain", overrides)
    assert parser.get_parsed_content("train#trainer").state.iteration == 2
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])


def test_ddp_scans_for_unused_parameters_only_while_the_encoder_is_frozen(dataset, tmp_path, single_process_group):
    """Epoch 1 frozen (scan on: the encoder sends no gradient), epoch 2 unfrozen (scan off, a new wrapper)."""
    tiny = {f"encoder#{k}": v for k, v in TINY_ENCODER["unetr"].items()}
    overrides = {**COMMON, "dataset_dir": str(dataset), "output_dir": str(tmp_path / "out"), "num_classes": 3,
                 "architecture": "unetr", "roi_size": [32, 32, 32], "freeze_encoder_epochs": 1, "max_epochs": 2,
                 "unetr#feature_size": 4, **tiny}  # fmt: skip
    seen = []

    def record(trainer):
        trainer.add_event_handler(
            Events.ITERATION_STARTED,
            lambda e: seen.append((e.state.epoch, e.network.find_unused_parameters, id(e.network.module))),
        )

    parser, before, after = _run_ddp_bundle("mae_finetune", overrides, record)
    assert [(epoch, scan) for epoch, scan, _ in seen] == [(1, True), (1, True), (2, False), (2, False)]
    assert len({module for _, _, module in seen}) == 1  # one network, two wrappers
    key = "vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(before[key], after[key])  # the encoder trained in epoch 2, through the new wrapper


def test_accumulation_micro_steps_skip_the_ddp_all_reduce(single_process_group):
    """accumulation_steps 2 over 5 iterations: DDP syncs on iterations 2, 4 and 5 (the optimizer's steps) only,
    and the weights end as without DDP."""
    torch.distributed.init_process_group("gloo")
    data = [(torch.randn(2, 4), torch.randn(2, 3)) for _ in range(5)]
    results, synced = [], []
    for wrap in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        network = torch.nn.parallel.DistributedDataParallel(net) if wrap else net
        trainer = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=network,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
            accumulation_steps=2, decollate=False,
        )  # fmt: skip
        AccumulationNoSync().attach(trainer)
        if wrap:
            trainer.add_event_handler(
                IterationEvents.FORWARD_COMPLETED, lambda e: synced.append(e.network.require_backward_grad_sync)
            )
        trainer.run()
        results.append(net.weight.detach().clone())
    assert synced == [False, True, False, True, True]
    torch.testing.assert_close(results[1], results[0])

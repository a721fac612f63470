"""Training from a preprocessed folder (``preprocessed_dir``): both bundles run in-process on tiny preprocessed
phantoms without reading ``dataset_dir``, a folder made with other data settings stops the run before anything is
built, the crop augmentation on the CPU and on the device (``gpu_augment``, with crops in their storage layout
converted on the device), the ``loader`` setting and its defaults, 2D slices, the multi-GPU config's DistributedSampler; one subprocess run (slow)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from bundle_utils import REPO, TINY_NETWORK, run_bundle, write_overrides
from monai.bundle import ConfigParser
from monai.data import DataLoader, DistributedSampler, ThreadDataLoader

from monai_mae.data import PreprocessedCropDataset, load_data_preset, preprocess_dataset
from monai_mae.engines import (
    GPUAugmentPrepareBatch,
    MAEPrepareBatch,
    PreprocessedCentreCropDataset,
    PreprocessedVolumeDataset,
    check_preprocessed_dir,
    crop_augmentation,
)
from monai_mae.model_file import read_model

TINY_UNETR = {"architecture": "unetr", "encoder#hidden_size": 48, "encoder#mlp_dim": 96, "encoder#num_heads": 4,
              "unetr#feature_size": 4}  # fmt: skip
COMMON = {"num_workers": 0, "max_epochs": 1, "val_interval": 1, "warmup_epochs": 1, "progress_bar": False,
          "device": "cpu", "resume": False}  # fmt: skip
TINY = {
    "mae_pretrain": {"roi_size": [16, 16, 16], "patch_size": [8, 8, 8], "batch_size": 2, "num_samples": 2,
                     **TINY_NETWORK, **COMMON},
    "mae_finetune": {"roi_size": [32, 32, 32], "batch_size": 1, "num_samples": 1, "sw_batch_size": 2,
                     "num_classes": 3, **TINY_UNETR, **COMMON},
}  # fmt: skip
#: the pictures (matplotlib layout) take most of a tiny validation's time and are tested elsewhere
NO_PICTURES = {"validate#evaluator#val_handlers": "$@validate#handlers[:3]"}


def _parser(bundle: str, files: tuple[str, ...] = ("train.json",), **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / f) for f in files])
    parser.update({"bundle_root": str(REPO / "bundles" / bundle), **overrides})
    return parser


def _section(parser: ConfigParser, name: str) -> None:
    for index in range(len(parser.get(name, []))):
        parser.get_parsed_content(f"{name}#{index}")


def _run(parser: ConfigParser) -> None:
    """What ``monai.bundle run`` does with the parsed config: initialize, run, finalize."""
    for name in ("initialize", "run", "finalize"):
        _section(parser, name)


# --------------------------------------------------------------------------------------------------
# end to end, in-process
# --------------------------------------------------------------------------------------------------


def test_pretrain_trains_from_the_folder_without_dataset_dir(preprocessed, tmp_path, caplog):
    absent, out = tmp_path / "never_made", tmp_path / "out"
    parser = _parser(
        "mae_pretrain", **TINY["mae_pretrain"], **NO_PICTURES, preprocessed_dir=str(preprocessed),
        dataset_dir=str(absent), synthetic_if_missing=True, output_dir=str(out), cache="cache",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="monai_mae.engines.preprocessed"):
        _run(parser)
    train_ds, val_ds = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")
    assert type(train_ds) is PreprocessedCropDataset and type(val_ds) is PreprocessedCentreCropDataset
    assert (
        parser.get_parsed_content("train#nifti_dataset") is None and parser.get_parsed_content("train#datalist") == []
    )
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "model_best.pt").is_file()
    assert read_model(out / "models" / "model.pt").data_preset["pixdim"] == [1.5, 1.5, 2.0]
    assert not absent.exists() and not (out / "cache").exists()  # no phantoms generated, no cache written
    said = [r.getMessage() for r in caplog.records if "cache=" in r.getMessage()]
    assert len(said) == 1 and f"preprocessed_dir={str(preprocessed)!r}" in said[0]
    assert "cache='cache' is ignored" in said[0] and "2 training, 1 validation" in said[0]
    engine = parser.get_parsed_content("train#trainer")
    assert engine.state.epoch == 1 and np.isfinite(engine.state.output["loss"].item())


def test_finetune_trains_with_labels_and_validates_whole_volumes_gpu_augment(preprocessed, tmp_path):
    absent, out = tmp_path / "never_made", tmp_path / "out"
    parser = _parser(
        "mae_finetune", **TINY["mae_finetune"], **NO_PICTURES, preprocessed_dir=str(preprocessed),
        dataset_dir=str(absent), output_dir=str(out), gpu_augment=True,
        **{"train#augment#intensity_scale": 0.1, "train#augment#intensity_shift": 0.1},
    )  # fmt: skip
    _run(parser)
    prepare = parser.get_parsed_content("train#prepare_batch")
    assert isinstance(prepare, GPUAugmentPrepareBatch) and prepare.intensity_scale == 0.1
    assert prepare.storage_layout and parser.get_parsed_content("train#dataset").storage_layout  # float16/uint8 crops
    assert parser.get_parsed_content("train#crop_transform") is None  # nothing random left on the CPU side
    val_ds = parser.get_parsed_content("validate#dataset")
    assert isinstance(val_ds, PreprocessedVolumeDataset) and len(val_ds) == 1
    item = val_ds[0]
    assert item["image"].shape == item["label"].shape == (1, *val_ds.volumes[0]["shape"][1:])
    assert str(item["image"].meta["filename_or_obj"]).endswith("phantom_002.nii.gz")
    metrics = parser.get_parsed_content("validate#evaluator").state.metrics
    # no datalist read (dataset_dir absent): the classes are named by the labels the manifest copied from it
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and "val_dice_organ_2" in metrics["val_class_dice"]
    assert (out / "models" / "model.pt").is_file() and not absent.exists()
    defaults = _parser("mae_finetune", preprocessed_dir=str(preprocessed), dataset_dir=str(absent))
    assert defaults.get_parsed_content("num_classes") == 3  # background + the 2 organs, without --num_classes
    assert defaults.get_parsed_content("class_names") == ["organ_1", "organ_2"]


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_pretrain_gpu_augment_reads_the_storage_layout_and_prepares_the_default_batch(
    preprocessed, tmp_path, spatial_dims
):
    roi = {"roi_size": [16] * spatial_dims, "patch_size": [8] * spatial_dims, "spatial_dims": spatial_dims}
    prepared = {}
    for gpu in (False, True):
        parser = _parser(
            "mae_pretrain", **{**TINY["mae_pretrain"], **roi}, preprocessed_dir=str(preprocessed),
            output_dir=str(tmp_path / "out"), gpu_augment=gpu, **{"train#augment#flip_prob": 0.0},
        )  # fmt: skip
        _section(parser, "initialize")
        assert parser.get_parsed_content("train#dataset").storage_layout is gpu
        torch.manual_seed(0)  # the same shuffle and crops for both
        batch = next(iter(parser.get_parsed_content("train#dataloader")))
        assert batch["image"].dtype == (torch.float16 if gpu else torch.float32)
        prepared[gpu] = parser.get_parsed_content("train#prepare_batch")(batch, "cpu")[0]
    assert prepared[True].shape == (4, 1, *roi["roi_size"]) and prepared[True].dtype == torch.float32
    assert torch.equal(prepared[True], prepared[False])


@pytest.mark.parametrize(
    "change, named",
    [
        ({"preset": {**load_data_preset("ct"), "a_min": -100.0}}, r"'a_min': -100\.0.*'a_min': -175\.0"),
        (
            {"spacing": [2.0, 2.0, 2.0]},
            r"pixdim: .* has \[2\.0, 2\.0, 2\.0\], the run's preset has \[1\.5, 1\.5, 2\.0\]",
        ),
    ],
    ids=["ct_window", "spacing"],
)
def test_a_folder_made_with_other_settings_stops_before_training(phantoms, tmp_path, change, named):
    other = tmp_path / "other"
    preprocess_dataset(phantoms, other, "ct", workers=1, labels=False, **change)
    out = tmp_path / "out"
    parser = _parser("mae_pretrain", **TINY["mae_pretrain"], preprocessed_dir=str(other), output_dir=str(out))
    with pytest.raises(RuntimeError, match="Failed to instantiate") as error:  # the initialize component
        _section(parser, "initialize")
    assert isinstance(error.value.__cause__, ValueError)
    assert re.search(named, str(error.value.__cause__)), str(error.value.__cause__)
    assert not out.exists()  # nothing built, nothing written
    # the datasets check on their own too (a run that skips initialize)
    with pytest.raises(ValueError, match=named):
        PreprocessedCentreCropDataset(other, roi_size=16, preset=load_data_preset("ct"))


def test_a_folder_without_manifest_is_named(tmp_path):
    empty = tmp_path / "not_preprocessed"
    empty.mkdir()
    parser = _parser("mae_finetune", **TINY["mae_finetune"], preprocessed_dir=str(empty))
    with pytest.raises(RuntimeError, match="Failed to instantiate") as error:
        _section(parser, "initialize")
    cause = error.value.__cause__
    assert isinstance(cause, FileNotFoundError) and str(empty / "manifest.json") in str(cause)
    assert "python -m monai_mae.data.preprocess" in str(cause)


def test_finetune_needs_labels_in_the_folder(phantoms, tmp_path):
    images_only = tmp_path / "images_only"
    preprocess_dataset(phantoms, images_only, "ct", workers=1, labels=False)
    with pytest.raises(ValueError, match=r"images_only: 2 volume\(s\) of 'training' have no label"):
        check_preprocessed_dir(images_only, load_data_preset("ct"), with_label=True)
    check_preprocessed_dir(images_only, load_data_preset("ct"), log=False)  # fine for pretraining


def test_2d_slices_from_the_folder(preprocessed, tmp_path):
    parser = _parser(
        "mae_pretrain", **{**TINY["mae_pretrain"], "spatial_dims": 2, "roi_size": [16, 16], "patch_size": [8, 8]},
        preprocessed_dir=str(preprocessed), output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    _section(parser, "initialize")
    crops = parser.get_parsed_content("train#dataset")[0]
    assert [c["image"].shape for c in crops] == [torch.Size([1, 16, 16])] * 2
    val_ds = parser.get_parsed_content("validate#dataset")
    middle = val_ds[0][0]["image"]  # the centre axial slice, padded to 16 x 16 in-plane
    stored = np.load(preprocessed / val_ds.volumes[0]["files"]["image"]).astype(np.float32)
    x, y, z = stored.shape[1:]
    assert torch.equal(middle, torch.from_numpy(stored[:, x // 2 - 8 : x // 2 + 8, y // 2 - 8 : y // 2 + 8, z // 2]))
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    images, _, _, _ = parser.get_parsed_content("train#prepare_batch")(batch, "cpu")
    assert images.shape == (4, 1, 16, 16)


def test_multi_gpu_config_samples_the_folder_with_a_distributed_sampler(preprocessed, tmp_path, single_process_group):
    out = tmp_path / "out"
    parser = _parser(
        "mae_pretrain", ("train.json", "multi_gpu_train.json"), **TINY["mae_pretrain"], **NO_PICTURES,
        preprocessed_dir=str(preprocessed), dataset_dir=str(tmp_path / "never_made"), output_dir=str(out),
    )  # fmt: skip
    _run(parser)
    sampler = parser.get_parsed_content("train#sampler")
    assert isinstance(sampler, DistributedSampler) and isinstance(sampler.dataset, PreprocessedCropDataset)
    assert len(sampler) == 2 and isinstance(
        parser.get_parsed_content("validate#sampler").dataset, PreprocessedCentreCropDataset
    )
    assert (out / "models" / "model.pt").is_file() and not (tmp_path / "never_made").exists()


def test_multi_gpu_finetune_config_checks_the_folder_and_samples_it(preprocessed, tmp_path, single_process_group):
    parser = _parser(
        "mae_finetune", ("train.json", "multi_gpu_train.json"), **TINY["mae_finetune"],
        preprocessed_dir=str(preprocessed), dataset_dir=str(tmp_path / "never_made"), output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    _section(parser, "initialize")
    assert isinstance(parser.get_parsed_content("train#sampler").dataset, PreprocessedCropDataset)
    assert isinstance(parser.get_parsed_content("validate#sampler").dataset, PreprocessedVolumeDataset)
    assert not (tmp_path / "never_made").exists()
    _section(parser, "finalize")


# --------------------------------------------------------------------------------------------------
# augmentation: CPU transforms and the device-side PrepareBatch wrapper
# --------------------------------------------------------------------------------------------------


def _batch(spatial: tuple[int, ...], n: int = 4) -> dict[str, torch.Tensor]:
    image = torch.rand(n, 1, *spatial)
    return {"image": image, "label": (image > 0.5).float(), "name": ["a"] * n}


@pytest.mark.parametrize("spatial", [(4, 6, 8), (6, 8)], ids=["3d", "2d"])
def test_gpu_augment_prepare_batch_flips_images_and_labels_together(spatial):
    torch.manual_seed(0)
    batch = _batch(spatial)
    hook = GPUAugmentPrepareBatch(flip_prob=0.5)  # wraps MONAI's default_prepare_batch: (image, label)
    images, labels = hook(batch, torch.device("cpu"), non_blocking=True)
    assert images.shape == batch["image"].shape and labels.shape == batch["label"].shape
    assert torch.equal(labels, (images > 0.5).float())  # every sample's label flipped exactly as its image
    assert not torch.equal(images, batch["image"])  # something was flipped (seeded)
    everything = GPUAugmentPrepareBatch(flip_prob=1.0)(batch, "cpu")[0]
    assert torch.equal(everything, batch["image"].flip(list(range(2, 2 + len(spatial)))))
    untouched = GPUAugmentPrepareBatch(flip_prob=0.0)(batch, "cpu")
    assert torch.equal(untouched[0], batch["image"]) and torch.equal(untouched[1], batch["label"])


def test_gpu_augment_prepare_batch_around_mae_prepare_batch():
    batch = _batch((8, 8, 8), n=2)
    hook = GPUAugmentPrepareBatch(MAEPrepareBatch(seed=3), flip_prob=0.5, intensity_shift=0.1, intensity_scale=0.1,
                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    images, targets, args, kwargs = hook(batch, "cpu")
    plain = MAEPrepareBatch(seed=3)(batch, "cpu")
    assert images.shape == plain[0].shape and images.dtype == plain[0].dtype and targets is images
    assert args == plain[2] and set(kwargs) == set(plain[3]) == {"generator"}
    assert not torch.allclose(images, batch["image"]) and torch.isfinite(images).all()
    with pytest.raises(TypeError, match="needs a dict batch"):
        hook(batch["image"], "cpu")


def test_gpu_augment_prepare_batch_copies_with_the_trainers_flags_before_the_wrapped_hook():
    seen = {}

    def inner(batch, device, non_blocking, **kwargs):
        seen.update(batch=batch, device=device, non_blocking=non_blocking, kwargs=kwargs)
        return batch["image"]

    batch = _batch((4, 4, 4), n=2)
    GPUAugmentPrepareBatch(inner, flip_prob=0.0)(batch, "cpu", True, dtype=torch.float64)
    assert seen["non_blocking"] is True and seen["kwargs"] == {"dtype": torch.float64}
    assert seen["batch"]["image"].dtype == torch.float64 and seen["batch"]["name"] == ["a", "a"]


@pytest.mark.parametrize("spatial", [(4, 6, 8), (6, 8)], ids=["3d", "2d"])
def test_gpu_augment_prepare_batch_converts_the_storage_layout_before_augmenting(spatial):
    torch.manual_seed(0)
    batch = _batch(spatial)
    reverse = (0, 1, *range(len(spatial) + 1, 1, -1))  # (B, C, *S) <-> (B, C, *S reversed)
    default = {"image": batch["image"].half().float(), "label": batch["label"]}
    stored = {"image": batch["image"].half().permute(reverse).contiguous(),
              "label": batch["label"].to(torch.uint8).permute(reverse).contiguous()}  # fmt: skip
    options = {"flip_prob": 0.5, "intensity_shift": 0.1, "intensity_scale": 0.1}
    expected = GPUAugmentPrepareBatch(**options, generator=torch.Generator().manual_seed(2))(default, "cpu")
    got = GPUAugmentPrepareBatch(**options, generator=torch.Generator().manual_seed(2), storage_layout=True)(
        stored, "cpu"
    )
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and a.shape == (4, 1, *spatial) and torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"flip_prob": 1.5}, "flip_prob"), ({"intensity_shift": -0.1}, "intensity_shift"),
     ({"intensity_scale": 1.0}, "intensity_scale")],
)  # fmt: skip
def test_augmentation_options_are_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPUAugmentPrepareBatch(**kwargs)
    with pytest.raises(ValueError, match=message):
        crop_augmentation(3, **kwargs)
    with pytest.raises(TypeError, match="callable"):
        GPUAugmentPrepareBatch(prepare_batch="MAEPrepareBatch")


def test_crop_augmentation_on_the_cpu_flips_labels_with_images_and_jitters_images_only():
    assert crop_augmentation(3, flip_prob=0.0) is None
    t = crop_augmentation(3, flip_prob=0.5, intensity_shift=0.2, intensity_scale=0.2, with_label=True)
    t.set_random_state(seed=0)
    image = torch.rand(1, 6, 6, 6)
    label = (image > 0.5).float()
    combos = [[d for d in (1, 2, 3) if mask >> (d - 1) & 1] for mask in range(8)]
    flips = set()
    for _ in range(8):
        out = t({"image": image.clone(), "label": label.clone()})
        out_image, out_label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        axes = [c for c in combos if torch.equal(out_label, label.flip(c) if c else label)]
        assert len(axes) == 1  # the label moved by one set of flips and kept its values
        moved = (image.flip(axes[0]) if axes[0] else image).flatten()
        a, b = torch.linalg.lstsq(
            torch.stack([moved, torch.ones_like(moved)], 1), out_image.flatten()[:, None]
        ).solution[:, 0]
        assert torch.allclose(
            out_image.flatten(), a * moved + b, atol=1e-5
        )  # the image moved the same way, then jitter
        assert 0.8 - 1e-6 <= a <= 1.2 + 1e-6 and -0.2 - 1e-6 <= b <= 0.2 + 1e-6 and (a, b) != (1.0, 0.0)
        flips.add(tuple(axes[0]))
    assert len(flips) > 1


# --------------------------------------------------------------------------------------------------
# loader settings
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", ["mae_pretrain", "mae_finetune"])
def test_loader_setting_and_worker_defaults(bundle, preprocessed, tmp_path, monkeypatch):
    base = {**TINY[bundle], "preprocessed_dir": str(preprocessed), "output_dir": str(tmp_path / "out")}
    default = _parser(bundle, **base).get_parsed_content("train#dataloader")
    assert type(default) is DataLoader and default.num_workers == 0 and default.prefetch_factor is None
    assert default.pin_memory is False and default.persistent_workers is False
    threaded = _parser(bundle, **{**base, "loader": "ThreadDataLoader", "num_workers": 1})
    loader = threaded.get_parsed_content("train#dataloader")
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 1 and loader.prefetch_factor == 2
    assert loader.persistent_workers is False  # CPU defaults as before: no persistent workers
    with pytest.raises(RuntimeError, match="Failed to instantiate|Failed to evaluate") as error:
        _parser(bundle, **{**base, "loader": "FastLoader"}).get_parsed_content("train#dataloader")
    assert "ThreadDataLoader" in str(error.value) + str(error.value.__cause__)
    # a CUDA device string: workers for a 16-core machine (per process under torchrun), pinned memory, prefetch
    monkeypatch.setattr("monai_mae.engines.runtime.available_cpus", lambda: 16)
    cuda = _parser(bundle, **{**{k: v for k, v in base.items() if k != "num_workers"}, "device": "cuda:1"})
    settings = {
        key: cuda.get_parsed_content(key)
        for key in ("num_workers", "pin_memory", "prefetch_factor", "persistent_workers")
    }
    assert settings == {"num_workers": 8, "pin_memory": True, "prefetch_factor": 4, "persistent_workers": True}
    assert cuda.get_parsed_content("train#trainer#non_blocking") is True
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _parser(bundle, device="cuda:1").get_parsed_content("num_workers") == 4
    cpu = _parser(bundle, device="cpu")
    assert [cpu.get_parsed_content(k) for k in ("num_workers", "pin_memory", "persistent_workers")] == [4, False, False]


def test_without_preprocessed_dir_nothing_changes(phantoms, tmp_path):
    parser = _parser("mae_pretrain", **TINY["mae_pretrain"], dataset_dir=str(phantoms), output_dir=str(tmp_path / "out"),
                     gpu_augment=True)  # fmt: skip
    _section(parser, "initialize")
    assert type(parser.get_parsed_content("train#dataset")).__name__ == "Dataset"
    assert parser.get_parsed_content("train#preprocessed_dataset") is None
    assert isinstance(parser.get_parsed_content("train#prepare_batch"), MAEPrepareBatch)  # gpu_augment needs the folder
    assert len(parser.get_parsed_content("validate#dataset")) == 1


# --------------------------------------------------------------------------------------------------
# one bundle run in a subprocess
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundle_run_2d_gpu_augment_thread_loader_subprocess(preprocessed, tmp_path):
    overrides = write_overrides(
        tmp_path / "tiny.json",
        **{**TINY["mae_pretrain"], "spatial_dims": 2, "roi_size": [16, 16], "patch_size": [8, 8], "max_epochs": 2,
           "gpu_augment": True, "loader": "ThreadDataLoader", "num_workers": 1, "cache": "persistent"},
    )  # fmt: skip
    out, absent = tmp_path / "out", tmp_path / "never_made"
    result = run_bundle(
        "mae_pretrain", "train.json", overrides, "--preprocessed_dir", str(preprocessed), "--dataset_dir", str(absent),
        "--output_dir", str(out),
    )  # fmt: skip
    assert result.stdout.count("cache='persistent' is ignored") == 1 and "Epoch[2] Complete" in result.stdout
    assert read_model(out / "models" / "model.pt").state_dict["patch_embedding.patch_embeddings.weight"].shape == (
        48,
        1,
        8,
        8,
    )
    assert not absent.exists() and not (out / "cache").exists()

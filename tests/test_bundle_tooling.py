"""Release tooling of both bundles: LICENSE and model-zoo docs, metadata.json against the model-zoo
schema's required fields, inference input checks, and TorchScript export (``ckpt_export``)."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest
import torch
from bundle_utils import REPO
from monai.bundle import ConfigParser, ckpt_export

import monai_mae
from monai_mae.data import load_data_preset, write_synthetic_dataset
from monai_mae.model_file import save_model
from monai_mae.networks.factory import segmentation_network

BUNDLES = ("mae_pretrain", "mae_finetune")

# The fields the MONAI model-zoo metadata schema requires: meta_schema_20220324.json, the schema each
# metadata.json names in "schema" (MONAI-extra-test-data release 0.8.1). It is not available offline,
# so its required fields are written down here.
_TENSOR_FIELDS = [
    "type",
    "format",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
]
_TENSOR = {
    "type": "object",
    "required": _TENSOR_FIELDS,
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "num_channels": {"type": "integer", "minimum": 1},
        "spatial_shape": {"type": "array", "minItems": 2, "maxItems": 3},
        "dtype": {"type": "string"},
        "value_range": {"type": "array"},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object", "minProperties": 1},
    },
}
_VERSION = {"type": "string", "pattern": r"^\d+\.\d+\.\d+"}
META_SCHEMA = {
    "type": "object",
    "required": [
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],  # fmt: skip
    "properties": {
        "version": _VERSION,
        "changelog": {"type": "object", "minProperties": 1},
        "monai_version": _VERSION,
        "pytorch_version": _VERSION,
        "numpy_version": _VERSION,
        "required_packages_version": {"type": "object", "additionalProperties": _VERSION},
        "optional_packages_version": {"type": "object", "additionalProperties": _VERSION},
        "task": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "authors": {"type": "string", "minLength": 1},
        "copyright": {"type": "string", "minLength": 1},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
                "outputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
            },
        },
    },
}


def _metadata(bundle: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_follows_the_model_zoo_schema(bundle):
    meta = _metadata(bundle)
    jsonschema.validate(meta, META_SCHEMA)
    assert meta["schema"].endswith("meta_schema_20220324.json")
    assert meta["version"] in meta["changelog"]  # the current version has its changelog entry
    assert meta["required_packages_version"]["monai-mae"] == monai_mae.__version__


def test_the_schema_catches_a_missing_field():
    meta = _metadata("mae_pretrain")
    del meta["network_data_format"]["inputs"]["image"]["is_patch_data"]
    with pytest.raises(jsonschema.ValidationError, match="'is_patch_data' is a required property"):
        jsonschema.validate(meta, META_SCHEMA)
    del meta["copyright"]
    with pytest.raises(jsonschema.ValidationError, match="'copyright' is a required property"):
        jsonschema.validate(meta, META_SCHEMA)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_license_and_model_zoo_readme(bundle):
    root = REPO / "bundles" / bundle
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
    headings = [
        line.lstrip("#").strip()
        for line in (root / "docs" / "README.md").read_text().splitlines()
        if line.startswith("#")
    ]
    for section in ("Model Overview", "Data", "Training configuration", "Input", "Output", "Performance",
                    "MONAI Bundle Commands", "Execute training", "Execute multi-GPU training", "Execute evaluation",
                    "Execute inference", "Export checkpoint to TorchScript", "References", "License"):  # fmt: skip
        assert section in headings, (bundle, section)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_synthetic_dataset(root, num=3, num_validation=1, shape=(24, 24, 16), seed=3)
    return root


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_checks_its_input_files_like_training(bundle, dataset, tmp_path):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / bundle), "dataset_dir": str(dataset)})
    assert [item["image"] for item in parser.get_parsed_content("datalist")] == [
        str(dataset / "imagesTr" / "phantom_002.nii.gz")
    ]

    bad = shutil.copytree(dataset, tmp_path / "data")
    truncated = bad / "imagesTr" / "phantom_002.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200])
    parser.update({"dataset_dir": str(bad)})
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content("datalist", lazy=False)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert "phantom_002.nii.gz: corrupt or truncated NIfTI" in str(cause) and "skip_bad_files" in str(cause)


# Each fine-tuning architecture, tiny, with ckpt_export's own arguments. UNETR scripts; ViTSeg does not script
# (a ``tuple[int, ...]`` annotation in mae.py, einops) but traces, so it exports with use_trace and an input shape.
EXPORT_NETWORKS = {
    "unetr": ({"encoder": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, "options": {"feature_size": 8}}, {}),
    "vitseg": ({"encoder": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 2},
                "options": {"decoder_channels": [16, 8, 8]}}, {"use_trace": True, "input_shape": [1, 1, 32, 32, 32]}),
}  # fmt: skip


@pytest.mark.parametrize(
    "network", [pytest.param(n, marks=pytest.mark.slow) if n == "unetr" else n for n in sorted(EXPORT_NETWORKS)]
)  # UNETR's scripted export is the costliest: only in `make test`
def test_ckpt_export_gives_the_eager_output(network, tmp_path):
    """``python -m monai.bundle ckpt_export --key_in_ckpt network``: the self-describing model file rebuilds the network."""
    bundle = REPO / "bundles" / "mae_finetune"
    settings, export_args = EXPORT_NETWORKS[network]
    eager = segmentation_network(network, 1, 5, 32, **settings).eval()
    preset = {**load_data_preset("ct"), "roi_size": [32, 32, 32], "num_classes": 5, "in_channels": 1}
    ckpt = save_model(eager, tmp_path / "models" / "model.pt", data_preset=preset)  # as FinalModelSaver writes it
    ckpt_export(
        net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt), key_in_ckpt="network",
        meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle), ckpt_path=str(ckpt), **export_args,
    )  # fmt: skip
    extra = {"inference.json": "", "metadata.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == _metadata("mae_finetune")["version"]
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected, got = eager(x), scripted(x)
    assert got.shape == (1, 5, 32, 32, 32)
    assert torch.allclose(got, expected, atol=1e-5)

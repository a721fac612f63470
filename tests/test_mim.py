"""Convolutional networks by name (``networks/cnn.py``) and their masked-image pretraining (``networks/mim.py``):
shapes, the masked input, the loss contract, transfer into the segmentation network, model files."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_mae import MAEViT, MaskedReconstructionLoss, patchify
from monai_mae.engines.finetune import FreezeEncoder, layerwise_lr_groups, load_pretrained
from monai_mae.model_file import architecture_for, build_network, encoder_settings, save_model
from monai_mae.networks.cnn import CNN_ARCHITECTURES, CNN_DEFAULTS, cnn_network, nnunet_kernels_strides
from monai_mae.networks.factory import ARCHITECTURES, segmentation_network
from monai_mae.networks.mim import MaskedImageModel, load_mim_weights

SMALL = {
    "unet": {"channels": [4, 8], "strides": [2], "num_res_units": 1},
    "dynunet": {"base_filters": 4, "max_filters": 16},
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
}


def _mim(architecture: str = "unet", spatial_dims: int = 3, **kwargs) -> MaskedImageModel:
    return MaskedImageModel(architecture, 1, 16, patch_size=4, spatial_dims=spatial_dims, options=SMALL[architecture],
                            **kwargs)  # fmt: skip


@pytest.mark.parametrize("architecture", CNN_ARCHITECTURES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cnn_network_shapes_and_spec_rebuild(architecture, spatial_dims):
    torch.manual_seed(0)
    net = cnn_network(architecture, 2, 3, spatial_dims, img_size=16, options=SMALL[architecture]).eval()
    x = torch.rand(2, 2, *([16] * spatial_dims))
    out = net(x)
    assert out.shape == (2, 3, *([16] * spatial_dims))
    spec = net.network_spec
    assert spec["_target_"].startswith("monai.networks.nets.") and spec["out_channels"] == 3
    twin = type(net)(**{k: v for k, v in spec.items() if k != "_target_"}).eval()
    twin.load_state_dict(net.state_dict())
    assert torch.equal(twin(x), out)


def test_cnn_defaults_are_the_documented_networks():
    unet = cnn_network("unet", 1, 6)
    assert sum(p.numel() for p in unet.parameters()) == 1_191_093  # 16-32-64-128, 2 residual units
    dyn = cnn_network("dynunet", 1, 6, img_size=48)
    assert dyn.network_spec["filters"] == [32, 64, 128, 256] and dyn.network_spec["res_block"] is False
    assert cnn_network("segresnet", 1, 6).network_spec["init_filters"] == CNN_DEFAULTS["segresnet"]["init_filters"]


@pytest.mark.parametrize(
    "img_size, spacing, kernels, strides",
    [
        ((48, 48, 48), None, [[3, 3, 3]] * 4, [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
        ((64, 64, 16), (0.8, 0.8, 3.0), [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
         [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]),
        ((8, 8), None, [[3, 3], [3, 3]], [[1, 1], [2, 2]]),
    ],
)  # fmt: skip
def test_nnunet_plan(img_size, spacing, kernels, strides):
    assert nnunet_kernels_strides(img_size, spacing, spatial_dims=len(img_size)) == (kernels, strides)


def test_cnn_errors_name_the_problem():
    with pytest.raises(ValueError, match="'resnet' is not a valid value"):
        cnn_network("resnet", 1, 2)
    with pytest.raises(ValueError, match="'dynunet' needs img_size"):
        cnn_network("dynunet", 1, 2)
    with pytest.raises(ValueError, match=r"invalid options for architecture 'unet' \(UNet\)"):
        cnn_network("unet", 1, 2, options={"width": 3})
    with pytest.raises(ValueError, match="side below min_size=4"):
        nnunet_kernels_strides((2, 16, 16))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mim_returns_mae_layout_and_masks_the_input(spatial_dims):
    torch.manual_seed(0)
    mim = _mim(spatial_dims=spatial_dims)
    seen = {}
    mim.network.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    x = torch.rand(2, 1, *([16] * spatial_dims)) + 0.5  # no zero voxel in the image
    pred, mask = mim(x, generator=torch.Generator().manual_seed(1))
    n = 4**spatial_dims
    assert pred.shape == (2, n, 4**spatial_dims) and mask.shape == (2, n)
    assert mask.sum(1).tolist() == [n - int(n * 0.25)] * 2  # the MAE's count: N_keep = int(N * (1 - ratio))
    voxels = mim.mask_voxels(mask, x.shape[2:])
    assert torch.equal(patchify(voxels, 4).amax(-1), mask)  # the per-voxel mask is the patch mask, patch by patch
    assert torch.equal(seen["x"] == 0, voxels.bool())  # masked voxels zeroed, visible ones untouched
    assert torch.equal(seen["x"][~voxels.bool()], x[~voxels.bool()])
    loss = MaskedReconstructionLoss(4, spatial_dims=spatial_dims)((pred, mask), x)  # the MAE's loss, unchanged
    loss.backward()
    assert all(p.grad is not None for p in mim.parameters())


def test_mim_masks_follow_the_generator_and_the_ratio():
    mim = _mim()
    x = torch.rand(1, 1, 16, 16, 16)
    _, a = mim(x, generator=torch.Generator().manual_seed(3))
    _, b = mim(x, generator=torch.Generator().manual_seed(3))
    _, c = mim(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and int(c.sum()) == 32


def test_learned_fill_is_trained():
    mim = _mim(mask_fill="learned")
    pred, mask = mim(torch.rand(2, 1, 16, 16, 16))
    MaskedReconstructionLoss(4)((pred, mask), torch.rand(2, 1, 16, 16, 16)).backward()
    assert mim.mask_token.shape == (1, 1, 1, 1, 1) and mim.mask_token.grad is not None
    assert "mask_token" in mim.state_dict() and "zero_fill" not in mim.state_dict()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mean_fill_is_each_images_visible_mean(spatial_dims):
    torch.manual_seed(0)
    mim = _mim(spatial_dims=spatial_dims, mask_fill="mean")
    seen = {}
    mim.network.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    x = torch.rand(2, 1, *([16] * spatial_dims))
    x[1] += 3.0  # a second image of another level gets its own fill
    _, mask = mim(x, generator=torch.Generator().manual_seed(2))
    masked = mim.mask_voxels(mask, x.shape[2:]).bool()
    for b in range(2):
        visible_mean = x[b][~masked[b]].mean()
        assert torch.allclose(seen["x"][b][masked[b]], visible_mean.expand(int(masked[b].sum())))
        assert torch.equal(seen["x"][b][~masked[b]], x[b][~masked[b]])
    assert 3.0 < float(seen["x"][1][masked[1]][0]) < 4.0 and float(seen["x"][0][masked[0]][0]) < 1.0
    assert mim.mask_token is None and mim.init_args["mask_fill"] == "mean"


@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        ({"mask_fill": "noise"}, None, "Unsupported option 'noise'"),
        ({"masking_ratio": 1.0}, None, r"masking_ratio must be in \[0, 1\), got 1.0"),
        ({}, (1, 2, 16, 16, 16), r"expected input \(B, 1, S, S, S\), got \(1, 2, 16, 16, 16\)"),
        ({}, (1, 1, 16, 16, 18), "spatial axis 2 has size 18, which is not divisible by the patch size 4"),
    ],
)
def test_mim_errors(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        _mim(**kwargs)(torch.rand(*shape))


def test_bad_masking_ratio_per_call():
    with pytest.raises(ValueError, match="masking_ratio 0.9999 leaves no visible token out of 64"):
        _mim()(torch.rand(1, 1, 16, 16, 16), masking_ratio=0.9999)


@pytest.mark.parametrize("architecture", CNN_ARCHITECTURES)
def test_pretrained_weights_go_into_the_segmentation_network(architecture, tmp_path):
    torch.manual_seed(0)
    mim = _mim(architecture)
    save_model(mim, tmp_path / "mim.pt", data_preset={"modality": "ct"})
    assert architecture_for(tmp_path / "mim.pt", default="vitseg") == architecture
    options = encoder_settings(tmp_path / "mim.pt", architecture)
    net = segmentation_network(architecture, 1, 4, 16, encoder=options)
    load_pretrained(net, tmp_path / "mim.pt")
    target, source = net.state_dict(), mim.state_dict()
    same = [k for k in target if torch.equal(target[k], source["network." + k])]
    head = [k for k in target if k not in same]
    assert head and len(same) > 2 * len(head)  # every layer but the output head
    assert all(source["network." + k].shape != target[k].shape for k in head)
    groups = layerwise_lr_groups(net, 1e-3, 0.05, layer_decay=1.0, encoder_lr_scale=0.3)  # pretrained layers slower
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, param in net.named_parameters():
        assert lr_of[id(param)] == pytest.approx(3e-4 if name in same else 1e-3), name
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    rebuilt = build_network(tmp_path / "mim.pt")  # the model file describes the masked-image model too
    assert isinstance(rebuilt, MaskedImageModel) and rebuilt.init_args == mim.init_args


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_load_mim_weights_strips_wrapper_prefixes(prefix):
    torch.manual_seed(0)
    mim, unet = _mim("unet"), cnn_network("unet", 1, 3, options=SMALL["unet"])
    report = load_mim_weights(unet, {prefix + k: v for k, v in mim.state_dict().items()})
    target, source = unet.state_dict(), mim.state_dict()
    assert report["loaded"] and all(torch.equal(target[k], source["network." + k]) for k in report["loaded"])


def test_load_mim_weights_refuses_other_networks(tmp_path):
    unet = cnn_network("unet", 1, 3, options=SMALL["unet"])
    with pytest.raises(ValueError, match="holds no masked-image-model weights"):
        load_mim_weights(unet, MAEViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_heads=2).state_dict())
    wide = MaskedImageModel("unet", 1, 16, patch_size=4, options={"channels": [8, 16], "strides": [2]})
    with pytest.raises(ValueError, match=r"fits only 3 of the 15 tensors of UNet"):
        load_mim_weights(unet, wide.state_dict())


def test_checkpoint_and_architecture_must_agree(tmp_path):
    save_model(_mim("unet"), tmp_path / "mim.pt")
    save_model(MAEViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_heads=2), tmp_path / "mae.pt")
    with pytest.raises(ValueError, match=r"architecture='segresnet' differs from the network pretrained .* \('unet'\)"):
        encoder_settings(tmp_path / "mim.pt", "segresnet")
    with pytest.raises(ValueError, match=r"architecture='vitseg' differs from the network pretrained"):
        encoder_settings(tmp_path / "mim.pt", "vitseg")
    with pytest.raises(ValueError, match=r"holds monai_mae.networks.mae.MAEViT; pretrain with .*mim_cnn.json"):
        encoder_settings(tmp_path / "mae.pt", "unet")
    assert architecture_for(tmp_path / "mae.pt", default="vitseg", scratch="unet") == "vitseg"
    assert architecture_for("", default="vitseg", scratch="unet") == "unet"  # from scratch: the best scratch network
    assert architecture_for("", default="vitseg") == "vitseg"
    # an MAE file names the ViT network its pretraining was meant for (mae_pretrain's finetune_architecture)
    mae = MAEViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_heads=2)
    save_model(mae, tmp_path / "for_unetr.pt", run={"finetune_architecture": "unetr"})
    assert architecture_for(tmp_path / "for_unetr.pt", default="vitseg") == "unetr"
    save_model(mae, tmp_path / "odd.pt", run={"finetune_architecture": "unet"})  # not a ViT network: ignored
    assert architecture_for(tmp_path / "odd.pt", default="vitseg") == "vitseg"
    recorded = encoder_settings(tmp_path / "mim.pt", "unet")
    with pytest.raises(ValueError, match=r"channels=\[8, 16\] \(given\) vs \[4, 8\]"):
        segmentation_network("unet", 1, 3, 16, encoder=recorded, options={"channels": [8, 16]})
    with pytest.raises(ValueError, match=r"encoder settings \['hidden_size'\] are for a ViT encoder"):
        encoder_settings("", "unet", given={"hidden_size": 192})
    agreeing = segmentation_network("unet", 1, 3, 16, encoder=recorded, options={"channels": (4, 8)})
    assert agreeing.network_spec["channels"] == [4, 8]


def test_cnn_optimizer_groups_and_freezing():
    net = segmentation_network("unet", 1, 3, 16, options=SMALL["unet"])
    groups = layerwise_lr_groups(net, 1e-3, 0.05, layer_decay=1.0)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and {g["lr"] for g in groups} == {1e-3}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="layer_decay=0.75 and encoder_lr_scale=1.0 need a ViT encoder"):
        layerwise_lr_groups(net, 1e-3, 0.05, layer_decay=0.75)
    with pytest.raises(ValueError, match="encoder_lr_scale=0.3 lowers the rate of pretrained weights, but no masked"):
        layerwise_lr_groups(net, 1e-3, 0.05, layer_decay=1.0, encoder_lr_scale=0.3)  # from scratch: nothing loaded
    with pytest.raises(ValueError, match="freeze_encoder_epochs=2 needs a ViT encoder"):
        FreezeEncoder(net, 2)
    FreezeEncoder(net, 0).attach(Engine(lambda e, b: None))  # no freezing: nothing to find


def test_every_architecture_is_buildable_by_name():
    assert set(CNN_ARCHITECTURES) < set(ARCHITECTURES)
    for architecture in CNN_ARCHITECTURES:
        net = segmentation_network(architecture, 1, 2, 16, options=SMALL[architecture])
        assert net(torch.rand(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)

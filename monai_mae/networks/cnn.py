"""Convolutional segmentation networks by name: MONAI's ``UNet``, ``DynUNet`` (planned as nnU-Net would) and
``SegResNet``, built so that a model file can describe them.

These are the networks a user trains from scratch when no pretraining is involved; the package builds them
for two jobs: as the fine-tuning network (``architecture="unet"`` etc. in the ``mae_finetune`` bundle), and
as the body of a :class:`~monai_mae.networks.mim.MaskedImageModel` that pretrains the same network by
masked-image modelling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from monai.networks.nets import DynUNet, SegResNet, UNet
from monai.utils import ensure_tuple_rep, look_up_option

__all__ = ["CNN_ARCHITECTURES", "CNN_DEFAULTS", "cnn_network", "nnunet_kernels_strides", "as_lists"]

#: Convolutional architectures, by the name used in ``architecture`` settings.
CNN_ARCHITECTURES = ("unet", "dynunet", "segresnet")

#: Constructor arguments of each architecture (besides channels and ``spatial_dims``) when none are given.
#: ``unet``: MONAI's residual U-Net, 16-32-64-128 channels, 2 residual units per level (1.2 M weights in 3D).
#: ``dynunet``: nnU-Net's plan (:func:`nnunet_kernels_strides` from the crop and the voxel spacing; 32 filters
#: doubling to at most 320, instance norm, leaky ReLU, no deep supervision).
#: ``segresnet``: MONAI's defaults (16 initial filters, 1-2-2-4 down blocks).
CNN_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2, "norm": "instance"},
    "dynunet": {"base_filters": 32, "max_filters": 320, "norm_name": "instance", "res_block": False},
    "segresnet": {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": None},
}
_TARGETS = {"unet": UNet, "dynunet": DynUNet, "segresnet": SegResNet}
# settings that plan a DynUNet and are not constructor arguments
_DYNUNET_PLAN = ("base_filters", "max_filters", "img_size", "spacing")


def nnunet_kernels_strides(
    img_size: Sequence[int] | int,
    spacing: Sequence[float] | float | None = None,
    spatial_dims: int = 3,
    min_size: int = 4,
    max_stages: int = 6,
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides of a U-Net for a crop of ``img_size`` voxels, following nnU-Net's planning rules.

    At every stage an axis is halved while its feature map stays at least ``2 * min_size`` voxels and its
    voxel spacing is at most twice the finest one (so anisotropic volumes are first downsampled in-plane);
    its kernel is 3 once its spacing is within twice the finest one, else 1. Stage 0 has stride 1.

    Args:
        img_size: the training crop, e.g. ``(96, 96, 96)``.
        spacing: voxel size in mm (None: isotropic).
        spatial_dims: 2 or 3.
        min_size: the smallest feature-map side at the bottleneck. Defaults to 4.
        max_stages: at most this many stages including the first. Defaults to 6.

    Returns:
        ``(kernels, strides)``, one ``[k, ...]`` / ``[s, ...]`` list per stage.

    Raises:
        ValueError: for a crop side below ``min_size`` or a non-positive spacing.

    Examples::

        >>> nnunet_kernels_strides((48, 48, 48))[1]
        [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
        >>> nnunet_kernels_strides((64, 64, 16), spacing=(0.8, 0.8, 3.0))  # in-plane first, 1-wide kernel in z
        ([[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]])
    """
    sizes = [int(s) for s in ensure_tuple_rep(img_size, spatial_dims)]
    spacings = [float(s) for s in ensure_tuple_rep(1.0 if spacing is None else spacing, spatial_dims)]
    if min(sizes) < min_size:
        raise ValueError(f"img_size {tuple(sizes)} has a side below min_size={min_size}.")
    if min(spacings) <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacings)}.")
    kernels = [[3 if s <= 2 * min(spacings) else 1 for s in spacings]]
    strides = [[1] * spatial_dims]
    while len(strides) < max_stages:
        finest = min(spacings)
        stride = [2 if size >= 2 * min_size and sp <= 2 * finest else 1 for size, sp in zip(sizes, spacings)]
        if not any(s == 2 for s in stride):
            break
        sizes = [size // s for size, s in zip(sizes, stride)]
        spacings = [sp * s for sp, s in zip(spacings, stride)]
        strides.append(stride)
        kernels.append([3 if sp <= 2 * min(spacings) else 1 for sp in spacings])
    return kernels, strides


def as_lists(value: Any) -> Any:
    """``value`` with every tuple turned into a list, recursively (the form a model file and a JSON config hold)."""
    if isinstance(value, Mapping):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


def cnn_network(
    architecture: str,
    in_channels: int,
    out_channels: int,
    spatial_dims: int = 3,
    img_size: Sequence[int] | int | None = None,
    spacing: Sequence[float] | float | None = None,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build one of :data:`CNN_ARCHITECTURES` and record its constructor arguments in ``network.network_spec``.

    Args:
        architecture: ``"unet"``, ``"dynunet"`` or ``"segresnet"``.
        in_channels, out_channels, spatial_dims: as for MONAI's classes.
        img_size: the training crop (``dynunet`` plans its stages from it; the others ignore it).
        spacing: voxel size in mm for the ``dynunet`` plan (None: isotropic).
        options: constructor arguments layered on :data:`CNN_DEFAULTS` (``dynunet`` also takes ``base_filters``
            and ``max_filters``, or ``kernel_size`` / ``strides`` / ``filters`` directly); None values are left out.

    Returns:
        The network; ``network.network_spec`` is ``{"_target_": "monai.networks.nets.<Class>", **arguments}``,
        which :func:`~monai_mae.model_file.build_network` rebuilds.

    Raises:
        ValueError: for an unknown architecture, ``dynunet`` without ``img_size`` (and no explicit strides), or
            arguments the class rejects (the message names the architecture).

    Examples::

        >>> net = cnn_network("unet", 1, 3, img_size=32)
        >>> net.network_spec["_target_"], net.network_spec["channels"]
        ('monai.networks.nets.UNet', [16, 32, 64, 128])
    """
    architecture = look_up_option(architecture, CNN_ARCHITECTURES)
    given = {k: v for k, v in dict(options or {}).items() if v is not None}
    args: dict[str, Any] = {**CNN_DEFAULTS[architecture], **given}
    if architecture == "dynunet":
        args = _plan_dynunet(args, img_size, spacing, spatial_dims)
    args = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels, **as_lists(args)}
    cls = _TARGETS[architecture]
    try:
        network = cls(**args)
    except TypeError as err:
        raise ValueError(f"invalid options for architecture {architecture!r} ({cls.__name__}): {err}.") from err
    network.network_spec = {"_target_": f"monai.networks.nets.{cls.__name__}", **args}
    return network


def _plan_dynunet(
    args: dict[str, Any], img_size: Sequence[int] | int | None, spacing: Any, spatial_dims: int
) -> dict[str, Any]:
    """DynUNet's kernels, strides and filters from the crop and spacing, unless given explicitly."""
    base, top = int(args["base_filters"]), int(args["max_filters"])
    args = {k: v for k, v in args.items() if k not in _DYNUNET_PLAN}
    if "strides" not in args or "kernel_size" not in args:
        if img_size is None:
            raise ValueError("architecture 'dynunet' needs img_size (the training crop) to plan its stages.")
        kernels, strides = nnunet_kernels_strides(img_size, spacing, spatial_dims)
        args.setdefault("kernel_size", kernels)
        args.setdefault("strides", strides)
    args.setdefault(
        "upsample_kernel_size", [list(s) if isinstance(s, (list, tuple)) else s for s in args["strides"][1:]]
    )
    args.setdefault("filters", [min(base * 2**i, top) for i in range(len(args["strides"]))])
    return args

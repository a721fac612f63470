"""Does MAE self-pretraining help UNETR segmentation when labels are scarce?

On the synthetic CT phantoms of :mod:`monai_mae.data.synthetic`:

1. pretrain an MAE (:class:`monai_mae.MAEViT`, 12 encoder layers, patch 16, qkv bias) on a pool of
   unlabeled phantoms with MONAI's ``SupervisedTrainer`` and the package's
   ``MAEPrepareBatch`` / ``MaskedReconstructionLoss`` / ``build_optimizer`` (once, seed 0);
2. for each number of labeled training volumes ``n`` and each seed, draw the same ``n`` volumes
   for both arms and fine-tune MONAI's ``UNETR`` with the same step budget
   (``DiceCELoss``, AdamW, warm-up + cosine schedule):

   * *scratch*: random initialisation, one learning rate for every layer;
   * *MAE-pretrained*: encoder loaded with :func:`monai_mae.engines.finetune.load_pretrained`,
     its residual stream rescaled to a fresh UNETR's size (``residual_scale="auto"``; the encoder's
     function is unchanged), optional layer-wise learning-rate decay (``--layer-decay``, default
     1.0: the same optimizer as from scratch);

3. evaluate the final weights (no model selection) on held-out labeled phantoms that neither
   pretraining nor fine-tuning saw: sliding-window inference (overlap 0.5), Dice of the 5 organs.

The phantoms use the anatomical layout (liver right, spleen left at a similar HU, a posterior
kidney, the spine along z, the lung on top, each jittered per phantom): with randomly placed organs,
a masked 16^3 patch cannot be predicted from its neighbours, so the MAE has nothing to learn about
organs (its loss stopped improving after 40 of 200 epochs in our runs).

Prints a markdown table (mean +- sample std over seeds, and the mean paired difference) and writes
``{out_dir}/pretrain_benefit_<architecture>.{md,json,png}`` (the PNG is drawn with matplotlib). Generated data and the
pretrained MAE are kept in ``{work_dir}`` and reused by a later run with the same settings; so is
every finished fine-tune (``runs_<settings>.jsonl``), so an interrupted run continues where it stopped.

Presets (``--preset``; any size flag overrides the preset):

* ``cpu`` (default): about 1 to 1.5 hours on a 2-core CPU: 64x64x48 phantoms at
  2.25 x 2.25 x 2.67 mm (the default field of view at coarser voxels), 48^3 crops, ViT width 192 /
  MLP 768 / 4 heads / 12 layers, UNETR feature size 16; MAE (normalised-pixel loss) on 96
  unlabeled phantoms (250 epochs, 6000 steps);
  300 fine-tuning steps with 2, 4 and 8 labeled phantoms over 3 seeds; 6 held-out phantoms.
  The script sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set): on a machine shared with other jobs,
  two spin-waiting OpenMP threads ran 4x slower than one in our measurements.
* ``gpu``: the published setting's sizes: ViT-B (768 / 3072 / 12 heads), feature size 16, 96^3
  crops of 128x128x96 phantoms at 1.5 x 1.5 x 2 mm, hundreds of pretraining epochs on 64 unlabeled
  phantoms, 2 / 4 / 8 / 16 labeled phantoms over 5 seeds, bf16 autocast on CUDA.
* ``quick`` (``--quick``): a smoke run of every code path in under 2 minutes (tiny sizes, 1 seed).

Examples::

    python benchmarks/pretrain_benefit.py --quick
    nohup python benchmarks/pretrain_benefit.py > /tmp/pretrain_benefit.log 2>&1 &
    python benchmarks/pretrain_benefit.py --preset gpu --device cuda
    python benchmarks/pretrain_benefit.py --labeled-sizes 2 8 --seeds 0 1 2 3 4 --finetune-steps 200
    python benchmarks/pretrain_benefit.py --architecture vitseg --conv-skips   # the UNETR-like hybrid ViTSeg
    python benchmarks/pretrain_benefit.py --step-times 5 --threads 1           # s/step and parameters per network

``--conv-skips`` builds the ViTSeg arms with ``conv_skips=True`` (a convolutional stem whose full- and
half-resolution features join the last two decoder stages); its reports are written as
``pretrain_benefit_vitseg_conv_skips.*`` and its fine-tunes cached under their own key.

``--setting realistic --target-scanner 0.7 35 20`` labels from one scanner and pretrains on, and tests on, another:
the unlabeled pool and the held-out phantoms are drawn with contrast 0.7, 35 HU noise and 20 HU bias, the labeled
pool with the defaults; ``--no-pretrain-on-target`` is the control, pretrained on the labeled pool's scanner.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: on a CPU shared with other jobs, OpenMP threads spinning while they wait
# for a descheduled sibling made the training steps several times slower; passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import monai  # noqa: E402
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import AsDiscreted, Compose, EnsureTyped, LoadImaged, Orientationd, ScaleIntensityRanged
from monai.utils import set_determinism

from monai_mae import MAEViT, MaskedReconstructionLoss
from monai_mae.data import ensure_dataset, get_dataset, get_pretrain_transforms, load_datalist
from monai_mae.data.realistic import REALISTIC_ORGANS, check_realistic_options, realistic_spacing
from monai_mae.data.synthetic import LAYOUTS, ORGAN_TYPES
from monai_mae.engines import (
    GradientClipping,
    MAEPrepareBatch,
    NonFiniteLossGuard,
    atomic_save,
    build_optimizer,
    keep_freed_memory,
)
from monai_mae.engines.finetune import FreezeEncoder, layerwise_lr_groups, load_pretrained
from monai_mae.networks.cnn import CNN_ARCHITECTURES, cnn_network
from monai_mae.networks.mim import MASK_FILLS, MaskedImageModel
from monai_mae.networks.vitseg import ViTSeg

__all__ = [
    "BenefitConfig",
    "PRESETS",
    "prepare_data",
    "pretrain_mae",
    "finetune",
    "evaluate_dice",
    "summarise",
    "format_markdown",
    "draw_chart",
    "combine",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
ARMS = ("scratch", "pretrained")
CNNS = CNN_ARCHITECTURES  # pretrained by masked-image modelling (MaskedImageModel) instead of an MAE
ARCHITECTURES = ("unetr", "vitseg", *CNNS)
ARCH_NAMES = {"unetr": "UNETR", "vitseg": "ViTSeg", "unet": "UNet", "dynunet": "DynUNet", "segresnet": "SegResNet"}
CONV_SKIPS_NAME = "ViTSeg+skips"  # ViTSeg(conv_skips=True), the UNETR-like hybrid
CT_WINDOW = (-175.0, 250.0)
UNETR_PATCH = 16  # UNETR's fixed patch size
logger = logging.getLogger("pretrain_benefit")


# settings that only the MAE depends on (the rest of its key, data and ViT shape, is shared with UNETR)
_MAE_ONLY = ("num_unlabeled", "mae_cls_token", "decoder_hidden_size", "decoder_mlp_dim", "decoder_num_layers", "decoder_num_heads",
             "masking_ratio", "norm_pix_loss", "pretrain_epochs", "pretrain_batch", "pretrain_samples", "pretrain_lr",
             "pretrain_warmup_epochs", "visible_loss_weight", "mask_fill", "mask_patch", "pretrain_on_target")  # fmt: skip


# ViT settings that a convolutional network (and its masked-image pretraining) ignores
_VIT_ONLY = (
    "hidden_size",
    "mlp_dim",
    "num_heads",
    "num_layers",
    "mae_cls_token",
    "decoder_hidden_size",
    "decoder_mlp_dim",
    "decoder_num_layers",
    "decoder_num_heads",
    "feature_size",
)


# settings added after runs had been cached: left out of the cache keys while off (0), so the keys of
# the MAEs and fine-tunes made before they existed stay valid
_ADDED_LATER = (
    "drop_path_rate",
    "visible_loss_weight",
    "intensity_shift",
    "intensity_scale",
    "style",
    "curve_steps",
    "conv_skips",
    "mask_fill",
    "mask_patch",
    "target_scanner",
    "pretrain_on_target",
)
STYLES = ("simple", "realistic")
#: ``make_realistic_phantom``'s knobs that ``BenefitConfig.target_scanner`` sets, in its order
SCANNER_KNOBS = ("contrast", "noise_hu", "bias_hu")


_OFF = {
    "style": "simple",
    "curve_steps": (),
    "conv_skips": False,
    "mask_fill": "zero",
    "target_scanner": (),
    "pretrain_on_target": True,
}  # the value of a later setting that means "as before it existed" (default: 0)


def _without_unset_later_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in _ADDED_LATER or v != _OFF.get(k, 0)}


@dataclass(frozen=True)
class BenefitConfig:
    """Every setting of one benchmark run.

    Attributes:
        phantom_shape, phantom_spacing: size (voxels) and voxel size (mm) of the generated phantoms;
            the transforms keep this native spacing.
        style: ``"simple"`` (the original phantoms) or ``"realistic"`` (an upper-abdomen CT with body wall, table,
            bowel, 9 labelled structures, partial volume, correlated noise and bias: docs/phantoms.md);
            ``--setting realistic`` selects :data:`REALISTIC_CHANGES`.
        layout, num_organs: organ placement and number of organs of the phantoms
            (:func:`monai_mae.data.make_phantom`); ``"anatomical"`` keeps a patient-like arrangement,
            which is what an MAE can learn from unlabeled volumes (with ``"random"`` placement nothing
            but intensity tells the organs apart).
        num_unlabeled: phantoms for MAE pretraining (their labels are never read).
        num_labeled_pool: labeled phantoms the fine-tuning subsets are drawn from.
        num_test: held-out labeled phantoms for the Dice evaluation.
        architecture: the segmentation network, ``"unetr"`` (MONAI's UNETR, patch 16, 12 layers) or
            ``"vitseg"`` (:class:`monai_mae.networks.vitseg.ViTSeg`: pure ViT, light decoder).
        roi: cubic crop side (a multiple of ``patch``).
        patch: cubic patch side of the MAE and the segmentation encoder (UNETR: 16).
        hidden_size, mlp_dim, num_heads, num_layers: ViT encoder (UNETR: 12 layers).
        mae_cls_token: whether the MAE has a class token (MONAI's layout; ViTSeg has none).
        feature_size: UNETR's convolutional feature size.
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: MAE decoder.
        masking_ratio, norm_pix_loss, visible_loss_weight: MAE objective (``visible_loss_weight``:
            :class:`~monai_mae.losses.MaskedReconstructionLoss`'s ``visible_weight``).
        pretrain_epochs, pretrain_batch, pretrain_samples, pretrain_lr, pretrain_warmup_epochs: MAE
            training (batch = volumes per step; samples = crops per volume).
        finetune_steps: optimizer steps per fine-tune (the same budget for both arms and every ``n``).
        finetune_batch, finetune_samples: volumes per step and crops per volume.
        finetune_lr, layer_decay, encoder_lr_scale, warmup_fraction, freeze_encoder_epochs: fine-tuning
            optimizer (``layer_decay`` and ``encoder_lr_scale``, the encoder's lr relative to the
            decoder's, apply to the pretrained arm only; scratch uses 1.0 for both).
        intensity_shift, intensity_scale: fine-tuning augmentation of both arms, per crop:
            ``RandScaleIntensityd(factors=intensity_scale)`` then ``RandShiftIntensityd(offsets=intensity_shift)``
            on the windowed [0, 1] image (:func:`monai_mae.data.get_pretrain_transforms`' own jitter, as the
            ``mae_finetune`` bundle's chain); 0 = off.
        drop_path_rate: ViTSeg's stochastic depth while fine-tuning a pretrained encoder (pretrained
            arm only; scratch uses 0).
        conv_skips: ViTSeg with convolutional skip connections (``ViTSeg(conv_skips=True)``, both arms); the MAE
            is the same as without.
        mask_fill: what replaces the masked voxels in the masked-image model of a CNN (``MaskedImageModel``'s
            ``mask_fill``): ``"zero"`` (the windowed image's minimum, the value of air), ``"mean"`` (each
            image's mean over its visible voxels) or ``"learned"``.
        mask_patch: side of the masked cubes of a CNN's masked-image model (0: ``patch``); the scratch arm ignores it.
        target_scanner: ``(contrast, noise_hu, bias_hu)`` of a second scanner (realistic style only;
            :func:`monai_mae.data.realistic.make_realistic_phantom`'s knobs): the unlabeled pool and the held-out test
            phantoms are drawn with them, the labeled pool with the defaults, as when a user labels scans from one
            scanner and pretrains on, and segments, the unlabeled scans of another. Empty: one scanner for all.
        pretrain_on_target: with ``target_scanner``, draw the unlabeled pool with it (True) or with the labeled
            pool's default knobs (False: the control, the masked-image model of the one-scanner benchmark).
        residual_scale: ``load_pretrained``'s rescaling of the transferred encoder's residual stream
            (``"auto"``: to a fresh UNETR's size; 1.0: weights as pretrained); pretrained arm only.
        labeled_sizes, seeds: the grid of fine-tunes.
        sw_batch_size: sliding-window batch at evaluation.
        curve_steps: fine-tuning steps after which the held-out Dice is also measured (a learning curve in each
            run's ``curve``: step, mean training loss since the previous point, Dice); empty = final weights only.
    """

    phantom_shape: tuple[int, int, int] = (64, 64, 48)
    phantom_spacing: tuple[float, float, float] = (2.25, 2.25, 2.67)
    layout: str = "anatomical"
    style: str = "simple"
    num_organs: int = 5
    num_unlabeled: int = 96
    num_labeled_pool: int = 8
    num_test: int = 6
    architecture: str = "unetr"
    roi: int = 48
    patch: int = 16
    hidden_size: int = 192
    mlp_dim: int = 768
    num_heads: int = 4
    num_layers: int = 12
    mae_cls_token: bool = True
    feature_size: int = 16
    decoder_hidden_size: int = 128
    decoder_mlp_dim: int = 512
    decoder_num_layers: int = 2
    decoder_num_heads: int = 4
    masking_ratio: float = 0.75
    norm_pix_loss: bool = True
    visible_loss_weight: float = 0.0
    pretrain_epochs: int = 250
    pretrain_batch: int = 4
    pretrain_samples: int = 2
    pretrain_lr: float = 1.5e-3
    pretrain_warmup_epochs: int = 20
    finetune_steps: int = 300
    finetune_batch: int = 1
    finetune_samples: int = 2
    finetune_lr: float = 1e-3
    layer_decay: float = 1.0
    intensity_shift: float = 0.0
    intensity_scale: float = 0.0
    encoder_lr_scale: float = 1.0
    residual_scale: float | str = "auto"
    warmup_fraction: float = 0.1
    freeze_encoder_epochs: int = 0
    drop_path_rate: float = 0.0
    labeled_sizes: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    sw_batch_size: int = 2
    curve_steps: tuple[int, ...] = ()
    conv_skips: bool = False
    mask_fill: str = "zero"
    mask_patch: int = 0
    target_scanner: tuple[float, ...] = ()
    pretrain_on_target: bool = True

    @property
    def masking_patch(self) -> int:
        """The side of the masked cubes: ``mask_patch``, or ``patch`` when it is 0."""
        return self.mask_patch or self.patch

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}.")
        if self.architecture == "unetr" and (self.patch, self.num_layers) != (UNETR_PATCH, 12):
            raise ValueError(
                f"UNETR fixes patch {UNETR_PATCH} and 12 layers, got patch {self.patch}, {self.num_layers} layers."
            )
        if self.roi % self.patch:
            raise ValueError(f"roi must be a multiple of the patch size {self.patch}, got {self.roi}.")
        if not 0 <= self.drop_path_rate < 1 or (self.drop_path_rate and self.architecture != "vitseg"):
            raise ValueError(
                f"drop_path_rate must be in [0, 1) and needs architecture 'vitseg', got {self.drop_path_rate}."
            )
        if not 0 < self.encoder_lr_scale <= 1:
            raise ValueError(f"encoder_lr_scale must be in (0, 1], got {self.encoder_lr_scale}.")
        if self.conv_skips and self.architecture != "vitseg":
            raise ValueError(f"conv_skips needs architecture 'vitseg', got {self.architecture!r}.")
        if self.mask_fill not in MASK_FILLS:
            raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}.")
        if self.mask_fill != "zero" and self.architecture not in CNNS:
            raise ValueError(
                f"mask_fill {self.mask_fill!r} needs a CNN architecture {CNNS}, got {self.architecture!r}."
            )
        if self.mask_patch and (self.architecture not in CNNS or self.mask_patch < 0 or self.roi % self.mask_patch):
            raise ValueError(
                f"mask_patch needs a CNN architecture {CNNS} and must divide roi={self.roi}, got "
                f"{self.mask_patch} for {self.architecture!r}."
            )
        if self.target_scanner:
            if self.style != "realistic" or len(self.target_scanner) != 3:
                raise ValueError(
                    "target_scanner needs the realistic style and 3 values (contrast, noise_hu, bias_hu), got "
                    f"{self.target_scanner!r} with style {self.style!r}."
                )
            check_realistic_options(self.num_organs, *self.target_scanner)
        elif not self.pretrain_on_target:
            raise ValueError("pretrain_on_target=False needs a target_scanner: there is only one scanner.")
        if max(self.labeled_sizes) > self.num_labeled_pool:
            raise ValueError(
                f"labeled_sizes {self.labeled_sizes} ask for more volumes than num_labeled_pool={self.num_labeled_pool}."
            )
        if min(self.labeled_sizes) < 1 or not self.seeds:
            raise ValueError(f"labeled_sizes must be >= 1 and seeds non-empty, got {self.labeled_sizes}, {self.seeds}.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}.")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}.")
        if self.style == "realistic" and self.layout != "anatomical":
            raise ValueError(f"the realistic style has the anatomical layout only, got layout={self.layout!r}.")
        if not 1 <= self.num_organs <= len(self.organ_names(all_organs=True)):
            raise ValueError(
                f"num_organs must be in 1..{len(self.organ_names(all_organs=True))}, got {self.num_organs}."
            )
        if not (
            self.residual_scale == "auto" or (isinstance(self.residual_scale, (int, float)) and self.residual_scale > 0)
        ):
            raise ValueError(f"residual_scale must be 'auto' or a positive number, got {self.residual_scale!r}.")
        if not (self.intensity_shift >= 0 and 0 <= self.intensity_scale < 1):
            raise ValueError(
                f"intensity_shift must be >= 0 and intensity_scale in [0, 1), got {self.intensity_shift}, {self.intensity_scale}."
            )
        if not self.visible_loss_weight >= 0:
            raise ValueError(f"visible_loss_weight must be >= 0, got {self.visible_loss_weight}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")

    def organ_names(self, all_organs: bool = False) -> list[str]:
        """Names of the labels 1..num_organs (of every label the style has with ``all_organs``)."""
        names = list(REALISTIC_ORGANS) if self.style == "realistic" else [organ[0] for organ in ORGAN_TYPES]
        return names if all_organs else names[: self.num_organs]

    def pretrain_key(self) -> str:
        """A short hash of the settings that determine the pretrained MAE (to reuse it safely)."""
        names = ("phantom_shape", "phantom_spacing", "layout", "style", "num_organs", "roi", "hidden_size", "mlp_dim", "num_heads",
                 "patch", "num_layers", "target_scanner", *_MAE_ONLY)  # fmt: skip
        if self.architecture in CNNS:  # a masked-image model of the network itself; the ViT sizes do not matter
            names = ("architecture", *(n for n in names if n not in _VIT_ONLY))
        if not self.pretrain_on_target:  # the unlabeled pool is the one-scanner benchmark's: so is the model
            names = tuple(n for n in names if n not in ("target_scanner", "pretrain_on_target"))
        text = json.dumps(_without_unset_later_settings({n: getattr(self, n) for n in names}), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


PRESETS: dict[str, BenefitConfig] = {
    "cpu": BenefitConfig(),
    "gpu": BenefitConfig(
        phantom_shape=(128, 128, 96),
        phantom_spacing=(1.5, 1.5, 2.0),
        num_unlabeled=64,
        num_labeled_pool=16,
        num_test=8,
        roi=96,
        hidden_size=768,
        mlp_dim=3072,
        num_heads=12,
        feature_size=16,
        decoder_hidden_size=512,
        decoder_mlp_dim=2048,
        decoder_num_layers=8,
        decoder_num_heads=16,
        pretrain_epochs=400,
        pretrain_batch=4,
        pretrain_samples=2,
        pretrain_lr=1.5e-4,
        pretrain_warmup_epochs=40,
        finetune_steps=3000,
        finetune_batch=1,
        finetune_samples=4,
        finetune_lr=3e-4,
        labeled_sizes=(2, 4, 8, 16),
        seeds=(0, 1, 2, 3, 4),
        sw_batch_size=4,
    ),  # fmt: skip
    "quick": BenefitConfig(
        phantom_shape=(40, 40, 32),
        phantom_spacing=(1.5, 1.5, 2.0),
        num_unlabeled=3,
        num_labeled_pool=2,
        num_test=1,
        roi=32,
        hidden_size=48,
        mlp_dim=96,
        num_heads=4,
        feature_size=4,
        decoder_hidden_size=32,
        decoder_mlp_dim=64,
        decoder_num_layers=1,
        decoder_num_heads=4,
        pretrain_epochs=2,
        pretrain_batch=2,
        pretrain_samples=1,
        pretrain_warmup_epochs=1,
        finetune_steps=2,
        finetune_samples=1,
        labeled_sizes=(2,),
        seeds=(0,),
    ),  # fmt: skip
}

#: What ``--architecture vitseg`` changes in each preset: the long-sequence regime (8^3 patches; 216 tokens
#: per 48^3 crop on CPU), an MAE without a class token trained on plain pixels (no per-patch normalisation)
#: of the masked *and* the visible patches (``visible_loss_weight``), at a third of UNETR's MAE lr on CPU,
#: intensity jitter while fine-tuning (both arms), a lower encoder lr for pretrained weights, the encoder
#: loaded as it is (ViTSeg reads only its final normed tokens), and as many fine-tuning steps as fit in
#: about 70% of UNETR's wall-clock time. The MAE objective mattered most: with normalised pixels at lr
#: 1.5e-3 the pretrained ViTSeg lost to scratch under every fine-tuning recipe we tried, and without the
#: visible-patch term its last layer kept too little of each patch's own detail for ViTSeg's light decoder
#: (``docs/pretraining_study.md``, "What this shows").
VITSEG_CHANGES: dict[str, dict[str, Any]] = {
    "cpu": dict(architecture="vitseg", patch=8, num_layers=6, mae_cls_token=False, pretrain_epochs=100,
                norm_pix_loss=False, visible_loss_weight=1.0, pretrain_lr=5e-4, finetune_steps=800, intensity_shift=0.1,
                intensity_scale=0.1, encoder_lr_scale=0.3, residual_scale=1.0),
    "gpu": dict(architecture="vitseg", patch=8, num_layers=12, mae_cls_token=False, norm_pix_loss=False,
                visible_loss_weight=1.0, finetune_steps=6000, intensity_shift=0.1, intensity_scale=0.1,
                encoder_lr_scale=0.3, residual_scale=1.0),
    "quick": dict(architecture="vitseg", patch=8, num_layers=2, mae_cls_token=False, norm_pix_loss=False,
                  visible_loss_weight=1.0, intensity_shift=0.1, intensity_scale=0.1, encoder_lr_scale=0.3, residual_scale=1.0),
}  # fmt: skip


#: What ``--architecture unet|dynunet|segresnet`` changes in each preset: the network is pretrained by masked-image
#: modelling (:class:`monai_mae.networks.mim.MaskedImageModel`: 75% of the 8^3 patches of each crop set to zero, the
#: whole encoder-decoder reconstructs them, loss on the masked patches), then fine-tuned whole (every layer but the
#: output head starts from the pretrained weights) with one learning rate; intensity jitter for both arms, as ViTSeg.
CNN_CHANGES: dict[str, dict[str, Any]] = {
    "cpu": dict(
        patch=8,
        pretrain_epochs=30,
        pretrain_warmup_epochs=3,
        norm_pix_loss=False,
        pretrain_lr=1e-3,
        finetune_steps=800,
        intensity_shift=0.1,
        intensity_scale=0.1,
        residual_scale=1.0,
        labeled_sizes=(1, 2, 4),
        seeds=(0, 1, 2, 3, 4),
    ),
    "gpu": dict(
        patch=16,
        norm_pix_loss=False,
        pretrain_lr=1e-3,
        finetune_steps=6000,
        intensity_shift=0.1,
        intensity_scale=0.1,
        residual_scale=1.0,
    ),
    "quick": dict(patch=8, norm_pix_loss=False, intensity_shift=0.1, intensity_scale=0.1, residual_scale=1.0),
}


#: What ``--setting realistic`` changes in each preset: phantoms that behave like abdominal CT (docs/phantoms.md) at
#: the voxel size of an adult-sized patient (:func:`monai_mae.data.realistic.realistic_spacing`), so each organ is a
#: small part of the volume and of a crop; liver, kidney, bone, lung, spleen, pancreas and stomach labelled.
REALISTIC_CHANGES: dict[str, dict[str, Any]] = {
    "cpu": dict(style="realistic", phantom_shape=(128, 128, 48), phantom_spacing=realistic_spacing((128, 128, 48)),
                num_organs=7),
    "gpu": dict(style="realistic", phantom_shape=(256, 256, 96), phantom_spacing=realistic_spacing((256, 256, 96)),
                num_organs=9),
    "quick": dict(style="realistic", phantom_shape=(48, 48, 32), phantom_spacing=realistic_spacing((48, 48, 32)),
                  num_organs=5),
}  # fmt: skip
SETTINGS = ("phantoms", "realistic")


def preset_config(preset: str, architecture: str, setting: str = "phantoms") -> BenefitConfig:
    """``PRESETS[preset]`` with the changes of ``architecture`` (:data:`VITSEG_CHANGES`, :data:`CNN_CHANGES`) and of
    ``setting`` (``"phantoms"``: none; ``"realistic"``: :data:`REALISTIC_CHANGES`)."""
    cfg = dataclasses.replace(PRESETS[preset], architecture=architecture)
    if setting == "realistic":
        cfg = dataclasses.replace(cfg, **REALISTIC_CHANGES[preset])
    if architecture == "vitseg":
        cfg = dataclasses.replace(cfg, **VITSEG_CHANGES[preset])
    elif architecture in CNNS:
        cfg = dataclasses.replace(cfg, **CNN_CHANGES[preset])
    return cfg


# ------------------------------------------------------------------------------------------ data
def prepare_data(cfg: BenefitConfig, work_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Generate (once) and load the unlabeled pool, the labeled pool and the held-out test set.

    The three sets come from different seeds, so no phantom is in two of them. With ``cfg.target_scanner`` the
    test set (and, with ``cfg.pretrain_on_target``, the unlabeled pool) is drawn with that scanner's knobs; the test
    phantoms have the same anatomy and labels as without (the knobs do not change the anatomy).

    Returns:
        ``(unlabeled, labeled_pool, test)`` datalist entries (absolute paths; ``unlabeled`` without labels).
    """
    geometry = dict(shape=cfg.phantom_shape, spacing=cfg.phantom_spacing, layout=cfg.layout, num_organs=cfg.num_organs,
                    **({"style": "realistic"} if cfg.style == "realistic" else {}))  # fmt: skip
    scanner = dict(zip(SCANNER_KNOBS, cfg.target_scanner))
    unlabeled_knobs = scanner if cfg.pretrain_on_target else {}
    unlabeled_dir, labeled_dir, test_dir = _data_dirs(cfg, work_dir)
    ensure_dataset(
        unlabeled_dir,
        num=cfg.num_unlabeled,
        num_validation=0,
        seed=1000,
        with_labels=False,
        synthetic_if_missing=True,
        **geometry,
        **unlabeled_knobs,
    )
    for folder, knobs in ((labeled_dir, {}), (test_dir, scanner)):  # the same folder twice without a target scanner
        ensure_dataset(
            folder,
            num=cfg.num_labeled_pool + cfg.num_test,
            num_validation=cfg.num_test,
            seed=2000,
            synthetic_if_missing=True,
            **geometry,
            **knobs,
        )
    unlabeled = load_datalist(unlabeled_dir, "training")
    return (
        unlabeled,
        load_datalist(labeled_dir, "training", require_label=True),
        load_datalist(test_dir, "validation", require_label=True),
    )


def _data_dirs(cfg: BenefitConfig, work_dir: Path) -> tuple[Path, Path, Path]:
    """The folders of :func:`prepare_data`: unlabeled pool, labeled pool (its validation split is the one-scanner
    test set) and test set (the labeled pool's folder itself without a target scanner)."""
    tag = "x".join(map(str, cfg.phantom_shape)) + "_" + "x".join(f"{s:g}" for s in cfg.phantom_spacing)
    tag += f"_{cfg.layout}{cfg.num_organs}" + ("_realistic" if cfg.style == "realistic" else "")
    scanner_tag = "".join(f"_{k}{v:g}" for k, v in zip(SCANNER_KNOBS, cfg.target_scanner))
    unlabeled_tag = scanner_tag if cfg.pretrain_on_target else ""
    labeled_name = f"labeled_{cfg.num_labeled_pool}_{cfg.num_test}"
    root = work_dir / f"data_{tag}"
    return (
        root / f"unlabeled_{cfg.num_unlabeled}{unlabeled_tag}",
        root / labeled_name,
        root / f"{labeled_name}{scanner_tag}",
    )


def _train_transforms(cfg: BenefitConfig, num_samples: int, with_label: bool) -> Compose:
    """The package's training transforms (the intensity jitter only when fine-tuning), ending in plain
    tensors (``MetaTensor`` costs ~25% per CPU step)."""
    jitter = dict(intensity_shift=cfg.intensity_shift, intensity_scale=cfg.intensity_scale) if with_label else {}
    chain = get_pretrain_transforms(
        "ct", roi_size=cfg.roi, pixdim=None, a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], num_samples=num_samples,
        with_label=with_label, flip_prob=0.1, train=True, **jitter,
    )  # fmt: skip
    keys = ["image", "label"] if with_label else ["image"]
    return Compose([*chain.transforms, EnsureTyped(keys, track_meta=False)])  # flat, so CacheDataset still caches


def _eval_transforms() -> Compose:
    """Whole volumes at native spacing, CT window: the ``mae_finetune`` bundle's validation chain."""
    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys, ensure_channel_first=True, image_only=True),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ScaleIntensityRanged("image", a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys, track_meta=False),
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------ training
def _quiet_engine_logs() -> None:
    for name in ("ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator"):
        logging.getLogger(name).setLevel(logging.WARNING)


def pretrain_mae(
    cfg: BenefitConfig, unlabeled: list[dict], work_dir: Path, device: torch.device, amp: bool, reuse: bool = True
) -> tuple[Path, dict]:
    """Train an MAE on ``unlabeled`` (or, with ``reuse``, take one trained with the same settings); return its file and log."""
    path = work_dir / f"mae_{cfg.pretrain_key()}" / "model.pt"
    info_path = path.with_name("pretrain.json")
    kind = "masked-image model" if cfg.architecture in CNNS else "MAE"  # for the log lines
    if reuse and path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        logger.info(
            f"reusing the pretrained {kind} {path} ({info['steps']} steps, {info['seconds']:.0f} s when trained)"
        )
        return path, {**info, "reused": True}
    set_determinism(seed=0)
    mae = build_pretrain_network(cfg).to(device)
    dataset = get_dataset(unlabeled, _train_transforms(cfg, cfg.pretrain_samples, with_label=False), cache="cache")
    loader = DataLoader(dataset, batch_size=cfg.pretrain_batch, shuffle=True, num_workers=0, drop_last=True)
    optimizer = build_optimizer(mae, lr=cfg.pretrain_lr, weight_decay=0.05)  # fused AdamW on CUDA and CPU
    steps = cfg.pretrain_epochs * len(loader)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=cfg.pretrain_warmup_epochs * len(loader), t_total=steps)
    trainer = SupervisedTrainer(
        device=device, max_epochs=cfg.pretrain_epochs, train_data_loader=loader, network=mae, optimizer=optimizer,
        loss_function=MaskedReconstructionLoss(cfg.masking_patch, norm_pix_loss=cfg.norm_pix_loss, visible_weight=cfg.visible_loss_weight),
        prepare_batch=MAEPrepareBatch(),
        inferer=SimpleInferer(), amp=amp, amp_kwargs={"dtype": torch.bfloat16}, decollate=False,
        train_handlers=[LrScheduleHandler(scheduler, print_lr=False, epoch_level=False), NonFiniteLossGuard(),
                        GradientClipping(3.0)],
    )  # fmt: skip
    losses: list[float] = []
    epoch_losses: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"].detach()))
    )

    def log_epoch(engine: Any) -> None:
        epoch_losses.append(statistics.fmean(losses[-len(loader) :]))
        if engine.state.epoch % max(1, cfg.pretrain_epochs // 12) == 0 or engine.state.epoch == cfg.pretrain_epochs:
            logger.info(f"  {kind} epoch {engine.state.epoch}/{cfg.pretrain_epochs}: loss {epoch_losses[-1]:.5f} "
                        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip

    trainer.add_event_handler(Events.EPOCH_COMPLETED, log_epoch)
    logger.info(f"pretraining the {kind}: {len(unlabeled)} unlabeled phantoms, {cfg.pretrain_epochs} epochs x {len(loader)} steps "
                f"(batch {cfg.pretrain_batch} volumes x {cfg.pretrain_samples} crops of {cfg.roi}^3)")  # fmt: skip
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    atomic_save(mae.state_dict(), path)
    info = {"steps": steps, "seconds": seconds, "first_epoch_loss": epoch_losses[0], "last_epoch_loss": epoch_losses[-1],
            "epoch_losses": epoch_losses, "settings_key": cfg.pretrain_key()}  # fmt: skip
    info_path.write_text(json.dumps(info, indent=1))
    logger.info(
        f"{kind} pretrained in {seconds / 60:.1f} min: loss {epoch_losses[0]:.5f} -> {epoch_losses[-1]:.5f}; saved {path}"
    )
    return path, {**info, "reused": False}


def build_pretrain_network(cfg: BenefitConfig) -> torch.nn.Module:
    """The self-supervised network: the MAE of the ViT encoder, or a masked-image model of the CNN itself."""
    if cfg.architecture in CNNS:
        return MaskedImageModel(cfg.architecture, 1, cfg.roi, patch_size=cfg.masking_patch, masking_ratio=cfg.masking_ratio,
                                mask_fill=cfg.mask_fill, spacing=cfg.phantom_spacing)  # fmt: skip
    return MAEViT(
        1,
        cfg.roi,
        cfg.patch,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        masking_ratio=cfg.masking_ratio,
        decoder_hidden_size=cfg.decoder_hidden_size,
        decoder_mlp_dim=cfg.decoder_mlp_dim,
        decoder_num_layers=cfg.decoder_num_layers,
        decoder_num_heads=cfg.decoder_num_heads,
        qkv_bias=True,
        cls_token=cfg.mae_cls_token,
    )


def build_network(cfg: BenefitConfig, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """The segmentation network of ``cfg.architecture``, freshly initialised (encoder as the MAE's).

    ``drop_path_rate`` is ViTSeg's stochastic depth (UNETR has none; it must then be 0).
    """
    if cfg.architecture in CNNS:
        if drop_path_rate:
            raise ValueError(f"drop_path_rate={drop_path_rate} needs architecture 'vitseg'.")
        return cnn_network(cfg.architecture, 1, cfg.num_organs + 1, img_size=cfg.roi, spacing=cfg.phantom_spacing)
    if cfg.architecture == "vitseg":
        return ViTSeg(
            1, cfg.num_organs + 1, cfg.roi, patch_size=cfg.patch, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
            num_layers=cfg.num_layers, num_heads=cfg.num_heads, qkv_bias=True, drop_path_rate=drop_path_rate,
            conv_skips=cfg.conv_skips,
        )  # fmt: skip
    if drop_path_rate:
        raise ValueError(f"drop_path_rate={drop_path_rate} needs architecture 'vitseg'; UNETR has no stochastic depth.")
    return UNETR(
        1, cfg.num_organs + 1, (cfg.roi,) * 3, feature_size=cfg.feature_size, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads, qkv_bias=True,
    )  # fmt: skip


def finetune(
    cfg: BenefitConfig,
    train_items: list[dict],
    seed: int,
    ckpt: Path | None,
    device: torch.device,
    amp: bool,
    test_items: list[dict] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Fine-tune ``cfg.architecture`` on ``train_items`` for ``cfg.finetune_steps`` steps (about; whole epochs), from
    ``ckpt`` or scratch; with ``cfg.curve_steps`` and ``test_items``, the held-out Dice at those steps in ``curve``."""
    set_determinism(seed=seed)
    net = build_network(cfg, drop_path_rate=cfg.drop_path_rate if ckpt is not None else 0.0)
    load_pretrained(net, ckpt if ckpt is not None else "", residual_scale=cfg.residual_scale)
    net = net.to(device)
    dataset = get_dataset(train_items, _train_transforms(cfg, cfg.finetune_samples, with_label=True), cache="cache")
    loader = DataLoader(dataset, batch_size=min(cfg.finetune_batch, len(train_items)), shuffle=True, num_workers=0)
    epochs = max(1, math.ceil(cfg.finetune_steps / len(loader)))
    steps = epochs * len(loader)
    layer_decay, encoder_scale = (cfg.layer_decay, cfg.encoder_lr_scale) if ckpt is not None else (1.0, 1.0)
    groups = layerwise_lr_groups(net, cfg.finetune_lr, 0.05, layer_decay, encoder_lr_scale=encoder_scale)
    optimizer = build_optimizer(groups, lr=cfg.finetune_lr, betas=(0.9, 0.999))
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=int(cfg.warmup_fraction * steps), t_total=steps)
    handlers = [LrScheduleHandler(scheduler, print_lr=False, epoch_level=False), NonFiniteLossGuard()]
    if ckpt is not None and cfg.freeze_encoder_epochs:
        handlers.append(FreezeEncoder(net, cfg.freeze_encoder_epochs))
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=loader, network=net, optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True), inferer=SimpleInferer(), amp=amp,
        amp_kwargs={"dtype": torch.bfloat16}, decollate=False, train_handlers=handlers,
    )  # fmt: skip
    losses: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"].detach()))
    )

    def log_progress(engine: Any) -> None:
        recent = statistics.fmean(losses[-max(1, steps // 10) :])
        logger.info(
            f"    step {engine.state.iteration}/{steps}: loss {recent:.3f} ({time.perf_counter() - start:.0f} s)"
        )

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, steps // 4)), log_progress)
    curve: list[dict] = []

    def curve_point(engine: Any) -> None:
        done = engine.state.iteration
        if done in cfg.curve_steps and test_items:
            since = curve[-1]["step"] if curve else 0
            evaluation_start = time.perf_counter()
            net.eval()
            dice = evaluate_dice(cfg, net, test_items, device, amp)["dice"]
            net.train()
            curve.append(
                {
                    "step": done,
                    "loss": statistics.fmean(losses[since:done]),
                    "dice": dice,
                    "seconds": time.perf_counter() - evaluation_start,
                }
            )
            logger.info(f"    curve: step {done}: loss {curve[-1]['loss']:.3f}, held-out Dice {dice:.3f}")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, curve_point)
    start = time.perf_counter()
    trainer.run()
    tail = losses[-max(1, len(losses) // 10) :]
    evaluation = sum(point["seconds"] for point in curve)  # the curve's evaluations are not training time
    info = {"steps": steps, "epochs": epochs, "seconds": time.perf_counter() - start - evaluation, "first_loss": losses[0],
            "final_loss": statistics.fmean(tail)}  # fmt: skip
    return net, {**info, "curve": curve} if curve else info


def evaluate_dice(
    cfg: BenefitConfig, net: torch.nn.Module, test_items: list[dict], device: torch.device, amp: bool
) -> dict:
    """Sliding-window Dice of the final weights on the held-out phantoms: mean over organs, and per organ."""
    loader = DataLoader(get_dataset(test_items, _eval_transforms(), cache="none"), batch_size=1, num_workers=0)
    names = cfg.organ_names()  # label k is names[k - 1]
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=loader, network=net, amp=amp, amp_kwargs={"dtype": torch.bfloat16},
        inferer=SlidingWindowInferer(cfg.roi, sw_batch_size=cfg.sw_batch_size, overlap=0.5, mode="gaussian"),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=cfg.num_organs + 1),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"per_class": MeanDice(include_background=False, reduction="mean_batch", return_with_label=names,
                                                  output_transform=from_engine(["pred", "label"]))},
    )  # fmt: skip
    evaluator.run()
    metrics = evaluator.state.metrics
    return {"dice": float(metrics["dice"]), "per_class": {n: float(metrics[n]) for n in names}}


# ------------------------------------------------------------------------------------------ report
def network_label(config: BenefitConfig | dict[str, Any]) -> str:
    """The network's name in reports and charts: ``ARCH_NAMES`` of the architecture, :data:`CONV_SKIPS_NAME` for
    ViTSeg with ``conv_skips``; ``config`` is a :class:`BenefitConfig` or a report's ``"config"``."""
    values = asdict(config) if isinstance(config, BenefitConfig) else config
    architecture = values.get("architecture", "unetr")
    return CONV_SKIPS_NAME if architecture == "vitseg" and values.get("conv_skips") else ARCH_NAMES[architecture]


def phantoms_label(config: BenefitConfig | dict[str, Any]) -> str:
    """``"realistic phantoms"`` or ``"phantoms"``: which data a report's Dice was measured on (chart titles)."""
    values = asdict(config) if isinstance(config, BenefitConfig) else config
    return "realistic phantoms" if values.get("style") == "realistic" else "phantoms"


def scanner_knobs(cfg: BenefitConfig) -> str:
    """The target scanner in words: ``"contrast 0.7, noise 35 HU, bias 20 HU"``."""
    contrast, noise, bias = cfg.target_scanner
    return f"contrast {contrast:g}, noise {noise:g} HU, bias {bias:g} HU"


def scanner_words(cfg: BenefitConfig) -> str:
    """How the unlabeled and test phantoms were drawn, for titles: ``"unlabeled and test: contrast 0.7, ..."``."""
    sets = "unlabeled and test" if cfg.pretrain_on_target else "test (unlabeled as labeled)"
    return f"{sets}: {scanner_knobs(cfg)}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], cfg: BenefitConfig) -> list[dict]:
    """One row per labeled size: mean and sample std of the Dice of each arm, and of the paired difference."""
    rows = []
    for n in cfg.labeled_sizes:
        by_arm = {arm: {r["seed"]: r["dice"] for r in runs if r["n_labeled"] == n and r["arm"] == arm} for arm in ARMS}
        seeds = sorted(set(by_arm["scratch"]) & set(by_arm["pretrained"]))
        if not seeds:
            continue
        row: dict[str, Any] = {"n_labeled": n, "seeds": seeds}
        for arm in ARMS:
            row[arm] = dict(zip(("mean", "std"), _mean_std([by_arm[arm][s] for s in seeds])))
        diffs = [by_arm["pretrained"][s] - by_arm["scratch"][s] for s in seeds]
        row["difference"] = dict(zip(("mean", "std"), _mean_std(diffs)))
        row["pretrained_better"] = sum(d > 0 for d in diffs)
        per_class = {}
        for arm in ARMS:
            organ_runs = [
                r["per_class"] for r in runs if r["n_labeled"] == n and r["arm"] == arm and r["seed"] in seeds
            ]
            per_class[arm] = {k: statistics.fmean(r[k] for r in organ_runs) for k in organ_runs[0]}
        row["per_class_mean"] = per_class
        rows.append(row)
    return rows


def format_markdown(rows: list[dict], cfg: BenefitConfig, env: dict, pretrain: dict) -> str:
    """The result tables and the settings as markdown."""
    cnn = cfg.architecture in CNNS
    method = "Masked-image" if cnn else "MAE"
    lines = [
        f"## {method} pretraining benefit for {network_label(cfg)} (synthetic CT phantoms, {cfg.style} style)",
        "",
        f"Mean Dice of the {cfg.num_organs} organs on {cfg.num_test} held-out phantoms (sliding window, final weights), "
        f"mean +- sample std over seeds {list(cfg.seeds)}; the same labeled subset per seed for both arms.",
        "",
        f"| labeled volumes | from scratch | {method}-pretrained | difference (paired) | pretrained better |",
        "| ---: | :---: | :---: | :---: | :---: |",
    ]
    for row in rows:
        s, p, d = row["scratch"], row["pretrained"], row["difference"]
        lines.append(f"| {row['n_labeled']} | {s['mean']:.3f} +- {s['std']:.3f} | {p['mean']:.3f} +- {p['std']:.3f} | "
                     f"{d['mean']:+.3f} +- {d['std']:.3f} | {row['pretrained_better']}/{len(row['seeds'])} |")  # fmt: skip
    organs = list(rows[0]["per_class_mean"]["scratch"]) if rows else []
    if organs:
        lines += ["", "Per-organ Dice (mean over seeds), scratch / pretrained:", "",
                  "| labeled volumes | " + " | ".join(organs) + " |", "| ---: |" + " :---: |" * len(organs)]  # fmt: skip
        for row in rows:
            pc = row["per_class_mean"]
            cells = [f"{pc['scratch'][o]:.3f} / {pc['pretrained'][o]:.3f}" for o in organs]
            lines.append(f"| {row['n_labeled']} | " + " | ".join(cells) + " |")
    reused = " (reused from an earlier run)" if pretrain.get("reused") else ""
    lines += [
        "",
        "Settings: "
        f"phantoms {'x'.join(map(str, cfg.phantom_shape))} at {'x'.join(f'{s:g}' for s in cfg.phantom_spacing)} mm, "
        f"{cfg.style} style, {cfg.layout} layout, {cfg.num_organs} organs; "
        + (f"labeled pool with the default scanner knobs, {scanner_words(cfg)}; " if cfg.target_scanner else "")
        + f"{cfg.roi}^3 crops; "
        + (
            f"{ARCH_NAMES[cfg.architecture]} (monai_mae.networks.cnn defaults), masks of {cfg.masking_patch}^3 patches, "
            f"{cfg.mask_fill} fill"
            if cnn
            else f"ViT width {cfg.hidden_size}, MLP {cfg.mlp_dim}, {cfg.num_heads} heads, {cfg.num_layers} layers, "
            f"patch {cfg.patch}; {ARCH_NAMES[cfg.architecture]}"
        )
        + (" with convolutional skips (conv_skips: full- and half-resolution stem)" if cfg.conv_skips else "")
        + (f" feature size {cfg.feature_size}" if cfg.architecture == "unetr" else "")
        + f". {'Masked-image model' if cnn else 'MAE'}: {cfg.num_unlabeled} unlabeled phantoms, {cfg.pretrain_epochs} epochs "
        f"({pretrain['steps']} steps, {pretrain['seconds'] / 60:.1f} min{reused}), masking {cfg.masking_ratio}, "
        f"{'normalised' if cfg.norm_pix_loss else 'plain'}-pixel loss on the masked patches"
        + (f" + {cfg.visible_loss_weight:g} x the visible ones" if cfg.visible_loss_weight else "")
        + ", "
        f"loss {pretrain['first_epoch_loss']:.4f} -> {pretrain['last_epoch_loss']:.4f}. "
        f"Fine-tuning: about {cfg.finetune_steps} AdamW steps of {cfg.finetune_batch} volume(s) x {cfg.finetune_samples} crops, "
        f"lr {cfg.finetune_lr:g}, warm-up {cfg.warmup_fraction:.0%} + cosine, DiceCE, "
        f"intensity jitter (scale {cfg.intensity_scale:g}, shift {cfg.intensity_shift:g}) for both arms; layer decay {cfg.layer_decay:g} "
        f"and encoder lr x{cfg.encoder_lr_scale:g} for the pretrained arm (1.0 from scratch); frozen-encoder epochs {cfg.freeze_encoder_epochs}; "
        f"transferred residual stream scaled by {cfg.residual_scale if isinstance(cfg.residual_scale, str) else f'{cfg.residual_scale:g}'}.",
        "",
        f"Run: `{env['command']}` on {env['device']}, torch {env['torch']}, MONAI {env['monai']}, "
        f"{env['threads']} threads, {env['total_minutes']:.0f} min in all.",
    ]
    return "\n".join(lines) + "\n"


ARM_STYLE = {
    ("scratch", 0): "#c8462f",
    ("pretrained", 0): "#2864be",
    ("scratch", 1): "#e69f00",
    ("pretrained", 1): "#009e73",
}
_PALETTE = (
    "#c8462f",
    "#2864be",
    "#e69f00",
    "#009e73",
    "#7b3294",
    "#008837",
    "#d01c8b",
    "#4d4d4d",
    "#a6611a",
    "#0571b0",
)


def _arm_label(label: str, arm: str) -> str:
    if arm == "scratch":
        return "from scratch"
    return "masked-image pretrained" if label in {ARCH_NAMES[a] for a in CNNS} else "MAE-pretrained encoder"


def _arm_colour(arm: str, k: int) -> str:
    return ARM_STYLE.get((arm, k), _PALETTE[(2 * k + ARMS.index(arm)) % len(_PALETTE)])


def draw_chart(results: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Mean Dice (+- std error bars) against the number of labeled volumes: one line per architecture and arm.

    Args:
        results: ``{architecture label: rows of summarise()}``, at most two architectures.
        path: the PNG (folders are created).
        title: the chart's title (wrapped at 90 characters).
    """
    from monai_mae.engines.pictures import require_matplotlib

    Figure, Canvas = require_matplotlib()
    figure = Figure(figsize=(9, 5.6), dpi=100)
    Canvas(figure)
    axes = figure.add_subplot()
    sizes = sorted({row["n_labeled"] for rows in results.values() for row in rows})
    width = 0.08 * max(len(results) * len(ARMS) - 1, 1)
    for k, (label, rows) in enumerate(results.items()):
        for j, arm in enumerate(ARMS):
            offset = (k * len(ARMS) + j) * 0.08 - width / 2  # keep the error bars apart
            xs = [sizes.index(row["n_labeled"]) + offset for row in rows]
            axes.errorbar(
                xs, [row[arm]["mean"] for row in rows], yerr=[row[arm]["std"] for row in rows], color=_arm_colour(arm, k),
                marker="o" if arm == "pretrained" else "s", linewidth=2.5, capsize=5,
                linestyle="-" if arm == "pretrained" else "--",
                label=f"{label}, {_arm_label(label, arm)}",
            )  # fmt: skip
    axes.set_xticks(range(len(sizes)), [str(n) for n in sizes])
    axes.set_xlim(-0.5, len(sizes) - 0.5)  # one labeled size: the arms side by side in the middle, not at the edges
    axes.set_xlabel("labeled training volumes")
    axes.set_ylabel("mean Dice on held-out phantoms")
    axes.set_title(textwrap.fill(title, 90))  # long titles on two lines, inside the figure
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def draw_scanner_slices(images: dict[str, str | Path], path: Path, title: str) -> Path:
    """The middle axial slice of each image side by side, in the CT window of the fine-tuning (-175..250 HU).

    Args:
        images: ``{panel title: NIfTI path}``, e.g. the same test phantom from the default and the target scanner.
        path: the PNG (folders are created).
        title: the figure's title (wrapped at 120 characters).
    """
    from monai_mae.engines.pictures import require_matplotlib

    Figure, Canvas = require_matplotlib()
    figure = Figure(figsize=(4 * len(images), 4.4), dpi=100)
    Canvas(figure)
    for k, (panel, image) in enumerate(images.items()):
        volume = nib.load(image).get_fdata(dtype=np.float32)
        axial = np.clip((volume[:, :, volume.shape[2] // 2] + 175.0) / 425.0, 0.0, 1.0)
        axes = figure.add_subplot(1, len(images), k + 1)
        axes.imshow(np.rot90(axial), cmap="gray", vmin=0.0, vmax=1.0)  # anterior up
        axes.set_title(panel, fontsize=10)
        axes.axis("off")
    figure.suptitle(textwrap.fill(title, 120), fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def draw_both_scanners(cfg: BenefitConfig, work_dir: Path, path: Path) -> Path:
    """:func:`draw_scanner_slices` of the first held-out phantom as the default and ``cfg``'s target scanner draw it
    (from the folders :func:`prepare_data` wrote; nothing is generated)."""
    _, labeled_dir, test_dir = _data_dirs(cfg, work_dir)
    plain_test, test = (load_datalist(folder, "validation", require_label=True) for folder in (labeled_dir, test_dir))
    panels = {"default scanner (labeled pool)": plain_test[0]["image"], scanner_knobs(cfg): test[0]["image"]}
    title = f"{Path(test[0]['image']).name}, a held-out phantom, from both scanners (middle slice, -175..250 HU)"
    return draw_scanner_slices(panels, path, title)


def format_combined(reports: dict[str, dict]) -> str:
    """One markdown table of every architecture and arm from the JSON reports of several runs."""
    lines = [
        "| labeled volumes | "
        + " | ".join(f"{a} scratch | {a} pretrained | {a} difference (better)" for a in reports)
        + " |",
        "| ---: |" + " :---: | :---: | :---: |" * len(reports),
    ]
    sizes = sorted({row["n_labeled"] for report in reports.values() for row in report["summary"]})
    for n in sizes:
        cells = []
        for report in reports.values():
            row = next((r for r in report["summary"] if r["n_labeled"] == n), None)
            if row is None:
                cells += ["-"] * 3
                continue
            s, p, d = row["scratch"], row["pretrained"], row["difference"]
            cells += [f"{s['mean']:.3f} +- {s['std']:.3f}", f"{p['mean']:.3f} +- {p['std']:.3f}",
                      f"{d['mean']:+.3f} ({row['pretrained_better']}/{len(row['seeds'])})"]  # fmt: skip
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    budget = []
    for label, report in reports.items():
        runs = report.get("runs", [])
        if runs:
            steps = sorted({r["steps"] for r in runs})
            seconds = [r["seconds"] for r in runs]
            budget.append(f"{label}: {'/'.join(map(str, steps))} steps per fine-tune, "
                          f"{statistics.fmean(seconds):.0f} s on average ({min(seconds):.0f}-{max(seconds):.0f} s)")  # fmt: skip
    return "\n".join(lines) + ("\n\nFine-tuning budget: " + "; ".join(budget) + ".\n" if budget else "\n")


def step_time_configs(preset: str) -> dict[str, BenefitConfig]:
    """The networks :func:`step_times` measures: every architecture at ``preset``'s sizes, and ViTSeg with
    ``conv_skips`` (``"vitseg_conv_skips"``)."""
    configs = {arch: preset_config(preset, arch) for arch in ARCHITECTURES}
    configs["vitseg_conv_skips"] = dataclasses.replace(configs["vitseg"], conv_skips=True)
    return configs


def parameter_counts(preset: str) -> dict[str, int]:
    """Parameters (trainable or not) of each network of :func:`step_time_configs`."""
    return {
        name: sum(p.numel() for p in build_network(cfg).parameters()) for name, cfg in step_time_configs(preset).items()
    }


def step_times(preset: str, steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per fine-tuning step of each network of :func:`step_time_configs`, measured interleaved.

    One step: a batch of ``finetune_batch`` volumes x ``finetune_samples`` random crops, DiceCE, backward,
    AdamW. Interleaving the networks step by step exposes all to the same machine load, so the
    ratios (what sets equal wall-clock budgets, e.g. ``VITSEG_CHANGES[preset]["finetune_steps"]``) hold
    on a busy machine too.
    """
    configs = step_time_configs(preset)
    torch.manual_seed(0)
    cfg = configs["unetr"]
    batch = cfg.finetune_batch * cfg.finetune_samples
    image = torch.rand(batch, 1, cfg.roi, cfg.roi, cfg.roi, device=device)
    label = torch.randint(0, cfg.num_organs + 1, (batch, 1, cfg.roi, cfg.roi, cfg.roi), device=device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    nets = {arch: build_network(c).to(device) for arch, c in configs.items()}
    optimizers = {arch: build_optimizer(net, lr=1e-4) for arch, net in nets.items()}
    times: dict[str, list[float]] = {arch: [] for arch in nets}
    for step in range(steps + 2):  # the first two steps warm up allocators and kernels
        for arch, net in nets.items():
            start = time.perf_counter()
            loss_fn(net(image), label).backward()
            optimizers[arch].step()
            optimizers[arch].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 2:
                times[arch].append(time.perf_counter() - start)
    return {arch: statistics.median(values) for arch, values in times.items()}


def best_arms(reports: dict[str, dict], margin: float = 0.02, share: float = 0.8) -> list[dict]:
    """Per labeled size: the best scratch arm and the best pretrained arm of any architecture, compared seed by seed.

    The arms of every architecture fine-tune on the same labeled subset for a seed, so the difference is paired.
    Only seeds that both best arms ran count.

    Args:
        reports: ``{architecture label: report}`` (the JSON of :func:`main`).
        margin: the mean paired difference the pretrained arm must reach. Defaults to 0.02.
        share: the fraction of seeds in which it must be better. Defaults to 0.8 (4 of 5).

    Returns:
        one dict per size: ``n_labeled``, ``scratch`` / ``pretrained`` (``architecture``, ``mean``, ``seeds``),
        ``difference`` (mean), ``better`` (count), ``paired_seeds``, ``unmeasured`` (architectures without a run at
        this size: then no verdict) and ``target_met``.
    """
    dice: dict[tuple[str, str, int], dict[int, float]] = {}
    for label, report in reports.items():
        for run in report.get("runs", []):
            dice.setdefault((label, run["arm"], run["n_labeled"]), {})[run["seed"]] = run["dice"]
    rows = []
    for n in sorted({key[2] for key in dice}):
        best = {}
        for arm in ARMS:
            candidates = [(statistics.fmean(v.values()), label, v) for (label, a, size), v in dice.items()
                          if a == arm and size == n]  # fmt: skip
            if candidates:
                best[arm] = max(candidates, key=lambda c: c[0])
        if len(best) < 2:
            continue
        seeds = sorted(set(best["scratch"][2]) & set(best["pretrained"][2]))
        diffs = [best["pretrained"][2][s] - best["scratch"][2][s] for s in seeds]
        row = {"n_labeled": n, "paired_seeds": seeds, "difference": statistics.fmean(diffs) if diffs else float("nan"),
               "better": sum(d > 0 for d in diffs)}  # fmt: skip
        for arm in ARMS:
            mean, label, values = best[arm]
            row[arm] = {"architecture": label, "mean": mean, "seeds": sorted(values)}
        with_runs = {key[0] for key in dice}  # a report that keeps only its summary cannot be paired by seed
        row["unmeasured"] = sorted(label for label in with_runs if not any(k[0] == label and k[2] == n for k in dice))
        row["target_met"] = (bool(diffs) and not row["unmeasured"] and row["difference"] >= margin
                             and row["better"] >= share * len(seeds))  # fmt: skip
        rows.append(row)
    return rows


def _verdict(row: dict) -> str:
    if row.get("unmeasured"):
        return "no verdict: " + ", ".join(row["unmeasured"]) + " not measured"
    return "met" if row["target_met"] else "missed"


def format_best_arms(rows: list[dict]) -> str:
    """The :func:`best_arms` comparison as a markdown table."""
    lines = ["| labeled volumes | best scratch arm | best pretrained arm | paired difference | pretrained better | "
             "target (+0.02, 4 of 5) |", "| ---: | :--- | :--- | :---: | :---: | :---: |"]  # fmt: skip
    for row in rows:
        s, p = row["scratch"], row["pretrained"]
        lines.append(f"| {row['n_labeled']} | {s['architecture']} {s['mean']:.3f} ({len(s['seeds'])} seeds) | "
                     f"{p['architecture']} {p['mean']:.3f} ({len(p['seeds'])} seeds) | {row['difference']:+.3f} | "
                     f"{row['better']}/{len(row['paired_seeds'])} | {_verdict(row)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def combine(paths: Sequence[Path], out_dir: Path, figures_dir: Path | None = None) -> Path:
    """Read the JSON reports of runs with different ``--architecture`` and write one table and one chart."""
    reports = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        reports[network_label(report["config"])] = report
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_only = [label for label, report in reports.items() if not report.get("runs")]
    markdown = format_combined(reports) + "\nBest arm of any architecture with per-run results, per labeled size"
    markdown += f" ({', '.join(summary_only)}: summary only, not compared):\n\n" if summary_only else ":\n\n"
    markdown += format_best_arms(best_arms(reports))
    (out_dir / "pretrain_benefit_combined.md").write_text(markdown)
    counts = {label: len({s for row in report["summary"] for s in row["seeds"]}) for label, report in reports.items()}
    title = " vs ".join(f"{label} ({n} seed{'s' if n != 1 else ''})" for label, n in counts.items())
    figures_dir = out_dir if figures_dir is None else figures_dir
    draw_chart({label: report["summary"] for label, report in reports.items()}, figures_dir / "pretrain_benefit_combined.png",
               f"Dice on held-out {' and '.join(sorted({phantoms_label(r['config']) for r in reports.values()}))}, {title}")  # fmt: skip
    print(markdown, flush=True)
    return out_dir / "pretrain_benefit_combined.md"


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="size preset (default: cpu)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="unetr",
                        help="segmentation network: unetr (patch 16) or vitseg (pure ViT, patch 8; the preset's VITSEG_CHANGES)")  # fmt: skip
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default="phantoms",
        help="phantoms (the original anatomical phantoms) or realistic (abdominal-CT-like volumes)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run, < 2 minutes (same as --preset quick)")
    parser.add_argument(
        "--step-times",
        type=int,
        default=None,
        metavar="STEPS",
        help="only measure the seconds per fine-tuning step (and count the parameters) of every network at the "
        "preset's sizes, ViTSeg with --conv-skips included (interleaved)",
    )
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="REPORT_JSON",
                        help="only write one table and chart from the JSON reports of earlier runs (e.g. unetr and vitseg)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="retrain the MAE and every fine-tune (implied by --quick)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="where the .md/.json go")
    parser.add_argument(
        "--figures-dir",
        type=Path,
        default=None,
        help="where the .png goes (default: benchmarks/figures, or OUT_DIR when --out-dir is given)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="generated data and MAE weights (default: OUT_DIR/pretrain_benefit_work)",
    )
    for name in ("labeled_sizes", "seeds", "curve_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="+", default=None)
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="organ placement of the phantoms")
    ints = ("num_organs", "num_unlabeled", "num_labeled_pool", "num_test", "roi", "patch", "hidden_size", "mlp_dim", "num_heads",
            "num_layers", "feature_size",
            "pretrain_epochs", "pretrain_batch", "pretrain_samples", "finetune_steps", "finetune_batch",
            "finetune_samples", "freeze_encoder_epochs", "sw_batch_size", "mask_patch", "pretrain_warmup_epochs")  # fmt: skip
    for name in ints:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    for name in (
        "pretrain_lr",
        "finetune_lr",
        "layer_decay",
        "encoder_lr_scale",
        "masking_ratio",
        "drop_path_rate",
        "visible_loss_weight",
        "intensity_shift",
        "intensity_scale",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--conv-skips",
        action="store_true",
        default=None,
        help="ViTSeg arms with convolutional skip connections (ViTSeg conv_skips; needs --architecture vitseg)",
    )
    parser.add_argument("--mask-fill", choices=MASK_FILLS, default=None,
                        help="what replaces the masked voxels of a CNN's masked-image model: zero (the value of air), mean (each image's visible mean) or learned")  # fmt: skip
    parser.add_argument("--target-scanner", type=float, nargs=3, default=None, metavar=("CONTRAST", "NOISE_HU", "BIAS_HU"),
                        help="realistic setting: draw the unlabeled pool and the test phantoms with these scanner knobs, the labeled pool with the defaults")  # fmt: skip
    parser.add_argument("--pretrain-on-target", action=argparse.BooleanOptionalAction, default=None,
                        help="with --target-scanner: pretrain on unlabeled phantoms of the target scanner (default) or, with --no-pretrain-on-target, of the labeled pool's scanner (the control)")  # fmt: skip
    parser.add_argument("--residual-scale", type=_residual_scale, default=None,
                        help="rescale the transferred encoder's residual stream: 'auto' (to a fresh UNETR's size) or a factor (1 = off)")  # fmt: skip
    return parser.parse_args(argv)


def _residual_scale(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}")
    return value


# settings that only the pretrained arm depends on: the MAE, and how it is transferred and fine-tuned
_PRETRAINED_ONLY = (
    *_MAE_ONLY,
    "layer_decay",
    "encoder_lr_scale",
    "residual_scale",
    "freeze_encoder_epochs",
    "drop_path_rate",
)


def _runs_key(cfg: BenefitConfig, device: torch.device, amp: bool, arm: str = "pretrained") -> str:
    """Hash of everything that determines one fine-tune of ``arm`` except which (n, seed) it is.

    The scratch arm's key leaves out the MAE and transfer settings, so changing those reuses the
    finished scratch fine-tunes.
    """
    drop = ("labeled_sizes", "seeds", *(_PRETRAINED_ONLY if arm == "scratch" else ()))
    settings = _without_unset_later_settings({k: v for k, v in asdict(cfg).items() if k not in drop})
    text = json.dumps({**settings, "device": device.type, "amp": amp, "arm": arm}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def report_name(cfg: BenefitConfig, quick: bool = False) -> str:
    """The reports' file name without suffix:
    ``pretrain_benefit[_quick]_<architecture>[_conv_skips][_<mask_fill>_fill][_mask<mask_patch>][_realistic]``
    ``[_scanner<contrast>-<noise_hu>-<bias_hu>[_pretrained_on_labeled_scanner]]``."""
    name = ("pretrain_benefit_quick" if quick else "pretrain_benefit") + f"_{cfg.architecture}"
    name += "_conv_skips" if cfg.conv_skips else ""
    name += f"_{cfg.mask_fill}_fill" if cfg.mask_fill != "zero" else ""
    name += f"_mask{cfg.mask_patch}" if cfg.mask_patch else ""
    name += "_realistic" if cfg.style == "realistic" else ""
    name += "_scanner" + "-".join(f"{v:g}" for v in cfg.target_scanner) if cfg.target_scanner else ""
    return name + ("" if cfg.pretrain_on_target else "_pretrained_on_labeled_scanner")


def _figures_dir(args: argparse.Namespace) -> Path:
    if args.figures_dir is not None:
        return args.figures_dir
    default_out = args.out_dir.resolve() == (REPO / "benchmarks" / "results").resolve()
    return REPO / "benchmarks" / "figures" if default_out else args.out_dir


def portable_command(argv: Sequence[str]) -> str:
    """The command line of this run with paths made relative to the repository (``<tmp>/NAME`` outside it)."""
    parts = ["python", "benchmarks/pretrain_benefit.py"]
    for arg in argv:
        if os.path.isabs(arg):
            path = Path(arg).resolve()
            arg = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f"<tmp>/{path.name}"
        parts.append(arg)
    return " ".join(shlex.quote(a) for a in parts)


def _load_done(path: Path) -> dict[tuple[str, int, int], dict]:
    """Finished fine-tunes of an earlier, interrupted run with the same settings (a torn last line is skipped)."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                run = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(run["arm"], run["n_labeled"], run["seed"])] = run
    return done


def build_config(args: argparse.Namespace) -> BenefitConfig:
    """The preset with every given flag applied."""
    preset = "quick" if args.quick else args.preset
    cfg = preset_config(preset, getattr(args, "architecture", "unetr"), getattr(args, "setting", "phantoms"))
    changes = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cfg) if getattr(args, f.name, None) is not None
    }
    for name in ("labeled_sizes", "seeds", "curve_steps", "target_scanner"):
        if name in changes:
            changes[name] = tuple(changes[name])
    cfg = dataclasses.replace(cfg, **changes)
    cfg.check()
    return cfg


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.combine:
        return {"combined": str(combine(args.combine, args.out_dir, _figures_dir(args)))}
    if args.step_times:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        preset = "quick" if args.quick else args.preset
        times = step_times(preset, args.step_times, device)
        counts = parameter_counts(preset)
        configs = step_time_configs(preset)
        budget = preset_config(preset, "vitseg")
        seconds = budget.finetune_steps * times["vitseg"]
        print(
            f"seconds per fine-tuning step ({preset} preset, {device}, {torch.get_num_threads()} threads, median of "
            f"{args.step_times}, interleaved); steps in the wall-clock of ViTSeg's {budget.finetune_steps} steps "
            f"({seconds:.0f} s):",
            flush=True,
        )
        for name, value in times.items():
            label, millions = network_label(configs[name]), counts[name] / 1e6
            line = f"  {label:>12}: {value:.3f} s/step, {seconds / value:.0f} steps, {millions:.2f} M parameters"
            print(line, flush=True)
        return times
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    _quiet_engine_logs()
    cfg = build_config(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()  # large activations reused between steps instead of faulted in again
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    work_dir = args.work_dir or args.out_dir / "pretrain_benefit_work"
    name = report_name(cfg, args.quick)
    t0 = time.perf_counter()

    unlabeled, pool, test = prepare_data(cfg, work_dir)
    logger.info(
        f"data: {len(unlabeled)} unlabeled, {len(pool)} labeled (pool), {len(test)} held-out test phantoms in {work_dir}"
    )
    reuse = not (args.quick or args.fresh)
    ckpt, pretrain = pretrain_mae(cfg, unlabeled, work_dir, device, amp, reuse=reuse)

    runs: list[dict] = []
    done_paths = {arm: work_dir / f"runs_{_runs_key(cfg, device, amp, arm)}.jsonl" for arm in ARMS}
    done: dict[tuple[str, int, int], dict] = {}
    for arm, done_path in done_paths.items():
        if reuse:
            done.update({key: run for key, run in _load_done(done_path).items() if key[0] == arm})
        else:
            done_path.unlink(missing_ok=True)
    total = len(cfg.labeled_sizes) * len(cfg.seeds) * len(ARMS)
    for n in cfg.labeled_sizes:
        for seed in cfg.seeds:
            subset = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))]
            for arm in ARMS:
                if (arm, n, seed) in done:
                    runs.append({"architecture": cfg.architecture, **done[(arm, n, seed)]})
                    logger.info(f"[{len(runs)}/{total}] n={n} seed={seed} {arm:>10}: Dice {runs[-1]['dice']:.3f} "
                                f"(from {done_paths[arm].name})")  # fmt: skip
                    continue
                net, info = finetune(cfg, subset, seed, ckpt if arm == "pretrained" else None, device, amp, test)
                result = evaluate_dice(cfg, net, test, device, amp)
                cases = [Path(s["image"]).name for s in subset]
                runs.append(
                    {
                        "architecture": cfg.architecture,
                        "arm": arm,
                        "n_labeled": n,
                        "seed": seed,
                        "train_cases": cases,
                        **result,
                        **info,
                    }
                )
                with open(done_paths[arm], "a", encoding="utf-8") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
                logger.info(f"[{len(runs)}/{total}] n={n} seed={seed} {arm:>10}: Dice {result['dice']:.3f} "
                            f"(per organ {', '.join(f'{v:.2f}' for v in result['per_class'].values())}); "
                            f"{info['steps']} steps in {info['seconds']:.0f} s, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}")  # fmt: skip
                del net

    rows = summarise(runs, cfg)
    env = {
        "command": portable_command(argv if argv is not None else sys.argv[1:]),
        "device": f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)" if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "amp": amp,
        "total_minutes": (pretrain["seconds"] + sum(r["seconds"] for r in runs)) / 60,  # cached parts included
        "minutes_this_invocation": (time.perf_counter() - t0) / 60,
    }  # fmt: skip
    markdown = format_markdown(rows, cfg, env, pretrain)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.md").write_text(markdown)
    report = {"config": asdict(cfg), "environment": env, "pretrain": pretrain, "summary": rows, "runs": runs}
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    masking = [f"{cfg.mask_fill} mask fill"] if cfg.mask_fill != "zero" else []
    masking += [f"{cfg.mask_patch}^3 masks"] if cfg.mask_patch else []
    masking += [scanner_words(cfg)] if cfg.target_scanner else []
    masking_words = f" ({', '.join(masking)})" if masking else ""
    draw_chart({network_label(cfg): rows}, _figures_dir(args) / f"{name}.png",
               f"{network_label(cfg)}{masking_words} Dice on held-out {phantoms_label(cfg)} ({len(cfg.seeds)} seed(s))")  # fmt: skip
    if cfg.target_scanner:
        draw_both_scanners(cfg, work_dir, _figures_dir(args) / f"{name}_slices.png")
    print(markdown, flush=True)
    logger.info(f"wrote {args.out_dir / name}.md and .json, {_figures_dir(args) / name}.png")
    return report


if __name__ == "__main__":
    main()

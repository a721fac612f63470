"""How much better than a trivial guess a pretrained network fills in masked patches.

The masked-patch mean squared error of a reconstruction means little on its own: it depends on the
intensity window and on how much structure a volume has. :class:`MaskedFillErrorProbe` puts it next to the
error of the simplest guess that sees the same visible patches, every masked voxel set to the mean of the
visible voxels of its window, and :class:`ReconstructionErrorHandler` sums both over the volumes an
evaluator runs through (the ``mae_pretrain`` bundle's ``inference.json``). Their ratio is 1 for a network that
learned nothing beyond the mean intensity and 0 for a perfect reconstruction; the demo
(``make demo``) reports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from monai_mae.networks.display import reconstruct_image
from monai_mae.networks.patching import unpatchify

__all__ = ["MaskedFillErrorProbe", "ReconstructionErrorHandler", "masked_fill_errors"]

logger = logging.getLogger(__name__)


class MaskedFillErrorProbe(nn.Module):
    """Image-to-image view of a masked-reconstruction network that also returns the mask and the mean-fill guess.

    ``forward(x)`` masks ``x`` with a generator re-seeded with ``seed`` on every call (the same window always
    gets the same mask, as :class:`~monai_mae.networks.mae.MAEReconstructor` does) and returns the channels
    ``[reconstruction, masked, mean fill]`` stacked, each with ``x``'s channels: the reconstruction with the
    visible patches pasted back, 1 on masked voxels, and ``x`` with every masked voxel replaced by the mean
    of the visible voxels (per sample and channel). Sliding-window inference stitches all three.

    Args:
        network: an :class:`~monai_mae.networks.mae.MAEViT` or a
            :class:`~monai_mae.networks.mim.MaskedImageModel`: ``network(x, ratio, generator=g)`` returns
            ``(pred (B, N, prod(P) * C), mask (B, N))`` and ``network.patch_size`` is the patch.
        seed: mask seed. Defaults to 0.
        masking_ratio: ratio for the masks; None uses the network's.
        norm_pix_loss: whether the network predicts per-patch normalised patches.
    """

    def __init__(
        self, network: nn.Module, seed: int = 0, masking_ratio: float | None = None, norm_pix_loss: bool = False
    ) -> None:
        super().__init__()
        self.network = network
        self.seed = seed
        self.masking_ratio = masking_ratio
        self.norm_pix_loss = norm_pix_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 3 * C, *S)``: reconstruction, masked voxels, mean fill."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        pred, mask = self.network(x, self.masking_ratio, generator=generator)
        patch = tuple(self.network.patch_size)
        image = x.float()
        recon = reconstruct_image(pred, mask, image, patch, norm_pix_loss=self.norm_pix_loss, paste_visible=True)
        per_patch = mask.float()[..., None].expand(-1, -1, int(torch.Size(patch).numel()) * x.shape[1])
        masked = unpatchify(per_patch, patch, image.shape[2:], x.shape[1])  # (B, C, *S), 1 = masked
        visible = 1.0 - masked
        dims = tuple(range(2, x.ndim))
        mean = (image * visible).sum(dims, keepdim=True) / visible.sum(dims, keepdim=True).clamp_min(1.0)
        fill = image * visible + mean * masked
        return torch.cat([recon, masked, fill], dim=1).to(x.dtype)


def masked_fill_errors(stacked: torch.Tensor, image: torch.Tensor) -> tuple[float, float, float]:
    """Sums of squared errors on the masked voxels from a :class:`MaskedFillErrorProbe` output.

    Args:
        stacked: ``(B, 3 * C, *S)``, the probe's output (possibly stitched by a sliding window).
        image: ``(B, C, *S)``, the input.

    Returns:
        ``(reconstruction squared error, mean-fill squared error, masked voxels)``, summed over the batch.

    Raises:
        ValueError: when the shapes do not belong together.
    """
    channels = image.shape[1]
    if stacked.shape[1] != 3 * channels or stacked.shape[2:] != image.shape[2:] or stacked.shape[0] != image.shape[0]:
        raise ValueError(
            f"expected the probe's output of shape {(image.shape[0], 3 * channels, *image.shape[2:])} for an image of "
            f"shape {tuple(image.shape)}, got {tuple(stacked.shape)}."
        )
    recon, masked, fill = stacked.float().split(channels, dim=1)
    target = image.float()
    masked = masked.round()  # window stitching keeps 0/1 with overlap 0; rounding guards against blending
    recon_error = ((recon - target) ** 2 * masked).sum()
    fill_error = ((fill - target) ** 2 * masked).sum()
    return float(recon_error), float(fill_error), float(masked.sum())


class ReconstructionErrorHandler:
    """Sum the masked-patch errors of the reconstruction and of the mean fill over an evaluator's volumes.

    At every iteration it runs ``inferer(images, probe)`` on the batch's ``image`` (in the network's
    intensity space: postprocessing changes only the prediction; a decollated batch, a list of one dict per
    volume as MONAI's evaluators leave it, is read volume by volume), and when the evaluator completes it logs one line, puts
    ``masked_mse``, ``mean_fill_mse`` and ``masked_mse_ratio`` into ``engine.state.metrics`` and, with
    ``output_path``, writes them as JSON (with the number of volumes).

    Args:
        probe: a :class:`MaskedFillErrorProbe` around the network.
        inferer: called as ``inferer(images, probe)`` (e.g. a MONAI ``SlidingWindowInferer`` with overlap 0).
        device: where the images go.
        output_path: JSON file to write at the end; None writes nothing.
        image_key: the batch's image key. Defaults to ``"image"``.
    """

    def __init__(
        self,
        probe: MaskedFillErrorProbe,
        inferer: Callable[..., torch.Tensor],
        device: str | torch.device = "cpu",
        output_path: str | os.PathLike | None = None,
        image_key: str = "image",
    ) -> None:
        self.probe = probe
        self.inferer = inferer
        self.device = torch.device(device)
        self.output_path = None if output_path is None else Path(output_path)
        self.image_key = image_key
        self._sums = [0.0, 0.0, 0.0]
        self._volumes = 0

    def attach(self, engine: Engine) -> None:
        """Attach to an evaluator."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _reset(self, engine: Engine) -> None:
        self._sums = [0.0, 0.0, 0.0]
        self._volumes = 0

    @torch.no_grad()
    def _iteration(self, engine: Engine) -> None:
        batch = engine.state.batch
        # MONAI's evaluators decollate the batch into one dict per volume before their postprocessing
        images = [item[self.image_key][None] for item in batch] if isinstance(batch, list) else [batch[self.image_key]]
        self.probe.eval()
        for image in images:
            image = torch.as_tensor(image).as_subclass(torch.Tensor).to(self.device)
            stacked = self.inferer(image, self.probe)
            for index, value in enumerate(masked_fill_errors(stacked, image)):
                self._sums[index] += value
            self._volumes += image.shape[0]

    def results(self) -> dict[str, Any]:
        """``{"masked_mse", "mean_fill_mse", "masked_mse_ratio", "volumes"}`` of what was summed so far."""
        recon, fill, count = self._sums
        masked_mse = recon / count if count else float("nan")
        fill_mse = fill / count if count else float("nan")
        ratio = masked_mse / fill_mse if fill_mse else float("nan")
        return {
            "masked_mse": masked_mse,
            "mean_fill_mse": fill_mse,
            "masked_mse_ratio": ratio,
            "volumes": self._volumes,
        }

    def _completed(self, engine: Engine) -> None:
        results = self.results()
        engine.state.metrics.update({k: v for k, v in results.items() if k != "volumes"})
        logger.info(
            "masked-patch MSE %.4g vs %.4g filling each masked patch with the mean of the visible voxels: "
            "ratio %.3f over %d volumes",
            results["masked_mse"],
            results["mean_fill_mse"],
            results["masked_mse_ratio"],
            results["volumes"],
        )
        if self.output_path is not None:
            self.output_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.output_path.with_name(self.output_path.name + ".tmp")
            temporary.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(temporary, self.output_path)

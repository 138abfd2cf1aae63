"""Two baselines for AnoFPDM's evaluation: a FLAIR intensity threshold and a healthy reconstruction.

Intensity (Meissen et al., "Challenging current semi-supervised anomaly segmentation methods for brain MRI",
2021): the anomaly score of a pixel is its FLAIR intensity on the model grid divided by its volume's 99th brain
percentile (``intensity_scores``); the mask is score >= tau inside the brain. tau is one global value, chosen on
the validation split as the percentile of the validation brain scores that maximises the pooled validation Dice
(``choose_threshold``).
That choice uses the validation lesion MASKS, which AnoFPDM never does: it can only make the baseline stronger.

Reconstruction (Sanchez et al., "What is healthy? Generative counterfactual diffusion for lesion localization",
2022, the paper's "DDIM clf-free" row): deterministic DDIM inversion of the slice with the null label up to the
noise level L, then classifier-free-guided DDIM decoding towards the healthy label back to a clean image x_h;
the anomaly score is |x0 - x_h| averaged over the model's channels, then the same 5x5 median filter as AnoFPDM;
the mask is thresholded like the intensity baseline (tau chosen on validation with the masks). L and w are the
method's two other parameters (arguments, or the model's calibration); the paper tuned them by a grid search
with pixel labels, which is not repeated here.

Both baselines keep the mask inside the brain pixels (``metrics.brain_pixels``) and drop the same small
connected components as AnoFPDM. Neither decides healthy/unhealthy: in the "mixed" setting their masks are
scored as they are.

Cost of the reconstruction per slice, for the grid 0, s, 2s, ..., L (n steps): n - 1 null evaluations to
encode (the clean image stands for timestep 0, as in AnoFPDM's encoding) and n guided + null evaluations to
decode, each pair in one batched call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets import SliceSet
from ..errors import InputError
from ..metrics import dice
from ..progress import Progress
from ..schedule import CLEAN, Schedule, ddim_invert_step, ddim_step, timestep_grid
from ..volume import restore_intensity
from ._checks import check_int, check_real
from .forward import NULL_LABEL, BatchedGuidance, EpsModel
from .threshold import MAX_SMALL_COMPONENT, MEDIAN_SIZE, median_filter, remove_small_components

# candidate percentiles of the validation brain scores: coarse below 99, fine above (lesions are a few percent)
PERCENTILES = tuple(float(p) for p in np.r_[np.arange(80.0, 99.0, 1.0), np.arange(99.0, 99.95, 0.1)].round(2))
DEFAULT_NOISE_FRACTION = 0.5  # L = 0.5 T when neither an argument nor the calibration gives it
DEFAULT_RECONSTRUCTION_STRIDE = 10


@dataclass(frozen=True)
class Reconstruction:
    """Settings of the reconstruction baseline."""

    noise_level: int  # L, a 0-based timestep; the grid ends at the largest multiple of stride <= L
    w: float  # guidance strength of the decoding
    stride: int = DEFAULT_RECONSTRUCTION_STRIDE
    healthy_label: int = 0
    clip_x0: bool = True  # clamp x0 predictions to [-1, 1] while decoding (guided-diffusion's clip_denoised)
    median_size: int | None = MEDIAN_SIZE

    def grid(self, schedule: Schedule) -> list[int]:
        check_int("reconstruction noise level L", self.noise_level, low=1, high=schedule.num_timesteps - 1)
        check_int("reconstruction stride", self.stride, low=1, high=self.noise_level)
        check_real("guidance strength w", self.w, low=0.0)
        return timestep_grid(schedule.num_timesteps, stride=self.stride, stop=self.noise_level + 1)

    def evaluations_per_slice(self, schedule: Schedule) -> int:
        steps = len(self.grid(schedule))
        return steps - 1 + steps * (2 if self.w > 0 else 1)


def reconstruction_settings(calibration: dict, schedule: Schedule, *, noise_level: int | None = None,
                            w: float | None = None, stride: int | None = None,
                            healthy_label: int = 0) -> Reconstruction:
    """Arguments first, then the bundle's calibration ("reconstruction": {"noise_level", "w", "stride"}; w falls
    back to AnoFPDM's calibrated "w"), then L = 0.5 T and the default stride."""
    stored = calibration.get("reconstruction") or {}
    if w is None:
        w = stored.get("w", calibration.get("w"))
    if w is None:
        raise InputError("the reconstruction baseline needs a guidance strength w and the model has none calibrated",
                         fix="pass --reconstruction-w or calibrate the model first")
    if noise_level is None:
        noise_level = stored.get("noise_level", round(DEFAULT_NOISE_FRACTION * schedule.num_timesteps))
    stride = stride if stride is not None else stored.get("stride", DEFAULT_RECONSTRUCTION_STRIDE)
    settings = Reconstruction(noise_level=int(noise_level), w=float(w), stride=int(stride), healthy_label=healthy_label)
    settings.grid(schedule)  # validate now, before any work
    return settings


def reconstruct_healthy(eps_model: EpsModel, schedule: Schedule, x0: torch.Tensor, settings: Reconstruction, *,
                        on_step: Callable[[], None] | None = None) -> tuple[torch.Tensor, int]:
    """DDIM-encode x0 ([B, C, H, W] in [-1, 1]) with the null label to L, decode with guidance towards the healthy
    label to a clean image; returns (x_h, network evaluations per slice)."""
    grid = settings.grid(schedule)
    encoder = BatchedGuidance(eps_model, x0, NULL_LABEL, with_null=False)  # null label only
    decoder = BatchedGuidance(eps_model, x0, settings.healthy_label, with_null=settings.w > 0)
    x = x0
    with torch.no_grad():
        for t, t_next in itertools.pairwise(grid):
            eps_null, _ = encoder(x, t)
            x = ddim_invert_step(schedule, x, t, t_next, eps_null)
            if on_step is not None:
                on_step()
        for k in range(len(grid) - 1, -1, -1):
            eps_h, eps_null = decoder(x, grid[k])
            eps = eps_h if eps_null is None else (1.0 + settings.w) * eps_h - settings.w * eps_null
            x = ddim_step(schedule, x, grid[k], grid[k - 1] if k else CLEAN, eps, clip_x0=settings.clip_x0)
            if on_step is not None:
                on_step()
    return x, (encoder.rows + decoder.rows) // x0.shape[0]


def reconstruction_scores(eps_model: EpsModel, schedule: Schedule, images: np.ndarray, settings: Reconstruction, *,
                          channels: Sequence[int] | None = None, chunk_size: int = 16,
                          device: str | torch.device = "cpu",
                          task: str = "reconstruction baseline") -> tuple[np.ndarray, int]:
    """Anomaly scores |x0 - x_h| for slices [N, C, H, W], averaged over ``channels`` (default all; AnoFPDM's scored
    modalities in the evaluation), median-filtered: ([N, H, W], network evaluations per slice)."""
    check_int("chunk size", chunk_size, low=1)
    steps = 2 * len(settings.grid(schedule)) - 1
    chunks = range(0, len(images), chunk_size)
    scores, evaluations = np.empty((len(images), *images.shape[2:]), np.float32), 0
    with Progress(len(chunks) * steps, task, unit="step") as bar:
        for start in chunks:
            x0 = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk_size])).to(device)
            healthy, evaluations = reconstruct_healthy(eps_model, schedule, x0, settings, on_step=bar.update)
            difference = (x0 - healthy).abs()
            score = (difference if channels is None else difference[:, list(channels)]).mean(dim=1)
            if settings.median_size is not None:
                score = median_filter(score, settings.median_size)
            scores[start:start + len(x0)] = score.cpu().numpy()
    return scores, evaluations


def intensity_scores(data: SliceSet, modalities: Sequence[str], modality: str = "flair") -> np.ndarray:
    """The intensity baseline's score [N, H, W]: each slice's FLAIR in units of its VOLUME's scale (the 99th
    percentile of the brain, as the anofpdm recipe divides by before its per-slice min-max step).

    The model's own input cannot serve: its per-slice min-max stretch makes every slice's brightest pixel 1, so a
    lesion-free slice looks as bright as a lesion and one global threshold means nothing (Meissen et al. threshold
    volume-normalised images).
    """
    if modality not in modalities:
        raise InputError(f"the intensity baseline thresholds {modality.upper()}, which this model does not use "
                         f"(it uses {', '.join(modalities)})", fix="leave 'intensity' out of the variants")
    channel = list(modalities).index(modality)
    scores = np.empty((len(data), *data.images.shape[2:]), np.float32)
    for case in dict.fromkeys(data.cases):
        rows = data.of_case(case)
        stats = data.geometries[case].intensity
        scores[rows] = restore_intensity(data.images[rows, channel], stats, channel=channel) / stats.scales[channel]
    return scores


def threshold_masks(scores: np.ndarray, brain: np.ndarray, threshold: float, *,
                    max_component_size: int | np.ndarray = MAX_SMALL_COMPONENT) -> np.ndarray:
    """score >= threshold inside the brain, components of <= max_component_size pixels (one value, or one per
    slice as pipeline.segment_slices reports them) dropped: bool [N, H, W]."""
    mask = torch.from_numpy((np.asarray(scores) >= threshold) & np.asarray(brain, bool))
    limits = np.broadcast_to(np.asarray(max_component_size, dtype=np.int64), (len(mask),))
    for limit in np.unique(limits):
        if limit > 0:
            rows = torch.from_numpy(np.flatnonzero(limits == limit))
            mask[rows] = remove_small_components(mask[rows], int(limit))
    return mask.numpy()


def choose_threshold(scores: np.ndarray, truth: np.ndarray, brain: np.ndarray, *,
                     percentiles: Sequence[float] = PERCENTILES,
                     max_component_size: int | np.ndarray = MAX_SMALL_COMPONENT) -> tuple[float, dict]:
    """The percentile of the validation brain scores whose threshold maximises the pooled validation Dice of
    ``threshold_masks`` (lowest percentile on ties). Uses pixel labels: for baselines only."""
    brain = np.asarray(brain, bool)
    if not brain.any():
        raise InputError("the validation slices have no brain pixels", fix="check the validation cases")
    if not np.asarray(truth).any():
        raise InputError("the validation split has no lesion pixels, so a baseline threshold cannot be chosen",
                         fix="add validation cases with lesion masks")
    candidates = np.percentile(np.asarray(scores)[brain], percentiles)
    dices = [dice(threshold_masks(scores, brain, float(v), max_component_size=max_component_size), truth)
             for v in candidates]
    best = int(np.argmax(dices))
    record = {"parameter": "threshold", "uses_pixel_labels": True,
              "method": "percentile of the validation brain scores maximising the pooled validation Dice",
              "percentile": float(percentiles[best]), "value": float(candidates[best]),
              "validation_dice_pooled": float(dices[best]), "validation_slices": len(truth),
              "dice_per_percentile": [[float(p), float(d)] for p, d in zip(percentiles, dices, strict=True)]}
    return float(candidates[best]), record

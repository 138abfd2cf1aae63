"""Training restoration models on clean slices degraded on the fly.

Methods: ``ddpm`` (an ordinary unconditional epsilon model, for noise-level-matched denoising), ``conditional``
(Daw et al.: the degraded slice as extra channels; p_cond(t) masking for denoising), ``cvdm`` (learned pixel-wise
schedule), ``cvdm-simple`` (one learned global schedule) and ``cvdm-linear`` (the fixed linear schedule in the
same continuous-time machinery). Every batch draws fresh degradations from the loop's generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets import load_slices
from ..errors import InputError
from ..manifest import read_manifest
from ..nets.presets import build_preset
from ..schedule import linear_schedule
from ..train import TrainSettings, train
from . import cvdm, degrade
from .conditional import DEFAULT_TEMPERATURE, conditional_loss
from .model import CVDM_KINDS, METHODS, NORMALISATION, TASKS, RestoreModel, condition_channels, save_restore_model

DEFAULT_SIGMA_RANGE = (0.02, 0.3)  # Rician noise, normalised units (1-15 % of the intensity range)
IMPUTE_FRACTION_RANGE = (0.1, 0.6)
SCHEDULE_NET = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                "num_head_channels": -1, "dropout": 0.0}


def degrade_batch(x0: torch.Tensor, task: str, generator: torch.Generator, *, sigma_range: Sequence[float],
                  factors: Sequence[int]) -> torch.Tensor:
    """The condition for clean slices x0 [B, 1, H, W]: noisy, partly missing (+ observed mask) or low-resolution."""
    batch = x0.shape[0]
    if task == "denoise":
        low, high = sigma_range
        sigma = low + (high - low) * torch.rand(batch, generator=generator)
        return degrade.rician_noise(x0, sigma, generator).image
    if task == "impute":
        low, high = IMPUTE_FRACTION_RANGE
        fraction = float(low + (high - low) * torch.rand(1, generator=generator))
        kind = int(torch.randint(3, (1,), generator=generator))
        if kind == 2:
            out = degrade.drop_box(x0, max(4, int(x0.shape[-1] * fraction / 1.5)), generator)
        else:
            out = (degrade.drop_voxels if kind == 0 else degrade.drop_lines)(x0, fraction, generator)
        return torch.cat([out.image, out.known], dim=1)
    factor = factors[int(torch.randint(len(factors), (1,), generator=generator))]
    return degrade.downsample(x0, factor).image


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` window of each slice [B, C, H, W]."""
    height, width = images.shape[-2:]
    tops = torch.randint(height - size + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(width - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([x[..., t:t + size, s:s + size] for x, t, s in zip(images, tops, lefts, strict=True)])


def _batches(images: torch.Tensor, task: str, settings: TrainSettings, device: torch.device, *, method: str,
             num_timesteps: int, sigma_range: Sequence[float], factors: Sequence[int], crop: int | None
             ) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    def next_batch(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        x0 = images[torch.randint(len(images), (settings.batch_size,), generator=generator)]
        if crop:
            x0 = random_crops(x0, crop, generator)
        noise = torch.randn(x0.shape, generator=generator)
        if method == "ddpm":
            t = torch.randint(num_timesteps, (len(x0),), generator=generator)
            return tuple(v.to(device) for v in (x0, t, noise))
        condition = degrade_batch(x0, task, generator, sigma_range=sigma_range, factors=factors)
        if method in CVDM_KINDS:
            return tuple(v.to(device) for v in (x0, condition, torch.rand(len(x0), generator=generator), noise))
        t = torch.randint(num_timesteps, (len(x0),), generator=generator)
        uniform = torch.rand(len(x0), generator=generator)
        return tuple(v.to(device) for v in (x0, condition, t, noise, uniform))

    return next_batch


class _CVDMJoint(nn.Module):
    """Noise model and schedule trained together by the one training loop."""

    def __init__(self, eps: nn.Module, learned: cvdm.LearnedSchedule):
        super().__init__()
        self.eps, self.learned = eps, learned


def _check(task: str, method: str, factors: Sequence[int], sigma_range: Sequence[float], crop: int | None,
           image_size: int) -> None:
    if task not in TASKS:
        raise InputError(f"unknown restoration task {task!r}", fix=f"use one of {', '.join(TASKS)}")
    if method not in METHODS:
        raise InputError(f"unknown restoration method {method!r}", fix=f"use one of {', '.join(METHODS)}")
    if method == "ddpm" and task != "denoise":
        raise InputError("an unconditional DDPM only denoises (by noise-level matching)",
                         fix="use --method conditional or cvdm for imputation and super-resolution")
    bad = [f for f in factors if f not in degrade.SUPERRES_FACTORS]
    if task == "superres" and (not factors or bad):
        raise InputError(f"unsupported super-resolution factor(s) {bad or list(factors)}",
                         fix=f"use factors among {degrade.SUPERRES_FACTORS}")
    if not 0 < sigma_range[0] < sigma_range[1] <= 1:
        raise InputError(f"noise range {list(sigma_range)} must satisfy 0 < low < high <= 1",
                         fix="give e.g. --sigma-range 0.02 0.3 (fractions of the normalised range)")
    if crop is not None and not (16 <= crop <= image_size and crop % 8 == 0):
        raise InputError(f"crop size {crop} must be a multiple of 8 between 16 and the slice size {image_size}",
                         fix="give e.g. --crop 32, or leave it out to train on whole slices")


def build_restore_model(task: str, method: str, *, preset: str = "tiny", image_size: int = 64,
                        modality: str = "t1", info: dict[str, Any] | None = None) -> RestoreModel:
    """A freshly initialised model for task/method (the networks and the schedule)."""
    conditions = 0 if method == "ddpm" else condition_channels(task)
    extra = 1 if method in CVDM_KINDS else 0  # the gamma map
    eps = build_preset(preset, image_size=image_size, in_channels=1 + conditions + extra, out_channels=1,
                       num_classes=None)
    if method in CVDM_KINDS:
        kind = CVDM_KINDS[method]
        pixel = build_preset("tiny", image_size=image_size, in_channels=conditions, out_channels=1,
                             num_classes=None, **SCHEDULE_NET) if kind == "pixel" else None
        return RestoreModel(task, method, eps, learned=cvdm.LearnedSchedule(kind, pixel), image_size=image_size,
                            modality=modality, info=dict(info or {}))
    return RestoreModel(task, method, eps, schedule=linear_schedule(1000), image_size=image_size, modality=modality,
                        info=dict(info or {}))


def train_restore_model(manifest: str | Path, out: str | Path, *, task: str, method: str, modality: str = "t1",
                        preset: str = "tiny", image_size: int = 64, factors: Sequence[int] = (2, 4),
                        sigma_range: Sequence[float] = DEFAULT_SIGMA_RANGE,
                        temperature: float = DEFAULT_TEMPERATURE, crop: int | None = None,
                        settings: TrainSettings | None = None, work_dir: str | Path | None = None) -> Path:
    """Train on the clean slices of the manifest's ``train`` split and write a restoration bundle to ``out``.

    ``crop``: train on random square windows of this size (for convolutional networks, e.g. preset tiny-conv).
    """
    settings = settings or TrainSettings()
    factors = tuple(int(f) for f in factors) if task == "superres" else ()
    _check(task, method, factors, sigma_range, crop, image_size)
    table = read_manifest(manifest, modalities=(modality,))
    rows = table.split("train")
    if not rows:
        raise InputError("no rows with split 'train'", path=table.path, fix="mark the training cases with split=train")
    data = load_slices(rows, (modality,), (image_size, image_size), NORMALISATION, task="reading clean cases")
    info = {"sigma_range": list(sigma_range), "factors": list(factors), "temperature": temperature,
            "probabilistic_conditioning": method == "conditional" and task == "denoise",
            "noise": "rician" if task == "denoise" else None, "crop": crop}
    torch.manual_seed(settings.seed)
    model = build_restore_model(task, method, preset=preset, image_size=image_size, modality=modality, info=info)
    device = torch.device(settings.device)
    batches = _batches(torch.from_numpy(data.images), task, settings, device, method=method,
                       num_timesteps=1000, sigma_range=sigma_range, factors=factors, crop=crop)
    work = Path(work_dir) if work_dir else Path(out).with_name(Path(out).name + ".training")
    if model.is_cvdm:
        def joint_loss(joint: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return cvdm.cvdm_loss(joint.eps, joint.learned, *batch).total

        joint, history = train(_CVDMJoint(model.eps, model.learned), joint_loss, batches, settings, work,
                               task=f"training restore {task} ({method})")
        model.eps, model.learned = joint.eps, joint.learned
    else:
        loss = (_ddpm_loss(model.schedule) if method == "ddpm" else
                conditional_loss(model.schedule, probabilistic=info["probabilistic_conditioning"],
                                 temperature=temperature))
        model.eps, history = train(model.eps, loss, batches, settings, work, task=f"training restore {task} ({method})")
    summary = {"manifest": str(Path(manifest).resolve()), "cases": len(rows), "slices": len(data), "preset": preset,
               "settings": asdict(settings), "final_loss": history[-1]["loss"] if history else None,
               "loss_history": history}
    return save_restore_model(out, model, summary)


def _ddpm_loss(schedule: Any) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    from ..schedule import q_sample

    def loss(network: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x0, t, noise = batch
        return torch.nn.functional.mse_loss(network(q_sample(schedule, x0, t, noise), t), noise)

    return loss

"""Restore a volume: read, go to model slices, restore, come back to the input's exact geometry and units.

Only voxels the model saw (kept slices, inside the crop) are replaced; everything else keeps the input's values,
and imputation keeps every observed voxel. Noise is estimated on the input's native voxels (Haar MAD inside the
head, or Rayleigh in a noisy background for Rician data) and carried to model units: the intensity scaling, and
the resampling to the model grid, which averages neighbouring voxels (its effect on white noise is measured by
pushing unit noise through the same resize).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from ..errors import InputError
from ..progress import Progress, warn
from ..volume import (
    PLANES,
    Case,
    SliceGeometry,
    back_from_plane,
    canonical_array,
    foreground_mask,
    from_model_slices,
    grid_difference,
    image_grid,
    missing_axial_slices,
    read_case,
    read_image,
    resize_slices,
    restore_intensity,
    to_model_grid,
    to_model_slices,
    view_case_in_plane,
    view_in_plane,
)
from . import cvdm
from .conditional import sample_conditional
from .degrade import FILL
from .denoise import DenoiseSettings, denoise
from .model import NORMALISATION, RestoreModel, load_restore_model
from .noise import SigmaOutOfRange, estimate_sigma_gaussian, estimate_sigma_rician, match_timestep

CHUNK = 16  # slices per network batch


@dataclass
class RestoreSettings:
    samples: int = 1  # > 1: an uncertainty map (per-voxel variance over the samples)
    sampler: str = "ddim"  # matched denoising
    cycles: int = 1
    steps: int = 50  # DDIM steps (conditional) / at most this many (matched denoising); CVDM uses its own 200
    cvdm_steps: int = cvdm.SAMPLING_STEPS
    start: float | None = None  # conditional/CVDM chain start in (0, 1]; None: the model's calibrated start
    factor: int | None = None  # super-resolution factor the input has lost
    sigma: float | None = None  # known noise level in input units (skips the estimate)
    plane: str = "auto"  # slicing plane; auto: axial, or coronal when whole axial slices are to be imputed
    seed: int = 0
    device: str = "cpu"


@dataclass
class RestoreResult:
    image: sitk.Image
    uncertainty: sitk.Image | None = None
    schedule_map: sitk.Image | None = None
    report: dict[str, Any] = field(default_factory=dict)


# -- noise in model units ---------------------------------------------------------------------------------


def noise_transfer(geometry: SliceGeometry, seed: int = 0) -> float:
    """Standard deviation on the model grid of unit white noise on the input's crop (resampling averages it)."""
    noise = np.random.default_rng(seed).standard_normal((4, 1, *geometry.padded_size)).astype(np.float32)
    return float(resize_slices(noise, geometry.model_size).std())


def estimate_input_sigma(volume: np.ndarray) -> tuple[float, str]:
    """Noise sigma of a canonical volume in its units, and which estimator gave it."""
    head = foreground_mask(volume)
    background = ~head & (volume != 0)
    if background.sum() > 0.5 * (~head).sum() and (~head).sum() > 1000:  # a noisy (not zeroed) background
        sigma = estimate_sigma_rician(volume, ~head)
        if math.isfinite(sigma):
            return sigma, "rician-background"
    return estimate_sigma_gaussian(volume, head), "gaussian-mad"


def sigma_in_model_units(sigma: float, geometry: SliceGeometry) -> float:
    """onls normalisation maps [0, scale] to [-1, 1] (factor 2 / scale), then the resampling transfer."""
    return sigma * 2.0 / geometry.intensity.scales[0] * noise_transfer(geometry)


# -- per task ---------------------------------------------------------------------------------------------


def _chunks(count: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, count)) for i in range(0, count, CHUNK)]


def uses_matched_entry(model: RestoreModel, settings: RestoreSettings) -> bool:
    """Denoise by entering the chain at the noise-matched step: always for a DDPM, and for a conditional DDPM
    unless a sampling start is asked for (``--start 1`` is the paper's conditional chain from noise)."""
    return model.enters_at_matched_step and (model.method == "ddpm" or settings.start is None)


def _matched_denoise(model: RestoreModel, slices: torch.Tensor, sigma: float, settings: RestoreSettings,
                     bar: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
    outputs, report = [], {}
    for part in _chunks(len(slices)):
        result = denoise(model.denoiser_eps(slices[part]), model.schedule, slices[part], sigma,
                         DenoiseSettings(sampler=settings.sampler, ddim_steps=settings.steps, cycles=settings.cycles,
                                         seed=settings.seed))
        outputs.append(result.image)
        report = {"entry_timesteps": [m.t for m in result.matches], "entry_sigmas": [m.sigma for m in result.matches]}
        bar.update(part.stop - part.start)
    return torch.cat(outputs), report


def _sample(model: RestoreModel, condition: torch.Tensor, seed: int, settings: RestoreSettings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = model.sampling_start if settings.start is None else settings.start
    if model.is_cvdm:
        return cvdm.sample(model.eps, model.learned, condition, steps=settings.cvdm_steps, generator=generator,
                           start=start)
    return sample_conditional(model.eps, model.schedule, condition, steps=settings.steps,
                              probabilistic=model.probabilistic, temperature=model.temperature, generator=generator,
                              start=start)


def sample_restorations(model: RestoreModel, condition: torch.Tensor, settings: RestoreSettings, bar: Progress
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Conditional/CVDM restoration of model-grid conditions [S, C, H, W]: the mean of ``settings.samples`` draws,
    their per-pixel variance (None for one draw) and the learned schedule map (pixel-wise CVDM only)."""
    draws = []
    for k in range(settings.samples):
        parts = []
        for part in _chunks(len(condition)):
            with torch.no_grad():
                parts.append(_sample(model, condition[part], settings.seed + 1000 * k + part.start, settings))
            bar.update(part.stop - part.start)
        draws.append(torch.cat(parts))
    stack = torch.stack(draws)
    variance = stack.var(dim=0, unbiased=True) if settings.samples > 1 else None
    schedule = (torch.cat([cvdm.schedule_map(model.learned, condition[part]) for part in _chunks(len(condition))])
                if model.has_schedule_map else None)  # in chunks: the schedule network on every slice at once is GBs
    return stack.mean(dim=0), variance, schedule


# -- the volume API -----------------------------------------------------------------------------------------

NETWORK_MULTIPLE = 8  # the UNets halve the slice three times


def _slice_size(model: RestoreModel) -> tuple[int, int] | None:
    """The slice grid: the model's training size, or for a crop-trained model None, the input's own pixels (the
    crop around the head padded to a square), so that restoration never resamples the input to a coarser grid."""
    return None if model.native_resolution else (model.image_size, model.image_size)


def _pad_for_network(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Edge-replicate slices [S, C, H, W] up to multiples of NETWORK_MULTIPLE; returns them and the true size."""
    height, width = x.shape[-2:]
    rows, columns = (-height) % NETWORK_MULTIPLE, (-width) % NETWORK_MULTIPLE
    padded = torch.nn.functional.pad(x, (0, columns, 0, rows), mode="replicate") if rows or columns else x
    return padded, (height, width)


def _check_task(model: RestoreModel, task: str, settings: RestoreSettings, mask: Any) -> None:
    if task != model.task:
        raise InputError(f"this model restores {model.task!r}, not {task!r}", path=model.path,
                         fix=f"give a model trained with --task {task}")
    if task == "superres":
        trained = model.info.get("factors") or []
        if settings.factor not in trained:
            raise InputError(f"super-resolution factor {settings.factor} is not one the model was trained for "
                             f"({', '.join(map(str, trained))})", path=model.path,
                             fix=f"pass --factor {' or '.join(map(str, trained))}, or train a model for it")
    if task == "impute" and mask is None:
        raise InputError("imputation needs the mask of missing voxels", fix="pass --mask MISSING.nii.gz (1 = missing)")
    if settings.samples < 1:
        raise InputError(f"samples must be at least 1 (got {settings.samples})", fix="pass --samples 1 or more")
    if settings.plane not in ("auto", *PLANES):
        raise InputError(f"unknown slicing plane {settings.plane!r}", fix=f"pass one of auto, {', '.join(PLANES)}")
    if settings.start is not None and not 0 < settings.start <= 1:
        raise InputError(f"the sampling start {settings.start} is outside (0, 1]",
                         fix="pass --start 1 for the full chain from noise, or a fraction such as 0.2")


def _read_mask(mask: Any, reference: sitk.Image) -> sitk.Image:
    """The missing-voxel mask, checked to lie on the input's voxel grid."""
    image = mask if isinstance(mask, sitk.Image) else read_image(mask, label_map=True)
    problem = grid_difference(image_grid(reference), image_grid(image))
    if problem:
        raise InputError(f"the mask does not match the image ({problem})",
                         path=str(mask) if not isinstance(mask, sitk.Image) else "mask",
                         fix="give a mask on the input image's voxel grid")
    return image


def _plane(settings: RestoreSettings, missing: sitk.Image | None) -> str:
    """The slicing plane: as asked, or (auto) coronal when whole axial slices are missing, which no axial slice
    can show the model; a missing axial slice is a missing row of every coronal slice."""
    whole = 0 if missing is None else missing_axial_slices(missing)
    if settings.plane == "auto":
        return "coronal" if whole else "axial"
    if settings.plane == "axial" and whole:
        warn(f"{whole} axial slices are missing entirely: in axial slices the model sees nothing of them and can "
             "only invent them; --plane coronal or sagittal fills them from their neighbours")
    return settings.plane


def _fill_missing(case: Case, holes: np.ndarray) -> Case:
    """The case with each missing voxel (``holes``, the input's array layout) set to its nearest observed voxel's
    value. Only for finding the head and the intensity scale (holes, and zeroed slices above all, would break
    both); the model never sees these values."""
    if holes.all():
        raise InputError("the mask marks every voxel as missing", path="mask", fix="give a mask of the missing part")
    if not holes.any():
        return case
    spacing = tuple(reversed(case.reference.GetSpacing()))
    nearest = ndimage.distance_transform_edt(holes, sampling=spacing, return_distances=False, return_indices=True)
    images = {}
    for modality, image in case.images.items():
        filled = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[tuple(nearest)])
        filled.CopyInformation(image)
        images[modality] = filled
    return Case(images=images, sources=dict(case.sources))


def _observed(missing: sitk.Image, geometry: SliceGeometry) -> np.ndarray:
    """The model-grid observed mask [S, 1, H, W] of a missing-voxel mask on the sliced (plane-turned) grid."""
    on_model_grid = to_model_grid(missing, geometry, interpolation="nearest", source="mask") > 0
    return (~on_model_grid)[:, None].astype(np.float32)


def _back(maps: np.ndarray, geometry: SliceGeometry, reference: np.ndarray | None, replace: np.ndarray | None
          ) -> sitk.Image:
    """Model-grid slices (normalised) -> input units on the input grid; keep ``reference`` outside the model's view."""
    values = restore_intensity(maps, geometry.intensity)
    image = from_model_slices(values, geometry)
    if reference is None:
        return image
    covered = sitk.GetArrayFromImage(from_model_slices(np.ones_like(values), geometry, interpolation="nearest")) > 0
    array = sitk.GetArrayFromImage(image)
    keep = ~covered
    if replace is not None:
        keep |= ~replace
    array = np.where(keep, reference, array).astype(np.float32)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def restore_volume(model: str | os.PathLike[str] | RestoreModel | None, image: Any, task: str, *,
                   settings: RestoreSettings | None = None, mask: Any = None) -> RestoreResult:
    """Denoise, impute or super-resolve one volume (a path or a SimpleITK image) with a restoration model
    (a folder, a loaded model, or None / "demo" for the bundled demo model of ``task``)."""
    settings = settings or RestoreSettings()
    if not isinstance(model, RestoreModel):
        model = load_restore_model(model, task=task, device=settings.device)
    _check_task(model, task, settings, mask)
    case = read_case({model.modality: image}, (model.modality,))
    original = case.reference
    missing = _read_mask(mask, original) if task == "impute" else None
    holes = None if missing is None else sitk.GetArrayFromImage(missing) > 0  # replaced voxels, input layout
    plane = _plane(settings, missing)
    case = view_case_in_plane(case if holes is None else _fill_missing(case, holes), plane)
    slices, geometry = to_model_slices(case, _slice_size(model), normalisation=NORMALISATION)
    reference = sitk.GetArrayFromImage(original).astype(np.float32)  # the voxel layout of every plane's view
    report: dict[str, Any] = {"task": task, "method": model.method, "plane": plane, "slices": len(slices)}
    matched = uses_matched_entry(model, settings)
    if not matched:
        report["sampling_start"] = model.sampling_start if settings.start is None else settings.start
    x = torch.from_numpy(slices).to(settings.device)
    if task == "denoise":
        native, _ = canonical_array(case.reference)
        sigma, estimator = (settings.sigma, "given") if settings.sigma else estimate_input_sigma(native)
        sigma_model = sigma_in_model_units(sigma, geometry)
        report.update(sigma=sigma, sigma_estimator=estimator, sigma_model_units=sigma_model)
        try:
            match = match_timestep(model.schedule, sigma_model) if model.schedule is not None else None
        except SigmaOutOfRange as error:
            raise InputError(f"estimated noise level is out of range: {error}", path=case.sources.get(model.modality),
                             fix="check the input, or pass the noise level with --sigma") from error
        low = model.info.get("sigma_range", [0.0, math.inf])[0]
        if (match is not None and match.clean) or sigma_model < 0.5 * low:
            warn(f"the image looks clean already (estimated sigma {sigma:.4g}, {sigma_model:.4f} in model units); "
                 "returning it unchanged")
            report.update(already_clean=True)
            return RestoreResult(image=sitk.Image(original), report=report)
        high = model.info.get("sigma_range", [0.0, math.inf])[1]
        if model.method != "ddpm" and sigma_model > high:
            warn(f"noise level {sigma_model:.3f} (model units) is above what the model was trained on ({high}); "
                 "the result may keep noise")
    if task == "impute":
        observed = _observed(view_in_plane(missing, plane), geometry)
        known = torch.from_numpy(observed).to(x.device)
        x = torch.cat([torch.where(known.bool(), x, torch.full_like(x, FILL)), known], dim=1)
        report.update(missing_fraction=float(1 - observed.mean()))
    if task == "superres":
        report.update(factor=settings.factor)
    if matched and settings.samples > 1:
        warn("denoising from the matched noise level gives one result and no uncertainty map "
             "(a conditional denoiser gives one with --start 1)")
    total = len(slices) * (1 if matched else settings.samples)
    variance = schedule = None
    x, size = _pad_for_network(x)
    with Progress(total, f"restore {task}", unit="slice") as bar:
        if matched:
            restored, details = _matched_denoise(model, x, sigma_model, settings, bar)
            report.update(details)
        else:
            restored, variance, schedule = sample_restorations(model, x, settings, bar)
    restored, variance, schedule = (None if v is None else v[..., :size[0], :size[1]]
                                    for v in (restored, variance, schedule))
    result = RestoreResult(image=back_from_plane(_back(restored[:, 0].cpu().numpy(), geometry, reference, holes),
                                                 original), report=report)
    if variance is not None:  # onls is linear: variance scales by (scale / 2)^2
        scale = geometry.intensity.scales[0] / 2.0
        result.uncertainty = back_from_plane(from_model_slices(variance[:, 0].cpu().numpy() * scale**2, geometry),
                                             original)
    if schedule is not None:
        result.schedule_map = back_from_plane(from_model_slices(schedule[:, 0].cpu().numpy(), geometry), original)
    return result

"""Evaluating restoration models on held-out slices with known clean ground truth, beside classical baselines.

Clean slices of a manifest split (a ``phantoms --noise-free`` cohort) are degraded synthetically: Rician noise at
several levels (denoise), dropped voxels, dropped rows and a missing square (impute), in-plane block averaging by
2 and 4 (superres). Each degraded set is restored by the classical baselines (non-local means and total
variation; biharmonic inpainting; bilinear and bicubic interpolation) and by every model given for the task, and
scored on the model grid in normalised units mapped to [0, 1], inside the head: PSNR, SSIM, MAE (head voxels) and
MS-SSIM (3 scales, whole slice).

Conditional and CVDM models are scored on the mean of ``samples`` draws, with their chain started from pure noise
(the papers) and at their calibrated start (``calibrate restore``) when that differs; with two draws or more, the
Spearman correlation between the per-voxel variance and the absolute error (over head voxels) says whether the
uncertainty map ranks the worst voxels; for CVDM the learned schedule map is ranked the same way. The
unconditional DDPM is entered at the matched timestep and, to show what the paper shows, at half, twice and four
times it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import load_slices
from ..manifest import read_manifest
from ..metrics import ms_ssim
from ..progress import Progress
from . import cvdm, degrade
from .model import NORMALISATION, RestoreModel

DEFAULT_SIGMAS = (0.05, 0.1, 0.2)
ENTRY_FACTORS = (0.5, 1.0, 2.0, 4.0)  # the unconditional DDPM entered at these multiples of the matched timestep
IMPUTE_SETTINGS = (("voxels", 0.3), ("rows", 0.25), ("box", 16))
HEAD_LEVEL = -0.98  # normalised units: voxels above this in the clean slice are head, not air


@dataclass(frozen=True)
class EvaluationSettings:
    sigmas: Sequence[float] = DEFAULT_SIGMAS
    samples: int = 4  # draws per conditional/CVDM restoration (mean scored; variance = uncertainty)
    steps: int = 50  # DDIM steps: conditional sampling, and at most this many after the matched entry
    cvdm_steps: int = cvdm.SAMPLING_STEPS
    seed: int = 0


@dataclass
class Degradation:
    """One degraded version of the clean slices, as a model and a baseline receive it."""

    task: str
    setting: str
    image: torch.Tensor  # [S, 1, H, W] what a viewer sees
    condition: torch.Tensor  # [S, C, H, W] what a conditional model receives
    sigma: float | None = None
    factor: int | None = None
    known: torch.Tensor | None = None  # [S, 1, H, W] impute: 1 where observed


@dataclass
class Restoration:
    method: str
    image: np.ndarray  # [S, H, W]
    variance: np.ndarray | None = None
    schedule: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationRows:
    rows: list[dict[str, Any]] = field(default_factory=list)
    examples: list[tuple[Degradation, list[Restoration], list[Restoration]]] = field(default_factory=list)

    def add(self, setting: str, method: str, scores: dict[str, float], **extra: Any) -> None:
        self.rows.append({"setting": setting, "method": method, **scores, **extra})

    def markdown(self) -> str:
        lines = ["| setting | method | PSNR | SSIM | MS-SSIM | MAE | notes |", "|---|---|---|---|---|---|---|"]
        for row in self.rows:
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                              if k not in ("setting", "method", "psnr", "ssim", "ms_ssim", "mae"))
            lines.append(f"| {row['setting']} | {row['method']} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                         f"{row['ms_ssim']:.3f} | {row['mae']:.4f} | {extra} |")
        return "\n".join(lines) + "\n"


# -- scores ---------------------------------------------------------------------------------------------------


def image_scores(clean: np.ndarray, restored: np.ndarray, head: np.ndarray | None = None) -> dict[str, float]:
    """PSNR (dB), SSIM, MS-SSIM and MAE over slices [S, H, W] in [-1, 1] (scored on [0, 1]), slice means.

    With ``head`` [S, H, W], PSNR, SSIM (the mean of its map) and MAE count the head voxels only, so that the air
    around the head, half of a slice, does not decide the ranking; MS-SSIM always takes the whole slice.
    """
    from skimage.metrics import structural_similarity

    a, b = (np.clip(clean, -1, 1) + 1) / 2, (np.clip(restored, -1, 1) + 1) / 2
    where = np.ones(a.shape, dtype=bool) if head is None else np.asarray(head, dtype=bool)
    psnr, ssim, mae = [], [], []
    for x, y, inside in zip(a, b, where, strict=True):
        if not inside.any():
            continue
        error = (x - y)[inside]
        psnr.append(10 * np.log10(1.0 / max(float(np.mean(error**2)), 1e-12)))
        ssim.append(float(structural_similarity(x, y, data_range=1.0, full=True)[1][inside].mean()))
        mae.append(float(np.abs(error).mean()))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
            "ms_ssim": float(np.mean([ms_ssim(x, y, data_range=1.0) for x, y in zip(a, b, strict=True)])),
            "mae": float(np.mean(mae))}


def uncertainty_rank_correlation(variance: np.ndarray, error: np.ndarray, where: np.ndarray | None = None) -> float:
    """Spearman correlation between per-voxel variance and absolute error (inside ``where`` when given); NaN
    when either is constant (nothing to rank)."""
    from scipy.stats import spearmanr

    if where is not None:
        variance, error = variance[where], error[where]
    return float(spearmanr(variance.ravel(), np.abs(error).ravel()).statistic)


# -- baselines ------------------------------------------------------------------------------------------------


def denoise_baselines(noisy: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Non-local means (sigma-aware) and total-variation denoising of slices [S, H, W] in [-1, 1]. Their strengths
    (on the [0, 1] scale, where the noise is sigma / 2: NLM h = 0.8 x noise, TV weight = 0.5 x noise) were the best
    of a small grid on validation slices of the training cohort at sigma 0.05-0.2: tuned baselines, not straw men."""
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

    unit = (noisy + 1) / 2
    nlm = np.stack([denoise_nl_means(s, h=0.8 * sigma / 2, sigma=sigma / 2, patch_size=5, patch_distance=6)
                    for s in unit])
    tv = np.stack([denoise_tv_chambolle(s, weight=sigma / 4) for s in unit])
    return {"non-local means": nlm * 2 - 1, "total variation": tv * 2 - 1}


def impute_baseline(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    from skimage.restoration import inpaint_biharmonic

    return np.stack([inpaint_biharmonic(s, ~k.astype(bool)) for s, k in zip(image, known, strict=True)])


def superres_baselines(clean: torch.Tensor, factor: int) -> dict[str, np.ndarray]:
    """Bilinear (the model's condition) and bicubic interpolation of the block-averaged slices."""
    low = F.avg_pool2d(clean, factor)
    size = clean.shape[-2:]
    return {f"{mode} interpolation": F.interpolate(low, size=size, mode=mode, align_corners=False)[:, 0].numpy()
            for mode in ("bilinear", "bicubic")}


def baselines(case: Degradation, clean: torch.Tensor) -> dict[str, np.ndarray]:
    if case.task == "denoise":
        return denoise_baselines(case.image[:, 0].numpy(), float(case.sigma))
    if case.task == "impute":
        return {"biharmonic inpainting": impute_baseline(case.image[:, 0].numpy(), case.known[:, 0].numpy())}
    return superres_baselines(clean, int(case.factor))


# -- degradations ---------------------------------------------------------------------------------------------


def degradations(task: str, clean: torch.Tensor, settings: EvaluationSettings, factors: Sequence[int] = (2, 4)
                 ) -> list[Degradation]:
    """The degraded versions of ``clean`` [S, 1, H, W] scored for ``task``, each from its own seeded generator."""
    def generator(k: int) -> torch.Generator:
        return torch.Generator().manual_seed(settings.seed + 7919 * k)

    if task == "denoise":
        cases = []
        for k, sigma in enumerate(settings.sigmas):
            noisy = degrade.rician_noise(clean, sigma, generator(k)).image
            cases.append(Degradation(task, f"Rician sigma={sigma:g}", noisy, noisy, sigma=float(sigma)))
        return cases
    if task == "impute":
        cases = []
        for k, (kind, amount) in enumerate(IMPUTE_SETTINGS):
            if kind == "box":
                out = degrade.drop_box(clean, int(amount), generator(k), within=clean > HEAD_LEVEL)
                label = f"{amount}x{amount} px square in the head missing"
            else:
                drop = degrade.drop_voxels if kind == "voxels" else degrade.drop_lines
                out, label = drop(clean, float(amount), generator(k)), f"{amount:.0%} {kind} missing"
            cases.append(Degradation(task, label, out.image, torch.cat([out.image, out.known], 1), known=out.known))
        return cases
    return [Degradation(task, f"{factor}x in-plane", low, low, factor=factor)
            for factor in factors for low in [degrade.downsample(clean, factor).image]]


# -- models ---------------------------------------------------------------------------------------------------


def restore_with(model: RestoreModel, case: Degradation, settings: EvaluationSettings, name: str
                 ) -> list[Restoration]:
    """The model's restoration(s) of one degraded set; impute keeps every observed voxel, as the pipeline does."""
    from .pipeline import RestoreSettings, sample_restorations

    if model.method == "ddpm":
        return _matched_entries(model, case, settings, name, ENTRY_FACTORS)
    results = _matched_entries(model, case, settings, name, (1,)) if model.enters_at_matched_step else []
    for start in sorted({1.0, model.sampling_start}):  # the papers' chain from noise, and the calibrated start
        sampling = RestoreSettings(samples=settings.samples, steps=settings.steps, cvdm_steps=settings.cvdm_steps,
                                   seed=settings.seed, start=start)
        with Progress(len(case.condition) * settings.samples, f"{name}: {case.setting}", unit="slice") as bar:
            mean, variance, schedule = sample_restorations(model, case.condition, sampling, bar)
        if case.known is not None:
            mean = torch.where(case.known.bool(), case.image, mean)
        label = f"{name}, from noise" if start == 1 else f"{name}, start {start:g}"
        label += f" (mean of {settings.samples})" if settings.samples > 1 else ""
        results.append(Restoration(label, mean[:, 0].numpy(), *(None if v is None else v[:, 0].numpy()
                                                                for v in (variance, schedule)),
                                   extra={"start": start}))
    return results


def _matched_entries(model: RestoreModel, case: Degradation, settings: EvaluationSettings, name: str,
                     factors: Sequence[float]) -> list[Restoration]:
    from .denoise import DenoiseSettings, denoise
    from .noise import match_timestep

    matched = match_timestep(model.schedule, float(case.sigma)).t
    results = []
    for factor in factors:
        t = min(model.schedule.num_timesteps - 1, max(0, round(matched * factor)))
        with torch.no_grad():
            out = denoise(model.denoiser_eps(case.condition), model.schedule, case.image, float(case.sigma),
                          DenoiseSettings(ddim_steps=settings.steps, seed=settings.seed), t_override=t)
        label = f"{name}, matched entry" if factor == 1 else f"{name}, entry {factor:g}x matched"
        results.append(Restoration(label, out.image[:, 0].numpy(), extra={"t": t}))
    return results


# -- the evaluation -------------------------------------------------------------------------------------------


def evaluate_task(task: str, models: dict[str, RestoreModel], clean: torch.Tensor, settings: EvaluationSettings
                  ) -> EvaluationRows:
    """Every degradation of ``task``: the input itself, the baselines and each model, scored against ``clean``."""
    factors = sorted({f for m in models.values() for f in m.info.get("factors") or []}) or [2, 4]
    truth = clean[:, 0].numpy()
    head = truth > HEAD_LEVEL
    rows = EvaluationRows()
    for case in degradations(task, clean, settings, factors):
        rows.add(case.setting, "degraded input", image_scores(truth, case.image[:, 0].numpy(), head))
        classical, restored = [], []
        for name, image in baselines(case, clean).items():
            rows.add(case.setting, name, image_scores(truth, image, head))
            classical.append(Restoration(name, image))
        for name, model in models.items():
            if case.factor is not None and case.factor not in (model.info.get("factors") or []):
                continue
            for result in restore_with(model, case, settings, name):
                extra = dict(result.extra)
                error = result.image - truth
                if result.variance is not None:
                    extra["uncertainty_rank_corr"] = uncertainty_rank_correlation(result.variance, error, head)
                if result.schedule is not None:
                    extra["schedule_rank_corr"] = uncertainty_rank_correlation(result.schedule, error, head)
                rows.add(case.setting, result.method, image_scores(truth, result.image, head), **extra)
                restored.append(result)
        rows.examples.append((case, classical, restored))
    return rows


def held_out_slices(manifest: str | Path, split: str, model: RestoreModel, limit: int) -> torch.Tensor:
    """Up to ``limit`` slices (evenly spread) of the split, preprocessed as the model expects."""
    rows = read_manifest(manifest, modalities=(model.modality,)).split(split)
    data = load_slices(rows, (model.modality,), (model.image_size, model.image_size), NORMALISATION)
    pick = np.linspace(0, len(data) - 1, min(limit, len(data))).round().astype(int)
    return torch.from_numpy(data.images[pick])


def run_evaluation(models: dict[str, RestoreModel], manifest: str | Path, *, split: str = "test", slices: int = 24,
                   settings: EvaluationSettings | None = None) -> tuple[dict[str, EvaluationRows], np.ndarray]:
    """{task: rows} for every task among ``models`` ({name: model}), on the same held-out slices; and the slices."""
    from ..errors import InputError

    settings = settings or EvaluationSettings()
    first = next(iter(models.values()))
    for name, model in models.items():
        if (model.image_size, model.modality) != (first.image_size, first.modality):
            raise InputError(f"model {name} works on {model.modality} {model.image_size} px slices, the others on "
                             f"{first.modality} {first.image_size} px", path=model.path,
                             fix="evaluate models of one modality and slice size together")
    clean = held_out_slices(manifest, split, first, slices)
    results = {}
    for task in (t for t in ("denoise", "impute", "superres") if any(m.task == t for m in models.values())):
        results[task] = evaluate_task(task, {n: m for n, m in models.items() if m.task == task}, clean, settings)
    return results, clean[:, 0].numpy()


def write_evaluation(results: dict[str, EvaluationRows], clean: np.ndarray, out: str | Path, *,
                     command: str | None = None, figure: bool = True) -> dict[str, str]:
    """results.md (a table per task), results.json and one figure per task in ``out``; returns {label: path}."""
    import json

    from ..fileio import results_folder, write_text_atomic
    from .figure import save_restoration_figure

    folder = results_folder(out)
    text = [f"`{command}`\n"] if command else []
    for task, rows in results.items():
        text += [f"## {task}\n", rows.markdown()]
    write_text_atomic(folder / "results.md", "\n".join(text))
    finite = {task: [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                     for row in rows.rows] for task, rows in results.items()}
    write_text_atomic(folder / "results.json",
                      json.dumps({"command": command, "results": finite}, indent=1, allow_nan=False) + "\n")
    outputs = {"results": str(folder / "results.md"), "results_json": str(folder / "results.json")}
    if figure:
        for task, rows in results.items():
            outputs[f"figure_{task}"] = str(save_restoration_figure(
                rows.examples, clean, folder / f"figure-{task}.png", title=f"restoration: {task} (held-out slices)"))
    return outputs

"""The paper's Table 1/2 protocol on longitudinal pairs: counterfactual(baseline, follow-up age) vs the real follow-up.

For each held-out subject (first and last visit of the split): one DDIM encoding of the baseline's slab keeps the
latents at every fixed noise level L and finds ONLS's t0; each is decoded with regressor guidance towards the
follow-up age and composed as the run's composition says (``pipeline.compose``: the guided decoding itself, or the
input plus guided minus unguided decoding of the same latent). The identity baseline returns the baseline
unchanged. Metrics, per subject then averaged:

- SSIM (window 11), MSE, PSNR between the counterfactual and the follow-up, on the model slices mapped from
  [-1, 1] to [0, 1] (data range 1); SSIM is the mean over slices, MSE over all pixels of the slab.
- ventricle volume measured from the image (see ``ventricle_volume``) vs the same measurement on the real
  follow-up (and vs the follow-up's ground-truth mask volume);
- the regressor's age of the counterfactual (at t = 0) vs the target age;
- direction: an age sweep around the baseline's age, whose measured ventricle volume should rise monotonically.

The follow-up is mapped onto the baseline's model grid (same crop, same slices) and normalised with its own
V99.5, exactly as a model input would be.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from ..devices import resolve_device
from ..errors import InputError
from ..fileio import atomic_path, results_folder, write_text_atomic
from ..manifest import ManifestRow, read_manifest
from ..nets.bundle import ModelBundle
from ..progress import track
from ..volume import (
    Normalisation,
    SliceGeometry,
    normalise_slices,
    read_case,
    read_image,
    to_model_grid,
    to_model_slices,
    volume_scale,
)
from .onls import decode, encode, encoding_grid, noise_level, predict, timestep_for_level
from .pipeline import (
    AgingSettings,
    AgingSpec,
    check_age,
    compose,
    inference_networks,
    model_spec,
    resolved_values,
    variance_rows,
)
from .training import central_rows

NOISE_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # the paper's Table 2 sweep
SWEEP_OFFSETS = (-10.0, -5.0, 5.0, 10.0, 15.0)  # years around the baseline age
SSIM_WINDOW = 11
VENTRICLE_ROI_PIXELS = 4  # in-plane dilation of the baseline ventricle mask that bounds the measurement


@dataclass(eq=False)
class SubjectPair:
    subject: str
    age: float
    target: float
    baseline: np.ndarray  # [S, C, H, W] model slices of the slab, [-1, 1]
    followup: np.ndarray  # [S, C, H, W] on the baseline's model grid
    ventricles_baseline: np.ndarray  # [S, H, W] bool
    ventricles_followup: np.ndarray
    pixel_ml: float  # volume of one model pixel of one slice


def longitudinal_pairs(rows: Sequence[ManifestRow]) -> list[tuple[ManifestRow, ManifestRow]]:
    """(first visit, last visit) of every subject with two visits at different ages."""
    by_subject: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_subject.setdefault(row.subject, []).append(row)
    pairs = []
    for _, visits in sorted(by_subject.items()):
        visits = sorted(visits, key=lambda r: (r.age, r.visit or 0))
        if len(visits) >= 2 and visits[-1].age > visits[0].age:
            pairs.append((visits[0], visits[-1]))
    return pairs


def _pixel_ml(geometry: SliceGeometry) -> float:
    slice_mm, row_mm, col_mm = geometry.orientation.canonical_spacing(geometry.spacing)
    (rows, cols), (model_h, model_w) = geometry.padded_size, geometry.model_size
    return rows * row_mm / model_h * cols * col_mm / model_w * slice_mm / 1000.0


def load_pair(baseline: ManifestRow, followup: ManifestRow, spec: AgingSpec, central: int) -> SubjectPair:
    """Both visits on the baseline's model grid, with their ventricle masks (slab only)."""
    normalisation = Normalisation.from_dict(spec.normalisation)
    case = read_case({m: baseline.images[m] for m in spec.modalities}, spec.modalities)
    slices, geometry = to_model_slices(case, spec.image_size, normalisation=normalisation)
    later = read_case({m: followup.images[m] for m in spec.modalities}, spec.modalities)
    raw = np.stack([to_model_grid(later.images[m], geometry, fill=float(later.array(m).min()),
                                  source=str(followup.images[m])) for m in spec.modalities], axis=1)
    scales = [volume_scale(later.array(m), normalisation.effective_percentile) for m in spec.modalities]
    follow, _ = normalise_slices(raw, normalisation, scales)
    masks = []
    for row in (baseline, followup):
        if row.ventricles is None:
            raise InputError(f"case {row.case!r} has no ventricle mask", fix="fill the manifest's 'ventricles' column")
        masks.append(to_model_grid(read_image(row.ventricles, label_map=True), geometry, interpolation="nearest",
                                   source=str(row.ventricles)) > 0)
    rows = central_rows(len(slices), central)
    return SubjectPair(subject=baseline.subject, age=check_age("baseline age", baseline.age),
                       target=check_age("follow-up age", followup.age), baseline=slices[rows], followup=follow[rows],
                       ventricles_baseline=masks[0][rows], ventricles_followup=masks[1][rows],
                       pixel_ml=_pixel_ml(geometry))


# ------------------------------------------------------------------------------------------------ metrics


def to_unit(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, np.float64) + 1.0) / 2.0


def image_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """SSIM (window 11, data range 1, mean over slices), MSE and PSNR on [S, H, W] slices in [-1, 1]."""
    from skimage.metrics import structural_similarity

    a, b = to_unit(prediction), to_unit(truth)
    ssim = float(np.mean([structural_similarity(p, t, win_size=SSIM_WINDOW, data_range=1.0)
                          for p, t in zip(a, b, strict=True)]))
    mse = float(np.mean((a - b) ** 2))
    return {"ssim": ssim, "mse": mse, "psnr": float(10.0 * np.log10(1.0 / max(mse, 1e-12)))}


def ventricle_roi(mask: np.ndarray, radius: int = VENTRICLE_ROI_PIXELS) -> np.ndarray:
    """Where ventricles may be measured: the baseline mask dilated in-plane by a disk of ``radius`` pixels."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = (yy**2 + xx**2 <= radius**2)[None]
    return ndimage.binary_dilation(mask, structure=disk)


def ventricle_threshold(image: np.ndarray, mask: np.ndarray, roi: np.ndarray) -> float:
    """Midway between the median intensity inside the ventricles and in the tissue ring around them (T1: CSF dark)."""
    ring = roi & ~mask
    if not mask.any() or not ring.any():
        raise InputError("the baseline ventricle mask is empty on the model slices",
                         fix="check the ventricle masks in the manifest")
    return float((np.median(image[mask]) + np.median(image[ring])) / 2.0)


def ventricle_volume(image: np.ndarray, roi: np.ndarray, threshold: float, pixel_ml: float) -> float:
    """mL of pixels darker than ``threshold`` inside ``roi`` (first channel, [S, H, W])."""
    return float(np.count_nonzero((image < threshold) & roi) * pixel_ml)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return float(stats.spearmanr(x, y).statistic)


# ------------------------------------------------------------------------------------------------ running


@dataclass(eq=False)
class AgingEvaluation:
    methods: list[str]
    per_subject: list[dict[str, Any]]  # subject -> method -> metrics, plus sweep
    summary: dict[str, dict[str, float]]  # method -> mean/std of each metric
    checks: dict[str, Any]
    info: dict[str, Any]
    paired: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # see paired_differences
    examples: dict[str, Any] = field(default_factory=dict)  # images of the first subject for the figure


def method_name(level: float | None, scale: float, scales: Sequence[float]) -> str:
    suffix = f" (c={scale:g})" if len(scales) > 1 else ""
    return f"ONLS{suffix}" if level is None else f"L={level:.1f}{suffix}"


def evaluate_subject(bundle: ModelBundle, spec: AgingSpec, pair: SubjectPair, settings: AgingSettings,
                     levels: Sequence[float], scales: Sequence[float], sweep: Sequence[float]) -> dict[str, Any]:
    """Every method on one subject; returns metrics per method, the sweep's volumes and the images."""
    device = resolve_device(settings.device)
    eps_model, regressor = inference_networks(bundle, settings, device)
    schedule = bundle.schedule()
    T = schedule.num_timesteps
    values = resolved_values(spec, settings)
    grid = encoding_grid(T, settings.steps)
    fixed = {level: timestep_for_level(level, grid, T) for level in levels}
    fallback = timestep_for_level(values["fallback_noise_level"]["value"], grid, T)
    x0 = torch.from_numpy(pair.baseline).float().to(device)
    encoding = encode(eps_model, regressor, schedule, x0, grid, zeta=values["zeta"]["value"],
                      keep=[*fixed.values(), fallback], variance_rows=variance_rows(spec, settings, x0.shape[0]),
                      chunk_size=settings.chunk_size)
    t0 = encoding.t0 if encoding.t0 is not None else fallback
    roi = ventricle_roi(pair.ventricles_baseline)
    threshold = ventricle_threshold(pair.baseline[:, 0], pair.ventricles_baseline, roi)
    follow_volume = ventricle_volume(pair.followup[:, 0], roi, threshold, pair.pixel_ml)
    truth_volume = float(pair.ventricles_followup.sum() * pair.pixel_ml)

    def score(images: np.ndarray, age_estimate: float | None) -> dict[str, float]:
        volume = ventricle_volume(images[:, 0], roi, threshold, pair.pixel_ml)
        metrics = image_metrics(images[:, 0], pair.followup[:, 0])
        metrics.update(ventricle_ml=volume, ventricle_error_ml=abs(volume - follow_volume),
                       ventricle_error_truth_ml=abs(volume - truth_volume))
        if age_estimate is not None:
            metrics["regressor_age_error"] = abs(age_estimate - pair.target)
            metrics["regressor_age"] = age_estimate
        return metrics

    def years(images: torch.Tensor) -> float:
        return float(spec.ages.years(float(predict(regressor, images, 0, settings.chunk_size)[:, 0].mean())))

    target = spec.ages.normalise(pair.target)
    reconstructions: dict[int, torch.Tensor] = {}

    def counterfactual(start: int, targets: torch.Tensor | float, scale: float, copies: int = 1) -> torch.Tensor:
        latent = encoding.latents[start].repeat(copies, 1, 1, 1)
        guided = decode(eps_model, regressor, schedule, latent, start, grid, targets, scale=scale,
                        variant=settings.guidance, chunk_size=settings.chunk_size).images
        if values["composition"]["value"] != "age-change":
            return guided
        if start not in reconstructions:
            reconstructions[start] = decode(eps_model, regressor, schedule, encoding.latents[start], start, grid,
                                            0.0, scale=0.0, chunk_size=settings.chunk_size).images
        return compose(x0, guided, reconstructions[start])

    results: dict[str, Any] = {"identity": score(pair.baseline, years(x0))}
    images: dict[str, np.ndarray] = {"baseline": pair.baseline[:, 0], "follow-up": pair.followup[:, 0]}
    for scale in scales:
        for level, start in [*fixed.items(), (None, t0)]:
            decoded = counterfactual(start, target, scale)
            name = method_name(level, scale, scales)
            results[name] = score(decoded.cpu().numpy(), years(decoded))
            results[name]["L"] = noise_level(start, T)
            images[name] = decoded[:, 0].cpu().numpy()
    sweep_ages = [pair.age + offset for offset in sweep if spec.ages.low <= pair.age + offset <= spec.ages.high]
    sweep_volumes = []
    if sweep_ages:
        k, s = len(sweep_ages), x0.shape[0]
        targets = torch.tensor([spec.ages.normalise(a) for a in sweep_ages], dtype=torch.float32, device=device)
        decoded = counterfactual(t0, targets.repeat_interleave(s), scales[0], copies=k)
        decoded = decoded.reshape(k, s, *x0.shape[1:]).cpu().numpy()
        sweep_volumes = [ventricle_volume(d[:, 0], roi, threshold, pair.pixel_ml) for d in decoded]
    baseline_volume = results["identity"]["ventricle_ml"]
    return {"subject": pair.subject, "age": pair.age, "target": pair.target, "t0": t0, "L": noise_level(t0, T),
            "onls_fired": encoding.t0 is not None, "variance": encoding.variance,
            "levels": [noise_level(t, T) for t in encoding.timesteps],
            "follow_up_ventricle_ml": follow_volume, "follow_up_truth_ml": truth_volume,
            "baseline_truth_ml": float(pair.ventricles_baseline.sum() * pair.pixel_ml),
            "methods": results, "sweep": {"ages": sweep_ages, "ventricle_ml": sweep_volumes,
                                          "baseline_ventricle_ml": baseline_volume},
            "images": images}


def _summary(per_subject: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, float]]:
    summary = {}
    for method in methods:
        rows = [s["methods"][method] for s in per_subject]
        summary[method] = {}
        for key in rows[0]:
            values = np.array([r[key] for r in rows], np.float64)
            summary[method][key] = float(values.mean())
            summary[method][f"{key}_std"] = float(values.std())
    return summary


PAIRED_METRICS = ("psnr", "ssim")


def paired_differences(per_subject: list[dict[str, Any]], reference: str, others: Sequence[str],
                       keys: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, dict[str, float]]]:
    """Per-subject ``reference - other`` of each metric: mean and a 95% t-interval over subjects.

    With a few subjects, gaps between methods can be far smaller than the spread between subjects; the interval
    says whether a gap in the table is more than that (NaN, null in results.json, with fewer than two subjects).
    """
    paired: dict[str, dict[str, dict[str, float]]] = {}
    for other in others:
        paired[other] = {}
        for key in keys:
            gaps = np.array([s["methods"][reference][key] - s["methods"][other][key] for s in per_subject])
            mean = float(gaps.mean())
            half = (float(stats.t.ppf(0.975, gaps.size - 1) * gaps.std(ddof=1) / math.sqrt(gaps.size))
                    if gaps.size > 1 else math.nan)
            paired[other][key] = {"mean": mean, "low": mean - half, "high": mean + half}
    return paired


def _monotone(values: Sequence[float]) -> bool:
    return all(b > a for a, b in itertools.pairwise(values))


def _checks(per_subject: list[dict[str, Any]], summary: dict[str, dict[str, float]],
            scales: Sequence[float]) -> dict[str, Any]:
    onls = method_name(None, scales[0], scales)
    fixed = [m for m in summary if m.startswith("L=")]
    # Table 2's claim is about the paper's sweep; further levels (e.g. --noise-levels ...,0.3) are shown beside it
    paper = [m for m in fixed if any(math.isclose(summary[m]["L"], level) for level in NOISE_LEVELS)]
    checks: dict[str, Any] = {
        "onls_ssim_at_least_every_fixed_L_0.4_to_1.0": all(summary[onls]["ssim"] >= summary[m]["ssim"]
                                                          for m in paper) if paper else None,
        "onls_psnr_at_least_every_fixed_L_0.4_to_1.0": all(summary[onls]["psnr"] >= summary[m]["psnr"]
                                                          for m in paper) if paper else None,
        "onls_better_than_identity_ventricle_error": summary[onls]["ventricle_error_ml"]
        < summary["identity"]["ventricle_error_ml"],
        "onls_better_than_identity_psnr": summary[onls]["psnr"] > summary["identity"]["psnr"],
        "best_fixed_L_ssim": max(fixed, key=lambda m: summary[m]["ssim"]) if fixed else None,
        "best_fixed_L_psnr": max(fixed, key=lambda m: summary[m]["psnr"]) if fixed else None,
    }
    monotone, anchored, correlations = [], [], []
    for subject in per_subject:
        sweep = subject["sweep"]
        if len(sweep["ages"]) < 2:
            continue
        monotone.append(_monotone(sweep["ventricle_ml"]))
        points = sorted([*zip(sweep["ages"], sweep["ventricle_ml"], strict=True),
                         (subject["age"], sweep["baseline_ventricle_ml"])])
        anchored.append(_monotone([v for _, v in points]))
        correlations.append(spearman([a for a, _ in points], [v for _, v in points]))
    checks["sweep_subjects"] = len(monotone)
    checks["sweep_monotone_fraction"] = float(np.mean(monotone)) if monotone else None
    checks["sweep_monotone_with_input_fraction"] = float(np.mean(anchored)) if anchored else None
    checks["sweep_spearman_mean"] = float(np.nanmean(correlations)) if correlations else None
    checks["onls_fired_fraction"] = float(np.mean([s["onls_fired"] for s in per_subject]))
    same_scale = [m for m in fixed if m.endswith(onls.removeprefix("ONLS"))]
    return {**checks, **level_choice(per_subject, onls, same_scale)}


def level_choice(per_subject: list[dict[str, Any]], onls: str, fixed: Sequence[str]) -> dict[str, float | None]:
    """How much choosing L per subject could gain here, and whether ONLS's choice follows it.

    The oracle takes each subject's best fixed L by PSNR against the real follow-up (which no method may see): the
    ceiling of any per-subject rule over these levels. The Spearman correlation of ONLS's L with that best L is
    near 0 when the variance rule picks L for reasons unrelated to the counterfactual's quality.
    """
    if len(fixed) < 2:
        return {"oracle_fixed_L_psnr": None, "onls_L_spearman_with_oracle_L": None}
    psnr = np.array([[s["methods"][m]["psnr"] for m in fixed] for s in per_subject])
    best = psnr.argmax(axis=1)
    oracle_levels = [s["methods"][fixed[b]]["L"] for s, b in zip(per_subject, best, strict=True)]
    onls_levels = [s["methods"][onls]["L"] for s in per_subject]
    correlation = spearman(onls_levels, oracle_levels) if len(per_subject) > 2 else math.nan
    return {"oracle_fixed_L_psnr": float(psnr.max(axis=1).mean()), "onls_L_spearman_with_oracle_L": correlation}


def run_evaluation(bundle: ModelBundle, manifest: str | os.PathLike[str], *, split: str = "test",
                   settings: AgingSettings | None = None, levels: Sequence[float] = NOISE_LEVELS,
                   scales: Sequence[float] | None = None, sweep: Sequence[float] = SWEEP_OFFSETS,
                   max_subjects: int | None = None) -> AgingEvaluation:
    """Evaluate every method on the split's longitudinal pairs (see the module docstring)."""
    started = time.perf_counter()
    settings = (settings or AgingSettings()).validate()
    spec = model_spec(bundle)
    values = resolved_values(spec, settings)
    scales = list(scales) if scales else [values["guidance_scale"]["value"]]
    table = read_manifest(manifest, require=("age",), modalities=spec.modalities)
    pairs = longitudinal_pairs(table.split(split))
    if not pairs:
        raise InputError(f"split {split!r} has no subject with two visits at different ages", path=table.path,
                         fix="evaluate a longitudinal cohort (`diffusion-engine phantoms aging`)")
    pairs = pairs[:max_subjects] if max_subjects else pairs
    central = spec.central_slices if settings.central_slices is None else settings.central_slices
    per_subject = []
    for baseline, followup in track(pairs, f"evaluating aging on {split}", unit="subject"):
        pair = load_pair(baseline, followup, spec, central)
        per_subject.append(evaluate_subject(bundle, spec, pair, settings, levels, scales, sweep))
    methods = list(per_subject[0]["methods"])
    summary = _summary(per_subject, methods)
    from ..anomaly.evaluate import machine_description

    count = int(per_subject[0]["images"]["baseline"].shape[0])
    info = {"model": str(bundle.path), "manifest": str(Path(manifest).resolve()), "split": split,
            "subjects": len(per_subject), "slices_per_subject": count,
            "variance_slices": len(range(count)[variance_rows(spec, settings, count)]),
            "steps": settings.steps, "precision": settings.precision, "zeta": values["zeta"], "guidance_scales": scales,
            "guidance": settings.guidance, "composition": values["composition"],
            "fallback_noise_level": values["fallback_noise_level"],
            "noise_levels": list(levels), "sweep_offsets": list(sweep), "machine": machine_description(settings.device),
            "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M")}
    examples = per_subject[0].pop("images")
    for subject in per_subject[1:]:
        subject.pop("images")
    onls = method_name(None, scales[0], scales)
    paired = paired_differences(per_subject, onls, [m for m in methods if m != onls])
    return AgingEvaluation(methods=methods, per_subject=per_subject, summary=summary,
                           checks=_checks(per_subject, summary, scales), info=info, paired=paired,
                           examples=examples)


# ------------------------------------------------------------------------------------------------ writing

ROWS = (("SSIM", "ssim", 3), ("MSE", "mse", 4), ("PSNR", "psnr", 1), ("ventricle error vs follow-up image (mL)",
        "ventricle_error_ml", 2), ("ventricle error vs follow-up mask (mL)", "ventricle_error_truth_ml", 2),
        ("regressor age error (years)", "regressor_age_error", 1), ("noise level L", "L", 2))


def results_markdown(evaluation: AgingEvaluation, command: str | None = None) -> str:
    info, summary = evaluation.info, evaluation.summary
    lines = [f"# ONLS counterfactual aging: {info['split']} split, {info['subjects']} subjects", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| metric | " + " | ".join(evaluation.methods) + " |",
              "|---|" + "---|" * len(evaluation.methods)]
    for label, key, digits in ROWS:
        cells = []
        for method in evaluation.methods:
            values = summary[method]
            cells.append(f"{values[key]:.{digits}f} ± {values[key + '_std']:.{digits}f}" if key in values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    checks = evaluation.checks
    lines += ["", "Checks:", ""] + [f"- {key}: {value}" for key, value in checks.items()]
    if checks.get("oracle_fixed_L_psnr") is not None:
        lines += ["", "oracle_fixed_L_psnr takes each subject's best fixed L by PSNR against its real follow-up, "
                  "which no method may see: the most any per-subject choice of L could reach here. "
                  "onls_L_spearman_with_oracle_L near 0 means ONLS's L does not follow that best L."]
    lines += _paired_markdown(evaluation)
    lines += ["", f"Settings: {info['steps']} DDIM steps ({info.get('precision', 'float32')}), "
              f"zeta {info['zeta']['value']:g} ({info['zeta']['source']}), "
              f"guidance scale(s) {', '.join(f'{c:g}' for c in info['guidance_scales'])} ({info['guidance']}), "
              f"composition {info['composition']['value']} ({info['composition']['source']}), "
              f"{info['slices_per_subject']} central slices per subject (the variance rule reads the central "
              f"{info.get('variance_slices', info['slices_per_subject'])}); age sweep offsets {info['sweep_offsets']}.",
              f"Machine: {info['machine']['cpu']}, torch {info['machine']['torch']} "
              f"({info['machine']['torch_threads']} threads); {info['seconds']:.0f} s in all.",
              "", "Metrics on model slices mapped to [0, 1]; identity = the baseline returned unchanged. Ventricle "
              "volume is measured from the image (pixels darker than the midpoint of the baseline's ventricle and "
              "surrounding-tissue intensities, inside the baseline mask dilated by "
              f"{VENTRICLE_ROI_PIXELS} pixels)."]
    return "\n".join(lines) + "\n"


def _paired_markdown(evaluation: AgingEvaluation) -> list[str]:
    if not evaluation.paired:
        return []
    reference = next(m for m in evaluation.methods if m.startswith("ONLS"))
    keys = list(next(iter(evaluation.paired.values())))
    lines = ["", f"Paired per subject, {reference} minus each method: mean [95% interval over subjects] "
             "(an interval that contains 0 means the subjects do not separate the two):", "",
             "| method | " + " | ".join(f"{key.upper()} gap" for key in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for method, gaps in evaluation.paired.items():
        cells = []
        for key, gap in gaps.items():
            digits = 5 if key == "ssim" else 3
            interval = f" [{gap['low']:+.{digits}f}, {gap['high']:+.{digits}f}]" if math.isfinite(gap["low"]) else ""
            cells.append(f"{gap['mean']:+.{digits}f}{interval}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def save_figure(evaluation: AgingEvaluation, path: str | os.PathLike[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = evaluation.examples
    onls = next(m for m in evaluation.methods if m.startswith("ONLS"))
    shown = ["baseline", "follow-up", *(m for m in ("L=1.0", "L=0.6") if m in examples), onls]
    middle = examples["baseline"].shape[0] // 2
    figure = plt.figure(figsize=(3 * (len(shown) + 1), 9))
    subject = evaluation.per_subject[0]
    for i, name in enumerate(shown):
        axis = figure.add_subplot(3, len(shown) + 1, i + 1)
        axis.imshow(examples[name][middle], cmap="gray", vmin=-1, vmax=1)
        axis.set_title(name if name != onls else f"{name} L={subject['L']:.1f}", fontsize=9)
        axis.axis("off")
    axis = figure.add_subplot(3, len(shown) + 1, len(shown) + 1)
    difference = examples[onls][middle] - examples["baseline"][middle]
    limit = max(float(np.abs(difference).max()), 1e-3)
    axis.imshow(difference, cmap="coolwarm", vmin=-limit, vmax=limit)
    axis.set_title("ONLS - baseline", fontsize=9)
    axis.axis("off")
    # gaps to ONLS per subject, not the methods' means: the spread between subjects dwarfs the methods' differences
    others = list(evaluation.paired)
    for row, (key, label) in enumerate((("ssim", "SSIM"), ("psnr", "PSNR (dB)"))):
        axis = figure.add_subplot(3, 2, 3 + row)
        gaps = [evaluation.paired[m][key] for m in others]
        means = np.array([g["mean"] for g in gaps])
        spans = np.nan_to_num(np.array([[g["mean"] - g["low"], g["high"] - g["mean"]] for g in gaps]).T)
        colours = ["grey" if m == "identity" else "C1" if m.startswith("ONLS") else "C0" for m in others]
        axis.bar(range(len(others)), means, yerr=spans, color=colours, capsize=3)
        axis.axhline(0.0, color="k", linewidth=0.8)
        axis.set_xticks(range(len(others)), others, rotation=45, fontsize=7)
        axis.set_ylabel(f"{label}: ONLS minus method")
        axis.set_title("per-subject gap, mean and 95% interval (above 0: ONLS better)", fontsize=8)
    axis = figure.add_subplot(3, 2, 5)
    for subject in evaluation.per_subject:
        points = sorted([*zip(subject["sweep"]["ages"], subject["sweep"]["ventricle_ml"], strict=True),
                         (subject["age"], subject["sweep"]["baseline_ventricle_ml"])])
        offsets = [a - subject["age"] for a, _ in points]
        base = subject["sweep"]["baseline_ventricle_ml"]
        axis.plot(offsets, [v - base for _, v in points], marker="o", alpha=0.6)
    axis.set_xlabel("target age - current age (years)")
    axis.set_ylabel("ventricle volume change (mL)")
    axis.set_title("ONLS age sweep", fontsize=9)
    axis = figure.add_subplot(3, 2, 6)
    for subject in evaluation.per_subject:
        axis.plot(subject["levels"], subject["variance"], alpha=0.5)
    axis.axhline(evaluation.info["zeta"]["value"], color="k", linestyle="--", label="zeta")
    axis.set_yscale("log")
    axis.set_xlabel("noise level L reached by the encoding")
    axis.set_ylabel("Var over slices of R(x_t, t)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return target


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_evaluation(evaluation: AgingEvaluation, out: str | os.PathLike[str], *, command: str | None = None,
                     figure: bool = True) -> dict[str, str]:
    """results.md, results.json and (optionally) figure.png in ``out``; returns {label: path}."""
    folder = results_folder(out)
    data = {"command": command, "info": evaluation.info, "summary": evaluation.summary, "checks": evaluation.checks,
            "paired": evaluation.paired, "subjects": evaluation.per_subject}
    write_text_atomic(folder / "results.json", json.dumps(_plain(data), indent=1, allow_nan=False) + "\n")
    write_text_atomic(folder / "results.md", results_markdown(evaluation, command))
    outputs = {"results_json": str(folder / "results.json"), "results": str(folder / "results.md")}
    if figure:
        outputs["figure"] = str(save_figure(evaluation, folder / "figure.png"))
    return outputs

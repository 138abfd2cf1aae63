"""Evaluation of anomaly segmentation on one split of a manifest: AnoFPDM, its variants and two baselines, scored
with the paper's Table 1 protocol (metric definitions: ``diffusion_engine.metrics``).

    evaluation = run_evaluation("model", "cohort/manifest.csv", split="test")
    write_evaluation(evaluation, "results/")      # results.md, results.json, figure.png

Every AnoFPDM variant is a settings change run through the pipeline's own code (``run_forward`` and
``segment_from_forward``, what ``segment_slices`` runs: no copy of the algorithm). Variants that change only the
post-processing (last_sam, fixed_threshold) reuse the forward pass of anofpdm; their time includes that pass:

    anofpdm          AnoFPDM (DDIM): deterministic encoding, dynamic t_e and Q* (the model's calibration)
    anofpdm_ddpm     stochastic (DDPM) encoding; thr_01 and M_max stay the calibrated (DDIM) ones unless the model
                     was calibrated with DDPM encoding (the pipeline warns)
    last_sam         the SAM at t_e only instead of the mean up to t_e (the paper's "S_te" rows)
    fixed_noise      ablation: one t_e for every slice. Default: the median t_e of the AnoFPDM (DDIM) run over the
                     evaluated slices, snapped to the grid: no labels, and the same noise scale on average, so the
                     row isolates the effect of choosing t_e per slice
    fixed_threshold  ablation: one absolute threshold for every slice instead of Algorithm 1. Default: the median
                     Q* of the AnoFPDM (DDIM) run over the slices it decided unhealthy (all slices when none): no
                     labels, same reasoning

AnoFPDM runs with the decision switched off (so that every mask is kept for the "unhealthy" setting) and the
decision (``decision.decide`` with the model's decision score and thr_01, ``decision.mixed_setting_masks``) is
applied to the same run for the "mixed" setting: exactly what segment_slices returns with the decision on, from one
pass.

The baselines (``anomaly.baselines``) choose their threshold on the validation split WITH its lesion masks;
AnoFPDM uses no pixel label anywhere (its calibration uses image-level labels only). The table says which is
which, as the paper does.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..errors import InputError, ModelError
from ..fileio import atomic_path, results_folder, write_text_atomic
from ..metrics import brain_pixels, protocol_metrics

if TYPE_CHECKING:
    from ..datasets import SliceSet
    from ..nets.bundle import ModelBundle
    from .pipeline import AnomalySettings, ModelSpec, SliceResults


@dataclass(frozen=True)
class Variant:
    key: str
    label: str  # as in the results table
    kind: str  # "anofpdm" | "reconstruction" | "intensity"
    changes: tuple[tuple[str, Any], ...] = ()  # AnomalySettings fields this variant sets
    pixel_labels: bool = False  # does the method use lesion masks to choose a parameter?


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("anofpdm", "AnoFPDM (DDIM)", "anofpdm"),
    Variant("anofpdm_ddpm", "AnoFPDM (DDPM)", "anofpdm", (("encoding", "ddpm"),)),
    Variant("last_sam", "AnoFPDM (DDIM, S_te only)", "anofpdm", (("aggregation", "last"),)),
    Variant("fixed_noise", "AnoFPDM (DDIM), fixed noise scale", "anofpdm"),
    Variant("fixed_threshold", "AnoFPDM (DDIM), fixed threshold", "anofpdm"),
    Variant("reconstruction", "DDIM clf-free reconstruction [Sanchez et al.]", "reconstruction", pixel_labels=True),
    Variant("intensity", "FLAIR intensity threshold [Meissen et al.]", "intensity", pixel_labels=True),
)}
DERIVED = ("fixed_noise", "fixed_threshold")  # their default value comes from the "anofpdm" run
PAPER_BRATS21 = {"AnoFPDM (DDIM)": (77.4, 72.5, 72.2, 61.5, 50.0, 75.5),
                 "AnoFPDM (DDPM)": (75.2, 68.5, 68.3, 57.5, 46.0, 72.9),
                 "DDIM clf-free [17]": (74.3, 69.1, 59.9, 49.1, 38.1, 61.4)}


@dataclass(eq=False)
class MethodRun:
    """One method's output on the evaluated slices [N, H, W] and how it was obtained."""

    variant: Variant
    score: np.ndarray  # float32 continuous anomaly map (AUPRC)
    all_masks: np.ndarray  # bool, every mask kept ("unhealthy" setting)
    mixed_masks: np.ndarray  # bool, after the healthy/unhealthy decision ("mixed" setting)
    decided_unhealthy: np.ndarray  # bool [N]
    evaluations_per_slice: float | None  # network evaluations per slice (None: no network)
    seconds: float  # wall time on the evaluated split (tuning on validation excluded, see parameters)
    parameters: dict = field(default_factory=dict)
    slice_results: SliceResults | None = None
    metrics: dict = field(default_factory=dict)


@dataclass(eq=False)
class Evaluation:
    data: SliceSet
    truth: np.ndarray  # bool [N, H, W] lesion masks on the model grid
    brain: np.ndarray  # bool [N, H, W]
    runs: list[MethodRun]
    info: dict  # JSON-able: model, cohort, settings, machine, date


# ------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch version and threads, and the accelerator if one is used."""
    import torch

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict[str, Any]) -> str:
    text = f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
    return text + (f", GPU {info['gpu']}" if info.get("gpu") else ", CPU only")


# ------------------------------------------------------------------------------------------------ data


def load_split(manifest: str | os.PathLike[str], split: str, spec: ModelSpec, *, task: str) -> SliceSet:
    """The split's model slices with image-level labels and lesion masks (masks for evaluation only)."""
    from ..datasets import load_slices
    from ..manifest import read_manifest
    from ..volume import Normalisation

    table = read_manifest(manifest, modalities=spec.modalities)
    rows = table.split(split)
    if not rows:
        raise InputError(f"no case has split {split!r}", path=table.path,
                         fix=f"mark evaluation cases with split={split} or choose another split")
    unmasked = [row.case for row in rows if row.mask is None and row.healthy is not True]
    if unmasked:
        raise InputError(f"case(s) {', '.join(unmasked[:5])} of split {split!r} have no lesion mask and are not "
                         "marked healthy, so they cannot be scored", path=table.path,
                         fix="add a mask path, or healthy=1 for subjects without lesions")
    return load_slices(rows, spec.modalities, spec.image_size, Normalisation.from_dict(spec.normalisation),
                       labels=True, masks=True, task=task)


def pixel_areas(data: SliceSet) -> np.ndarray:
    """Physical area of a model pixel for every slice (cases can differ in field of view)."""
    from .pipeline import model_pixel_area_mm2

    by_case = {case: model_pixel_area_mm2(geometry) for case, geometry in data.geometries.items()}
    return np.array([by_case[case] for case in data.cases], dtype=np.float64)


def default_settings(bundle: ModelBundle, **overrides: Any) -> AnomalySettings:
    """AnomalySettings with the grid of the model's calibration (t_max, stride, encoding, early stop) unless
    overridden, so that the calibrated thr_01 and M_max hold; overrides that are None are ignored."""
    from .pipeline import AnomalySettings

    calibrated = (bundle.config.get("calibration") or {}).get("settings") or {}
    names = {f.name for f in fields(AnomalySettings)}
    values = {key: calibrated[key] for key in ("t_max", "stride", "encoding", "early_stop") if key in calibrated}
    values.update({key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown AnomalySettings field(s) {unknown}")
    return AnomalySettings(**values).validate()


# ------------------------------------------------------------------------------------------------ methods


def _forward_pass(bundle: ModelBundle, data: SliceSet, settings: AnomalySettings, values: dict, label: str,
                  cache: dict[tuple, tuple[Any, float]]) -> tuple[Any, float]:
    """(ForwardRun, its seconds), shared by the variants that differ only in post-processing (aggregation, fixed
    threshold): each such variant is timed as the forward pass plus its own post-processing."""
    from .pipeline import FORWARD_PASS_KEYS, run_forward

    key = (*(repr(getattr(settings, name)) for name in FORWARD_PASS_KEYS), repr(values["w"]["value"]))
    if key not in cache:
        started = time.perf_counter()
        run = run_forward(bundle, data.images, settings, w=values["w"]["value"], task=label)
        cache[key] = run, time.perf_counter() - started
    return cache[key]


def _classifier_pass(bundle: ModelBundle, data: SliceSet, settings: AnomalySettings, label: str,
                     cache: dict[tuple, tuple[Any, float]]) -> tuple[tuple[np.ndarray, int], float]:
    """((the diffusion classifier's evidence, its network evaluations), seconds), shared by every variant: it
    depends on nothing but the slices and the seed."""
    from .pipeline import class_evidence

    key = ("diffusion-classifier", settings.seed)
    if key not in cache:
        started = time.perf_counter()
        cache[key] = class_evidence(bundle, data.images, settings, task=label), time.perf_counter() - started
    return cache[key]


def _run_anofpdm(bundle: ModelBundle, data: SliceSet, base: AnomalySettings, variant: Variant, areas: np.ndarray,
                 split: str, extra: dict[str, Any], cache: dict[tuple, tuple[Any, float]]) -> MethodRun:
    import torch

    from .decision import decide, mixed_setting_masks
    from .pipeline import model_spec, resolve_values, segment_from_forward

    changes = {**dict(variant.changes), **extra}
    settings = replace(base, decision=False, **changes).validate()
    values = resolve_values(bundle, settings, len(model_spec(bundle).scored))
    run, forward_seconds = _forward_pass(bundle, data, settings, values, f"{variant.label} ({split})", cache)
    evidence, evaluations = None, 0
    if values["decision_score"]["value"] == "diffusion-classifier":  # the mixed setting's decision needs it
        (evidence, evaluations), classifier_seconds = _classifier_pass(
            bundle, data, settings, f"{variant.label}: slice decision ({split})", cache)
        forward_seconds += classifier_seconds
    started = time.perf_counter()
    results = segment_from_forward(run, settings, values, brain=brain_pixels(data.images), pixel_area_mm2=areas,
                                   evidence=evidence)
    seconds = forward_seconds + time.perf_counter() - started
    thr_01 = results.values.get("thr_01", {}).get("value")
    if thr_01 is None:
        raise ModelError("the model has no calibrated thr_01, which the mixed setting needs", path=bundle.path,
                         fix="calibrate it with `diffusion-engine calibrate anomaly` or pass --thr-01")
    decided = decide(results.values["decision_score"]["value"], float(thr_01), torch.from_numpy(results.cosine),
                     torch.from_numpy(results.m_te), None if evidence is None else torch.from_numpy(evidence)).numpy()
    all_masks = results.mask.astype(bool)
    mixed = mixed_setting_masks(torch.from_numpy(all_masks), torch.from_numpy(decided)).numpy()
    parameters = {"settings_changed": changes, "values": results.values, "timesteps": results.timesteps,
                  "median_t_e": float(np.median(results.t_e))}
    return MethodRun(variant=variant, score=results.score, all_masks=all_masks, mixed_masks=mixed,
                     decided_unhealthy=decided,
                     evaluations_per_slice=(results.network_evaluations + evaluations) / len(data),
                     seconds=seconds, parameters=parameters, slice_results=results)


def _derived_setting(key: str, reference: MethodRun | None, given: float | None) -> tuple[str, Any, dict]:
    """The fixed t_e or fixed threshold of an ablation (given, else from the reference run), and its origin."""
    if key == "fixed_noise":
        if given is not None:
            return "noise_scale", int(given), {"noise_scale": int(given), "source": "argument"}
        grid = np.asarray(reference.slice_results.timesteps)
        value = int(grid[np.argmin(np.abs(grid - np.median(reference.slice_results.t_e)))])
        return "noise_scale", value, {"noise_scale": value, "source": "median t_e of AnoFPDM (DDIM) over the "
                                                                       "evaluated slices, on the grid (no labels)"}
    if given is not None:
        return "threshold", float(given), {"threshold": float(given), "source": "argument"}
    decided, thresholds = reference.decided_unhealthy, reference.slice_results.threshold
    pool = thresholds[decided] if decided.any() else thresholds
    value = float(np.median(pool))
    return "threshold", value, {"threshold": value, "source": "median Q* of AnoFPDM (DDIM) over the slices it "
                                                           "decided unhealthy (no labels)"}


def _baseline_run(variant: Variant, test_scores: np.ndarray, val_scores: np.ndarray, data: SliceSet,
                  brain: np.ndarray, val: SliceSet, limits: np.ndarray, val_limits: np.ndarray) -> MethodRun:
    from .baselines import choose_threshold, threshold_masks

    threshold, record = choose_threshold(val_scores, val.masks.astype(bool), brain_pixels(val.images),
                                         max_component_size=val_limits)
    masks = threshold_masks(test_scores, brain, threshold, max_component_size=limits)
    decided = masks.reshape(len(masks), -1).any(axis=1)  # no decision step: a slice is unhealthy if it has a mask
    return MethodRun(variant=variant, score=test_scores, all_masks=masks, mixed_masks=masks, decided_unhealthy=decided,
                     evaluations_per_slice=None, seconds=0.0, parameters={"threshold": record})


def _run_baseline(variant: Variant, bundle: ModelBundle, spec: ModelSpec, base: AnomalySettings, data: SliceSet,
                  val: SliceSet, brain: np.ndarray, limits: np.ndarray, val_limits: np.ndarray,
                  reconstruction: dict[str, Any], split: str, val_split: str) -> MethodRun:
    from ..devices import resolve_device
    from .baselines import intensity_scores, reconstruction_scores, reconstruction_settings

    if variant.kind == "intensity":
        started = time.perf_counter()
        scores = intensity_scores(data, spec.modalities)
        seconds = time.perf_counter() - started
        run = _baseline_run(variant, scores, intensity_scores(val, spec.modalities), data, brain, val, limits,
                            val_limits)
        run.seconds, run.evaluations_per_slice = seconds, 0
        return run
    device = resolve_device(base.device)
    network = bundle.networks["eps"].to(device)
    schedule = bundle.schedule()
    settings = reconstruction_settings(bundle.config.get("calibration") or {}, schedule,
                                       healthy_label=spec.healthy_label, **reconstruction)
    options = {"channels": spec.scored, "chunk_size": base.chunk_size, "device": device}
    started = time.perf_counter()
    val_scores, _ = reconstruction_scores(network, schedule, val.images, settings,
                                          task=f"{variant.label} ({val_split}, threshold)", **options)
    tuning = time.perf_counter() - started
    started = time.perf_counter()
    scores, evaluations = reconstruction_scores(network, schedule, data.images, settings,
                                                task=f"{variant.label} ({split})", **options)
    seconds = time.perf_counter() - started
    run = _baseline_run(variant, scores, val_scores, data, brain, val, limits, val_limits)
    run.seconds, run.evaluations_per_slice = seconds, evaluations
    run.parameters.update(noise_level=settings.grid(schedule)[-1], w=settings.w, stride=settings.stride,
                          median_size=settings.median_size, validation_seconds=tuning)
    return run


def _requested(variants: Sequence[str] | None, given: dict[str, Any]) -> list[str]:
    chosen = list(VARIANTS) if not variants else list(dict.fromkeys(variants))
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}", fix=f"choose among {', '.join(VARIANTS)}")
    if any(key in chosen and given[key] is None for key in DERIVED) and "anofpdm" not in chosen:
        chosen.append("anofpdm")  # the ablations' default values come from it; it costs one pass and is shown
    return sorted(chosen, key=list(VARIANTS).index)


def run_evaluation(model: Any, manifest: str | os.PathLike[str], *, split: str = "test", val_split: str = "val",
                   variants: Sequence[str] | None = None, settings: AnomalySettings | None = None,
                   reconstruction: dict[str, Any] | None = None, fixed_noise_scale: int | None = None,
                   fixed_threshold: float | None = None) -> Evaluation:
    """Run the requested methods (default: all of VARIANTS) on ``split`` and score them.

    settings: the AnoFPDM settings every variant starts from (default: ``default_settings``, i.e. the
    calibration's grid). reconstruction: noise_level / w / stride of the reconstruction baseline (None entries:
    the calibration's or the defaults; w falls back to settings.w, then the calibrated w).
    """
    from .pipeline import component_limits, model_spec, resolve_model, resolve_values

    given = {"fixed_noise": fixed_noise_scale, "fixed_threshold": fixed_threshold}
    chosen = _requested(variants, given)
    device = settings.device if settings is not None else "auto"
    bundle = resolve_model(model, device=device)
    spec = model_spec(bundle)
    base = (settings or default_settings(bundle)).validate()
    if any(VARIANTS[k].kind == "anofpdm" for k in chosen):
        resolve_values(bundle, replace(base, decision=True), len(spec.scored), check_only=True)  # fail early
    reconstruction = {"w": base.w, **{k: v for k, v in (reconstruction or {}).items() if v is not None}}

    data = load_split(manifest, split, spec, task=f"reading {split} cases")
    needs_val = any(VARIANTS[k].kind != "anofpdm" for k in chosen)
    val = load_split(manifest, val_split, spec, task=f"reading {val_split} cases") if needs_val else None
    truth, brain, areas = data.masks.astype(bool), brain_pixels(data.images), pixel_areas(data)
    limits = component_limits(len(data), base.min_component_mm2, areas)
    val_limits = None if val is None else component_limits(len(val), base.min_component_mm2, pixel_areas(val))

    runs: dict[str, MethodRun] = {}
    forward_cache: dict[tuple, tuple[Any, float]] = {}
    for key in chosen:
        variant = VARIANTS[key]
        if variant.kind == "anofpdm":
            extra, derived = {}, None
            if key in DERIVED:
                name, value, derived = _derived_setting(key, runs.get("anofpdm"), given[key])
                extra[name] = value
            runs[key] = _run_anofpdm(bundle, data, base, variant, areas, split, extra, forward_cache)
            if derived:
                runs[key].parameters["ablation"] = derived
        else:
            runs[key] = _run_baseline(variant, bundle, spec, base, data, val, brain, limits, val_limits,
                                      reconstruction, split, val_split)
    for run in runs.values():
        run.metrics = protocol_metrics(mixed_masks=run.mixed_masks, all_masks=run.all_masks, truth=truth,
                                       scores=run.score, brain=brain, decided_unhealthy=run.decided_unhealthy,
                                       labels=data.unhealthy, cases=data.cases)
    info = _info(bundle, spec, manifest, split, val_split, data, val, truth, base)
    return Evaluation(data=data, truth=truth, brain=brain, runs=list(runs.values()), info=info)


def _info(bundle: ModelBundle, spec: ModelSpec, manifest: str | os.PathLike[str], split: str, val_split: str,
          data: SliceSet, val: SliceSet | None, truth: np.ndarray, base: AnomalySettings) -> dict[str, Any]:
    from ..devices import resolve_device

    lesion_slices = truth.reshape(len(truth), -1).any(axis=1)
    cases = list(dict.fromkeys(data.cases))
    names = np.asarray(data.cases)
    calibration = bundle.config.get("calibration") or {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine_version": __version__,
        "machine": machine_description(str(resolve_device(base.device))),
        "model": {"path": str(bundle.path), "modalities": list(spec.modalities),
                  "scored_modalities": [spec.modalities[i] for i in spec.scored],
                  "image_size": list(spec.image_size),
                  "calibration": {k: calibration[k] for k in ("decision_score", "w", "thr_01", "m_max", "settings")
                                  if k in calibration}},
        "cohort": {"manifest": str(Path(manifest).resolve()), "split": split, "cases": len(cases),
                   "lesion_cases": sum(bool(truth[names == c].any()) for c in cases), "slices": len(data),
                   "lesion_slices": int(lesion_slices.sum()), "lesion_slices_by_label": int(data.unhealthy.sum()),
                   "validation_split": val_split if val is not None else None,
                   "validation_slices": None if val is None else len(val)},
        "settings": {f.name: getattr(base, f.name) for f in fields(base)},
    }


# ------------------------------------------------------------------------------------------------ writing


def _plain(value: Any) -> Any:
    """JSON-able copy: numpy scalars/arrays to python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def results_json(evaluation: Evaluation, command: str | None = None) -> dict[str, Any]:
    methods = {}
    for run in evaluation.runs:
        n = len(evaluation.data)
        methods[run.variant.key] = {
            "label": run.variant.label, "pixel_labels_for_tuning": run.variant.pixel_labels,
            "network_evaluations_per_slice": run.evaluations_per_slice, "seconds": run.seconds,
            "seconds_per_slice": run.seconds / n, "parameters": run.parameters, "metrics": run.metrics}
    return _plain({"command": command, **evaluation.info, "methods": methods,
                   "metric_definitions": "see the docstring of diffusion_engine.metrics; Dice/IoU: mean over slices "
                                         "(two empty masks = 1); *_pooled: one confusion matrix over the set; AUPRC: "
                                         "average precision over the brain pixels of the set"})


def _percent(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.1f}"


def _number(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_markdown(evaluation: Evaluation, command: str | None = None) -> str:
    info, cohort = evaluation.info, evaluation.info["cohort"]
    n = len(evaluation.data)
    lines = ["# Anomaly segmentation: evaluation", "",
             f"- Command: `{command}`" if command else "- Command: (Python API)",
             f"- Model: `{info['model']['path']}` ({', '.join(info['model']['modalities'])}, "
             f"{'x'.join(map(str, info['model']['image_size']))}; scored: "
             f"{', '.join(info['model']['scored_modalities'])})",
             f"- Cohort: `{cohort['manifest']}`, split `{cohort['split']}`: {cohort['cases']} cases "
             f"({cohort['lesion_cases']} with lesions), {cohort['slices']} slices ({cohort['lesion_slices']} with "
             "lesion pixels on the model grid)"
             + (f"; baselines tuned on split `{cohort['validation_split']}` ({cohort['validation_slices']} slices)"
                if cohort["validation_split"] else ""),
             f"- Date: {info['date']} (diffusion-engine {info['engine_version']})",
             f"- Machine: {describe_machine(info['machine'])}",
             f"- AnoFPDM settings: stride {info['settings']['stride']}, t_max "
             f"{info['settings']['t_max'] if info['settings']['t_max'] is not None else '0.6 T'}, "
             f"calibration {json.dumps(_plain(info['model']['calibration']))}", "",
             "| Method | Pixel labels for tuning | Mixed Dice | Mixed IoU | Mixed AUPRC | Slice accuracy | "
             "Unhealthy Dice | Unhealthy IoU | Unhealthy AUPRC | Case Dice | UNet evaluations / slice | s / slice |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in evaluation.runs:
        mixed, unhealthy, cases = run.metrics["mixed"], run.metrics["unhealthy"], run.metrics["cases"]
        lines.append(f"| {run.variant.label} | {'yes' if run.variant.pixel_labels else 'no'} | "
                     f"{_percent(mixed['dice'])} | {_percent(mixed['iou'])} | {_percent(mixed['auprc'])} | "
                     f"{_percent(mixed['accuracy'])} | {_percent(unhealthy['dice'])} | {_percent(unhealthy['iou'])} | "
                     f"{_percent(unhealthy['auprc'])} | {_percent(cases['dice_mean_lesion_cases'])} | "
                     f"{_number(run.evaluations_per_slice, 0)} | {run.seconds / n:.3f} |")
    lines += ["", "Pooled over pixels (one confusion matrix per set) and the methods' chosen values:", "",
              "| Method | Mixed Dice (pooled) | Unhealthy Dice (pooled) | Healthy cases without false positives | "
              "Parameters |", "| --- | ---: | ---: | ---: | --- |"]
    for run in evaluation.runs:
        cases = run.metrics["cases"]
        lines.append(f"| {run.variant.label} | {_percent(run.metrics['mixed']['dice_pooled'])} | "
                     f"{_percent(run.metrics['unhealthy']['dice_pooled'])} | "
                     f"{cases['healthy_cases_without_false_positives']} / {cases['healthy_cases']} | "
                     f"{_parameter_text(run)} |")
    lines += ["", "Definitions (diffusion_engine.metrics): numbers in %. Dice and IoU are computed per slice on the "
              "model grid and averaged over the slices of the setting; two empty masks score 100 (the paper's "
              "convention, which lifts the mixed Dice on cohorts with many healthy slices). AUPRC is the average "
              "precision of the continuous anomaly map over the brain pixels of all slices of the setting. Mixed: "
              "every slice, masks of slices decided healthy emptied (baselines have no decision: a slice counts "
              "as decided unhealthy when its mask is non-empty). Unhealthy: slices with lesion pixels on the model "
              "grid, every mask kept. Slice accuracy: the healthy/unhealthy decision against the image-level "
              "labels. Case Dice: Dice pooled over the slices of a case (mixed masks), averaged over the cases "
              "with lesions. s / slice: wall time of the method on this split, tuning on validation excluded.", "",
              *_calibration_notes(evaluation),
              "For orientation only (other data): the paper's BraTS21 numbers (mixed Dice/IoU/AUPRC, unhealthy "
              "Dice/IoU/AUPRC): " + "; ".join(f"{k} {'/'.join(map(str, v))}" for k, v in PAPER_BRATS21.items()) + "."]
    return "\n".join(lines) + "\n"


def _calibration_notes(evaluation: Evaluation) -> list[str]:
    """Say when a variant runs with thresholds calibrated for another encoding."""
    settings = evaluation.info["model"]["calibration"].get("settings") or {}
    encoding = settings.get("encoding", "ddim")
    notes = []
    for run in evaluation.runs:
        own = dict(run.variant.changes).get("encoding", encoding)
        values = run.parameters.get("values", {})
        calibrated = any(values.get(name, {}).get("source") == "calibration" for name in ("thr_01", "m_max"))
        if own != encoding and calibrated:
            notes.append(f"{run.variant.label} uses the thr_01 and M_max calibrated with {encoding.upper()} encoding "
                         f"(`diffusion-engine calibrate anomaly --encoding {own}` on a copy of the model gives its "
                         "own).")
    return [*notes, ""] if notes else []


def _parameter_text(run: MethodRun) -> str:
    parameters = run.parameters
    if "threshold" in parameters:
        record = parameters["threshold"]
        text = f"threshold {record['value']:.4g} (percentile {record['percentile']:g} of validation brain scores)"
        if "noise_level" in parameters:
            text += f"; L {parameters['noise_level']}, w {parameters['w']:g}, stride {parameters['stride']}"
        return text
    values = parameters.get("values", {})
    text = ", ".join(f"{name} {_format(values[name]['value'])}" for name in ("w", "decision_score", "thr_01", "m_max")
                     if name in values)
    if "ablation" in parameters:
        ablation = {k: v for k, v in parameters["ablation"].items() if k != "source"}
        text += "; " + ", ".join(f"{k} {v:.4g}" for k, v in ablation.items())
        text += f" ({parameters['ablation']['source']})"
    return text + f"; median t_e {parameters.get('median_t_e', float('nan')):.0f}"


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return f"{value:.8g}" if isinstance(value, float) else str(value)


def _example_slices(evaluation: Evaluation, count: int) -> list[int]:
    """Slices with the largest lesions, one per case first."""
    area = evaluation.truth.reshape(len(evaluation.truth), -1).sum(axis=1)
    order = [int(i) for i in np.argsort(-area, kind="stable") if area[i] > 0]
    chosen, seen = [], set()
    for index in order:
        if evaluation.data.cases[index] not in seen:
            chosen.append(index)
            seen.add(evaluation.data.cases[index])
    chosen += [i for i in order if i not in chosen]
    return chosen[:count]


def save_figure(evaluation: Evaluation, path: str | os.PathLike[str], *, examples: int = 4) -> Path:
    """Example lesion slices (input, truth, the main method's map and mask, the baselines' masks) and the M_t
    curves of healthy vs unhealthy slices."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {run.variant.key: run for run in evaluation.runs}
    main = next((run for run in evaluation.runs if run.slice_results is not None), evaluation.runs[0])
    others = [runs[k] for k in ("reconstruction", "intensity") if k in runs and runs[k] is not main]
    picks = _example_slices(evaluation, examples)
    modalities = evaluation.info["model"]["modalities"]
    channel = modalities.index("flair") if "flair" in modalities else 0
    columns = 4 + len(others)
    curve_rows = 1 if main.slice_results is not None else 0
    figure = Figure(figsize=(2.2 * columns, 2.3 * (len(picks) + 1.4 * curve_rows)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(picks) + curve_rows, columns, height_ratios=[1] * len(picks) + [1.4] * curve_rows)
    for row, index in enumerate(picks):
        case = evaluation.data.cases[index]
        panels = [(evaluation.data.images[index, channel], "gray", f"{modalities[channel]} ({case})"),
                  (evaluation.truth[index], "gray", "ground truth"),
                  (main.score[index], "magma", f"{main.variant.label}: map"),
                  (main.mixed_masks[index], "gray", f"mask, Dice {_slice_dice(main, evaluation, index)}")]
        panels += [(run.all_masks[index], "gray", f"{run.variant.label.split(' [')[0]}, Dice "
                                                  f"{_slice_dice(run, evaluation, index)}") for run in others]
        for column, (image, cmap, title) in enumerate(panels):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(image, cmap=cmap, interpolation="nearest")
            axis.set_title(title, fontsize=7)
            axis.set_axis_off()
    if curve_rows:
        axis = figure.add_subplot(grid[len(picks), :])
        results = main.slice_results
        timesteps, curves = np.asarray(results.timesteps), results.curves
        for label, colour, name in ((0, "tab:blue", "healthy slices"), (1, "tab:red", "unhealthy slices")):
            rows = np.flatnonzero(evaluation.data.unhealthy == label)
            for i in rows[:: max(1, len(rows) // 30)]:
                axis.plot(timesteps, curves[i], color=colour, alpha=0.15, linewidth=0.7)
            if len(rows):
                axis.plot(timesteps, curves[rows].mean(axis=0), color=colour, linewidth=2.0,
                          label=f"{name} (mean of {len(rows)})")
        axis.set_xlabel("timestep t")
        axis.set_ylabel("M_t (mean over modalities)")
        axis.set_title(f"{main.variant.label}: divergence M_t between the healthy-guided and unconditional "
                       "predictions", fontsize=8)
        axis.legend(fontsize=7)
    if not picks:
        figure.suptitle("no slice of this split holds lesion pixels on the model grid", fontsize=8)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return Path(path)


def _slice_dice(run: MethodRun, evaluation: Evaluation, index: int) -> str:
    from ..metrics import dice

    mask = run.mixed_masks[index] if run.slice_results is not None else run.all_masks[index]
    return f"{100 * dice(mask, evaluation.truth[index]):.0f}"


def write_evaluation(evaluation: Evaluation, out: str | os.PathLike[str], *, command: str | None = None,
                     figure: bool = True) -> dict[str, str]:
    """results.md, results.json and (optionally) figure.png in ``out``; returns {label: path}."""
    folder = results_folder(out)
    outputs = {}
    write_text_atomic(folder / "results.json",
                      json.dumps(results_json(evaluation, command), indent=2, allow_nan=False) + "\n")
    outputs["results_json"] = str(folder / "results.json")
    write_text_atomic(folder / "results.md", results_markdown(evaluation, command))
    outputs["results"] = str(folder / "results.md")
    if figure:
        outputs["figure"] = str(save_figure(evaluation, folder / "figure.png"))
    return outputs

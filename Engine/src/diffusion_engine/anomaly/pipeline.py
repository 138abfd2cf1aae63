"""AnoFPDM end to end: a model bundle and a case (or model slices) in, a label map, an anomaly map and a report out.

    result = segment_anomalies("path/to/model", ["flair.nii.gz", "t2.nii.gz"])
    write_image(result.label, "lesions.nrrd")

The algorithm is the core's (forward.forward_statistics, threshold.segment, decision); this module adds what a
user needs around it: the model's calibration (w, thr_01, M_max) or explicit overrides, chunking with an
out-of-memory fallback, progress and cancellation, the mapping back to the input's exact geometry and a report.

Defaults and why:
- stride 40 with t_max = 0.6 T (600 of 1000): 15 grid steps, 30 network evaluations per slice in 15 batched calls.
  The paper's full grid (stride 1) costs 40x more; on a CPU a brain volume would take hours. H is the mean of S_t
  over the grid steps up to t_e, so a coarser grid averages fewer, evenly spread terms of the same sequence.
  Thresholds calibrated at one stride must be used at that stride (M_max and thr_01 depend on it): a warning says
  so when the settings differ from the calibration's.
- min_component_mm2 = 140.625: the authors' code drops components of <= 40 pixels on 128x128 BraTS slices, i.e.
  240 mm / 128 = 1.875 mm pixels; the area keeps that rule physical for any model size and field of view.
- early_stop off: see AnomalySettings.early_stop.
- The diffusion-classifier decision (classifier.py) runs its own pass only when it decides: with --no-decision, or
  another decision score, it costs nothing.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .. import __version__
from ..devices import resolve_device
from ..errors import InputError, ModelError
from ..metrics import brain_pixels
from ..nets.bundle import ModelBundle, resolve_bundle
from ..progress import Progress, warn
from ..schedule import timestep_grid
from ..volume import (
    Normalisation,
    SliceGeometry,
    canonical_array,
    from_model_slices,
    read_case,
    to_model_slices,
)
from ._checks import check_choice, check_int, check_real
from .classifier import classifier_noise, classifier_timesteps, unhealthy_evidence
from .decision import DECISION_SCORES, check_threshold, cosine_similarity, decide, mixed_setting_masks
from .forward import CODE_T_MAX_FRACTION, ENCODINGS, ForwardStatistics, forward_statistics
from .threshold import MAX_SMALL_COMPONENT, remove_small_components, segment

DEMO_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "anomaly-demo"
DEFAULT_STRIDE = 40
REFERENCE_PIXEL_MM = 240.0 / 128.0  # BraTS slices (240 px of 1 mm) resized to 128 px in the authors' code
DEFAULT_MIN_COMPONENT_MM2 = MAX_SMALL_COMPONENT * REFERENCE_PIXEL_MM**2  # the code's 40 px = 140.625 mm^2
AGGREGATIONS = ("mean", "last")
EARLY_STOP_PATIENCE = 2  # grid steps past the peak ...
EARLY_STOP_DROP = 0.5  # ... with M_t at most this fraction of its peak, in every modality
CALIBRATION_METHOD = "anofpdm"
CALIBRATION_VERSION = 2  # 2: the decision score is stored (version 1 means the cosine)
# settings that change M_t, the MSE curves and hence thr_01 and M_max
FORWARD_KEYS = ("t_max", "stride", "encoding", "early_stop")
CALIBRATE_HINT = ("calibrate the model once with `diffusion-engine calibrate anomaly --model MODEL --manifest "
                  "MANIFEST` (validation cases with image-level labels), or give the values explicitly")


@dataclass
class AnomalySettings:
    """How to run AnoFPDM; None means "the model's calibrated value" (or the paper's default where noted)."""
    w: float | None = None  # guidance strength; None -> the calibrated w
    t_max: int | None = None  # last timestep + 1 of the forward grid; None -> 0.6 T (the code's 600 of 1000)
    stride: int = DEFAULT_STRIDE  # timestep stride; 1 = the paper's full grid
    encoding: str = "ddim"  # "ddim" (deterministic inversion, the paper's best) or "ddpm" (fresh noise per step)
    aggregation: str = "mean"  # "mean": H = mean of S_t over t <= t_e; "last": S_{t_e} only
    noise_scale: int | None = None  # fixed t_e (0-based timestep on the grid) instead of argmax M_t
    threshold: float | None = None  # fixed absolute threshold on H instead of Algorithm 1
    quantile: float | None = None  # fixed quantile level of H instead of Algorithm 1's dynamic one
    decision: bool = True  # healthy/unhealthy decision per slice ("mixed" setting); False keeps every mask
    decision_score: str | None = None  # "cosine" (paper), "peak-divergence", "diffusion-classifier" (decision.py);
    # None -> calibrated
    thr_01: float | None = None  # decision threshold on that score; None -> calibrated
    m_max: float | list[float] | None = None  # Algorithm 1's M_max (one, or one per modality); None -> calibrated
    min_component_mm2: float = DEFAULT_MIN_COMPONENT_MM2  # components with at most this area are removed
    median_size: int = 5  # median filter of H (pixels, odd); 1 = none
    # Stop a slice once M_t has clearly passed its peak (EARLY_STOP_PATIENCE grid steps later and at most
    # EARLY_STOP_DROP of the peak, in every modality); a batch stops when all its slices have. When M_t is unimodal
    # this changes neither t_e, M_te, H nor the mask threshold; it does change the decision's cosine, which then
    # covers the steps up to the stop only, so thr_01 must be calibrated with the same setting. Off by default so
    # that the defaults are the paper's algorithm on a strided grid.
    early_stop: bool = False
    chunk_size: int = 64  # slices per network batch; halved on out-of-memory
    device: str = "auto"  # "auto" (GPU when available), "cpu", "cuda", "cuda:1", "mps"
    seed: int = 0  # DDPM encoding noise and the diffusion classifier's noise

    def validate(self) -> AnomalySettings:
        """Raise InputError for a setting out of range; returns self."""
        for name in ("w", "threshold", "quantile", "thr_01"):
            if getattr(self, name) is not None:  # thr_01's range depends on the score: checked where it is applied
                low, high = {"w": (0.0, math.inf), "threshold": (-math.inf, math.inf), "quantile": (0.0, 1.0),
                             "thr_01": (-math.inf, math.inf)}[name]
                check_real(name, getattr(self, name), low=low, high=high)
        if self.t_max is not None:
            check_int("t_max", self.t_max, low=1)
        if self.noise_scale is not None:
            check_int("noise scale (fixed t_e)", self.noise_scale, low=0)
        check_int("stride", self.stride, low=1)
        check_choice("encoding", self.encoding, ENCODINGS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.decision_score is not None:
            check_choice("decision score", self.decision_score, DECISION_SCORES)
        check_real("min_component_mm2", self.min_component_mm2, low=0.0)
        check_int("median filter size", self.median_size, low=1)
        if self.median_size % 2 == 0:
            raise InputError(f"median filter size must be odd, got {self.median_size}", fix="use an odd size such as 5")
        check_int("chunk_size", self.chunk_size, low=1)
        check_int("seed", self.seed, low=0)
        if self.threshold is not None and self.quantile is not None:
            raise InputError("a fixed threshold and a fixed quantile were both given", fix="give only one of them")
        if self.m_max is not None:
            values = [self.m_max] if isinstance(self.m_max, (int, float)) else list(self.m_max)
            if not values:
                raise InputError("M_max is empty", fix="give one value, or one per modality")
            for value in values:
                check_real("M_max", value, low=0.0, open_low=True)
        return self

    def resolved_t_max(self, num_timesteps: int) -> int:
        return round(CODE_T_MAX_FRACTION * num_timesteps) if self.t_max is None else self.t_max


@dataclass(eq=False)
class SliceResults:
    """Model-grid results for N slices (M = modalities scored, n = grid steps)."""
    score: np.ndarray  # [N, H, W] float32 anomaly map H (median-filtered mean over modalities)
    mask: np.ndarray  # [N, H, W] uint8 after threshold, median filter, component removal and decision
    unhealthy: np.ndarray  # [N] bool decision (values["decision_score"]'s rule); all True when decision=False
    cosine: np.ndarray  # [N] float64 cos(MSE^h, MSE^u)
    t_e: np.ndarray  # [N, M] int timestep of the peak of M_t (argmax), per modality
    m_te: np.ndarray  # [N, M] float M_te = max_t M_t, per modality
    threshold: np.ndarray  # [N] float64 Q* (the fixed threshold when one was given)
    curves: np.ndarray  # [N, n] float M_t averaged over modalities (0 after a slice's early stop)
    timesteps: list[int]  # the grid, ascending 0-based timesteps
    network_evaluations: int  # total, over all slices (rows through the network)
    end_step: np.ndarray  # [N, M] int last aggregated timestep (t_e, or the fixed noise scale)
    steps_run: np.ndarray  # [N] int grid steps counted per slice (n unless early_stop)
    quantile_level: np.ndarray | None  # [N, M] Algorithm 1's (or the fixed) quantile level; None: fixed threshold
    max_component_pixels: np.ndarray  # [N] int components of at most this many pixels were removed
    values: dict  # JSON-able: w, decision_score, thr_01, m_max used and where each came from
    evidence: np.ndarray | None = None  # [N] float64 diffusion-classifier evidence, when that score decided


@dataclass(eq=False)
class AnomalyResult:
    label: sitk.Image  # uint8 lesion mask on the input's voxel grid
    score_map: sitk.Image  # float32 anomaly map H on the input's voxel grid (0 outside the brain slices)
    report: dict  # JSON-able
    slice_results: SliceResults | None = None
    geometry: SliceGeometry | None = None


# ------------------------------------------------------------------------------------------------ the model


def resolve_model(model: str | os.PathLike[str] | ModelBundle | None, *, device: str = "cpu") -> ModelBundle:
    """A loaded anomaly model: None or "demo" is the bundled demo model; a folder is loaded; a bundle is checked."""
    bundle = resolve_bundle(model, "anomaly", demo=DEMO_MODEL, device=device,
                            fix="pass --model MODEL_FOLDER with a model trained by `diffusion-engine train "
                                "anomaly` (then calibrated with `diffusion-engine calibrate anomaly`)")
    model_spec(bundle)
    return bundle


@dataclass(frozen=True)
class ModelSpec:
    """What inference needs from an anomaly bundle's model.json, checked."""
    modalities: tuple[str, ...]  # input images, in channel order
    image_size: tuple[int, int]
    normalisation: dict
    scored: list[int]  # channels the statistics are computed over
    healthy_label: int
    unhealthy_label: int | None  # the class the diffusion classifier compares with; None when the model has none


def model_spec(bundle: ModelBundle) -> ModelSpec:
    """Check that the bundle can run AnoFPDM and return what inference needs (ModelError naming the fix)."""
    config, where = bundle.config, bundle.path / "model.json"
    if "eps" not in bundle.networks:
        raise ModelError(f"an anomaly model needs a network named 'eps', found {', '.join(bundle.networks)}",
                         path=where, fix="re-import the checkpoint with `--network-name eps`")
    net_config = config["networks"]["eps"]["config"]
    if not net_config.get("num_classes"):
        raise ModelError("the network is not class-conditional, so it cannot be guided towards 'healthy'",
                         path=where, fix="use a model trained with classifier-free guidance (`diffusion-engine "
                                         "train anomaly`)")
    if config["schedule"] is None:
        raise ModelError("the model records no noise schedule", path=where,
                         fix="re-import the checkpoint with its schedule (e.g. linear, 1000 steps)")
    prep = config["preprocessing"]
    modalities, size = prep.get("modalities"), prep.get("image_size")
    if not modalities or not isinstance(modalities, list) or not size:
        raise ModelError("the model's preprocessing section lacks 'modalities' or 'image_size'", path=where,
                         fix="add them to model.json (e.g. \"modalities\": [\"flair\", \"t2\"], \"image_size\": "
                             "[128, 128]), or retrain with `diffusion-engine train anomaly`")
    if net_config["in_channels"] != len(modalities):
        raise ModelError(f"the network takes {net_config['in_channels']} channels but the preprocessing lists "
                         f"{len(modalities)} modalities ({', '.join(modalities)})", path=where,
                         fix="make preprocessing.modalities name one modality per input channel")
    scored_names = prep.get("score_modalities", modalities)
    unknown = [m for m in scored_names if m not in modalities]
    if unknown or not scored_names:
        raise ModelError(f"score_modalities {scored_names} must be among the model's modalities {modalities}",
                         path=where, fix="fix preprocessing.score_modalities in model.json")
    healthy = config["labels"].get("healthy_label", 0)
    if not isinstance(healthy, int) or not 0 <= healthy < net_config["num_classes"]:
        raise ModelError(f"healthy_label {healthy!r} is not a class of the network", path=where,
                         fix="set labels.healthy_label in model.json to the healthy class index")
    size = (size, size) if isinstance(size, int) else tuple(size)
    named = [int(key) for key, meaning in config["labels"].items() if meaning == "unhealthy" and key.isdigit()]
    unhealthy = named[0] if named else 1 - healthy if net_config["num_classes"] == 2 else None
    return ModelSpec(modalities=tuple(modalities), image_size=(int(size[0]), int(size[1])),
                     normalisation=dict(prep.get("normalisation") or {"method": "anofpdm"}),
                     scored=[modalities.index(m) for m in scored_names], healthy_label=healthy,
                     unhealthy_label=unhealthy)


def _calibration(bundle: ModelBundle) -> dict | None:
    calibration = bundle.config["calibration"]
    if not calibration:
        return None
    where = bundle.path / "model.json"
    if calibration.get("method") != CALIBRATION_METHOD or not isinstance(calibration.get("settings"), dict):
        raise ModelError("the model's calibration section is not an AnoFPDM calibration", path=where,
                         fix="run `diffusion-engine calibrate anomaly` again")
    if calibration.get("version", 0) > CALIBRATION_VERSION:
        raise ModelError(f"the calibration was written by a newer diffusion-engine (version "
                         f"{calibration.get('version')})", path=where, fix="upgrade diffusion-engine or recalibrate")
    return calibration


def resolve_values(bundle: ModelBundle, settings: AnomalySettings, n_scored: int, *, check_only: bool = False
                   ) -> dict:
    """w, decision score, thr_01 and M_max for this run: the user's value, else the calibrated one; errors name every
    missing one."""
    calibration = _calibration(bundle) or {}
    calibrated_score = calibration.get("decision_score", "cosine")  # calibration version 1 had the cosine only
    score = settings.decision_score or calibrated_score
    if score != calibrated_score and "thr_01" in calibration:  # the calibrated thr_01 thresholds another score
        calibration = {key: value for key, value in calibration.items() if key != "thr_01"}
        if settings.decision and settings.thr_01 is None:
            raise InputError(f"the model's thr_01 was calibrated for the {calibrated_score} decision, not for "
                             f"{score}", path=bundle.path,
                             fix=f"give --thr-01 for the {score} decision, or recalibrate with "
                                 f"`diffusion-engine calibrate anomaly --decision {score}`")
    needed = {"w": True, "thr_01": settings.decision,
              "m_max": settings.threshold is None and settings.quantile is None}
    values, missing = {}, []
    for name, required in needed.items():
        given = getattr(settings, name)
        if given is not None:
            values[name] = {"value": given, "source": "settings"}
        elif name in calibration:
            values[name] = {"value": calibration[name], "source": "calibration"}
        elif required:
            missing.append(name)
    if missing:
        flags = {"w": "--w", "thr_01": "--thr-01 (or --no-decision)", "m_max": "--m-max (or --threshold/--quantile)"}
        raise ModelError(f"the model is not calibrated: {', '.join(missing)} unknown", path=bundle.path,
                         fix=f"{CALIBRATE_HINT}: {', '.join(flags[m] for m in missing)}")
    if "m_max" in values:
        m_max = values["m_max"]["value"]
        m_max = [float(m_max)] if isinstance(m_max, (int, float)) else [float(v) for v in m_max]
        if len(m_max) not in (1, n_scored):
            raise InputError(f"M_max has {len(m_max)} values for {n_scored} scored modalities",
                             fix="give one M_max, or one per modality")
        values["m_max"]["value"] = m_max
    values["w"]["value"] = float(values["w"]["value"])
    source = ("settings" if settings.decision_score is not None
              else "calibration" if "decision_score" in calibration else "default")
    values["decision_score"] = {"value": score, "source": source}
    if "thr_01" in values:
        check_threshold(score, values["thr_01"]["value"])
    if not check_only:
        _warn_if_calibrated_differently(bundle, settings, values, calibration)
    return values


def _warn_if_calibrated_differently(bundle: ModelBundle, settings: AnomalySettings, values: dict,
                                    calibration: dict) -> None:
    """thr_01 and M_max hold only for the w, grid and encoding they were calibrated with."""
    used = [name for name in ("thr_01", "m_max") if values.get(name, {}).get("source") == "calibration"]
    if not used:
        return
    schedule_steps = bundle.schedule().num_timesteps
    current = {"t_max": settings.resolved_t_max(schedule_steps), "stride": settings.stride,
               "encoding": settings.encoding, "early_stop": settings.early_stop, "w": values["w"]["value"]}
    reference = {**calibration["settings"], "w": calibration.get("w")}
    differences = [f"{key} {current[key]} (calibrated with {reference.get(key)})" for key in current
                   if key in reference and reference[key] != current[key]]
    if differences:
        warn(f"the calibrated {' and '.join(used)} of {bundle.path} were obtained with other settings: "
             f"{', '.join(differences)}; results may be off. Use the calibration's settings or recalibrate with "
             "these (`diffusion-engine calibrate anomaly`).")


# ------------------------------------------------------------------------------------------------ forward pass


def _out_of_memory(error: BaseException) -> bool:

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _passed_peak(fixed_index: int | None) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Early-stop rule: M_t is EARLY_STOP_PATIENCE steps past its peak and at most EARLY_STOP_DROP of it."""
    def finished(k: int, divergence: torch.Tensor, peak_index: torch.Tensor) -> torch.Tensor:
        peak = divergence.gather(-1, peak_index[..., None])[..., 0]
        past = (k - peak_index >= EARLY_STOP_PATIENCE) & (divergence[..., -1] <= EARLY_STOP_DROP * peak)
        done = past.all(dim=1)
        # a fixed noise scale must be reached first: H is the mean of S_t up to it
        return done if fixed_index is None or k >= fixed_index else torch.zeros_like(done)

    return finished


def forward_in_chunks(compute: Callable[[slice, Callable[[], None]], Any], count: int, n_steps: int,
                      chunk_size: int, task: str) -> list[tuple[slice, Any]]:
    """Run compute(rows, on_step) over consecutive slices of `count` rows, chunk by chunk.

    One progress tick per step of a chunk (cancellation is checked there). On out-of-memory the chunk size is
    halved and the chunk retried, down to one slice; then a ModelError.
    """
    results, start = [], 0
    with Progress(count * n_steps, task, unit="slice-step") as bar:
        while start < count:
            rows = slice(start, min(start + chunk_size, count))
            width, steps_done = rows.stop - rows.start, [0]

            def on_step(width: int = width, steps_done: list[int] = steps_done, first: int = start) -> None:
                steps_done[0] += 1
                bar.update(max(0, first * n_steps + steps_done[0] * width - bar.done))

            try:
                stats = compute(rows, on_step)
            except (RuntimeError, MemoryError) as error:
                if not (isinstance(error, MemoryError) or _out_of_memory(error)):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if width == 1:
                    raise ModelError("not enough memory to process even one slice at a time",
                                     fix="close other programs, use --device cpu, or use a smaller model") from error
                chunk_size = width // 2
                warn(f"out of memory with {width} slices per batch; retrying with {chunk_size}")
                continue
            results.append((rows, stats))
            start = rows.stop
            bar.update(max(0, start * n_steps - bar.done))
    return results


def _stack(parts: list[torch.Tensor], n_steps: int) -> torch.Tensor:
    """Concatenate per-chunk curves [b, M, n_i], zero-padding chunks that stopped early to n_steps."""
    return torch.cat([F.pad(p, (0, n_steps - p.shape[-1])) for p in parts])


@dataclass(eq=False)
class ForwardRun:
    """forward_statistics over every slice, concatenated on the CPU."""
    timesteps: list[int]
    divergence: torch.Tensor  # [N, M, n]
    mse_healthy: torch.Tensor
    mse_reference: torch.Tensor
    peak_step: torch.Tensor  # [N, M]
    peak_divergence: torch.Tensor  # [N, M]
    end_step: torch.Tensor  # [N, M]
    aggregated: torch.Tensor  # [N, M, H, W]
    last_sam: torch.Tensor  # [N, M, H, W]
    steps_run: torch.Tensor  # [N]
    network_evaluations: int  # total rows through the network

    @classmethod
    def concatenate(cls, parts: list[tuple[slice, ForwardStatistics]], grid: list[int]) -> ForwardRun:

        stats = [s for _, s in parts]
        n = len(grid)

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(s, name).cpu() for s in stats])

        steps_run = torch.cat([torch.full((s.divergence.shape[0],), n) if s.steps_run is None else s.steps_run.cpu()
                               for s in stats])
        return cls(timesteps=grid, divergence=_stack([s.divergence.cpu() for s in stats], n),
                   mse_healthy=_stack([s.mse_healthy.cpu() for s in stats], n),
                   mse_reference=_stack([s.mse_reference.cpu() for s in stats], n),
                   peak_step=cat("peak_step"), peak_divergence=cat("peak_divergence"),
                   end_step=cat("end_step"), aggregated=cat("aggregated"),
                   last_sam=cat("last_sam"), steps_run=steps_run,
                   network_evaluations=sum(s.network_evaluations * s.divergence.shape[0] for s in stats))


def _as_tensor(slices: np.ndarray | torch.Tensor, spec: ModelSpec) -> torch.Tensor:

    data = torch.as_tensor(np.asarray(slices) if not isinstance(slices, torch.Tensor) else slices)
    expected = (len(spec.modalities), *spec.image_size)
    if data.ndim != 4 or tuple(data.shape[1:]) != expected or data.shape[0] == 0:
        raise InputError(f"model slices must be [N, {', '.join(map(str, expected))}] with N >= 1, got "
                         f"{list(data.shape)}", fix="prepare them with volume.to_model_slices for this model")
    data = data.detach().to(torch.float32).cpu()
    if not bool(torch.isfinite(data).all()):
        raise InputError("the model slices contain NaN or infinite values", fix="check the preprocessing")
    return data


def _network_on(bundle: ModelBundle, device: str) -> tuple[torch.nn.Module, torch.device]:
    """The bundle's eps network, moved to the resolved device (once)."""
    resolved = resolve_device(device)
    network = bundle.networks["eps"]
    if next(network.parameters()).device != resolved:
        network.to(resolved)
    return network, resolved


def run_forward(bundle: ModelBundle, slices: np.ndarray | torch.Tensor, settings: AnomalySettings, *,
                w: float | Sequence[float], task: str) -> ForwardRun | list[ForwardRun]:
    """forward_statistics over all slices in chunks; with a sequence of w, one ForwardRun per w.

    Several w with DDIM encoding share their network evaluations (see GuidanceSweep): the encoding and both
    predictions do not depend on w, only their combination does. The bundle's network is moved to the device.
    """
    spec = model_spec(bundle)
    slices = _as_tensor(slices, spec)
    network, device = _network_on(bundle, settings.device)
    schedule = bundle.schedule()
    t_max = settings.resolved_t_max(schedule.num_timesteps)
    check_int("t_max", t_max, low=1, high=schedule.num_timesteps)
    grid = timestep_grid(schedule.num_timesteps, stride=settings.stride, stop=t_max)
    fixed_index = None
    if settings.noise_scale is not None:
        if settings.noise_scale not in grid:
            raise InputError(f"noise scale {settings.noise_scale} is not on the timestep grid (0 to {t_max - 1} "
                             f"in steps of {settings.stride})",
                             fix=f"choose a multiple of {settings.stride} below {t_max}")
        fixed_index = grid.index(settings.noise_scale)
    sweep = not isinstance(w, (int, float))
    ws = [float(v) for v in w] if sweep else [float(w)]
    for value in ws:
        check_real("guidance strength w", value, low=0.0)
    shared = sweep and settings.encoding == "ddim" and len(ws) > 1
    stop_when = _passed_peak(fixed_index) if settings.early_stop else None
    options = dict(t_max=t_max, stride=settings.stride, encoding=settings.encoding, fixed_end_step=settings.noise_scale,
                   healthy_label=spec.healthy_label, modalities=spec.scored, stop_when=stop_when)

    runs = []
    for w_value in [None] if shared else ws:
        options["generator"] = torch.Generator(device=device).manual_seed(settings.seed)  # same noise for every w
        def compute(rows: slice, on_step: Callable[[], None], w_value: float | None = w_value) -> ForwardStatistics:
            x0 = slices[rows].to(device)
            if w_value is not None:
                return forward_statistics(network, schedule, x0, w=w_value, on_step=on_step, **options)
            guidance = GuidanceSweep(network, ws, x0.shape[0])
            stats = forward_statistics(guidance, schedule, x0.repeat(len(ws), 1, 1, 1), w=1.0, on_step=on_step,
                                       **options)
            stats.network_evaluations = guidance.rows // x0.shape[0]
            return stats

        label = task if w_value is None or not sweep else f"{task} (w = {w_value:g})"
        parts = forward_in_chunks(compute, slices.shape[0], len(grid), settings.chunk_size, label)
        if w_value is not None:
            runs.append(ForwardRun.concatenate(parts, grid))
        else:
            runs.extend(_split_sweep(parts, grid, len(ws)))
    return runs if sweep else runs[0]


def class_evidence(bundle: ModelBundle, slices: np.ndarray | torch.Tensor, settings: AnomalySettings, *,
                   task: str = "diffusion classifier") -> tuple[np.ndarray, int]:
    """The diffusion classifier's evidence that each slice is unhealthy ([N] float64, classifier.py) and the
    network evaluations it took, in chunks like the forward pass."""
    spec = model_spec(bundle)
    if spec.unhealthy_label is None:
        raise ModelError("the model has no class labelled 'unhealthy' for the diffusion-classifier decision",
                         path=bundle.path / "model.json",
                         fix="use another decision score (--decision-score cosine), or name the class in "
                             "model.json's labels (e.g. \"1\": \"unhealthy\")")
    slices = _as_tensor(slices, spec)
    network, device = _network_on(bundle, settings.device)
    schedule = bundle.schedule()
    timesteps = classifier_timesteps(schedule.num_timesteps)
    noise = classifier_noise(slices.shape[1:], len(timesteps), settings.seed, device)

    def compute(rows: slice, on_step: Callable[[], None]) -> torch.Tensor:
        return unhealthy_evidence(network, schedule, slices[rows].to(device), healthy_label=spec.healthy_label,
                                  unhealthy_label=spec.unhealthy_label, timesteps=timesteps, noise=noise,
                                  on_step=on_step).cpu()

    parts = forward_in_chunks(compute, slices.shape[0], len(timesteps), settings.chunk_size, task)
    return torch.cat([part for _, part in parts]).numpy(), 2 * len(timesteps) * slices.shape[0]


class GuidanceSweep:
    """Several guidance strengths from one network evaluation per step (DDIM encoding only).

    forward_statistics runs on K stacked copies of a chunk with w = 1, so eps_g = 2 eps_h' - eps_null. Giving copy
    k the healthy prediction eps_h' = eps_null + (1 + w_k) / 2 (eps_h - eps_null) makes that (1 + w_k) eps_h -
    w_k eps_null, the guided prediction at w_k; the reference and the DDIM inversion use eps_null, which is the same
    for every copy. So every copy's x_t is the same, and the network sees the first copy only.
    """
    def __init__(self, network: Callable[..., torch.Tensor], ws: Sequence[float], batch: int):
        self.network, self.ws, self.batch, self.rows = network, list(ws), batch, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:

        k, b = len(self.ws), self.batch
        healthy, null = x[: k * b], x[k * b :]
        copies = (*healthy.split(b), *null.split(b))
        if null.shape[0] != k * b or not all(torch.equal(healthy[:b], part) for part in copies):
            raise ValueError("GuidanceSweep needs the stacked copies of one chunk with the same x_t (DDIM encoding)")
        eps = self.network(torch.cat([healthy[:b], null[:b]]), torch.cat([t[:b], t[k * b : k * b + b]]),
                           torch.cat([y[:b], y[k * b : k * b + b]]))
        self.rows += 2 * b
        eps_h, eps_null = eps[:b], eps[b:]
        scales = torch.tensor([(1.0 + w) / 2.0 for w in self.ws], dtype=eps.dtype, device=eps.device)
        guided = eps_null[None] + scales[:, None, None, None, None] * (eps_h - eps_null)[None]
        return torch.cat([guided.flatten(0, 1), eps_null.repeat(k, 1, 1, 1)])


def _split_sweep(parts: list[tuple[slice, ForwardStatistics]], grid: list[int], k: int) -> list[ForwardRun]:
    """The K stacked copies of every chunk back into one ForwardRun per guidance strength."""
    runs = []
    for index in range(k):
        per_w = []
        for rows, stats in parts:
            b = rows.stop - rows.start
            part = copy.copy(stats)
            for name in ("divergence", "mse_healthy", "mse_reference", "peak_index", "peak_divergence", "end_index",
                         "aggregated", "last_sam", "steps_run"):
                value = getattr(stats, name)
                if value is not None:
                    setattr(part, name, value[index * b : (index + 1) * b])
            part.network_evaluations = stats.network_evaluations if index == 0 else 0  # shared: count once
            per_w.append((rows, part))
        runs.append(ForwardRun.concatenate(per_w, grid))
    return runs


# ------------------------------------------------------------------------------------------------ segmentation


def component_limits(count: int, min_component_mm2: float,
                      pixel_area_mm2: float | np.ndarray | None) -> np.ndarray:
    """Largest removed component per slice in pixels: floor(area limit / pixel area)."""
    area = REFERENCE_PIXEL_MM**2 if pixel_area_mm2 is None else pixel_area_mm2
    area = np.broadcast_to(np.asarray(area, dtype=np.float64), (count,))
    if not np.all(np.isfinite(area) & (area > 0)):
        raise InputError(f"pixel areas must be positive, got {area.min()}", fix="pass the model pixel area in mm^2")
    return np.floor(min_component_mm2 / area + 1e-9).astype(np.int64)


def segment_slices(bundle: ModelBundle, slices: np.ndarray | torch.Tensor, settings: AnomalySettings, *,
                   pixel_area_mm2: float | np.ndarray | None = None, task: str = "segmenting") -> SliceResults:
    """AnoFPDM on preprocessed model slices [N, C, H, W] in [-1, 1] (volume.to_model_slices).

    pixel_area_mm2: area of one model pixel (one value, or one per slice) for the small-component rule; None means
    the authors' BraTS pixels (1.875 mm), i.e. the code's 40-pixel rule.
    """
    settings.validate()
    spec = model_spec(bundle)
    data = _as_tensor(slices, spec)
    values = resolve_values(bundle, settings, len(spec.scored))
    run = run_forward(bundle, data, settings, w=values["w"]["value"], task=task)
    evidence = None
    if settings.decision and values["decision_score"]["value"] == "diffusion-classifier":
        evidence, evaluations = class_evidence(bundle, data, settings, task=f"{task}: slice decision")
        run.network_evaluations += evaluations
    return segment_from_forward(run, settings, values, brain=brain_pixels(data.numpy()), pixel_area_mm2=pixel_area_mm2,
                                evidence=evidence)


# settings that change the forward pass itself; the others only post-process its statistics
FORWARD_PASS_KEYS = ("w", "t_max", "stride", "encoding", "noise_scale", "early_stop", "seed")


def segment_from_forward(run: ForwardRun, settings: AnomalySettings, values: dict, *, brain: np.ndarray,
                         pixel_area_mm2: float | np.ndarray | None = None,
                         evidence: np.ndarray | None = None) -> SliceResults:
    """Decision, anomaly map, Algorithm-1 threshold and masks from one forward pass; ``values`` as resolve_values
    gives them. Settings outside FORWARD_PASS_KEYS can change here without a new pass. ``evidence``
    (class_evidence) is needed when the diffusion classifier decides.

    Masks are kept inside ``brain`` [N, H, W] (metrics.brain_pixels of the input slices), as the baselines' are:
    the map also lights up where the crop or padding meets the head, and a lesion outside the brain is no finding.
    """
    count = run.peak_step.shape[0]
    cosine = cosine_similarity(run.mse_healthy, run.mse_reference)
    if settings.decision:
        unhealthy = decide(values["decision_score"]["value"], values["thr_01"]["value"], cosine, run.peak_divergence,
                           None if evidence is None else torch.from_numpy(evidence))
    else:
        unhealthy = torch.ones(cosine.shape, dtype=torch.bool)
    maps = run.aggregated if settings.aggregation == "mean" else run.last_sam
    m_max = values.get("m_max", {}).get("value")
    result = segment(maps, run.peak_divergence, None if m_max is None else torch.tensor(m_max, dtype=torch.float64),
                     quantile=settings.quantile, threshold=settings.threshold,
                     median_size=None if settings.median_size == 1 else settings.median_size, max_component_size=0)
    limits = component_limits(count, settings.min_component_mm2, pixel_area_mm2)
    mask = result.mask & torch.as_tensor(np.asarray(brain, dtype=bool))
    for limit in np.unique(limits):
        rows = torch.from_numpy(np.flatnonzero(limits == limit))
        if limit > 0:
            mask[rows] = remove_small_components(mask[rows], int(limit))
    mask = mixed_setting_masks(mask, unhealthy)
    return SliceResults(
        score=result.anomaly_map.float().numpy(), mask=mask.numpy().astype(np.uint8), unhealthy=unhealthy.numpy(),
        cosine=cosine.numpy(), t_e=run.peak_step.numpy(), m_te=run.peak_divergence.double().numpy(),
        threshold=result.threshold.numpy(), curves=run.divergence.mean(dim=1).double().numpy(),
        timesteps=list(run.timesteps), network_evaluations=int(run.network_evaluations),
        end_step=run.end_step.numpy(), steps_run=run.steps_run.numpy(),
        quantile_level=None if result.levels is None else result.levels.numpy(), max_component_pixels=limits,
        values=values, evidence=evidence)


# ------------------------------------------------------------------------------------------------ volumes


def _images_from_arrays(inputs: Any, reference: sitk.Image | None,
                        spacing: Sequence[float] | None) -> Any:
    """numpy volumes ([z, y, x], as sitk.GetArrayFromImage gives them) -> SimpleITK images with geometry."""
    def convert(item: Any, name: str) -> Any:
        if not isinstance(item, np.ndarray):
            return item
        if item.ndim != 3:
            raise InputError(f"the {name} array has shape {item.shape}; a 3D volume [z, y, x] is needed",
                             fix="pass one 3D array per modality")
        image = sitk.GetImageFromArray(np.ascontiguousarray(item, dtype=np.float32))
        if reference is not None:
            if reference.GetSize() != image.GetSize():
                raise InputError(f"the {name} array (size {image.GetSize()}) does not match the reference image "
                                 f"(size {reference.GetSize()})", fix="pass arrays on the reference's voxel grid")
            image.CopyInformation(reference)
        elif spacing is not None:
            values = [float(v) for v in spacing]
            if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
                raise InputError(f"spacing must be three positive numbers (x, y, z in mm), got {spacing}",
                                 fix="pass spacing=(sx, sy, sz)")
            image.SetSpacing(values)
        else:
            raise InputError("numpy arrays carry no voxel size or orientation",
                             fix="pass reference=<SimpleITK image on the same grid> or spacing=(sx, sy, sz) in mm "
                                 "(axial arrays, identity direction)")
        return image

    if isinstance(inputs, np.ndarray):
        return convert(inputs, "input")
    if isinstance(inputs, Mapping):
        return {key: convert(value, str(key)) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [convert(value, f"input {i + 1}") for i, value in enumerate(inputs)]
    return inputs


def model_pixel_area_mm2(geometry: SliceGeometry) -> float:
    """Physical area of one model pixel: the padded crop's extent divided by the model grid."""
    row_mm, col_mm = geometry.orientation.canonical_spacing(geometry.spacing)[1:]
    (rows, cols), (model_h, model_w) = geometry.padded_size, geometry.model_size
    return rows * row_mm / model_h * cols * col_mm / model_w


def _input_slice_index(geometry: SliceGeometry, canonical: int) -> tuple[str, int]:
    """The input image's index axis ('i', 'j' or 'k') and index of a canonical (axial) slice."""
    axis = geometry.orientation.axes[0]  # numpy axis of the [k, j, i] array
    count = geometry.canonical_shape[0]
    return "ijk"[2 - axis], count - 1 - canonical if geometry.orientation.flips[0] else canonical


def segment_anomalies(model: str | os.PathLike[str] | ModelBundle | None, inputs: Any,
                      settings: AnomalySettings | None = None, *, reference: sitk.Image | None = None,
                      spacing: Sequence[float] | None = None) -> AnomalyResult:
    """Segment lesions in one case: label map and anomaly map on the input's exact voxel grid, plus a report.

    inputs: what volume.read_case takes (paths, SimpleITK images, a dict modality -> image, or one multi-component
    image), in the model's modality order; or numpy volumes [z, y, x] with ``reference`` (an image on the same
    grid) or ``spacing`` (x, y, z mm; identity direction).
    """
    started = time.perf_counter()
    settings = (settings or AnomalySettings()).validate()
    bundle = resolve_model(model, device=settings.device)
    spec = model_spec(bundle)
    resolve_values(bundle, settings, len(spec.scored), check_only=True)  # fail early on missing calibration
    case = read_case(_images_from_arrays(inputs, reference, spacing), spec.modalities)
    slices, geometry = to_model_slices(case, spec.image_size, normalisation=Normalisation.from_dict(spec.normalisation))
    prepared = time.perf_counter()
    results = segment_slices(bundle, slices, settings, pixel_area_mm2=model_pixel_area_mm2(geometry))
    computed = time.perf_counter()
    label = from_model_slices(results.mask, geometry, interpolation="nearest", dtype=np.uint8)
    score = from_model_slices(results.score, geometry, interpolation="linear", dtype=np.float32)
    per_slice_voxels = canonical_array(label)[0].reshape(geometry.canonical_shape[0], -1).sum(axis=1)
    voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
    lesion_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))
    report = _report(bundle, case, settings, results, geometry, per_slice_voxels)
    report.update(lesion_voxels=lesion_voxels, lesion_volume_ml=lesion_voxels * voxel_ml, voxel_volume_ml=voxel_ml,
                  timing={"preprocessing_s": prepared - started, "forward_and_segmentation_s": computed - prepared,
                          "total_s": time.perf_counter() - started})
    return AnomalyResult(label=label, score_map=score, report=report, slice_results=results, geometry=geometry)


def _report(bundle: ModelBundle, case: Any, settings: AnomalySettings, results: SliceResults,
            geometry: SliceGeometry, per_slice_voxels: np.ndarray) -> dict:
    rows = []
    for i, canonical in enumerate(geometry.slices):
        axis, index = _input_slice_index(geometry, canonical)
        rows.append({
            "canonical_slice": int(canonical), "input_axis": axis, "input_index": int(index),
            "t_e": [int(v) for v in results.t_e[i]], "m_te": [float(v) for v in results.m_te[i]],
            "aggregation_end": [int(v) for v in results.end_step[i]], "threshold": float(results.threshold[i]),
            "cosine": float(results.cosine[i]), "unhealthy": bool(results.unhealthy[i]),
            **({} if results.evidence is None else {"classifier_evidence": float(results.evidence[i])}),
            "lesion_pixels_model": int(results.mask[i].sum()), "lesion_voxels": int(per_slice_voxels[canonical]),
            "steps_run": int(results.steps_run[i]),
        })
    calibration = bundle.config["calibration"] or {}
    return {
        "method": "AnoFPDM (forward process of a class-conditional diffusion model)",
        "engine_version": __version__,
        "model": {"path": str(bundle.path), "kind": bundle.kind, "format_version": bundle.config["format_version"],
                  "created_by": bundle.config.get("created_by"), "modalities": list(case.modalities)},
        "inputs": dict(case.sources),
        "settings": {**{f.name: getattr(settings, f.name) for f in fields(settings)},
                     "t_max": settings.resolved_t_max(bundle.schedule().num_timesteps),
                     "w": results.values["w"]["value"]},
        "values": results.values,
        "calibration": {key: calibration[key] for key in ("settings", "decision_score", "w", "thr_01", "m_max",
                                                          "date") if key in calibration} or None,
        "geometry": {"size": list(geometry.size), "spacing": list(geometry.spacing), "origin": list(geometry.origin),
                     "direction": list(geometry.direction), "model_size": list(geometry.model_size),
                     "model_pixel_area_mm2": model_pixel_area_mm2(geometry)},
        "network_evaluations": results.network_evaluations,
        "unhealthy_slices": int(results.unhealthy.sum()),
        "slices": rows,
        "curves": {"timesteps": list(results.timesteps), "m_t": results.curves.tolist()},
    }


__all__ = ["AnomalyResult", "AnomalySettings", "SliceResults", "model_spec", "resolve_model", "segment_anomalies",
           "segment_slices"]


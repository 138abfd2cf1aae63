"""ONLS end to end: an aging model bundle, a brain volume, its age and target age(s) in; the counterfactual
volume(s), the difference image(s) and a report out, on the input's exact voxel grid.

    result = age_counterfactual(None, "t1.nii.gz", age=63, target_age=75)     # None: the bundled demo model
    write_image(result.image, "t1_at_75.nii.gz")

The counterfactual is composed as input + difference, where the difference is (counterfactual - model input)
restored to the input's intensity units and mapped back to its grid. So voxels the method does not change keep
the input's values exactly (no resampling blur, no clipping at V99.5), and slices outside the processed central
slab are the input's own.

Defaults and why:
- steps = 100: a 100-step DDIM grid (stride 10 of T = 1000) holds every L = 0.1, ..., 1.0 of the paper's Table 2,
  and its small first inversion step (clean image to t = 9, with eps evaluated at t = 0) keeps the round trip
  exact enough to matter: plain DDIM reconstruction (c = 0) of held-out slices with the demo model is 20.9 dB at
  10 steps, 35.1 dB at 50 and 41.6 dB at 100 (L = 0.1), when a real follow-up differs from its baseline by about
  35 dB. Inversion and guided decoding cost 2 x (t0 / 10) network evaluations per slice.
- zeta, c and the fallback L come from the model's calibration when it has one, else zeta = 1e-4 (paper E.4).
- the central slab (the model's ``central_slices``, 16 for the demo): the paper processes the central slices
  of a subject as one batch; the variance rule needs a batch of slices that carry age information.
- the variance rule reads the model's slab even when more slices are processed (``central_slices`` = 0: all brain
  slices): the regressor learned age on those slices only, and on the others its spread across slices measures
  how unfamiliar they are, not the subject's age. (Over all 72 brain slices of the demo case the variance never
  fell below the calibrated zeta, so every all-slice run fell back to a fixed L after encoding to pure noise.) The
  regressor's age before and after is read on the same slab; every processed slice is encoded, guided and decoded.
- composition = "age-change": the counterfactual is input + (guided decoding - unguided decoding), both decoded
  from the same ONLS latent. The DDIM round trip alone blurs fine detail and shifts tissue borders (it is not
  exact); subtracting it leaves only what the age guidance changed, so the difference image shows aging and not
  reconstruction error, and with c = 0 the output is the input itself. "decoded" returns the guided decoding
  itself, as the paper does. One unguided decoding costs t0 / 10 more UNet evaluations per slice, no regressor.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..devices import resolve_device
from ..errors import InputError, ModelError
from ..nets.bundle import ModelBundle, resolve_bundle
from ..nets.precision import PRECISIONS, with_precision
from ..progress import Progress, warn
from ..volume import Normalisation, SliceGeometry, from_model_slices, read_case, restore_intensity, to_model_slices
from .onls import (
    GUIDANCE_VARIANTS,
    PAPER_ZETA,
    decode,
    encode,
    encoding_grid,
    noise_level,
    predict,
    timestep_for_level,
)
from .training import AgeScale, central_rows

DEMO_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "aging-demo"
DEFAULT_STEPS = 100
DEFAULT_GUIDANCE_SCALE = 20.0  # used only when the model records no calibrated c
DEFAULT_FALLBACK_LEVEL = 0.6
DEFAULT_COMPOSITION = "age-change"  # used only when the model records none
COMPOSITIONS = ("age-change", "decoded")
MIN_VARIANCE_SLICES = 4  # fewer slices give no usable batch variance: fixed L instead, with a warning
AGE_LIMITS = (0.0, 120.0)
OUT_OF_RANGE_SIGMAS = 5.0  # intensity warning: case mean this many training SDs away
AGE_DISAGREEMENT_YEARS = 15.0  # warning: the regressor's estimate of the input is this far from the given age


@dataclass
class AgingSettings:
    """How to run ONLS; None means "the model's calibrated value" (or the paper's default where noted)."""

    noise_level: float | None = None  # fixed L in (0, 1] (the paper's baseline); None -> ONLS
    zeta: float | None = None  # ONLS variance threshold (normalised age^2); None -> calibration, else 1e-4
    guidance_scale: float | None = None  # c; None -> calibration, else DEFAULT_GUIDANCE_SCALE
    guidance: str = "linear"  # s_r = y - R ("linear") or (y - R) sqrt(R) ("sqrt", the paper's box)
    steps: int = DEFAULT_STEPS  # DDIM grid steps over the whole chain
    central_slices: int | None = None  # slices processed per subject; None -> the model's; 0 -> all brain slices
    variance_slices: int | None = None  # central slices of those that the variance rule reads; None -> the model's
    fallback_noise_level: float | None = None  # L when the variance rule cannot run or never fires
    composition: str | None = None  # "age-change" or "decoded" (module docstring); None -> calibration's
    chunk_size: int = 64  # slices per network call
    device: str = "auto"
    precision: str = "float32"  # the UNet's compute precision; "bfloat16" is faster where the hardware has it

    def validate(self) -> AgingSettings:
        if self.noise_level is not None:
            _check_level("noise level L", self.noise_level)
        if self.fallback_noise_level is not None:
            _check_level("fallback noise level", self.fallback_noise_level)
        for name in ("zeta", "guidance_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0 or (name == "zeta" and value == 0)):
                raise InputError(f"{name} must be a finite number {'> 0' if name == 'zeta' else '>= 0'}, got {value!r}",
                                 fix=f"pass a valid {name}")
        if self.guidance not in GUIDANCE_VARIANTS:
            raise InputError(f"guidance must be one of {list(GUIDANCE_VARIANTS)}, got {self.guidance!r}",
                             fix="use 'linear'")
        if self.composition is not None and self.composition not in COMPOSITIONS:
            raise InputError(f"composition must be one of {list(COMPOSITIONS)}, got {self.composition!r}",
                             fix="use 'age-change' (input + what the age guidance changed) or 'decoded'")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}",
                             fix="use 'float32' (exact) or 'bfloat16' (faster on CPUs with AVX-512 BF16 and GPUs)")
        for name, low in (("steps", 1), ("chunk_size", 1), ("central_slices", 0), ("variance_slices", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}", fix=f"pass a valid {name}")
        return self


def _check_level(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise InputError(f"{name} must be in (0, 1], got {value!r}", fix="use e.g. 0.6")


def check_age(name: str, value: object) -> float:
    """A plausible age in years: a finite number in (0, 120]."""
    low, high = AGE_LIMITS
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"the {name} is missing or not a number ({value!r})", fix=f"give the {name} in years")
    value = float(value)
    if not math.isfinite(value) or not low < value <= high:
        raise InputError(f"the {name} {value:g} is implausible", fix=f"give the {name} in years, between {low:g} and "
                                                                    f"{high:g}")
    return value


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class AgingSpec:
    """What inference needs from an aging bundle's model.json, checked."""

    modalities: tuple[str, ...]
    image_size: tuple[int, int]
    normalisation: dict
    central_slices: int
    ages: AgeScale
    intensity_reference: dict | None
    calibration: dict


def resolve_model(model: str | os.PathLike[str] | ModelBundle | None, *, device: str = "cpu") -> ModelBundle:
    """A loaded aging model: None or "demo" is the bundled demo model; a folder is loaded; a bundle is checked."""
    bundle = resolve_bundle(model, "aging", demo=DEMO_MODEL, device=device,
                            fix="pass --model MODEL_FOLDER with a model trained by `diffusion-engine train aging`")
    model_spec(bundle)
    return bundle


def inference_networks(bundle: ModelBundle, settings: AgingSettings,
                       device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eps UNet at the settings' precision, regressor in float32) on ``device``. The regressor stays in float32:
    its gradient steers the decoding, and it costs far less than the UNet."""
    eps_model, regressor = (bundle.networks[name].to(device) for name in ("eps", "regressor"))
    return with_precision(eps_model, settings.precision), regressor


def model_spec(bundle: ModelBundle) -> AgingSpec:
    """Check that the bundle can run ONLS and return what inference needs (ModelError naming the fix)."""
    config, where = bundle.config, bundle.path / "model.json"
    retrain = "retrain with `diffusion-engine train aging`"
    for name, cls in (("eps", "UNetModel"), ("regressor", "EncoderUNetModel")):
        if name not in bundle.networks or config["networks"][name]["class"] != cls:
            raise ModelError(f"an aging model needs a {cls} named {name!r}, found {', '.join(bundle.networks)}",
                             path=where, fix=retrain)
    if config["networks"]["eps"]["config"].get("num_classes") is not None:
        raise ModelError("the epsilon network is class-conditional; ONLS needs an unconditional one", path=where,
                         fix=retrain)
    if config["networks"]["regressor"]["config"].get("out_channels") != 1:
        raise ModelError("the regressor must have one output (the normalised age)", path=where, fix=retrain)
    if config["schedule"] is None:
        raise ModelError("the model records no noise schedule", path=where, fix=retrain)
    prep, labels = config["preprocessing"], config["labels"]
    modalities, size = prep.get("modalities"), prep.get("image_size")
    if not modalities or not size or "age_low" not in labels or "age_high" not in labels:
        raise ModelError("model.json lacks preprocessing.modalities/image_size or labels.age_low/age_high",
                         path=where, fix=retrain)
    if config["networks"]["eps"]["config"]["in_channels"] != len(modalities):
        raise ModelError("the network's input channels do not match preprocessing.modalities", path=where, fix=retrain)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return AgingSpec(modalities=tuple(modalities), image_size=(int(size[0]), int(size[1])),
                     normalisation=dict(prep.get("normalisation") or {"method": "onls"}),
                     central_slices=int(prep.get("central_slices") or 0),
                     ages=AgeScale(float(labels["age_low"]), float(labels["age_high"])),
                     intensity_reference=prep.get("intensity_reference"), calibration=dict(config["calibration"]))


def resolved_values(spec: AgingSpec, settings: AgingSettings) -> dict[str, dict[str, Any]]:
    """zeta, c, the fallback L and the composition for this run, each with where it came from.

    A model calibrated before compositions existed recorded c for the guided decoding itself: "decoded".
    """
    defaults = {"zeta": PAPER_ZETA, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
                "fallback_noise_level": DEFAULT_FALLBACK_LEVEL,
                "composition": "decoded" if "guidance_scale" in spec.calibration else DEFAULT_COMPOSITION}
    values = {}
    for name, default in defaults.items():
        given = getattr(settings, name)
        kind = str if name == "composition" else float
        if given is not None:
            values[name] = {"value": kind(given), "source": "settings"}
        elif name in spec.calibration:
            values[name] = {"value": kind(spec.calibration[name]), "source": "calibration"}
        else:
            values[name] = {"value": default, "source": "default"}
    return values


def compose(x0: torch.Tensor, guided: torch.Tensor, reconstruction: torch.Tensor | None) -> torch.Tensor:
    """The counterfactual: the guided decoding, or with ``reconstruction`` (the unguided decoding of the same
    latent) the input plus what the guidance changed. ``guided`` may stack several targets: [K * S, ...]."""
    if reconstruction is None:
        return guided
    k = guided.shape[0] // x0.shape[0]
    return x0.repeat(k, 1, 1, 1) + (guided - reconstruction.repeat(k, 1, 1, 1))


# ------------------------------------------------------------------------------------------------ slices


@dataclass(eq=False)
class SliceCounterfactuals:
    """ONLS on one subject's slab of model slices, for one or more target ages."""

    images: torch.Tensor  # [K, S, C, H, W] counterfactuals, one per target age
    target_ages: list[float]
    mode: str  # "onls", "fixed" or "fallback" (fixed L because the variance rule could not decide)
    t0: int
    level: float  # L = (t0 + 1) / T
    variance_slices: int  # how many (central) slices the variance rule and the regressor's ages read
    encoding_timesteps: list[int]
    variance: list[float]
    age_before: float  # mean regressor estimate on the input slices (years)
    age_after: list[float]  # mean regressor estimate on each counterfactual (years)
    values: dict
    warnings: list[str] = field(default_factory=list)
    network_evaluations: dict = field(default_factory=dict)


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    warn(message)


def counterfactual_slices(bundle: ModelBundle, slices: torch.Tensor | np.ndarray, age: float,
                          target_ages: Sequence[float], settings: AgingSettings | None = None,
                          *, task: str = "aging") -> SliceCounterfactuals:
    """ONLS on a subject's model slices [S, C, H, W] in [-1, 1]: one encoding, one guided decoding per target."""
    settings = (settings or AgingSettings()).validate()
    spec = model_spec(bundle)
    age = check_age("current age", age)
    targets = [check_age("target age", value) for value in target_ages]
    if not targets:
        raise InputError("no target age given", fix="give at least one target age")
    for target in targets:
        if math.isclose(target, age, abs_tol=1e-6):
            raise InputError(f"the target age {target:g} equals the current age: there is nothing to change",
                             fix="give a target age different from the current age")
    warnings: list[str] = []
    for value, name in ((age, "current age"), *((t, "target age") for t in targets)):
        low, high = spec.ages.low, spec.ages.high
        if not low <= value <= high:
            _warn(warnings, f"the {name} {value:g} lies outside the model's age range {low:g}-{high:g} years; "
                            "the result is an extrapolation")
    values = resolved_values(spec, settings)
    device = resolve_device(settings.device)
    eps_model, regressor = inference_networks(bundle, settings, device)
    x0 = torch.as_tensor(np.asarray(slices) if not isinstance(slices, torch.Tensor) else slices).float().to(device)
    expected = (len(spec.modalities), *spec.image_size)
    if x0.ndim != 4 or tuple(x0.shape[1:]) != expected or x0.shape[0] == 0:
        raise InputError(f"model slices must be [S, {', '.join(map(str, expected))}], got {list(x0.shape)}",
                         fix="prepare them with volume.to_model_slices for this model")
    _check_intensity(spec, x0, warnings)
    schedule = bundle.schedule()
    T = schedule.num_timesteps
    grid = encoding_grid(T, settings.steps)
    mode, zeta, keep = "onls", values["zeta"]["value"], []
    fallback = timestep_for_level(values["fallback_noise_level"]["value"], grid, T)
    slab = variance_rows(spec, settings, x0.shape[0])
    slab_count = len(range(x0.shape[0])[slab])
    if settings.noise_level is not None:
        mode, zeta, keep = "fixed", None, [timestep_for_level(settings.noise_level, grid, T)]
    elif slab_count < MIN_VARIANCE_SLICES:
        _warn(warnings, f"only {slab_count} slice(s): the variance stopping rule needs at least "
                        f"{MIN_VARIANCE_SLICES} slices of the subject, so the fixed noise level L = "
                        f"{noise_level(fallback, T):g} is used instead")
        mode, zeta, keep = "fallback", None, [fallback]
    composition = values["composition"]["value"]
    with Progress((3 if composition == "age-change" else 2) * len(grid), task, unit="step") as bar:
        encoding = encode(eps_model, regressor, schedule, x0, grid, zeta=zeta, keep=keep, keep_if_passed=[fallback],
                          variance_rows=slab, chunk_size=settings.chunk_size, on_step=lambda: bar.update())
        if mode == "onls" and encoding.t0 is None:
            _warn(warnings, f"the regressor's variance never fell below zeta = {zeta:g} (lowest "
                            f"{min(encoding.variance):.3g}); decoding from pure noise (L = 1) would lose the "
                            f"subject's identity, so the fallback L = {noise_level(fallback, T):g} is used")
            mode = "fallback"
        t0 = encoding.t0 if mode == "onls" else keep[0] if keep else fallback
        start = encoding.latents[t0]
        k, s = len(targets), x0.shape[0]
        target_n = torch.tensor([spec.ages.normalise(t) for t in targets], dtype=torch.float32, device=device)
        decoded = decode(eps_model, regressor, schedule, start.repeat(k, 1, 1, 1), t0, grid,
                         target_n.repeat_interleave(s), scale=values["guidance_scale"]["value"],
                         variant=settings.guidance, chunk_size=settings.chunk_size, on_step=lambda: bar.update())
        reconstruction = None
        if composition == "age-change":
            reconstruction = decode(eps_model, regressor, schedule, start, t0, grid, 0.0, scale=0.0,
                                    chunk_size=settings.chunk_size, on_step=lambda: bar.update())
        bar.update(max(0, bar.total - bar.done))  # the steps ONLS did not need
    composed = compose(x0, decoded.images, None if reconstruction is None else reconstruction.images)
    images = composed.reshape(k, s, *x0.shape[1:])
    after = predict(regressor, images[:, slab].flatten(0, 1), 0, settings.chunk_size)[:, 0].reshape(k, -1).mean(1)
    before = float(spec.ages.years(float(encoding.clean_prediction.mean())))
    if abs(before - age) > AGE_DISAGREEMENT_YEARS:
        _warn(warnings, f"the model's regressor estimates {before:.0f} years for an input given as {age:g}: the "
                        "image may be unlike the training data (modality, preprocessing) or the age may be wrong")
    return SliceCounterfactuals(
        images=images.cpu(), target_ages=targets, mode=mode, t0=t0, level=noise_level(t0, T),
        variance_slices=slab_count, encoding_timesteps=encoding.timesteps, variance=encoding.variance,
        age_before=before, age_after=[float(spec.ages.years(float(v))) for v in after], values=values,
        warnings=warnings,
        network_evaluations={"eps": encoding.eps_rows + decoded.eps_rows
                                    + (reconstruction.eps_rows if reconstruction is not None else 0),
                             "regressor": encoding.regressor_rows + decoded.regressor_rows + k * slab_count})


def variance_rows(spec: AgingSpec, settings: AgingSettings, count: int) -> slice:
    """The central rows of ``count`` processed slices that the variance rule reads: the model's slab unless
    ``settings.variance_slices`` says otherwise (0: all of them). See the module docstring."""
    return central_rows(count, spec.central_slices if settings.variance_slices is None else settings.variance_slices)


def _check_intensity(spec: AgingSpec, x0: torch.Tensor, warnings: list[str]) -> None:
    reference = spec.intensity_reference
    if not reference:
        return
    mean = float(x0.mean())
    distance = abs(mean - reference["case_mean"]) / reference["case_mean_std"]
    if distance > OUT_OF_RANGE_SIGMAS:
        _warn(warnings, f"the input's intensities are far outside the training data (mean {mean:.2f} in model units, "
                        f"training {reference['case_mean']:.2f} +- {reference['case_mean_std']:.2f}); check the "
                        f"modality ({', '.join(spec.modalities)}) and the preprocessing")


# ------------------------------------------------------------------------------------------------ volumes


@dataclass(eq=False)
class AgingResult:
    target_ages: list[float]
    images: list[sitk.Image]  # counterfactual volume per target age, on the input's grid, in its units
    differences: list[sitk.Image]  # counterfactual - input, per target age
    report: dict
    slices: SliceCounterfactuals | None = None
    geometry: SliceGeometry | None = None

    @property
    def image(self) -> sitk.Image:
        return self.images[0]

    @property
    def difference(self) -> sitk.Image:
        return self.differences[0]


def age_counterfactual(model: str | os.PathLike[str] | ModelBundle | None, inputs: Any, age: float,
                       target_age: float | Sequence[float], settings: AgingSettings | None = None) -> AgingResult:
    """The subject in ``inputs`` (paths or SimpleITK images, in the model's modality order) at ``target_age``.

    ``target_age`` may be a list (an age sweep): one encoding is shared and one volume per age is returned.
    Outputs are the first modality's; the report holds t0/L, the variance curve and the regressor's ages.
    """
    started = time.perf_counter()
    settings = (settings or AgingSettings()).validate()
    targets = [target_age] if isinstance(target_age, (int, float)) and not isinstance(target_age, bool) \
        else list(target_age)
    check_age("current age", age)
    for value in targets:
        check_age("target age", value)
    bundle = resolve_model(model, device=settings.device)
    spec = model_spec(bundle)
    case = read_case(inputs, spec.modalities)
    slices, geometry = to_model_slices(case, spec.image_size, normalisation=Normalisation.from_dict(spec.normalisation))
    central = spec.central_slices if settings.central_slices is None else settings.central_slices
    rows = central_rows(len(slices), central)
    result = counterfactual_slices(bundle, slices[rows], age, targets, settings)
    before = restore_intensity(slices[rows, 0], geometry.intensity)
    reference = sitk.Cast(case.reference, sitk.sitkFloat32)
    images, differences = [], []
    for counterfactual in result.images:
        delta = np.zeros((len(slices), *spec.image_size), np.float32)
        delta[rows] = restore_intensity(counterfactual[:, 0].numpy(), geometry.intensity) - before
        difference = from_model_slices(delta, geometry, interpolation="linear", fill=0.0)
        images.append(sitk.Add(reference, difference))
        differences.append(difference)
    report = _report(bundle, case, settings, result, geometry, rows, age)
    report["timing"] = {"total_s": time.perf_counter() - started}
    return AgingResult(target_ages=result.target_ages, images=images, differences=differences, report=report,
                       slices=result, geometry=geometry)


def _report(bundle: ModelBundle, case: Any, settings: AgingSettings, result: SliceCounterfactuals,
            geometry: SliceGeometry, rows: slice, age: float) -> dict:
    return {
        "method": "ONLS counterfactual aging (regressor-guided generative diffusion model)",
        "engine_version": __version__,
        "model": {"path": str(bundle.path), "kind": bundle.kind, "created_by": bundle.config.get("created_by")},
        "inputs": dict(case.sources),
        "age": age, "target_ages": result.target_ages,
        "settings": {f.name: getattr(settings, f.name) for f in fields(settings)},
        "values": result.values,
        "noise_level": {"mode": result.mode, "t0": result.t0, "L": result.level,
                        "zeta": result.values["zeta"]["value"] if result.mode == "onls" else None},
        "variance_curve": {"timesteps": result.encoding_timesteps, "variance": result.variance},
        "regressor_age": {"before": result.age_before, "after": result.age_after},
        "slices": {"canonical": [int(geometry.slices[i]) for i in range(len(geometry.slices))[rows]],
                   "count": rows.stop - rows.start, "variance_rule": result.variance_slices},
        "warnings": result.warnings,
        "network_evaluations": result.network_evaluations,
        "composition": result.values["composition"]["value"],
        "output": "input + difference; the difference is zero outside the processed slices"
                  + ("; on them it is what the age guidance changed (guided - unguided decoding)"
                     if result.values["composition"]["value"] == "age-change" else
                     "; on them it is the guided decoding - the input"),
    }


__all__ = ["AgingResult", "AgingSettings", "AgingSpec", "SliceCounterfactuals", "age_counterfactual", "check_age",
           "counterfactual_slices", "model_spec", "resolve_model", "variance_rows"]

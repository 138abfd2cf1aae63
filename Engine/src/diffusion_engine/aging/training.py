"""Training ONLS's two networks on cross-sectional data (one visit per subject, as the paper requires).

- eps: an unconditional epsilon-prediction UNet (Ho et al. noise-prediction MSE);
- regressor: R(x_t, t), an encoder with a time embedding that predicts the normalised age of a slice from its
  noisy version x_t at a uniformly drawn t (the "anti-causal predictor" that guides decoding and whose batch
  variance is ONLS's stopping signal). By default it sees every slice under a random smooth intensity field
  (gain and bias field, ``random_intensity_field``): guidance follows R's gradient, and a regressor that can read
  age from brightness pulls the decoding towards brightness changes (a smooth field over the whole brain) instead
  of the anatomy that ages.

Both are trained with the shared loop (EMA, exact resume) and saved in one bundle of kind "aging", together
with the age normalisation, the preprocessing and the intensity statistics that inference checks inputs against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import SliceSet, load_slices
from ..errors import InputError
from ..manifest import ManifestRow, read_manifest
from ..nets.bundle import save_bundle
from ..nets.presets import build_preset
from ..schedule import Schedule, linear_schedule, q_sample
from ..train import TrainSettings, train
from ..volume import Normalisation

DEFAULT_MODALITIES = ("t1",)
DEFAULT_CENTRAL_SLICES = 16  # the paper feeds the central 30 of 60 slices; 16 at 2 mm cover the lateral ventricles
AGE_MARGIN_YEARS = 5.0  # the normalised range extends past the training ages so R can express them
MIN_INTENSITY_SPREAD = 0.05  # floor of the intensity reference's spread, in model units
# The regressor's first phase draws t below this fraction of T only: on nearly clean slices it leaves the
# "predict the mean age" plateau in ~1500 steps, where uniform t (mostly uninformative noise) did not in 6000.
LOW_NOISE_FRACTION = 0.1
# Regressor augmentation (module docstring): log-scale standard deviations of the global gain and of each term of
# the quadratic bias field (0.05: about 5% brightness per term; real bias fields span more, before correction).
INTENSITY_GAIN_STD, BIAS_FIELD_STD = 0.05, 0.05


@dataclass(frozen=True)
class AgeScale:
    """Normalised age a_n = (age - low) / (high - low): the regressor's output unit (ONLS's zeta is in it)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"age scale needs low < high, got {self.low}, {self.high}")

    def normalise(self, age: Any) -> Any:
        return (age - self.low) / (self.high - self.low)

    def years(self, normalised: Any) -> Any:
        return normalised * (self.high - self.low) + self.low

    def to_dict(self) -> dict[str, float]:
        return {"age_low": self.low, "age_high": self.high}

    @classmethod
    def from_ages(cls, ages: Sequence[float]) -> AgeScale:
        """Training ages widened by AGE_MARGIN_YEARS and rounded outwards to 5 years."""
        low = 5.0 * math.floor((min(ages) - AGE_MARGIN_YEARS) / 5.0)
        high = 5.0 * math.ceil((max(ages) + AGE_MARGIN_YEARS) / 5.0)
        return cls(max(low, 0.0), high)


def central_rows(count: int, central: int | None) -> slice:
    """The ``central`` middle slices of ``count`` (all when central is None/0 or count is smaller)."""
    if not central or central >= count:
        return slice(0, count)
    start = (count - central) // 2
    return slice(start, start + central)


def cross_sectional(rows: Sequence[ManifestRow], seed: int) -> list[ManifestRow]:
    """One visit per subject, drawn at random (seeded), so the models never see a subject's aging."""
    by_subject: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_subject.setdefault(row.subject, []).append(row)
    rng = np.random.default_rng(seed)
    return [visits[int(rng.integers(len(visits)))] for _, visits in sorted(by_subject.items())]


def central_slices(data: SliceSet, central: int | None) -> SliceSet:
    """Keep each case's central slices (the slab inference works on)."""
    keep = np.concatenate([data.of_case(case)[central_rows(len(data.of_case(case)), central)]
                           for case in dict.fromkeys(data.cases)])
    return SliceSet(images=data.images[keep], cases=[data.cases[i] for i in keep], slice_index=data.slice_index[keep],
                    ages=None if data.ages is None else data.ages[keep], geometries=data.geometries)


def eps_loss(schedule: Schedule) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    """Noise-prediction MSE (Ho et al.) of the unconditional UNet on a batch (x0, t, noise)."""

    def loss(network: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x0, t, noise = batch
        return torch.nn.functional.mse_loss(network(q_sample(schedule, x0, t, noise), t), noise)

    return loss


def regressor_loss(schedule: Schedule) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    """MSE of R(x_t, t) against the normalised age, on a batch (x0, t, noise, age)."""

    def loss(network: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x0, t, noise, age = batch
        return torch.nn.functional.mse_loss(network(q_sample(schedule, x0, t, noise), t)[:, 0], age)

    return loss


def random_intensity_field(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x0 in [-1, 1] (background -1) with its intensities above the background scaled by a random smooth field:
    exp(gain + a quadratic polynomial in the slice's coordinates), one field per slice."""
    b, _, h, w = x0.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    basis = torch.stack([yy, xx, yy * xx, yy**2 - 1 / 3, xx**2 - 1 / 3])  # [5, H, W], roughly zero-mean terms
    gain = INTENSITY_GAIN_STD * torch.randn(b, 1, 1, generator=generator)
    coefficients = BIAS_FIELD_STD * torch.randn(b, len(basis), generator=generator)
    field = torch.exp(gain + torch.einsum("bk,khw->bhw", coefficients, basis))[:, None]
    return ((x0 + 1.0) * field - 1.0).clamp(-1.0, 1.0)


def slice_batches(images: np.ndarray, ages: np.ndarray | None, batch_size: int, num_timesteps: int,
                  device: torch.device, *, augment_intensity: bool = False
                  ) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    """Uniform slices, uniform t in [0, num_timesteps), Gaussian noise (and the slices' ages when given), all from
    the loop's generator; ``augment_intensity`` passes the slices through ``random_intensity_field``."""
    data = torch.from_numpy(images)
    targets = None if ages is None else torch.from_numpy(ages.astype(np.float32))

    def next_batch(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        index = torch.randint(len(data), (batch_size,), generator=generator)
        t = torch.randint(num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(data[index].shape, generator=generator)
        x0 = random_intensity_field(data[index], generator) if augment_intensity else data[index]
        batch = (x0, t, noise) if targets is None else (x0, t, noise, targets[index])
        return tuple(v.to(device) for v in batch)

    return next_batch


def intensity_reference(data: SliceSet) -> dict[str, float]:
    """Mean and spread of the per-case mean slice intensity: inference warns about inputs far outside it."""
    means = np.array([data.images[data.of_case(case)].mean() for case in dict.fromkeys(data.cases)])
    # the floor keeps a small or uniform training set from flagging ordinary inputs
    return {"case_mean": float(means.mean()), "case_mean_std": float(max(means.std(), MIN_INTENSITY_SPREAD))}


def train_aging_model(manifest: str | Path, out: str | Path, *, modalities: Sequence[str] = DEFAULT_MODALITIES,
                      preset: str = "tiny", regressor_preset: str = "regressor", image_size: int = 64,
                      central: int | None = DEFAULT_CENTRAL_SLICES, settings: TrainSettings | None = None,
                      regressor_settings: TrainSettings | None = None, work_dir: str | Path | None = None,
                      regressor_low_noise_steps: int = 0, regressor_augmentation: bool = True,
                      num_timesteps: int = 1000, half_precision: bool = False, command: str | None = None) -> Path:
    """Train eps and R on the manifest's ``train`` split (one visit per subject) and write an aging bundle.

    ``regressor_low_noise_steps`` > 0 first trains R on t < LOW_NOISE_FRACTION * T only, then on uniform t.
    ``regressor_augmentation`` trains R on slices under random smooth intensity fields (``random_intensity_field``).
    ``half_precision`` stores the weights as float16 (half the size; the loader computes in float32).
    """
    settings = settings or TrainSettings()
    regressor_settings = regressor_settings or settings
    table = read_manifest(manifest, require=("age",), modalities=modalities)
    rows = table.split("train")
    if not rows:
        raise InputError("no rows with split 'train'", path=table.path, fix="mark the training cases with split=train")
    rows = cross_sectional(rows, settings.seed)
    normalisation = Normalisation("onls")
    data = central_slices(load_slices(rows, modalities, (image_size, image_size), normalisation), central)
    ages = AgeScale.from_ages([row.age for row in rows])
    schedule = linear_schedule(num_timesteps)
    shape = {"image_size": image_size, "in_channels": len(modalities)}
    work = Path(work_dir) if work_dir else Path(out).with_name(Path(out).name + ".training")
    device = torch.device(settings.device)
    torch.manual_seed(regressor_settings.seed)
    regressor = build_preset(regressor_preset, **shape, out_channels=1)
    history: dict[str, list] = {}
    targets, loss = ages.normalise(data.ages), regressor_loss(schedule)
    low_t = max(1, round(LOW_NOISE_FRACTION * num_timesteps))
    if regressor_low_noise_steps:
        low_noise = replace(regressor_settings, steps=regressor_low_noise_steps)
        regressor, history["regressor_low_noise"] = train(
            regressor, loss, slice_batches(data.images, targets, low_noise.batch_size, low_t, device,
                                           augment_intensity=regressor_augmentation), low_noise,
            work / "regressor-low-noise", task="training aging regressor (low noise)")
    regressor, history["regressor"] = train(
        regressor, loss, slice_batches(data.images, targets, regressor_settings.batch_size, num_timesteps, device,
                                       augment_intensity=regressor_augmentation),
        regressor_settings, work / "regressor", task="training aging regressor")
    torch.manual_seed(settings.seed)
    eps = build_preset(preset, **shape, out_channels=len(modalities), num_classes=None)
    eps, history["eps"] = train(eps, eps_loss(schedule), slice_batches(data.images, None, settings.batch_size,
                                                                       num_timesteps, device),
                                settings, work / "eps", task="training aging eps")
    networks = {name: net.cpu().half() if half_precision else net.cpu()
                for name, net in (("regressor", regressor), ("eps", eps))}
    train_ages = [float(row.age) for row in rows]
    summary = {"manifest": str(Path(manifest).resolve()), "subjects": len(rows), "slices": len(data),
               "cross_sectional": True, "train_ages": [min(train_ages), max(train_ages)],
               "presets": {"eps": preset, "regressor": regressor_preset},
               "settings": {"eps": asdict(settings), "regressor": asdict(regressor_settings)},
               "regressor_low_noise": {"steps": regressor_low_noise_steps, "t_below": low_t},
               "regressor_augmentation": {"intensity_field": regressor_augmentation,
                                          "gain_std": INTENSITY_GAIN_STD, "bias_field_std": BIAS_FIELD_STD},
               "final_loss": {name: h[-1]["loss"] if h else None for name, h in history.items()},
               "loss_history": history,
               "weights_dtype": "float16" if half_precision else "float32"}
    if command:
        summary["command"] = command
    preprocessing = {"modalities": list(modalities), "image_size": [image_size, image_size],
                     "normalisation": normalisation.to_dict(), "central_slices": central or 0,
                     "intensity_reference": intensity_reference(data)}
    labels = {**ages.to_dict(), "regressor_output": "normalised age (age - age_low) / (age_high - age_low)"}
    return save_bundle(out, networks, kind="aging", schedule=schedule,
                       preprocessing=preprocessing, labels=labels, training=summary)

"""Intensity normalisation of model slices, each with the statistics that undo it.

Pure numpy. Two recipes, named after the method whose preprocessing they reproduce:

- ``anofpdm`` (AnoFPDM code): per volume and modality divide by the 99th percentile of the non-zero voxels;
  then per slice and channel min-max to [0, 1] and on to [-1, 1]. A slice with constant content maps to -1.
  The per-slice minima/maxima are recorded, so the mapping is invertible slice by slice.
- ``onls`` (ONLS paper E.1): clip to [0, V99.5] (99.5th percentile of the non-zero voxels), rescale to
  [-1, 1]. The inverse returns values in [0, V99.5] (what was clipped away is lost).

``IntensityStats`` holds everything the inverse needs; it travels inside ``SliceGeometry``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

DEFAULT_PERCENTILE = {"anofpdm": 99.0, "onls": 99.5}
METHODS = tuple(DEFAULT_PERCENTILE)


@dataclass(frozen=True)
class Normalisation:
    """Which intensity recipe a model was trained with (stored in model bundles)."""

    method: str = "anofpdm"
    percentile: float | None = None  # None: the method's own (99 for anofpdm, 99.5 for onls)

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_PERCENTILE:
            raise InputError(f"unknown intensity normalisation {self.method!r}",
                             fix=f"use one of: {', '.join(METHODS)}")
        if self.percentile is not None and not 0.0 < float(self.percentile) <= 100.0:
            raise InputError(f"normalisation percentile {self.percentile} is outside (0, 100]",
                             fix="give a percentile such as 99 or 99.5")

    @property
    def effective_percentile(self) -> float:
        return DEFAULT_PERCENTILE[self.method] if self.percentile is None else float(self.percentile)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "percentile": self.percentile}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        unknown = set(data) - {"method", "percentile"}
        if unknown:
            raise InputError(f"normalisation record has unknown fields {sorted(unknown)}",
                             fix="use only 'method' and 'percentile'")
        return cls(method=data.get("method", "anofpdm"), percentile=data.get("percentile"))


@dataclass(frozen=True)
class IntensityStats:
    """What ``restore_intensity`` needs to map normalised slices back to the input's units.

    ``scales``: one per channel (the anofpdm divisor P99, or the onls clip level V99.5), in input units.
    ``slice_min``/``slice_max``: anofpdm only, [slice][channel], in units of the input divided by the scale.
    """

    method: str
    scales: tuple[float, ...]
    slice_min: tuple[tuple[float, ...], ...] | None = None
    slice_max: tuple[tuple[float, ...], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scales": list(self.scales),
                "slice_min": None if self.slice_min is None else [list(row) for row in self.slice_min],
                "slice_max": None if self.slice_max is None else [list(row) for row in self.slice_max]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityStats:
        def table(rows: Sequence[Sequence[float]] | None) -> tuple[tuple[float, ...], ...] | None:
            return None if rows is None else tuple(tuple(float(v) for v in row) for row in rows)

        return cls(method=str(data["method"]), scales=tuple(float(v) for v in data["scales"]),
                   slice_min=table(data.get("slice_min")), slice_max=table(data.get("slice_max")))


def volume_scale(volume: np.ndarray, percentile: float) -> float:
    """The given percentile of the non-zero voxels of one volume (linear interpolation, as numpy)."""
    nonzero = volume[volume != 0]
    if nonzero.size == 0:
        return 1.0  # an all-zero volume has no scale; read_image rejects such inputs before they get here
    scale = float(np.percentile(nonzero, percentile))
    return scale if scale > 0 else 1.0  # keeps the division finite for volumes without positive voxels


def normalise_slices(slices: np.ndarray, normalisation: Normalisation,
                     scales: Sequence[float]) -> tuple[np.ndarray, IntensityStats]:
    """Normalise model slices [S, C, H, W] with per-channel volume ``scales`` (see ``volume_scale``)."""
    if slices.ndim != 4 or slices.shape[1] != len(scales):
        raise ValueError(f"expected slices [S, {len(scales)}, H, W], got shape {slices.shape}")
    scale = np.asarray(scales, np.float64).reshape(1, -1, 1, 1)
    if normalisation.method == "onls":
        out = np.clip(slices, 0.0, scale) / scale * 2.0 - 1.0
        return out.astype(np.float32), IntensityStats("onls", tuple(float(s) for s in scales))
    scaled = slices / scale
    low = scaled.min(axis=(2, 3), keepdims=True)
    high = scaled.max(axis=(2, 3), keepdims=True)
    span = high - low
    # constant slices have span 0: they become 0 in [0, 1], i.e. -1, rather than NaN
    unit = np.divide(scaled - low, span, out=np.zeros_like(scaled), where=span > 0)
    stats = IntensityStats("anofpdm", tuple(float(s) for s in scales),
                           slice_min=tuple(tuple(float(v) for v in row) for row in low[:, :, 0, 0]),
                           slice_max=tuple(tuple(float(v) for v in row) for row in high[:, :, 0, 0]))
    return (unit * 2.0 - 1.0).astype(np.float32), stats


def restore_intensity(slices: np.ndarray, stats: IntensityStats, *, channel: int = 0) -> np.ndarray:
    """Map normalised slices back to the input's intensity units (float32).

    ``slices`` is [S, C, H, W] with every channel, or [S, H, W] holding channel ``channel`` only (e.g. one
    synthetic modality). Values outside [-1, 1] are mapped linearly too (not clipped).
    """
    data = np.asarray(slices, np.float64)
    single = data.ndim == 3
    if single:
        data = data[:, None]
        channels = [channel]
    else:
        channels = list(range(data.shape[1]))
    if data.ndim != 4 or data.shape[1] != len(channels) or max(channels) >= len(stats.scales):
        raise ValueError(f"slices of shape {np.shape(slices)} do not match {len(stats.scales)} channel statistics")
    scale = np.asarray([stats.scales[c] for c in channels]).reshape(1, -1, 1, 1)
    unit = (data + 1.0) / 2.0
    if stats.method == "onls":
        restored = unit * scale
    else:
        if stats.slice_min is None or stats.slice_max is None or len(stats.slice_min) != data.shape[0]:
            raise ValueError("anofpdm statistics need one min/max per slice; the slice count does not match")
        low = np.asarray(stats.slice_min)[:, channels][:, :, None, None]
        high = np.asarray(stats.slice_max)[:, channels][:, :, None, None]
        restored = (unit * (high - low) + low) * scale
    return (restored[:, 0] if single else restored).astype(np.float32)

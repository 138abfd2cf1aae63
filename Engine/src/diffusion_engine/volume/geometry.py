"""Canonical orientation, brain-slice selection, crop/pad/resize to the model grid, and the exact way back.

Canonical order is numpy [S, H, W]: axis 0 runs inferior -> superior, rows run anterior -> posterior (anterior
at the top) and columns run patient right -> left (patient's right on the image's left), i.e. radiological
display of axial slices. In ITK's LPS physical frame that is the array of an image whose direction is the
identity. Any voxel grid is brought there by transposes and flips only (no interpolation), choosing for each
patient axis the image axis closest to it, so the way back is exact.

The spatial steps are recorded in ``SliceGeometry``; ``from_model_slices`` undoes them and stamps the
reference image's size, spacing, origin and direction onto the result bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from .intensity import IntensityStats, Normalisation, normalise_slices, volume_scale

if TYPE_CHECKING:
    from .io import Case

# Foreground (head/brain) = voxels above this fraction of the robust intensity range [min, P99 above min],
# after an in-plane opening that removes isolated noise voxels.
FOREGROUND_LEVEL = 0.10
INTERPOLATIONS = ("linear", "nearest")
Grid = tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Orientation:
    """Canonical axis ``a`` is numpy axis ``axes[a]`` of the SimpleITK array ([k, j, i]), flipped if ``flips[a]``."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def from_direction(cls, direction: Sequence[float]) -> Orientation:
        """Pick the image axis closest to S-I first, then to A-P, then L-R (greedy; any direction matrix)."""
        matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # column c: physical direction of index c
        remaining = [0, 1, 2]
        axes, flips = [], []
        for physical in (2, 1, 0):  # LPS +z (superior), +y (posterior = down the rows), +x (left = along columns)
            index = max(remaining, key=lambda c: abs(matrix[physical, c]))  # first on ties: deterministic
            remaining.remove(index)
            axes.append(2 - index)  # ITK index axis i, j, k is numpy axis 2, 1, 0
            flips.append(bool(matrix[physical, index] < 0))
        return cls(tuple(axes), tuple(flips))  # type: ignore[arg-type]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """SimpleITK array [k, j, i, ...] -> canonical [S, H, W, ...] (trailing component axes kept)."""
        moved = np.transpose(array, (*self.axes, *range(3, array.ndim)))
        return np.flip(moved, axis=[a for a in range(3) if self.flips[a]])

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        unflipped = np.flip(array, axis=[a for a in range(3) if self.flips[a]])
        return np.transpose(unflipped, (*np.argsort(self.axes), *range(3, array.ndim)))

    def canonical_shape(self, size: Sequence[int]) -> tuple[int, int, int]:
        """ITK size (x, y, z) -> canonical shape (S, H, W)."""
        return tuple(int(size[2 - a]) for a in self.axes)  # type: ignore[return-value]

    def canonical_spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(spacing[2 - a]) for a in self.axes)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "flips": list(self.flips)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Orientation:
        axes, flips = tuple(int(a) for a in data["axes"]), tuple(bool(f) for f in data["flips"])
        if sorted(axes) != [0, 1, 2] or len(flips) != 3:
            raise ValueError(f"invalid orientation {data}")
        return cls(axes, flips)  # type: ignore[arg-type]


def canonical_array(image: sitk.Image) -> tuple[np.ndarray, Orientation]:
    """The image's voxels in canonical [S, H, W] order (a copy; components, if any, last) and how to undo it."""
    orientation = Orientation.from_direction(image.GetDirection())
    # always a copy: a view would alias (and outlive) the image's own buffer
    return np.array(orientation.to_canonical(sitk.GetArrayViewFromImage(image)), order="C"), orientation


def image_grid(image: sitk.Image) -> Grid:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@dataclass(frozen=True)
class SliceGeometry:
    """Everything needed to map model slices back onto the reference image, exactly. JSON via to_dict()."""

    size: tuple[int, int, int]  # reference image (ITK order x, y, z) ...
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # ... 9 values, row-major, as SimpleITK gives them
    orientation: Orientation  # voxel grid -> canonical [S, H, W]
    slices: tuple[int, ...]  # kept canonical slice indices, ascending
    crop: tuple[int, int, int, int]  # row start, row stop, column start, column stop (canonical in-plane)
    padding: tuple[int, int, int, int]  # rows added on top, bottom; columns added left, right
    model_size: tuple[int, int]  # (H, W) of the model slices
    channels: tuple[str, ...] = ()
    intensity: IntensityStats | None = None

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return self.orientation.canonical_shape(self.size)

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.crop[1] - self.crop[0], self.crop[3] - self.crop[2]

    @property
    def padded_size(self) -> tuple[int, int]:
        height, width = self.crop_size
        return height + self.padding[0] + self.padding[1], width + self.padding[2] + self.padding[3]

    @property
    def grid(self) -> Grid:
        return self.size, self.spacing, self.origin, self.direction

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "orientation": self.orientation.to_dict(),
                "slices": list(self.slices), "crop": list(self.crop), "padding": list(self.padding),
                "model_size": list(self.model_size), "channels": list(self.channels),
                "intensity": None if self.intensity is None else self.intensity.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SliceGeometry:
        try:
            return cls(size=_ints(data["size"], 3), spacing=_floats(data["spacing"], 3),
                       origin=_floats(data["origin"], 3), direction=_floats(data["direction"], 9),
                       orientation=Orientation.from_dict(data["orientation"]), slices=_ints(data["slices"]),
                       crop=_ints(data["crop"], 4), padding=_ints(data["padding"], 4),
                       model_size=_ints(data["model_size"], 2), channels=tuple(map(str, data.get("channels", ()))),
                       intensity=None if data.get("intensity") is None else IntensityStats.from_dict(data["intensity"]))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"the slice geometry record is malformed ({error!r})",
                             fix="run the preprocessing again instead of editing the record") from None


def _ints(values: Sequence[Any], length: int | None = None) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if length is not None and len(out) != length:
        raise ValueError(f"expected {length} values, got {len(out)}")
    return out


def _floats(values: Sequence[Any], length: int) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != length:
        raise ValueError(f"expected {length} values, got {len(out)}")
    return out


def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """Head/brain voxels: above FOREGROUND_LEVEL of [min, P99 of the voxels above min], opened in-plane.

    Relative to the minimum (not to 0) so shifted backgrounds work; P99 rather than the maximum so a few hot
    voxels do not raise the level; the opening drops background noise voxels that would inflate the crop.
    """
    low = float(volume.min())
    above = volume[volume > low]
    if above.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    level = low + FOREGROUND_LEVEL * (float(np.percentile(above, 99)) - low)
    cross = ndimage.generate_binary_structure(2, 1)[None]  # in-plane only: thick-slice volumes stay intact
    return ndimage.binary_opening(volume > level, structure=cross)


def select_brain_slices(foreground: np.ndarray, threshold: float) -> np.ndarray:
    """Canonical slice indices whose foreground covers more than ``threshold`` of the slice area."""
    return np.flatnonzero(foreground.mean(axis=(1, 2)) > threshold)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, height),
            max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, width))


def _aspect_padding(crop_size: tuple[int, int], spacing: tuple[float, float],
                    model_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding that gives the crop the model's physical aspect ratio, so resizing never distorts anatomy.

    With isotropic in-plane spacing and a square model this pads the crop to a square.
    """
    (height, width), (row_mm, col_mm), (model_h, model_w) = crop_size, spacing, model_size
    if height * row_mm * model_w < width * col_mm * model_h:
        new_height, new_width = math.ceil(width * col_mm * model_h / model_w / row_mm - 1e-6), width
    else:
        new_height, new_width = height, math.ceil(height * row_mm * model_w / model_h / col_mm - 1e-6)
    new_height, new_width = max(new_height, height), max(new_width, width)
    return ((new_height - height) // 2, new_height - height - (new_height - height) // 2,
            (new_width - width) // 2, new_width - width - (new_width - width) // 2)


def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of a triangle (linear) filter, widened when shrinking (antialiasing).

    Pixel centres are aligned (half-pixel convention, as align_corners=False); rows are renormalised at the
    edges, which for enlarging equals bilinear interpolation with edge clamping.
    """
    scale = size_in / size_out
    support = max(scale, 1.0)
    centres = (np.arange(size_out) + 0.5) * scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(size_in)[None, :] - centres[:, None]) / support)
    return weights / weights.sum(axis=1, keepdims=True)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    return np.minimum(((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)


def resize_slices(slices: np.ndarray, size: tuple[int, int], interpolation: str = "linear") -> np.ndarray:
    """Resize the last two axes to ``size`` ("linear": antialiased when shrinking, float; "nearest": any dtype)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    height, width = slices.shape[-2:]
    if (height, width) == tuple(size):
        return slices.copy()
    if interpolation == "nearest":
        return slices[..., _nearest_indices(height, size[0])[:, None], _nearest_indices(width, size[1])[None, :]]
    dtype = slices.dtype if slices.dtype == np.float64 else np.float32
    rows = _linear_weights(height, size[0]).astype(dtype)
    cols = _linear_weights(width, size[1]).astype(dtype)
    return np.matmul(np.matmul(rows, slices.astype(dtype, copy=False)), cols.T)


def _model_slices_from_canonical(volume: np.ndarray, geometry: SliceGeometry, interpolation: str,
                                 fill: float) -> np.ndarray:
    """Canonical volume [S, H0, W0] -> [S_kept, H, W]: keep slices, crop, pad with ``fill``, resize."""
    (r0, r1, c0, c1), (top, _, left, _) = geometry.crop, geometry.padding
    block = volume[list(geometry.slices), r0:r1, c0:c1]
    padded = np.full((block.shape[0], *geometry.padded_size), fill, dtype=block.dtype)
    padded[:, top:top + r1 - r0, left:left + c1 - c0] = block
    return resize_slices(padded, geometry.model_size, interpolation)


def to_model_grid(image: sitk.Image, geometry: SliceGeometry, *, interpolation: str = "linear",
                  fill: float = 0.0, source: str | None = None) -> np.ndarray:
    """Map another image on the reference grid (a lesion mask, a ventricle label) onto the model slices.

    Returns [S_kept, H, W]; use interpolation="nearest" for label maps (the dtype is kept then).
    """
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError("a 3D scalar image is needed here", path=source, fix="pass a single-component 3D image")
    difference = grid_difference(geometry.grid, image_grid(image))
    if difference:
        raise InputError(f"the image is not on the reference voxel grid: {difference}", path=source,
                         fix="resample it onto the reference volume first (3D Slicer: \"Resample Image (BRAINS)\")")
    volume, _ = canonical_array(image)
    if interpolation == "linear":
        volume = volume.astype(np.float32, copy=False)
    return _model_slices_from_canonical(volume, geometry, interpolation, fill)


def grid_difference(reference: Grid, other: Grid, *, spacing_rtol: float = 1e-4, origin_tol_voxels: float = 1e-3,
                    direction_tol: float = 1e-4) -> str:
    """How ``other`` (size, spacing, origin, direction) differs from ``reference``; "" if equal within tolerance.

    The tolerances absorb what file formats round away (NIfTI keeps float32 geometry, DICOM decimal strings).
    """
    def fmt(values: Sequence[float]) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    (size0, spacing0, origin0, direction0), (size1, spacing1, origin1, direction1) = reference, other
    if tuple(size0) != tuple(size1):
        return f"size {fmt(size1)} vs {fmt(size0)}"
    if not np.allclose(spacing1, spacing0, rtol=spacing_rtol, atol=0):
        return f"spacing {fmt(spacing1)} vs {fmt(spacing0)} mm"
    if not np.allclose(origin1, origin0, rtol=0, atol=origin_tol_voxels * max(spacing0)):
        return f"origin {fmt(origin1)} vs {fmt(origin0)} mm"
    if not np.allclose(direction1, direction0, rtol=0, atol=direction_tol):
        return f"direction {fmt(direction1)} vs {fmt(direction0)}"
    return ""


def to_model_slices(case: Case, size: tuple[int, int] | None, *, normalisation: Normalisation,
                    brain_threshold: float = 0.01, margin: int = 4) -> tuple[np.ndarray, SliceGeometry]:
    """A case -> normalised model slices float32 [S_kept, C, H, W] and the geometry that maps them back.

    Steps: canonical orientation; keep the slices where the first modality's foreground (``foreground_mask``)
    covers more than ``brain_threshold`` of the slice; crop in-plane to the foreground's bounding box over the
    kept slices plus ``margin`` voxels; pad (with each modality's minimum) to the model's physical aspect ratio;
    resize to ``size`` (linear, antialiased when shrinking); then ``normalisation`` per modality, with the volume
    statistics taken over the whole volume. ``geometry.intensity`` holds what ``restore_intensity`` needs.
    ``size`` None keeps the input's own pixels: the crop is padded to a square field of view and not resized.
    """
    model_size = None if size is None else _ints(size, 2)
    if model_size is not None and min(model_size) < 1:
        raise ValueError(f"model size must be positive, got {size}")
    reference, first = case.reference, case.modalities[0]
    volumes = [case.array(m) for m in case.modalities]
    foreground = foreground_mask(volumes[0])
    kept = select_brain_slices(foreground, brain_threshold)
    if kept.size == 0:
        raise InputError(f"no slice has more than {brain_threshold:.1%} of its area above the background",
                         path=case.sources.get(first, first),
                         fix="check that this is a brain MR volume, or lower the brain threshold")
    orientation = Orientation.from_direction(reference.GetDirection())
    crop = _bounding_box(foreground[kept].any(axis=0), max(int(margin), 0))
    in_plane_spacing = orientation.canonical_spacing(reference.GetSpacing())[1:]
    crop_size = (crop[1] - crop[0], crop[3] - crop[2])
    padding = _aspect_padding(crop_size, in_plane_spacing, model_size or (1, 1))
    if model_size is None:
        model_size = (crop_size[0] + padding[0] + padding[1], crop_size[1] + padding[2] + padding[3])
    geometry = SliceGeometry(size=reference.GetSize(), spacing=reference.GetSpacing(), origin=reference.GetOrigin(),
                             direction=reference.GetDirection(), orientation=orientation,
                             slices=tuple(int(k) for k in kept), crop=crop, padding=padding,
                             model_size=model_size, channels=case.modalities)
    raw = np.stack([_model_slices_from_canonical(v, geometry, "linear", float(v.min())) for v in volumes], axis=1)
    scales = [volume_scale(v, normalisation.effective_percentile) for v in volumes]
    slices, stats = normalise_slices(raw, normalisation, scales)
    return slices, replace(geometry, intensity=stats)


def from_model_slices(maps: np.ndarray, geometry: SliceGeometry, *, interpolation: str = "linear",
                      fill: float = 0.0, dtype: Any = np.float32) -> sitk.Image:
    """Model-grid maps [S_kept, H, W] (or [S_kept, C, H, W]) -> an image on the reference's exact voxel grid.

    Resize back to the padded crop, drop the padding, paste into a canonical volume filled with ``fill``
    (slices that were not kept stay ``fill``), undo the orientation and copy the reference geometry.
    "nearest" keeps label values (use dtype=np.uint8 for label maps); integer dtypes round linear results.
    """
    maps = np.asarray(maps)
    vector = maps.ndim == 4
    if maps.ndim not in (3, 4) or maps.shape[0] != len(geometry.slices) or maps.shape[-2:] != geometry.model_size:
        raise ValueError(f"maps of shape {maps.shape} do not fit the geometry: expected "
                         f"[{len(geometry.slices)}, (C,) {geometry.model_size[0]}, {geometry.model_size[1]}]")
    stack = maps if vector else maps[:, None]
    if interpolation == "linear" and stack.dtype != np.float64:
        stack = stack.astype(np.float32)
    (r0, r1, c0, c1), (top, _, left, _) = geometry.crop, geometry.padding
    block = resize_slices(stack, geometry.padded_size, interpolation)[..., top:top + r1 - r0, left:left + c1 - c0]
    block = _cast(block, np.dtype(dtype))
    canonical = np.full((stack.shape[1], *geometry.canonical_shape), fill, dtype=block.dtype)
    canonical[:, list(geometry.slices), r0:r1, c0:c1] = block.transpose(1, 0, 2, 3)
    if vector:
        array = np.stack([geometry.orientation.from_canonical(channel) for channel in canonical], axis=-1)
    else:
        array = geometry.orientation.from_canonical(canonical[0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer) and values.dtype.kind == "f":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)

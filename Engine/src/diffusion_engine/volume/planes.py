"""Slicing in another plane: a 2D model run on coronal or sagittal slices instead of axial ones.

The engine always cuts canonical axial slices. To cut another plane, the image gets a relabelled direction and
origin (a rigid turn of the patient frame that takes that plane's normal to superior-inferior, with superior at
the top of the rows); its voxels are untouched. A result computed on the turned grid therefore has the input's
voxel layout, and copying the input's geometry onto it puts it back exactly. Restoring missing axial slices
needs this: a missing axial slice is a missing row of every coronal slice, which a 2D model can fill.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import canonical_array
from .io import Case

PLANES = ("axial", "coronal", "sagittal")
# Rotations of the LPS frame (new = turn @ old): rows run superior -> inferior (new +y = old -z); coronal slices
# stack along A-P with columns R -> L as in axial slices, sagittal ones along R-L with columns A -> P.
_TURNS = {
    "axial": np.eye(3),
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),
    "sagittal": np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]),
}
WHOLE_SLICE = 0.95  # a slice counts as missing when this fraction of it is


def view_in_plane(image: sitk.Image, plane: str) -> sitk.Image:
    """The same voxels on a turned frame, so that ``plane``'s slices are the ones cut as axial."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if plane == "axial":
        return image
    turn = _TURNS[plane]
    turned = sitk.Image(image)  # copy-on-write: the caller's image is never relabelled
    turned.SetDirection(tuple((turn @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel()))
    turned.SetOrigin(tuple(turn @ np.asarray(image.GetOrigin())))
    return turned


def view_case_in_plane(case: Case, plane: str) -> Case:
    return Case(images={m: view_in_plane(i, plane) for m, i in case.images.items()}, sources=dict(case.sources))


def back_from_plane(result: sitk.Image, original: sitk.Image) -> sitk.Image:
    """A result computed on the turned grid, on the original grid (same voxels, the input's geometry)."""
    out = sitk.Image(result)
    out.CopyInformation(original)
    return out


def missing_axial_slices(missing: sitk.Image) -> int:
    """How many axial slices of a missing-voxel mask are (almost) wholly missing."""
    array, _ = canonical_array(missing)
    return int(((array > 0).mean(axis=(1, 2)) >= WHOLE_SLICE).sum())

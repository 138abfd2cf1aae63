"""Volumes in and out: read, check, reorient, slice, resize, normalise, and map results back exactly.

Knows nothing about generative models: it turns a case into model slices plus a ``SliceGeometry`` and turns
model-grid maps back into images on the input's exact voxel grid.

    case = read_case(["flair.nii.gz", "t2.nii.gz"], ["flair", "t2"])
    slices, geometry = to_model_slices(case, (128, 128), normalisation=Normalisation("anofpdm"))
    ...                                             # slices: float32 [S_kept, C, 128, 128] in [-1, 1]
    mask = from_model_slices(labels, geometry, interpolation="nearest", dtype=np.uint8)
    write_image(mask, "mask.nrrd")
"""

from .geometry import (
    Orientation,
    SliceGeometry,
    canonical_array,
    foreground_mask,
    from_model_slices,
    grid_difference,
    image_grid,
    resize_slices,
    select_brain_slices,
    to_model_grid,
    to_model_slices,
)
from .intensity import IntensityStats, Normalisation, normalise_slices, restore_intensity, volume_scale
from .io import Case, check_image, read_case, read_image, write_image
from .planes import PLANES, back_from_plane, missing_axial_slices, view_case_in_plane, view_in_plane

__all__ = [
    "PLANES",
    "Case",
    "IntensityStats",
    "Normalisation",
    "Orientation",
    "SliceGeometry",
    "back_from_plane",
    "canonical_array",
    "check_image",
    "foreground_mask",
    "from_model_slices",
    "grid_difference",
    "image_grid",
    "missing_axial_slices",
    "normalise_slices",
    "read_case",
    "read_image",
    "resize_slices",
    "restore_intensity",
    "select_brain_slices",
    "to_model_grid",
    "to_model_slices",
    "view_case_in_plane",
    "view_in_plane",
    "volume_scale",
    "write_image",
]

"""volume: reading/checking, canonical orientation, model slices and their exact inverse, intensities, writing.

The phantom is defined in physical LPS millimetres (ITK's frame): an ellipsoid "brain" plus a bright marker at
the patient's left, anterior, superior side. Every acquisition samples the same physical function through its
own voxel grid, so orientation errors move the marker and geometry errors change values.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffusion_engine.errors import InputError
from diffusion_engine.volume import (
    IntensityStats,
    Normalisation,
    Orientation,
    SliceGeometry,
    canonical_array,
    from_model_slices,
    normalise_slices,
    read_case,
    read_image,
    resize_slices,
    restore_intensity,
    to_model_grid,
    to_model_slices,
    volume_scale,
    write_image,
)

CENTRE = np.array([12.0, -18.0, 25.0])  # mm, LPS: the phantom is deliberately off the scanner origin
MARKER = np.array([18.0, -24.0, 12.0])  # from CENTRE: +x = patient left, -y = anterior, +z = superior
SEMI_AXES = np.array([35.0, 45.0, 30.0])


def brain(points: np.ndarray) -> np.ndarray:
    radius = np.sqrt((((points - CENTRE) / SEMI_AXES) ** 2).sum(-1))
    return 100.0 / (1.0 + np.exp((radius - 1.0) / 0.04))


def phantom(points: np.ndarray) -> np.ndarray:
    marker = points - CENTRE - MARKER
    return brain(points) + 150.0 * np.exp(-(marker**2).sum(-1) / (2 * 4.0**2))


def smooth_map(points: np.ndarray) -> np.ndarray:
    return 50.0 * np.exp(-(((points - CENTRE) / 25.0) ** 2).sum(-1))


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def voxel_points(direction, spacing, size, origin) -> np.ndarray:
    """Physical LPS position of every voxel, as a [k, j, i, 3] array (independent of the code under test)."""
    k, j, i = np.indices(tuple(size)[::-1], dtype=np.float64)
    index = np.stack([i, j, k], axis=-1)
    return np.asarray(origin) + (index * np.asarray(spacing)) @ np.asarray(direction).reshape(3, 3).T


def acquire(direction, spacing, size, function=phantom, origin=None, dtype=np.float32) -> sitk.Image:
    """Sample ``function`` on a voxel grid centred (near) the phantom; origin chosen unless given."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if origin is None:
        origin = CENTRE - matrix @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2) + [0.37, -0.61, 0.29]
    image = sitk.GetImageFromArray(function(voxel_points(matrix, spacing, size, origin)).astype(dtype))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in matrix.ravel()))
    return image


# columns = physical direction of index axes i, j, k
AXIAL_LPS = np.eye(3)
AXIAL_RAS = np.diag([-1.0, -1.0, 1.0])  # what NIfTI's RAS+ files become in ITK
SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)  # i: A->P, j: S->I, k: R->L
CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)  # i: R->L, j: S->I, k: A->P
OBLIQUE = rotation(0, 20) @ rotation(1, -25) @ AXIAL_RAS
OBLIQUE_SAGITTAL = rotation(2, 15) @ rotation(0, 30) @ SAGITTAL

ACQUISITIONS = {
    "axial-lps": (AXIAL_LPS, (2.5, 2.5, 2.5), (41, 47, 33)),
    "axial-ras-anisotropic": (AXIAL_RAS, (2.4, 2.1, 3.3), (37, 51, 23)),
    "sagittal": (SAGITTAL, (2.2, 2.6, 3.0), (45, 35, 31)),
    "coronal-flipped": (CORONAL @ np.diag([-1.0, 1.0, -1.0]), (2.5, 3.0, 2.7), (35, 27, 39)),
    "oblique": (OBLIQUE, (2.5, 2.5, 3.0), (47, 49, 35)),
    "oblique-sagittal": (OBLIQUE_SAGITTAL, (2.6, 2.4, 2.8), (45, 41, 43)),
}


def signed_permutations() -> list[np.ndarray]:
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[list(perm), range(3)] = signs
            out.append(matrix)
    return out


def regrid(base_direction, spacing, size, base_origin, matrix) -> tuple:
    """The same voxel centres as the base grid, with index axes permuted/flipped by the signed permutation."""
    base = np.asarray(base_direction)
    perm = [int(np.flatnonzero(matrix[:, c])[0]) for c in range(3)]  # new index axis c = old axis perm[c]
    signs = [matrix[perm[c], c] for c in range(3)]
    direction = np.column_stack([base[:, perm[c]] * signs[c] for c in range(3)])
    new_size = [size[p] for p in perm]
    new_spacing = [spacing[p] for p in perm]
    origin = np.asarray(base_origin, dtype=float).copy()
    for c in range(3):
        if signs[c] < 0:  # index 0 of a flipped axis is the old last voxel
            origin += base[:, perm[c]] * spacing[perm[c]] * (size[perm[c]] - 1)
    return direction, new_spacing, new_size, origin


def geometry_of(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("name", list(ACQUISITIONS))
def test_canonical_array_shows_marker_left_anterior_superior(name):
    image = acquire(*ACQUISITIONS[name])
    canonical, orientation = canonical_array(image)
    brain_centre, marker_centre = centroid(canonical > 50), centroid(canonical > 150)
    assert marker_centre[0] > brain_centre[0] + 2  # superior = higher slice index
    assert marker_centre[1] < brain_centre[1] - 2  # anterior at the top rows
    assert marker_centre[2] > brain_centre[2] + 2  # patient's left on the image's right
    # slice axis is the image axis closest to S-I: its spacing is that axis' spacing
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    si_axis = int(np.argmax(np.abs(direction[2])))
    assert canonical.shape[0] == image.GetSize()[si_axis]
    assert np.array_equal(orientation.from_canonical(canonical), sitk.GetArrayViewFromImage(image))


@pytest.mark.parametrize("base", [AXIAL_LPS, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_same_object_any_axis_order_gives_same_canonical_array(base):
    spacing, size = (2.5, 2.8, 3.1), (33, 41, 29)
    reference = acquire(base, spacing, size)
    expected, _ = canonical_array(reference)
    for matrix in signed_permutations():
        direction, new_spacing, new_size, origin = regrid(base, spacing, size, reference.GetOrigin(), matrix)
        image = acquire(direction, new_spacing, new_size, origin=origin)
        canonical, orientation = canonical_array(image)
        assert canonical.shape == expected.shape, matrix
        np.testing.assert_allclose(canonical, expected, atol=1e-3, err_msg=str(matrix))
        assert orientation == Orientation.from_dict(json.loads(json.dumps(orientation.to_dict())))


def test_identity_direction_is_already_canonical():
    # LPS identity: array[k, j, i] with +k superior, +j posterior (down the rows), +i patient left (rightwards)
    orientation = Orientation.from_direction(np.eye(3).ravel())
    assert orientation == Orientation((0, 1, 2), (False, False, False))
    assert Orientation.from_direction(AXIAL_RAS.ravel()) == Orientation((0, 1, 2), (False, True, True))


def test_canonical_array_of_vector_image_keeps_components_last():
    image = sitk.Compose([acquire(SAGITTAL, (2.5, 2.5, 2.5), (9, 11, 13)) * float(c + 1) for c in range(3)])
    canonical, orientation = canonical_array(image)
    assert canonical.shape == (11, 9, 13, 3)  # S from j, rows (A-P) from i, columns (L-R) from k
    assert np.array_equal(orientation.from_canonical(canonical), sitk.GetArrayViewFromImage(image))


# ---------------------------------------------------------------- model slices and the way back


@pytest.mark.parametrize("name", list(ACQUISITIONS))
def test_round_trip_geometry_is_bit_identical(name):
    image = acquire(*ACQUISITIONS[name])
    slices, geometry = to_model_slices(read_case([image], ["t1"]), (32, 32), normalisation=Normalisation())
    assert slices.dtype == np.float32 and slices.shape == (len(geometry.slices), 1, 32, 32)
    for maps in (slices[:, 0], slices):
        back = from_model_slices(maps, geometry)
        assert geometry_of(back) == geometry_of(image)
    label = from_model_slices((slices[:, 0] > 0).astype(np.uint8), geometry, interpolation="nearest", dtype=np.uint8)
    assert label.GetPixelID() == sitk.sitkUInt8 and geometry_of(label) == geometry_of(image)
    assert SliceGeometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry


@pytest.mark.parametrize("name", list(ACQUISITIONS))
def test_spatial_round_trip_without_resizing_is_value_exact(name):
    image = acquire(*ACQUISITIONS[name])
    _, geometry = to_model_slices(read_case([image], ["t1"]), (32, 32), normalisation=Normalisation())
    identity = replace(geometry, model_size=geometry.padded_size)
    grid = to_model_grid(image, identity)
    back = sitk.GetArrayFromImage(from_model_slices(grid, identity, fill=np.nan))
    original = sitk.GetArrayFromImage(image)
    covered = ~np.isnan(back)
    assert np.array_equal(back[covered], original[covered])  # bit for bit
    # only voxels below the foreground level (10% of the robust range, about 11 here) are left out
    assert original[~covered].max() < 15.0
    assert covered[original > 50].all()


def test_model_slices_at_crop_size_restore_the_input_values():
    image = acquire(*ACQUISITIONS["oblique"])
    case = read_case([image], ["t1"])
    no_clip = Normalisation("onls", percentile=100.0)
    _, first = to_model_slices(case, (32, 32), normalisation=no_clip)
    slices, geometry = to_model_slices(case, first.padded_size, normalisation=no_clip)
    assert geometry.padding == first.padding and geometry.padded_size == geometry.model_size
    restored = restore_intensity(slices, geometry.intensity)
    back = sitk.GetArrayFromImage(from_model_slices(restored[:, 0], geometry, fill=np.nan))
    original = sitk.GetArrayFromImage(image)
    covered = ~np.isnan(back)
    np.testing.assert_allclose(back[covered], original[covered], rtol=1e-5, atol=1e-4)


def test_resized_round_trip_of_label_and_smooth_maps():
    direction, spacing, size = ACQUISITIONS["axial-ras-anisotropic"]
    image = acquire(direction, spacing, size)
    _, geometry = to_model_slices(read_case([image], ["t1"]), (40, 40), normalisation=Normalisation())
    assert geometry.padded_size != geometry.model_size  # really resizing
    label = acquire(direction, spacing, size, function=lambda p: brain(p) > 50, dtype=np.uint8)
    on_grid = to_model_grid(label, geometry, interpolation="nearest")
    assert on_grid.dtype == np.uint8
    back = from_model_slices(on_grid, geometry, interpolation="nearest", dtype=np.uint8)
    assert dice(sitk.GetArrayFromImage(back) > 0, sitk.GetArrayFromImage(label) > 0) > 0.95
    smooth = acquire(direction, spacing, size, function=smooth_map)
    back = from_model_slices(to_model_grid(smooth, geometry), geometry, fill=np.nan)
    values, truth = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(smooth)
    covered = ~np.isnan(values)
    error = np.abs(values[covered] - truth[covered])
    assert error.max() < 0.03 * truth.max() and error.mean() < 0.003 * truth.max()


def test_slices_outside_the_brain_are_dropped_and_filled_back():
    direction, spacing, size = AXIAL_LPS, (2.0, 2.0, 2.0), (61, 61, 71)  # 140 mm along S-I: empty slabs
    image = acquire(direction, spacing, size)
    slices, geometry = to_model_slices(read_case([image], ["t1"]), (32, 32), normalisation=Normalisation())
    points = voxel_points(direction, spacing, size, image.GetOrigin())
    # per axial slice (k), independent of the code: the foreground level (about 10) lies between 5 and 50
    surely_brain = set(np.flatnonzero((brain(points) > 50).mean(axis=(1, 2)) > 0.01))
    maybe_brain = set(np.flatnonzero((brain(points) > 5).mean(axis=(1, 2)) > 0.01))
    assert surely_brain <= set(geometry.slices) <= maybe_brain
    back = sitk.GetArrayFromImage(from_model_slices(slices[:, 0], geometry, fill=-7.0))
    dropped = [k for k in range(size[2]) if k not in geometry.slices]
    assert dropped and np.all(back[dropped] == -7.0)


def test_multichannel_case_and_multicomponent_maps():
    direction, spacing, size = ACQUISITIONS["sagittal"]
    flair = acquire(direction, spacing, size)
    t2 = acquire(direction, spacing, size, function=lambda p: 2.0 * phantom(p) + smooth_map(p))
    slices, geometry = to_model_slices(read_case({"t2": t2, "flair": flair}, ["flair", "t2"]), (24, 24),
                                       normalisation=Normalisation("onls"))
    assert slices.shape[1] == 2 and geometry.channels == ("flair", "t2")
    assert not np.array_equal(slices[:, 0], slices[:, 1])
    vector = from_model_slices(slices, geometry)
    assert vector.GetNumberOfComponentsPerPixel() == 2 and geometry_of(vector) == geometry_of(flair)


def test_non_square_model_size_keeps_physical_aspect():
    image = acquire(*ACQUISITIONS["axial-lps"])
    _, geometry = to_model_slices(read_case([image], ["t1"]), (52, 40), normalisation=Normalisation())
    height, width = geometry.padded_size
    assert abs(height / width - 52 / 40) < 0.05
    assert geometry_of(from_model_slices(np.zeros((len(geometry.slices), 52, 40)), geometry)) == geometry_of(image)


@pytest.mark.parametrize(("shape_in", "shape_out"), [((47, 44), (32, 32)), ((20, 13), (41, 29)), ((37, 51), (16, 50))])
def test_resize_matches_torch_antialiased_bilinear_and_nearest_exact(shape_in, shape_out):
    torch = pytest.importorskip("torch")
    slices = np.random.default_rng(2).random((2, 3, *shape_in)).astype(np.float32)
    for mode, ours in (("bilinear", "linear"), ("nearest-exact", "nearest")):
        options = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        expected = torch.nn.functional.interpolate(torch.from_numpy(slices), size=shape_out, mode=mode, **options)
        np.testing.assert_allclose(resize_slices(slices, shape_out, ours), expected.numpy(), atol=1e-5)


# ---------------------------------------------------------------- intensity


def test_anofpdm_normalisation_matches_the_recipe():
    rng = np.random.default_rng(0)
    slices = rng.uniform(0, 300, size=(3, 2, 6, 5))
    slices[1, 0] = 42.0  # a constant slice
    scales = (250.0, 80.0)
    out, stats = normalise_slices(slices, Normalisation("anofpdm"), scales)
    for s in range(3):
        for c in range(2):
            x = slices[s, c] / scales[c]
            expected = -np.ones_like(x) if np.ptp(x) == 0 else (x - x.min()) / (x.max() - x.min()) * 2 - 1
            np.testing.assert_allclose(out[s, c], expected, atol=1e-6)
    assert np.all(out[1, 0] == -1.0) and np.isfinite(out).all()
    assert out.min() == -1.0 and out.max() == 1.0
    np.testing.assert_allclose(restore_intensity(out, stats), slices, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(restore_intensity(out[:, 1], stats, channel=1), slices[:, 1], rtol=1e-5, atol=1e-4)


def test_onls_normalisation_clips_and_inverts():
    rng = np.random.default_rng(1)
    volume = np.zeros((10, 12, 12))
    volume[2:8, 3:9, 3:9] = rng.gamma(4.0, 30.0, size=(6, 6, 6))
    v995 = volume_scale(volume, 99.5)
    assert v995 == pytest.approx(np.percentile(volume[volume > 0], 99.5))
    out, stats = normalise_slices(volume[:, None], Normalisation("onls"), [v995])
    np.testing.assert_allclose(out[:, 0], np.clip(volume, 0, v995) / v995 * 2 - 1, atol=1e-6)
    assert out.min() == -1.0 and out.max() == 1.0
    restored = restore_intensity(out, stats)[:, 0]
    np.testing.assert_allclose(restored, np.minimum(volume, v995), rtol=1e-5, atol=1e-4)
    single = restore_intensity(out[:, 0], stats)  # one channel as [S, H, W] comes back as [S, H, W]
    assert single.shape == volume.shape
    np.testing.assert_allclose(single, restored, rtol=1e-6)
    assert IntensityStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_anofpdm_slices_from_a_case_span_minus_one_to_one():
    image = acquire(*ACQUISITIONS["oblique"])
    normalisation = Normalisation.from_dict(Normalisation("anofpdm").to_dict())
    slices, geometry = to_model_slices(read_case([image], ["flair"]), (32, 32), normalisation=normalisation)
    assert np.all(slices.min(axis=(2, 3)) == -1.0) and np.all(slices.max(axis=(2, 3)) == 1.0)
    assert geometry.intensity.scales[0] == pytest.approx(
        np.percentile(sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(image) != 0], 99), rel=1e-6)


def test_unknown_normalisation_is_an_input_error():
    with pytest.raises(InputError, match="anofpdm, onls"):
        Normalisation("zscore")


# ---------------------------------------------------------------- reading and writing


def test_nifti_nrrd_and_metaimage_round_trips(tmp_path):
    image = acquire(*ACQUISITIONS["oblique"])
    for name, tolerance in (("x.nii.gz", 1e-5), ("x.nrrd", 1e-12), ("x.mha", 0.0)):
        read = read_image(write_image(image, tmp_path / name))
        assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))
        assert read.GetSize() == image.GetSize()
        # NIfTI keeps geometry in float32 (~1e-7 relative); NRRD folds spacing into its direction vectors, so
        # spacing comes back as a vector norm (last-bit rounding); MetaImage keeps doubles exactly.
        for got, want in zip(geometry_of(read)[1:], geometry_of(image)[1:], strict=True):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * 100)


def write_dicom_series(image: sitk.Image, folder: Path, uid: str, description: str, prefix: str = "") -> None:
    """A minimal MR series: one file per slice with position, orientation and series tags."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[0::3], *direction[1::3]))

    def position(k: int) -> tuple[float, ...]:
        return image.TransformIndexToPhysicalPoint((0, 0, k))

    for k in range(image.GetSize()[2]):
        plane = image[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000e", uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0008|103e", description), ("0020|0037", orientation), ("0020|0013", str(k + 1)),
                           ("0008|0018", f"{uid}.{k + 1}"), ("0018|0050", str(image.GetSpacing()[2])),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position(k)))):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(plane)


def test_dicom_series_folder(tmp_path):
    image = sitk.Cast(acquire(OBLIQUE, (1.5, 1.5, 3.0), (24, 20, 7)), sitk.sitkInt16)
    write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7", "flair")
    read = read_image(tmp_path / "series")
    assert read.GetSize() == image.GetSize()
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=1e-6)
    write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.8", "t2 axial", prefix="b")
    with pytest.raises(InputError) as error:
        read_image(tmp_path / "series")
    message = str(error.value)
    assert "2 DICOM series" in message
    assert "1.2.826.0.1.3680043.2.1125.7" in message and "1.2.826.0.1.3680043.2.1125.8" in message
    assert "t2 axial" in message and "folder of their own" in message
    chosen = read_image(tmp_path / "series", series="1.2.826.0.1.3680043.2.1125.8")
    assert chosen.GetSize() == image.GetSize()


def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = acquire(AXIAL_LPS, (3.0, 3.0, 3.0), (9, 10, 11))
    files = {"missing": tmp_path / "missing.nii.gz", "garbage": tmp_path / "garbage.nii.gz",
             "no-dicom": tmp_path / "empty_folder"}
    files["garbage"].write_bytes(b"this is not an image")
    files["no-dicom"].mkdir()
    truncated = tmp_path / "truncated.nii.gz"
    sitk.WriteImage(acquire(AXIAL_LPS, (3.0, 3.0, 3.0), (30, 30, 30)), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    files["truncated"] = truncated
    nan = sitk.GetArrayFromImage(good)
    nan[3, 3, 3] = np.nan
    inf = sitk.GetArrayFromImage(good)
    inf[2, 2, 2] = np.inf
    for name, image in {
        "flat2d.nrrd": sitk.Image([9, 10], sitk.sitkFloat32) + 1.0,
        "single_slice.nrrd": sitk.GetImageFromArray(np.random.default_rng(0).random((1, 9, 10))),
        "series4d.nii.gz": sitk.JoinSeries([good, good]),
        "vector.nrrd": sitk.Compose([good, good, good]),
        "nan.nrrd": sitk.GetImageFromArray(nan),
        "inf.mha": sitk.GetImageFromArray(inf),
        "empty.nrrd": good * 0.0,
        "constant.nrrd": good * 0.0 + 5.0,
    }.items():
        sitk.WriteImage(image, str(tmp_path / name))
        files[name] = tmp_path / name
    return files


def test_every_bad_input_names_the_file_and_a_fix(tmp_path):
    expected_problem = {"missing": "not found", "garbage": "cannot read", "no-dicom": "no DICOM",
                        "truncated": "truncated", "flat2d.nrrd": "2D", "single_slice.nrrd": "2D",
                        "series4d.nii.gz": "4D", "vector.nrrd": "3 components", "nan.nrrd": "NaN",
                        "inf.mha": "infinite", "empty.nrrd": "empty", "constant.nrrd": "same value"}
    for key, path in bad_inputs(tmp_path).items():
        with pytest.raises(InputError) as error:
            read_image(path)
        assert path.name in str(error.value), key
        assert expected_problem[key] in str(error.value), (key, str(error.value))
        assert error.value.fix, key
    assert read_image(tmp_path / "vector.nrrd", allow_components=True).GetNumberOfComponentsPerPixel() == 3


def test_trailing_singleton_time_axis_is_accepted(tmp_path):
    good = acquire(AXIAL_LPS, (3.0, 3.0, 3.0), (9, 10, 11))
    sitk.WriteImage(sitk.JoinSeries([good]), str(tmp_path / "one_frame.nii.gz"))
    assert read_image(tmp_path / "one_frame.nii.gz").GetSize() == (9, 10, 11)


def test_read_case_forms_and_errors(tmp_path):
    direction, spacing, size = AXIAL_RAS, (2.0, 2.0, 3.0), (20, 24, 14)
    flair = write_image(acquire(direction, spacing, size), tmp_path / "flair.nrrd")
    t2 = write_image(acquire(direction, spacing, size, function=smooth_map), tmp_path / "t2.nrrd")
    as_list = read_case([flair, t2], ["flair", "t2"])
    as_dict = read_case({"t2": str(t2), "flair": str(flair)}, ["flair", "t2"])
    vector = write_image(sitk.Compose([read_image(flair), read_image(t2)]), tmp_path / "both.nrrd")
    as_vector = read_case(vector, ["flair", "t2"])
    for case in (as_list, as_dict, as_vector):
        assert case.modalities == ("flair", "t2")
        assert np.array_equal(case.array("t2"), as_list.array("t2")) and case.array("t2").dtype == np.float32
        assert geometry_of(case.reference) == geometry_of(as_list.images["flair"])
    assert as_dict.sources["t2"] == str(t2)

    with pytest.raises(InputError, match="flair, t1, t1ce, t2, pd"):
        read_case([flair], ["dwi"])
    with pytest.raises(InputError, match=r"expects 2 image.*flair, t2") as error:
        read_case([flair], ["flair", "t2"])
    assert "flair.nrrd" in str(error.value)
    with pytest.raises(InputError, match="missing \\['t2'\\]"):
        read_case({"flair": flair}, ["flair", "t2"])
    with pytest.raises(InputError, match="2 component"):
        read_case(vector, ["flair", "t1", "t2"])

    shifted = acquire(direction, spacing, size, origin=np.add(read_image(flair).GetOrigin(), (0, 0, 1.5)))
    other = write_image(shifted, tmp_path / "t2_shifted.nii.gz")
    with pytest.raises(InputError) as error:
        read_case([flair, other], ["flair", "t2"])
    message = str(error.value)
    assert "flair.nrrd" in message and "t2_shifted.nii.gz" in message and "origin" in message
    assert "Resample Image (BRAINS)" in message and "BRAINSResample" in message
    coarse = write_image(acquire(direction, (2.0, 2.0, 3.5), size), tmp_path / "coarse.mha")
    with pytest.raises(InputError, match="spacing"):
        read_case([flair, coarse], ["flair", "t1"])
    # float32 rounding of a NIfTI copy is within tolerance
    nifti = write_image(acquire(direction, spacing, size, origin=read_image(flair).GetOrigin()), tmp_path / "t1.nii.gz")
    assert read_case([flair, nifti], ["flair", "t1"]).modalities == ("flair", "t1")


def test_case_without_brain_is_rejected():
    image = sitk.GetImageFromArray(np.zeros((20, 20, 20), np.float32))
    image[3, 3, 3] = 1.0  # one bright voxel: not a brain
    with pytest.raises(InputError, match="brain"):
        to_model_slices(read_case([image], ["t1"]), (16, 16), normalisation=Normalisation())


def test_write_image_is_atomic(tmp_path, monkeypatch):
    image = acquire(AXIAL_LPS, (3.0, 3.0, 3.0), (9, 10, 11))
    existing = tmp_path / "result.nrrd"
    existing.write_bytes(b"previous result")

    def broken_writer(img, name, *args):
        Path(name).write_bytes(b"half a file")  # a writer that dies halfway
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_writer)
    for target in (existing, tmp_path / "new" / "fresh.nii.gz"):
        with pytest.raises(InputError, match="disk full") as error:
            write_image(image, target)
        assert target.name in str(error.value) and error.value.fix
    monkeypatch.undo()
    assert existing.read_bytes() == b"previous result"
    assert not (tmp_path / "new" / "fresh.nii.gz").exists()
    leftovers = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert leftovers == {"result.nrrd"}

    written = write_image(image, tmp_path / "deep" / "er" / "x.nii.gz")
    assert written.is_file() and read_image(written).GetSize() == (9, 10, 11)
    for name, problem in (("out_dicom", "DICOM"), ("slice.dcm", "DICOM"), ("x.mhd", "two files"),
                          ("x.unknownformat", "cannot write")):
        if name == "out_dicom":
            (tmp_path / name).mkdir()
        with pytest.raises(InputError, match=problem) as error:
            write_image(image, tmp_path / name)
        assert name in str(error.value) and error.value.fix
    assert sorted(os.listdir(tmp_path)) == ["deep", "new", "out_dicom", "result.nrrd"]


def test_label_maps_may_be_empty_but_not_negative(tmp_path: Path) -> None:
    empty = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    path = tmp_path / "empty_mask.nii.gz"
    sitk.WriteImage(empty, str(path))
    with pytest.raises(InputError, match="empty"):
        read_image(path)
    assert read_image(path, label_map=True).GetSize() == (8, 8, 8)
    negative = sitk.Image(8, 8, 8, sitk.sitkInt16) - 1
    sitk.WriteImage(negative, str(tmp_path / "negative.nrrd"))
    with pytest.raises(InputError, match="negative"):
        read_image(tmp_path / "negative.nrrd", label_map=True)

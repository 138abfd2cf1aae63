"""DiffusionAnomaly's Qt-free logic on a real MRML scene (the `slicer-core` wheel), running the real engine.

Run: python -m pytest -q DiffusionAnomaly/Testing/Python (in an environment with slicer-core and the engine).
The model is a freshly initialised tiny network (no training): these tests check plumbing, geometry and the
scene, not segmentation quality. They are skipped when the slicer-core wheel is not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # DiffusionAnomaly/, as Slicer puts it on sys.path

from DiffusionAnomalyLib import engine, nodes  # noqa: E402
from DiffusionAnomalyLib.anomaly import TERMINOLOGY, AnomalyLogic, curve_columns  # noqa: E402
from DiffusionAnomalyLib.engine import EngineCancelled, UserError  # noqa: E402

SHAPE_KJI = (14, 20, 18)
# every slice unhealthy (cos <= 1 always) and a per-slice quantile threshold: a non-empty mask from any network
# the untrained model's map is highest at the slice border, outside the brain, where masks are not kept: a low
# fixed quantile leaves some mask inside the brain to check the geometry with
RUN = {"guidance": 1.0, "thr_01": 1.0, "speed": "fast", "device": "cpu", "extra_args": ("--quantile", "0.5")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained single-modality (FLAIR) anomaly bundle at 32 px, written with the engine's own bundle writer."""
    import torch
    from diffusion_engine.anomaly.training import LABELS
    from diffusion_engine.nets.bundle import save_bundle
    from diffusion_engine.nets.presets import build_preset
    from diffusion_engine.schedule import linear_schedule
    from diffusion_engine.volume import Normalisation

    torch.manual_seed(0)
    network = build_preset("tiny", image_size=32, in_channels=1, out_channels=1, num_classes=2)
    folder = tmp_path_factory.mktemp("model") / "flair-model"
    return save_bundle(folder, {"eps": network}, kind="anomaly", schedule=linear_schedule(1000),
                       preprocessing={"modalities": ["flair"], "image_size": [32, 32],
                                      "normalisation": Normalisation("anofpdm").to_dict()},
                       labels={**LABELS, "healthy_label": 0})


def _matrix(direction: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c] * spacing[c])
        matrix.SetElement(r, 3, origin[r])
    return matrix


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.radians(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _head(seed: int = 0) -> np.ndarray:
    """A [k, j, i] ellipsoidal 'brain' with a bright asymmetric blob, so misplaced voxels would show."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE_KJI), indexing="ij")
    brain = (k / 0.9) ** 2 + (j / 0.8) ** 2 + (i / 0.75) ** 2 < 1
    image = np.where(brain, 100.0 + 10.0 * rng.standard_normal(SHAPE_KJI), 0.0)
    image[((k - 0.3) ** 2 + (j + 0.3) ** 2 + (i - 0.2) ** 2 < 0.06) & brain] = 260.0
    return image.astype(np.float32)


def _scene_with_volume(matrix: vtk.vtkMatrix4x4, name: str = "FLAIR") -> tuple[object, object]:
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, _head())
    volume.SetIJKToRASMatrix(matrix)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, volume)
    return scene, volume


def _state(volume: object) -> tuple:
    """Everything about the input a run must not change."""
    attributes = tuple((n, volume.GetAttribute(n)) for n in volume.GetAttributeNames())
    return (volume.GetName(), nodes.ijk_to_ras(volume).tobytes(), slicer.util.arrayFromVolume(volume).tobytes(),
            volume.GetStorageNodeID(), volume.GetTransformNodeID(), attributes)


def _segment_array(segmentation: object, reference: object) -> np.ndarray:
    """The segment as a [k, j, i] array on the reference grid, through Slicer's own export."""
    scene = reference.GetScene()
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue("anomaly")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, label, reference)
    array = slicer.util.arrayFromVolume(label).copy()
    matrix = nodes.ijk_to_ras(label)
    scene.RemoveNode(label)
    np.testing.assert_allclose(matrix, nodes.ijk_to_ras(reference), atol=1e-9)
    return array


# ------------------------------------------------------------------------------------------------ pure parts


def test_grid_mapping_recovers_a_reversed_permuted_grid() -> None:
    reference = np.eye(4)
    reference[:3, :3] = np.diag([2.0, 1.0, 3.0])
    shape_ijk = (4, 5, 6)
    # the same voxel centres, indexed k-reversed and with i/j swapped: (i, j, k) -> (j, i, 5 - k)
    other = np.zeros((4, 4))
    other[:3, 0], other[:3, 1], other[:3, 2] = reference[:3, 1], reference[:3, 0], -reference[:3, 2]
    other[:3, 3] = reference[:3, :3] @ [0, 0, 5]
    other[3, 3] = 1
    assert nodes.grid_mapping(reference, other, shape_ijk, (5, 4, 6)) == ([1, 0, 2], [False, False, True])
    data = np.arange(120).reshape(6, 5, 4)  # [k, j, i] on the reference
    moved = np.flip(data.transpose(2, 1, 0).transpose(1, 0, 2), axis=2).transpose(2, 1, 0)
    np.testing.assert_array_equal(nodes.array_on_reference_grid(moved, other, reference, data.shape), data)
    shifted = other.copy()
    shifted[:3, 3] += 0.5 * reference[:3, 0]
    with pytest.raises(nodes.GeometryMismatch):
        nodes.grid_mapping(reference, shifted, shape_ijk, (5, 4, 6))


def test_progress_events_give_fraction_and_time_left() -> None:
    now = [0.0]
    tracker = engine.ProgressTracker(clock=lambda: now[0])
    assert engine.parse_event("not json") is None
    assert engine.parse_event('{"no_event": 1}') is None
    tracker.update(engine.parse_event('{"event": "start", "task": "segmenting", "total": 10}'))
    now[0] = 20.0
    tracker.update({"event": "progress", "task": "segmenting", "done": 4, "total": 10, "message": "chunk 1"})
    assert tracker.fraction == pytest.approx(0.4)
    assert tracker.text == "segmenting: 4/10 (chunk 1), about 30 s left"  # 5 s per step, 6 steps left


def test_engine_command_is_an_argument_list_with_json_progress(tmp_path: Path) -> None:
    argv = engine.engine_command("anomaly", ["--input", "a b.nrrd"], tmp_path / "cancel", python="py")
    assert argv == ["py", "-m", "diffusion_engine", "--progress", "json", "--cancel-file", str(tmp_path / "cancel"),
                    "anomaly", "--input", "a b.nrrd"]


def test_curve_columns_average_by_decision() -> None:
    report = {"curves": {"timesteps": [0, 40], "m_t": [[1.0, 3.0], [3.0, 5.0], [10.0, 20.0]]},
              "slices": [{"unhealthy": True, "lesion_voxels": 2, "input_axis": "k", "input_index": 4},
                         {"unhealthy": True, "lesion_voxels": 7, "input_axis": "k", "input_index": 5},
                         {"unhealthy": False, "lesion_voxels": 0, "input_axis": "k", "input_index": 6}]}
    assert curve_columns(report) == [("timestep", [0.0, 40.0]), ("mean M_t, unhealthy slices", [2.0, 4.0]),
                                     ("mean M_t, healthy slices", [10.0, 20.0]),
                                     ("M_t, slice K 5 (largest lesion)", [3.0, 5.0])]


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_give_clear_messages(tiny_model: Path, tmp_path: Path) -> None:
    scene, volume = _scene_with_volume(_matrix(np.eye(3), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)))
    logic = AnomalyLogic()
    with pytest.raises(UserError, match="No input volume is selected"):
        logic.process(None, model=str(tiny_model))
    second = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T2")
    slicer.util.updateVolumeFromArray(second, _head(1))
    with pytest.raises(UserError, match=r"needs 1 input volume \(FLAIR, in this order\) but 2 were selected"):
        logic.process([volume, second], model=str(tiny_model))
    with pytest.raises(UserError, match=r"Model folder .*missing-model was not found"):
        logic.process(volume, model=str(tmp_path / "missing-model"))
    with pytest.raises(UserError, match=r"has no model\.json"):
        logic.process(volume, model=str(tmp_path))
    with pytest.raises(UserError, match="Unknown speed"):
        logic.process(volume, model=str(tiny_model), speed="warp")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_engine_errors_reach_the_user(tiny_model: Path) -> None:
    scene, volume = _scene_with_volume(_matrix(np.eye(3), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)))
    with pytest.raises(engine.EngineFailed, match=r"(?i)thr_01|calibrat"):  # uncalibrated model, no override given
        AnomalyLogic().process(volume, model=str(tiny_model), device="cpu", speed="fast")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def oblique_run(tiny_model: Path) -> tuple:
    """One run on an oblique, left-handed (one axis reversed), anisotropic grid, its files kept."""
    direction = _rotation((17.0, -9.0, 28.0)) @ np.diag([1.0, -1.0, 1.0])
    scene, volume = _scene_with_volume(_matrix(direction, (1.2, 1.6, 2.5), (40.0, -15.0, 22.0)))
    before = _state(volume)
    results = AnomalyLogic().process(volume, model=str(tiny_model), keep_files=True, **RUN)
    yield scene, volume, before, results
    shutil.rmtree(Path(results.report["outputs"]["label"]).parent, ignore_errors=True)


def test_results_land_on_the_input_grid(oblique_run: tuple) -> None:
    scene, volume, before, results = oblique_run
    assert _state(volume) == before
    assert np.linalg.det(nodes.ijk_to_ras(volume)[:3, :3]) < 0
    reference = nodes.ijk_to_ras(volume)
    segmentation, score = results.segmentation, results.anomaly_map
    assert segmentation.GetName() == "FLAIR anomaly" and score.GetName() == "FLAIR anomaly map"
    np.testing.assert_array_equal(nodes.ijk_to_ras(score), reference)  # exactly, not approximately
    assert slicer.util.arrayFromVolume(score).shape == SHAPE_KJI

    # the engine's files, read independently with SimpleITK: their index order is the input's IJK
    import SimpleITK as sitk

    label_file = Path(results.report["outputs"]["label"])
    engine_label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    engine_map = sitk.GetArrayFromImage(sitk.ReadImage(results.report["outputs"]["map"]))
    assert engine_label.any() and not engine_label.all()
    np.testing.assert_array_equal(_segment_array(segmentation, volume), engine_label)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(score), engine_map)
    # and the engine saw the input's voxels where they are: its map is zero exactly on the empty slices
    brain_slices = _head().reshape(SHAPE_KJI[0], -1).any(axis=1)
    assert not engine_map[~brain_slices].any()

    # segmentation: one segment with terminology and the input as reference geometry
    segment = segmentation.GetSegmentation().GetSegment("anomaly")
    assert segment.GetTerminology() == TERMINOLOGY
    geometry = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry.startswith(";".join(f"{v:g}" for v in reference[0, :3]).split(";")[0][:3])

    # report-derived nodes
    voxel_ml = float(np.prod(np.linalg.norm(reference[:3, :3], axis=0))) / 1000.0
    assert results.lesion_volume_ml == pytest.approx(engine_label.sum() * voxel_ml, rel=1e-6)
    table = results.slice_table.GetTable()
    assert table.GetNumberOfRows() == results.brain_slices == len(results.report["slices"])
    assert {table.GetColumnName(c) for c in range(table.GetNumberOfColumns())} >= {"decision", "t_e", "Q*"}
    assert results.chart.GetNumberOfPlotSeriesNodes() >= 1
    assert results.curve_table.GetTable().GetNumberOfRows() == len(results.report["curves"]["timesteps"])

    # subject hierarchy: every output under the input's study
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume))
    for node in (segmentation, score, results.slice_table, results.curve_table, results.chart):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study

    # the options reached the engine
    report = json.loads((label_file.parent / "report.json").read_text())
    assert report["settings"]["stride"] == 60 and report["settings"]["device"] == "cpu"
    assert report["settings"]["thr_01"] == 1.0 and report["settings"]["quantile"] == 0.5


def test_the_slice_table_shows_the_diffusion_classifiers_evidence(tiny_model: Path) -> None:
    _scene, volume = _scene_with_volume(_matrix(np.eye(3), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)))
    extra = ("--quantile", "0.5", "--decision-score", "diffusion-classifier")
    results = AnomalyLogic().process(volume, model=str(tiny_model), **{**RUN, "thr_01": -1.0, "extra_args": extra})
    table = results.slice_table.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert "classifier evidence" in columns  # only when that score decided (the cosine runs have no such column)
    evidence = table.GetColumnByName("classifier evidence")
    assert [evidence.GetValue(r) for r in range(table.GetNumberOfRows())] == pytest.approx(
        [row["classifier_evidence"] for row in results.report["slices"]])
    assert all(row["unhealthy"] for row in results.report["slices"])  # every evidence is >= -1


def test_rerun_replaces_outputs_and_cancel_leaves_the_scene_alone(tiny_model: Path, oblique_run: tuple) -> None:
    scene, volume, before, first = oblique_run
    logic = AnomalyLogic()
    counts = {c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode",
                                                            "vtkMRMLTableNode", "vtkMRMLPlotChartNode")}
    second = logic.process(volume, model=str(tiny_model), **{**RUN, "thr_01": -1.0})  # now every slice healthy
    assert {c: scene.GetNumberOfNodesByClass(c) for c in counts} == counts
    # the chart now shows the healthy-slice curve only, and the old curves' series nodes are gone
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == second.chart.GetNumberOfPlotSeriesNodes() == 1
    assert second.segmentation.GetID() == first.segmentation.GetID()
    assert second.anomaly_map.GetID() == first.anomaly_map.GetID()
    assert second.lesion_volume_ml == 0.0 and not _segment_array(second.segmentation, volume).any()
    assert second.segmentation.GetSegmentation().GetSegment("anomaly").GetTerminology() == TERMINOLOGY
    assert _state(volume) == before

    # cancel a run in flight: the engine stops, nothing in the scene changes, the temporary files go
    events: list[dict] = []
    job = logic.process(volume, model=str(tiny_model), blocking=False, on_event=events.append,
                        **{**RUN, "speed": "accurate"})
    deadline = time.monotonic() + 120
    while not any(e["event"] == "progress" for e in events) and time.monotonic() < deadline and not job.poll():
        time.sleep(0.02)
    job.cancel()
    job.wait()
    assert job.cancelled and isinstance(job.error, EngineCancelled) and job.results is None
    assert job.engine.returncode == engine.EXIT_CANCELLED
    assert not job.workdir.exists()
    assert {c: scene.GetNumberOfNodesByClass(c) for c in counts} == counts
    assert second.lesion_volume_ml == 0.0 and not _segment_array(second.segmentation, volume).any()
    assert _state(volume) == before

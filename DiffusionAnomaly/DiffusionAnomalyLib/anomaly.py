"""DiffusionAnomaly's logic without Qt: volume nodes in, `diffusion-engine anomaly` in a subprocess, result nodes out.

    from DiffusionAnomalyLib.anomaly import AnomalyLogic
    results = AnomalyLogic().process(flairNode, model="/path/to/model", speed="fast")   # blocking
    print(results.lesion_volume_ml, results.segmentation.GetName())

The numerics are the engine's; this module only turns its files and report into nodes:
- a segmentation "<input> anomaly" (one segment with a terminology entry, reference geometry from the input),
- a float anomaly-map volume "<input> anomaly map" (Inferno colours),
- a per-slice table (healthy/unhealthy, t_e, Q*, lesion volume) and the M_t curves as a table and a plot chart,
all under the input's study in Subject Hierarchy. A re-run for the same input replaces these nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import slicer
import vtk

from .engine import UserError
from .jobs import SceneJob, check_volumes, read_report
from .models import ModelInfo, check_input_count, resolve_model
from .nodes import (
    OWNER_ATTRIBUTE,
    ROLE_ATTRIBUTE,
    fill_table,
    output_node,
    owner_tag,
    place_like,
    read_volume_array,
    remove_outputs,
    set_volume,
    use_color,
)

MODULE = "DiffusionAnomaly"
SPEEDS = ("fast", "default", "accurate")
DEVICES = ("auto", "cuda", "cpu")
INFERNO = "vtkMRMLColorTableNodeFileInferno.txt"
SEGMENT_ID = "anomaly"
SEGMENT_NAME = "Anomaly"
# Cyan stands out on the Inferno map (black-red-yellow) shown underneath it.
SEGMENT_COLOR = (0.2, 0.85, 1.0)
# DICOM/SNOMED-CT codes: "Morphologically Altered Structure" / "Lesion" in the brain (Slicer's terminology format:
# context~category~type~type modifier~anatomic context~anatomic region~region modifier).
TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
               "~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^"
               "~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")
LABEL_FILE, MAP_FILE, REPORT_FILE = "label.nrrd", "map.nrrd", "report.json"


@dataclass
class AnomalyOptions:
    """What the panel sets; None keeps the model's calibrated value."""
    model: str = ""  # model folder; empty = the bundled demo model
    device: str = "auto"  # auto (GPU when PyTorch sees one), cuda, cpu
    speed: str = "default"  # fast (10 noise levels), default (15), accurate (the paper's full grid, for a GPU)
    guidance: float | None = None  # guidance strength w
    noise_scale: int | None = None  # fixed t_e instead of each slice's own
    threshold: float | None = None  # fixed threshold on the anomaly map instead of the adaptive one
    thr_01: float | None = None  # healthy/unhealthy decision threshold on the model's decision score
    extra_args: tuple[str, ...] = ()  # further `diffusion-engine anomaly` options, for researchers

    def validate(self) -> AnomalyOptions:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise UserError(f"Unknown device {self.device!r}. Use one of {', '.join(DEVICES)}.")
        if self.speed not in SPEEDS:
            raise UserError(f"Unknown speed {self.speed!r}. Use one of {', '.join(SPEEDS)}.")
        return self

    def engine_args(self) -> list[str]:
        args = ["--device", self.device]
        if self.speed != "default":
            args.append(f"--{self.speed}")
        for flag, value in (("--w", self.guidance), ("--noise-scale", self.noise_scale),
                            ("--threshold", self.threshold), ("--thr-01", self.thr_01)):
            if value is not None:
                args += [flag, repr(value)]
        return [*args, *self.extra_args]


@dataclass
class AnomalyResults:
    segmentation: Any
    anomaly_map: Any
    slice_table: Any
    curve_table: Any
    chart: Any
    lesion_volume_ml: float
    unhealthy_slices: int
    brain_slices: int
    report: dict
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"Lesion volume {self.lesion_volume_ml:.2f} mL; {self.unhealthy_slices} of {self.brain_slices} "
                f"brain slices called unhealthy.")


class AnomalyLogic:
    """Qt-free: takes nodes explicitly; the scene is the input node's."""

    def process(self, inputs: Any, options: AnomalyOptions | None = None, *, blocking: bool = True,
                on_event: Callable[[dict], None] | None = None, on_log: Callable[[str], None] | None = None,
                on_finished: Callable[[SceneJob], None] | None = None, keep_files: bool = False,
                python: str | None = None, **option_values: Any) -> AnomalyResults | SceneJob:
        """Segment anomalies in one case. ``inputs``: a volume node, or one per model modality in its order.

        Options come as an AnomalyOptions and/or keywords (model=, device=, speed=, guidance=, ...). Blocking
        returns AnomalyResults (raising UserError, EngineFailed or EngineCancelled); otherwise the started SceneJob:
        poll() it from a timer, cancel() it, read .results / .error when done.
        """
        options = _options(options, option_values).validate()
        volumes = check_volumes(list(inputs) if isinstance(inputs, (list, tuple)) else [inputs])
        model = resolve_model(options.model, "anomaly")
        check_input_count(model, len(volumes))
        reference = volumes[0]
        job = SceneJob(MODULE, "anomaly", volumes, lambda files, work: _engine_args(model, options, files, work),
                       lambda work, outputs: self.apply_results(reference, work, job.engine.warnings),
                       on_event=on_event, on_log=on_log, on_finished=on_finished, keep_files=keep_files,
                       python=python).start()
        return job.result_or_raise() if blocking else job

    # -------------------------------------------------------------------------------------------- results

    def apply_results(self, reference: Any, workdir: Path, warnings: Sequence[str] = ()) -> AnomalyResults:
        """Engine files in ``workdir`` -> nodes for ``reference`` (replacing this module's earlier ones)."""
        label = read_volume_array(workdir / LABEL_FILE, reference)
        score = read_volume_array(workdir / MAP_FILE, reference)
        report = read_report(workdir / REPORT_FILE)
        scene = reference.GetScene()
        name = reference.GetName()
        scene.StartState(scene.BatchProcessState)
        try:
            segmentation = self._segmentation(scene, reference, label, name)
            score_node = self._score_map(scene, reference, score, name)
            slices = self._slice_table(scene, reference, report, name)
            curves, chart = self._curves(scene, reference, report, name)
            for node in (segmentation, score_node, slices, curves, chart):
                place_like(node, reference)
        finally:
            scene.EndState(scene.BatchProcessState)
        volume_ml = float(report["lesion_volume_ml"])
        segmentation.SetAttribute("DiffusionAnomaly.LesionVolumeMl", f"{volume_ml:.6g}")
        return AnomalyResults(segmentation=segmentation, anomaly_map=score_node, slice_table=slices,
                              curve_table=curves, chart=chart, lesion_volume_ml=volume_ml,
                              unhealthy_slices=int(report["unhealthy_slices"]), brain_slices=len(report["slices"]),
                              report=report, warnings=list(warnings))

    def remove_results(self, reference: Any) -> None:
        """Remove every node this module made for ``reference``."""
        remove_outputs(reference.GetScene(), MODULE, reference, None)

    @staticmethod
    def _segmentation(scene: Any, reference: Any, label: Any, name: str) -> Any:
        node = output_node(scene, MODULE, reference, "segmentation", "vtkMRMLSegmentationNode", f"{name} anomaly")
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)  # DICOM SEG export needs it
        segmentation = node.GetSegmentation()
        segmentation.RemoveAllSegments()
        # from a labelmap even when empty: an empty segment needs converters that only the Slicer application has
        node.AddSegmentFromBinaryLabelmapRepresentation(_oriented_image(label, reference), SEGMENT_NAME,
                                                        SEGMENT_COLOR, SEGMENT_ID)
        segmentation.GetSegment(SEGMENT_ID).SetTerminology(TERMINOLOGY)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def _score_map(scene: Any, reference: Any, score: Any, name: str) -> Any:
        node = output_node(scene, MODULE, reference, "map", "vtkMRMLScalarVolumeNode", f"{name} anomaly map")
        set_volume(node, score.astype("float32"), reference)
        display = node.GetDisplayNode()
        use_color(display, INFERNO)
        display.AutoWindowLevelOff()
        high = float(score.max())
        display.SetWindowLevelMinMax(0.0, high if high > 0 else 1.0)
        display.SetThreshold(high * 0.05, high)  # transparent background where nothing is abnormal
        display.ApplyThresholdOn()
        return node

    @staticmethod
    def _slice_table(scene: Any, reference: Any, report: dict, name: str) -> Any:
        node = output_node(scene, MODULE, reference, "slices", "vtkMRMLTableNode", f"{name} anomaly slices")
        rows = report["slices"]
        voxel_ml = float(report["voxel_volume_ml"])
        fill_table(node, [
            ("slice", [f"{row['input_axis'].upper()} {row['input_index']}" for row in rows]),
            ("decision", ["unhealthy" if row["unhealthy"] else "healthy" for row in rows]),
            ("t_e", [", ".join(str(t) for t in row["t_e"]) for row in rows]),
            ("Q*", [row["threshold"] for row in rows]),
            ("similarity (cos)", [row["cosine"] for row in rows]),
            ("peak divergence (M_te)", [sum(row["m_te"]) / len(row["m_te"]) for row in rows]),
            *([("classifier evidence", [row["classifier_evidence"] for row in rows])]
              if rows and "classifier_evidence" in rows[0] else []),
            ("lesion voxels", [row["lesion_voxels"] for row in rows]),
            ("lesion mL", [row["lesion_voxels"] * voxel_ml for row in rows]),
        ])
        return node

    @staticmethod
    def _curves(scene: Any, reference: Any, report: dict, name: str) -> tuple[Any, Any]:
        table = output_node(scene, MODULE, reference, "curves", "vtkMRMLTableNode", f"{name} anomaly M_t")
        columns = curve_columns(report)
        fill_table(table, columns)
        chart = output_node(scene, MODULE, reference, "chart", "vtkMRMLPlotChartNode", f"{name} anomaly M_t")
        chart.RemoveAllPlotSeriesNodeIDs()
        remove_outputs(scene, MODULE, reference, ["series"])
        colors = ((0.85, 0.2, 0.1), (0.2, 0.45, 0.85), (0.1, 0.1, 0.1))
        for (column, _), color in zip(columns[1:], colors, strict=False):  # at most 3 curves
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
            series.SetAttribute(OWNER_ATTRIBUTE, owner_tag(MODULE, reference))
            series.SetAttribute(ROLE_ATTRIBUTE, "series")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName(columns[0][0])
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleNone)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(f"{name}: guided vs unguided divergence M_t")
        chart.SetXAxisTitle("noise level t (timestep)")
        chart.SetYAxisTitle("M_t")
        return table, chart


def curve_columns(report: dict) -> list[tuple[str, list[float]]]:
    """M_t against t: mean over unhealthy and over healthy slices, and the slice with the most lesion voxels."""
    steps = report["curves"]["timesteps"]
    curves, rows = report["curves"]["m_t"], report["slices"]
    columns: list[tuple[str, list[float]]] = [("timestep", [float(t) for t in steps])]
    for label, wanted in (("mean M_t, unhealthy slices", True), ("mean M_t, healthy slices", False)):
        chosen = [curve for curve, row in zip(curves, rows, strict=True) if row["unhealthy"] == wanted]
        if chosen:
            columns.append((label, [sum(values) / len(chosen) for values in zip(*chosen, strict=True)]))
    if rows:
        largest = max(range(len(rows)), key=lambda i: rows[i]["lesion_voxels"])
        if rows[largest]["lesion_voxels"] > 0:
            row = rows[largest]
            columns.append((f"M_t, slice {row['input_axis'].upper()} {row['input_index']} (largest lesion)",
                            [float(v) for v in curves[largest]]))
    return columns


def _oriented_image(label: Any, reference: Any) -> Any:
    """A binary labelmap ([k, j, i] array) on the reference's exact grid, as segmentations store them."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(label.shape[2], label.shape[1], label.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values[:] = (label.reshape(-1) > 0).astype("uint8")
    image.GetPointData().GetScalars().Modified()
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def _options(options: AnomalyOptions | None, values: dict[str, Any]) -> AnomalyOptions:
    known = {f.name for f in fields(AnomalyOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    base = options or AnomalyOptions()
    return AnomalyOptions(**{**{f.name: getattr(base, f.name) for f in fields(AnomalyOptions)}, **values})


def _engine_args(model: ModelInfo, options: AnomalyOptions, files: list[Path], work: Path) -> list[str]:
    return ["--model", str(model.path), "--input", *map(str, files), "--output-label", str(work / LABEL_FILE),
            "--output-map", str(work / MAP_FILE), "--report", str(work / REPORT_FILE), *options.engine_args()]

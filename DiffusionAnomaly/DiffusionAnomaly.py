"""DiffusionAnomaly: find lesions in a brain MRI with a generative diffusion model (AnoFPDM), in 3D Slicer.

The panel (Widget) only wires the GUI to a parameter node; the work is done by DiffusionAnomalyLogic, which is
Qt-free (DiffusionAnomalyLib.anomaly.AnomalyLogic) and runs the engine in a separate PythonSlicer process, so the
GUI never freezes and never loads torch. From the Python console:

    logic = slicer.util.getModuleLogic("DiffusionAnomaly")
    results = logic.process(getNode("FLAIR"), model="/path/to/model", speed="fast")   # blocking
    print(results.summary())
"""

from __future__ import annotations

import pathlib
from typing import Annotated

import slicer
import vtk
from DiffusionAnomalyLib.anomaly import DEVICES, SPEEDS, AnomalyLogic, AnomalyOptions
from DiffusionAnomalyLib.engine import UserError
from DiffusionAnomalyLib.sample_data import images_for_model, register_when_started
from DiffusionAnomalyLib.widget import MODEL_SOURCES, EngineJobWidget
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

INPUT_FIELDS = ("inputVolume1", "inputVolume2", "inputVolume3", "inputVolume4")
DEMO_THUMBNAIL = pathlib.Path(__file__).resolve().parent / "Resources" / "Icons" / "DemoTumour.png"


class DiffusionAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Anomaly Segmentation (generative)")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["GenerativeBrainMRI contributors"]
        self.parent.helpText = _(
            "Finds lesions (tumours, white-matter hyperintensities, strokes) in a brain MRI as the regions that a "
            "generative diffusion model, guided towards 'healthy', would change (AnoFPDM). This is about generative "
            "diffusion models, not diffusion-weighted MRI. Results: a segmentation, an anomaly map, the M_t curves "
            "and a per-slice table, on the input's exact voxel grid. Research software: not for clinical use.")
        self.parent.acknowledgementText = _(
            "AnoFPDM: Che et al., 'Anomaly detection with the forward process of diffusion models'. Engine and "
            "modules: the GenerativeBrainMRI project (MIT licence).")
        # The bundled demo case as a Sample Data button ("Generative brain MRI" > DemoTumour)
        register_when_started("anomaly", on_loaded=useDemoCase, thumbnail=DEMO_THUMBNAIL)


def useDemoCase(source, loaded: dict) -> None:
    """After Sample Data loaded the demo case: select its images in the panel, in the model's order, and open it."""
    logic = DiffusionAnomalyLogic()
    parameterNode = logic.getParameterNode()
    try:
        modalities = logic.model(parameterNode.options().model).modalities
    except UserError:  # no usable model yet: the case's order; Apply then says what is missing
        modalities = ()
    volumes = images_for_model(loaded, modalities)
    for index, field in enumerate(INPUT_FIELDS):
        setattr(parameterNode, field, volumes[index] if index < len(volumes) else None)
    slicer.util.selectModule("DiffusionAnomaly")


@parameterNodeWrapper
class DiffusionAnomalyParameterNode:
    """Everything the panel shows; saved with the scene."""
    modelSource: Annotated[str, Choice(list(MODEL_SOURCES))] = MODEL_SOURCES[0]
    modelFolder: pathlib.Path
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    speed: Annotated[str, Choice(list(SPEEDS))] = "default"
    overrideGuidance: bool = False
    guidance: Annotated[float, WithinRange(0.0, 100.0)] = 2.0
    overrideNoiseScale: bool = False
    noiseScale: Annotated[int, WithinRange(0, 999)] = 200
    overrideThreshold: bool = False
    threshold: Annotated[float, WithinRange(0.0, 100.0)] = 0.1
    overrideDecision: bool = False
    decisionThreshold: Annotated[float, WithinRange(-1.0, 10.0)] = 0.9  # a cosine, an M_te (>= 0) or an evidence

    def folder(self) -> str:
        """The chosen model folder ("" when none: an empty path widget reads as ".")."""
        text = str(self.modelFolder or "")
        return "" if text in ("", ".") else text

    def inputs(self) -> list:
        return [v for v in (self.inputVolume1, self.inputVolume2, self.inputVolume3, self.inputVolume4) if v]

    def options(self) -> AnomalyOptions:
        return AnomalyOptions(
            model="" if self.modelSource == MODEL_SOURCES[0] else (self.folder() or "."),
            device=self.device, speed=self.speed,
            guidance=self.guidance if self.overrideGuidance else None,
            noise_scale=self.noiseScale if self.overrideNoiseScale else None,
            threshold=self.threshold if self.overrideThreshold else None,
            thr_01=self.decisionThreshold if self.overrideDecision else None)


class DiffusionAnomalyWidget(EngineJobWidget):
    jobTitle = _("Anomaly segmentation")

    def __init__(self, parent=None) -> None:
        EngineJobWidget.__init__(self, parent)
        self._results = None
        self._deviceInfo = None

    def createLogic(self):
        return DiffusionAnomalyLogic()

    def setup(self) -> None:
        EngineJobWidget.setup(self)
        self.ui.showResultsButton.connect("clicked(bool)", self.showResults)

    def setDefaults(self, parameterNode) -> None:
        if not parameterNode.inputVolume1:
            parameterNode.inputVolume1 = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    # -------------------------------------------------------------------------------------------- GUI state

    def updateGUI(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        useFolder = node.modelSource == MODEL_SOURCES[1]
        self.ui.modelFolderPathLineEdit.enabled = useFolder
        needed = 1
        try:
            model = self.logic.model(node.options().model)
            self.ui.modelInfoLabel.text = model.describe()
            needed = max(1, len(model.modalities))
            names = [m.upper() for m in model.modalities]
        except UserError as error:
            self.ui.modelInfoLabel.text = str(error)
            names = []
        for index in range(4):
            selector = getattr(self.ui, f"inputVolume{index + 1}Selector")
            label = getattr(self.ui, f"inputVolume{index + 1}SelectorLabel")
            selector.visible = label.visible = index < needed
            label.text = f"{names[index]}:" if index < len(names) else f"Input {index + 1}:"
        for flag, widget in (("overrideGuidance", "guidanceSpinBox"), ("overrideNoiseScale", "noiseScaleSpinBox"),
                             ("overrideThreshold", "thresholdSpinBox"), ("overrideDecision", "decisionSpinBox")):
            getattr(self.ui, widget).enabled = getattr(node, flag)
        self.ui.applyButton.enabled = not self.running and len(node.inputs()) >= 1
        self.ui.applyButton.toolTip = _("Run the model") if node.inputs() else _("Select an input volume")
        self.ui.cancelButton.enabled = self.running

    # -------------------------------------------------------------------------------------------- running

    def onApplyButton(self) -> None:
        node = self._parameterNode
        options = node.options()
        self.rememberModel(options.model)
        if not self._prepare(options):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the anomaly segmentation."), waitCursor=True):
            self.startJob(lambda **callbacks: self.logic.process(node.inputs(), options, blocking=False, **callbacks))

    def _prepare(self, options: AnomalyOptions) -> bool:
        """First Apply: install dependencies (one confirmation); on a CPU-only machine warn and offer fast mode."""
        if not self.ensureDependencies():
            return False
        if self._deviceInfo is None and options.device == "auto":
            from DiffusionAnomalyLib.engine import probe_device

            with slicer.util.tryWithErrorDisplay(_("PyTorch could not be started."), waitCursor=True):
                self._deviceInfo = probe_device()
            if self._deviceInfo is None:
                return False
            if self._deviceInfo.get("cuda"):
                self.ui.deviceInfoLabel.text = (f"GPU: {self._deviceInfo.get('name')} "
                                                f"({self._deviceInfo.get('memory_gb')} GB)")
            else:
                self.ui.deviceInfoLabel.text = _("No GPU found: running on the CPU.")
                if options.speed != "fast" and slicer.util.confirmYesNoDisplay(
                        _("No GPU is available, so the model runs on the CPU: expect several minutes per volume in "
                          "fast mode and much longer otherwise (the progress bar shows the time left). Switch to "
                          "fast mode?")):
                    self._parameterNode.speed = "fast"
                    options.speed = "fast"
        return True

    def onJobFinished(self, results) -> None:
        self._results = results
        self.ui.lesionVolumeLabel.text = f"{results.lesion_volume_ml:.2f} mL"
        self.ui.unhealthySlicesLabel.text = f"{results.unhealthy_slices} of {results.brain_slices}"
        self.ui.showResultsButton.enabled = True
        self.showResults()

    def showResults(self) -> None:
        """Input as background, anomaly map as foreground, the M_t chart and the slice table in the layout."""
        results = self._results
        if results is None:
            return
        reference = self._parameterNode.inputVolume1
        slicer.util.setSliceViewerLayers(background=reference, foreground=results.anomaly_map, foregroundOpacity=0.5)
        slicer.modules.plots.logic().ShowChartInLayout(results.chart)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(results.slice_table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


class DiffusionAnomalyLogic(ScriptedLoadableModuleLogic, AnomalyLogic):
    """The Qt-free AnomalyLogic plus Slicer's parameter-node plumbing."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DiffusionAnomalyParameterNode(super().getParameterNode())

    @staticmethod
    def model(path: str):
        from DiffusionAnomalyLib.models import resolve_model

        return resolve_model(path, "anomaly")


class DiffusionAnomalyTest(ScriptedLoadableModuleTest):
    """Runs in a real Slicer (Slicer --python-code "slicer.selfTests['DiffusionAnomaly']()" or ctest).

    Uses the bundled demo model; set DIFFUSION_ANOMALY_TEST_MODEL to a model folder to test another one.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_parameter_node_binds_to_the_panel()
        self.setUp()
        self.test_segment_a_synthetic_head()

    def test_parameter_node_binds_to_the_panel(self) -> None:
        widget = slicer.util.getModuleWidget("DiffusionAnomaly")
        node = widget.logic.getParameterNode()
        node.speed = "fast"
        self.assertEqual(widget.ui.speedComboBox.currentText, "fast")
        widget.ui.deviceComboBox.currentIndex = list(DEVICES).index("cpu")
        self.assertEqual(node.device, "cpu")

    def test_segment_a_synthetic_head(self) -> None:
        import os

        import numpy as np

        model = os.environ.get("DIFFUSION_ANOMALY_TEST_MODEL", "")
        logic = DiffusionAnomalyLogic()
        try:
            info = logic.model(model)
        except UserError as error:
            self.skipTest(str(error))
        k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 64, 56)), indexing="ij")
        brain = (k / 0.9) ** 2 + (j / 0.85) ** 2 + (i / 0.75) ** 2 < 1
        volumes = []
        for index, name in enumerate(info.modalities):
            volume = slicer.util.addVolumeFromArray(np.where(brain, 100.0 + 5 * index, 0.0).astype("float32"),
                                                    name=name.upper())
            volume.SetSpacing(3.0, 3.0, 3.0)
            volumes.append(volume)
        matrix = vtk.vtkMatrix4x4()
        volumes[0].GetIJKToRASMatrix(matrix)
        results = logic.process(volumes, model=model, speed="fast")
        outMatrix = vtk.vtkMatrix4x4()
        results.anomaly_map.GetIJKToRASMatrix(outMatrix)
        for r in range(4):
            for c in range(4):
                self.assertEqual(outMatrix.GetElement(r, c), matrix.GetElement(r, c))
        self.assertEqual(results.segmentation.GetName(), f"{volumes[0].GetName()} anomaly")
        self.assertGreaterEqual(results.lesion_volume_ml, 0.0)
        self.delayDisplay(results.summary())

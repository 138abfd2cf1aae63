"""DiffusionAging: show a brain MRI at another age with a generative diffusion model (ONLS), in 3D Slicer.

The panel only wires the GUI to a parameter node; DiffusionAgingLogic (Qt-free, DiffusionAgingLib.aging) runs the
engine in a separate PythonSlicer process. The shared glue comes from DiffusionAnomalyLib (module dependency). From
the Python console:

    logic = slicer.util.getModuleLogic("DiffusionAging")
    results = logic.process(getNode("T1"), age=63, target_age=75, model="/path/to/model")   # blocking
    print(results.summary())
"""

from __future__ import annotations

import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from DiffusionAgingLib.aging import DEVICES, AgingLogic, AgingOptions
from DiffusionAnomalyLib.engine import EngineCancelled, UserError
from DiffusionAnomalyLib.sample_data import images_for_model, register_when_started
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODEL_SOURCES = ("bundled demo model", "model folder")
MODEL_FOLDER_SETTING = "DiffusionAging/ModelFolder"
POLL_MS = 100
AGE_RANGE = (1.0, 120.0)
DEMO_THUMBNAIL = pathlib.Path(__file__).resolve().parent / "Resources" / "Icons" / "DemoAging.png"


class DiffusionAging(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Brain Aging (generative)")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = ["DiffusionAnomaly"]  # shared glue in DiffusionAnomalyLib
        self.parent.contributors = ["GenerativeBrainMRI contributors"]
        self.parent.helpText = _(
            "Shows a brain MRI as it would look at another age (counterfactual aging with ONLS: a generative "
            "diffusion model guided by an age regressor, with the noise level chosen per subject). This is about "
            "generative diffusion models, not diffusion-weighted MRI. Results: the aged volume, a signed difference "
            "map and, for an age sweep, a sequence to scrub. Research software: not for clinical use.")
        self.parent.acknowledgementText = _("ONLS counterfactual aging; engine and modules: the GenerativeBrainMRI "
                                            "project (MIT licence).")
        # The bundled demo case, when this version has one, as a Sample Data button ("Generative brain MRI")
        register_when_started("aging", on_loaded=useDemoCase, thumbnail=DEMO_THUMBNAIL)


def useDemoCase(source, loaded: dict) -> None:
    """After Sample Data loaded the demo case: select its image and the subject's age in the panel, and open it."""
    logic = DiffusionAgingLogic()
    parameterNode = logic.getParameterNode()
    try:
        modalities = logic.model(parameterNode.options().model).modalities
    except UserError:  # no usable model yet: the case's first image; Apply then says what is missing
        modalities = ()
    parameterNode.inputVolume = images_for_model(loaded, modalities)[0]
    if source.age is not None and AGE_RANGE[0] <= source.age <= AGE_RANGE[1]:
        parameterNode.age = source.age
    slicer.util.selectModule("DiffusionAging")


@parameterNodeWrapper
class DiffusionAgingParameterNode:
    modelSource: Annotated[str, Choice(list(MODEL_SOURCES))] = MODEL_SOURCES[0]
    modelFolder: pathlib.Path
    inputVolume: vtkMRMLScalarVolumeNode
    age: Annotated[float, WithinRange(*AGE_RANGE)] = 60.0
    targetAge: Annotated[float, WithinRange(*AGE_RANGE)] = 75.0
    sweep: bool = False
    targetAges: str = "65,70,75,80"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    autoNoiseLevel: bool = True
    noiseLevel: Annotated[float, WithinRange(0.05, 1.0)] = 0.6
    guidanceScale: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0  # 0 = the model's / the paper's value

    def folder(self) -> str:
        text = str(self.modelFolder or "")
        return "" if text in ("", ".") else text

    def options(self) -> AgingOptions:
        if self.sweep:
            try:
                targets = tuple(float(a) for a in self.targetAges.split(",") if a.strip())
            except ValueError:
                raise UserError(f"Target ages {self.targetAges!r} are not comma-separated numbers "
                                f"(e.g. 65,70,75,80).") from None
        else:
            targets = (self.targetAge,)
        return AgingOptions(
            age=self.age, target_ages=targets, device=self.device,
            model="" if self.modelSource == MODEL_SOURCES[0] else (self.folder() or "."),
            noise_level=None if self.autoNoiseLevel else self.noiseLevel,
            guidance_scale=self.guidanceScale or None)


class DiffusionAgingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._dependenciesChecked = False
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionAging.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffusionAgingLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.engine.kill()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        remembered = slicer.app.userSettings().value(MODEL_FOLDER_SETTING, "")
        if remembered and not parameterNode.folder():
            parameterNode.modelFolder = pathlib.Path(remembered)
            parameterNode.modelSource = MODEL_SOURCES[1]
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    def _updateGUI(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        self.ui.modelFolderPathLineEdit.enabled = node.modelSource == MODEL_SOURCES[1]
        try:
            self.ui.modelInfoLabel.text = self.logic.model(node.options().model).describe()
        except UserError as error:
            self.ui.modelInfoLabel.text = str(error)
        self.ui.targetAgeSpinBox.enabled = not node.sweep
        self.ui.targetAgesLineEdit.enabled = node.sweep
        self.ui.noiseLevelSpinBox.enabled = not node.autoNoiseLevel
        running = self._job is not None
        self.ui.applyButton.enabled = not running and node.inputVolume is not None
        self.ui.cancelButton.enabled = running

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start the aging."), waitCursor=True):
            options = self._parameterNode.options()
            if options.model:
                slicer.app.userSettings().setValue(MODEL_FOLDER_SETTING, options.model)
            if not self._dependenciesChecked:
                from DiffusionAnomalyLib.dependencies import ensure_dependencies

                if not ensure_dependencies(self.moduleName):
                    return
                self._dependenciesChecked = True
            self.ui.progressBar.visible = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting the engine...")
            self._job = self.logic.process(self._parameterNode.inputVolume, options, blocking=False,
                                           on_event=self._onEvent, on_finished=self._onFinished)
            self._timer.start()
        self._updateGUI()

    def _onEvent(self, event: dict) -> None:
        if self._job is None:
            return
        progress = self._job.progress
        if progress.fraction is not None:
            self.ui.progressBar.value = int(100 * progress.fraction)
        self.ui.statusLabel.text = progress.text

    def _poll(self) -> None:
        if self._job is not None:
            self._job.poll()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _onFinished(self, job) -> None:
        self._timer.stop()
        self._job = None
        self.ui.progressBar.visible = False
        self._updateGUI()
        if isinstance(job.error, EngineCancelled):
            self.ui.statusLabel.text = _("Cancelled; the scene was left as it was.")
            return
        if job.error is not None:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(str(job.error), windowTitle=_("Brain aging"))
            return
        results = job.results
        self.ui.statusLabel.text = _("Done. ") + results.summary()
        level = results.noise_level
        self.ui.noiseLevelResultLabel.text = f"{level['L']:.2f} ({level['mode']}, t0 = {level['t0']})"
        ages = results.regressor_age
        self.ui.predictedAgesLabel.text = (f"{ages['before']:.1f} -> "
                                           + ", ".join(f"{a:.1f}" for a in ages["after"]) + " years")
        for warning in results.warnings:
            slicer.util.warningDisplay(warning, windowTitle=_("Brain aging"))
        slicer.util.setSliceViewerLayers(background=results.images[-1], foreground=results.differences[-1],
                                         foregroundOpacity=0.4)
        if results.browser is not None:
            slicer.modules.sequences.showSequenceBrowser(results.browser)


class DiffusionAgingLogic(ScriptedLoadableModuleLogic, AgingLogic):
    """The Qt-free AgingLogic plus Slicer's parameter-node plumbing."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DiffusionAgingParameterNode(super().getParameterNode())

    @staticmethod
    def model(path: str):
        from DiffusionAnomalyLib.models import resolve_model

        return resolve_model(path, "aging")


class DiffusionAgingTest(ScriptedLoadableModuleTest):
    """Runs in a real Slicer; uses the bundled demo model (or DIFFUSION_AGING_TEST_MODEL)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_age_a_synthetic_head()

    def test_age_a_synthetic_head(self) -> None:
        import os

        import numpy as np

        model = os.environ.get("DIFFUSION_AGING_TEST_MODEL", "")
        logic = DiffusionAgingLogic()
        try:
            logic.model(model)
        except UserError as error:
            self.skipTest(str(error))
        k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 64, 56)), indexing="ij")
        brain = (k / 0.9) ** 2 + (j / 0.85) ** 2 + (i / 0.75) ** 2 < 1
        volume = slicer.util.addVolumeFromArray(np.where(brain, 100.0, 0.0).astype("float32"), name="T1")
        results = logic.process(volume, model=model, age=60, target_ages=(65, 75), device="auto")
        self.assertEqual([n.GetName() for n in results.images], ["T1 at age 65", "T1 at age 75"])
        self.assertEqual(results.sequence.GetNumberOfDataNodes(), 2)
        self.delayDisplay(results.summary())

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

import slicer
from DiffusionAgingLib.aging import DEVICES, AgingLogic, AgingOptions
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
    wholeBrain: bool = False
    reducedPrecision: bool = False

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
            guidance_scale=self.guidanceScale or None, whole_brain=self.wholeBrain,
            precision="bfloat16" if self.reducedPrecision else "float32")


class DiffusionAgingWidget(EngineJobWidget):
    jobTitle = _("Brain aging")

    def createLogic(self):
        return DiffusionAgingLogic()

    def setDefaults(self, parameterNode) -> None:
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def updateGUI(self, caller=None, event=None) -> None:
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
        self.ui.applyButton.enabled = not self.running and node.inputVolume is not None
        self.ui.cancelButton.enabled = self.running

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start the aging."), waitCursor=True):
            node = self._parameterNode
            options = node.options()
            self.rememberModel(options.model)
            if not self.ensureDependencies():
                return
            self.startJob(lambda **callbacks: self.logic.process(node.inputVolume, options, blocking=False,
                                                                 **callbacks))

    def onJobFinished(self, results) -> None:
        level = results.noise_level
        self.ui.noiseLevelResultLabel.text = f"{level['L']:.2f} ({level['mode']}, t0 = {level['t0']})"
        ages = results.regressor_age
        self.ui.predictedAgesLabel.text = (f"{ages['before']:.1f} -> "
                                           + ", ".join(f"{a:.1f}" for a in ages["after"]) + " years")
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

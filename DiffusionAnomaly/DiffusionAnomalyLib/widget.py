"""Panel plumbing that both modules share: the parameter node bound to the .ui, the remembered model folder, the
first-Apply dependency check, and an engine job's progress bar, polling, cancel and end.

A module's Widget subclasses EngineJobWidget and supplies ``createLogic``, ``updateGUI``, ``onApplyButton`` (which
calls ``startJob``) and ``onJobFinished``; optionally ``setDefaults`` and ``jobTitle``. Both modules' .ui files
hold the widgets used here: applyButton, cancelButton, progressBar, statusLabel, modelFolderPathLineEdit.
The parameter nodes have ``modelSource`` (one of MODEL_SOURCES), ``modelFolder`` and ``folder()``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from DiffusionAnomalyLib.engine import EngineCancelled

MODEL_SOURCES = ("bundled demo model", "model folder")
POLL_MS = 100


class EngineJobWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    jobTitle = ""  # window title of error and warning pop-ups

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

    # -- to supply ------------------------------------------------------------------------------------------

    def createLogic(self):
        raise NotImplementedError

    def setDefaults(self, parameterNode) -> None:
        """Fill an empty parameter node (e.g. the first volume of the scene as input)."""

    def updateGUI(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def onApplyButton(self) -> None:
        raise NotImplementedError

    def onJobFinished(self, results) -> None:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def modelFolderSetting(self) -> str:
        return f"{self.moduleName}/ModelFolder"

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.createLogic()
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        self.setDefaults(parameterNode)
        remembered = slicer.app.userSettings().value(self.modelFolderSetting, "")
        if remembered and not parameterNode.folder():
            parameterNode.modelFolder = pathlib.Path(remembered)
            parameterNode.modelSource = MODEL_SOURCES[1]
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    # -- running --------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._job is not None

    def rememberModel(self, model: str) -> None:
        if model:
            slicer.app.userSettings().setValue(self.modelFolderSetting, model)

    def ensureDependencies(self) -> bool:
        """First Apply: install what the engine needs, after one confirmation (False: the user declined)."""
        if not self._dependenciesChecked:
            from DiffusionAnomalyLib.dependencies import ensure_dependencies

            if not ensure_dependencies(self.moduleName):
                return False
            self._dependenciesChecked = True
        return True

    def startJob(self, start: Callable[..., object]) -> None:
        """``start(on_event=..., on_finished=...)`` launches the logic's non-blocking process and returns its job."""
        self.ui.statusLabel.text = _("Starting the engine...")
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        try:
            self._job = start(on_event=self._onEvent, on_finished=self._onFinished)
        except Exception:
            self.ui.progressBar.visible = False
            self.ui.statusLabel.text = _("Could not start.")
            raise
        self._timer.start()
        self.updateGUI()

    def _onEvent(self, event: dict) -> None:
        progress = self._job.progress if self._job is not None else None
        if progress is None:
            return
        if progress.fraction is not None:
            self.ui.progressBar.value = int(100 * progress.fraction)
        self.ui.statusLabel.text = progress.text
        if event.get("event") == "warning":
            slicer.util.showStatusMessage(event.get("message", ""), 5000)

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
        self.updateGUI()
        if isinstance(job.error, EngineCancelled):
            self.ui.statusLabel.text = _("Cancelled; the scene was left as it was.")
            return
        if job.error is not None:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(str(job.error), windowTitle=self.jobTitle)
            return
        self.ui.statusLabel.text = _("Done. ") + job.results.summary()
        self.onJobFinished(job.results)
        for warning in job.results.warnings:
            slicer.util.warningDisplay(warning, windowTitle=self.jobTitle)

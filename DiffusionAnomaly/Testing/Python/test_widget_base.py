"""The shared panel base (DiffusionAnomalyLib/widget.py) driven through Apply, progress, cancel, failure and success
with stand-ins for Qt and the Slicer GUI (no Slicer application here): the plumbing's paths all run.

The real GUI calls are checked by the module self-tests in a Slicer application (Testing/run_slicer_self_tests.py).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # DiffusionAnomaly/, as Slicer puts it on sys.path


class _Recorder:
    """Any attribute is settable; calls are recorded by name."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def connect(self, *args) -> None:
        self.calls.append(("connect", *args))


class _Timer:
    def __init__(self) -> None:
        self.active = False
        self.timeout = _Recorder()

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class _Settings(dict):
    def value(self, key: str, default: str = "") -> str:
        return self.get(key, default)

    def setValue(self, key: str, value: str) -> None:
        self[key] = value


class _ModuleWidget:
    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.parent = SimpleNamespace(isEntered=True)
        self.layout = SimpleNamespace(addWidget=lambda widget: None)

    def setup(self) -> None:
        pass

    def resourcePath(self, name: str) -> str:
        return f"{self.moduleName}/Resources/{name}"


class _Observer:
    def __init__(self) -> None:
        self.observed: list = []

    def addObserver(self, obj, event, callback) -> None:
        self.observed.append((obj, event, callback))

    def removeObserver(self, obj, event, callback) -> None:
        self.observed.remove((obj, event, callback))

    def removeObservers(self) -> None:
        self.observed.clear()


@pytest.fixture
def gui(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Stand-in qt, vtk and slicer modules; returns what the GUI was asked to show."""
    shown = SimpleNamespace(errors=[], warnings=[], status=[], settings=_Settings())
    ui = SimpleNamespace(**{name: _Recorder() for name in ("applyButton", "cancelButton", "progressBar",
                                                           "statusLabel", "modelFolderPathLineEdit")})
    shown.ui = ui
    util = SimpleNamespace(
        loadUI=lambda path: SimpleNamespace(setMRMLScene=lambda scene: None, path=path),
        childWidgetVariables=lambda widget: ui, VTKObservationMixin=_Observer,
        showStatusMessage=lambda text, ms: shown.status.append(text),
        errorDisplay=lambda text, windowTitle="": shown.errors.append((windowTitle, text)),
        warningDisplay=lambda text, windowTitle="": shown.warnings.append((windowTitle, text)))
    slicer = types.ModuleType("slicer")
    slicer.util = util
    slicer.app = SimpleNamespace(userSettings=lambda: shown.settings)
    slicer.mrmlScene = SimpleNamespace(StartCloseEvent=1, EndCloseEvent=2)
    modules = {
        "qt": SimpleNamespace(QTimer=_Timer),
        "vtk": SimpleNamespace(vtkCommand=SimpleNamespace(ModifiedEvent=33)),
        "slicer": slicer,
        "slicer.util": util,
        "slicer.i18n": SimpleNamespace(tr=lambda text: text),
        "slicer.ScriptedLoadableModule": SimpleNamespace(ScriptedLoadableModuleWidget=_ModuleWidget),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "DiffusionAnomalyLib.widget", raising=False)
    return shown


class _Job:
    def __init__(self, on_event, on_finished) -> None:
        self.on_event, self.on_finished = on_event, on_finished
        self.progress = SimpleNamespace(fraction=None, text="")
        self.cancelled = self.polled = 0
        self.engine = SimpleNamespace(kill=lambda: None)

    def poll(self) -> None:
        self.polled += 1

    def cancel(self) -> None:
        self.cancelled += 1

    def finish(self, error=None, results=None) -> None:
        self.error, self.results = error, results
        self.on_finished(self)


def _panel(gui: SimpleNamespace, fail_start: bool = False):
    from DiffusionAnomalyLib.widget import MODEL_SOURCES, EngineJobWidget

    node = SimpleNamespace(modelSource=MODEL_SOURCES[0], modelFolder=None, folder=lambda: "",
                           connectGui=lambda ui: "tag", disconnectGui=lambda tag: None, input=None)

    class Logic:
        def __init__(self) -> None:
            self.jobs: list[_Job] = []

        def getParameterNode(self):
            return node

        def process(self, on_event, on_finished):
            if fail_start:
                raise RuntimeError("the engine could not start")
            self.jobs.append(_Job(on_event, on_finished))
            return self.jobs[-1]

    class DiffusionAnomalyWidget(EngineJobWidget):
        jobTitle = "Anomaly segmentation"

        def __init__(self) -> None:
            EngineJobWidget.__init__(self)
            self.finished: list = []

        def createLogic(self):
            return Logic()

        def setDefaults(self, parameterNode) -> None:
            parameterNode.input = parameterNode.input or "first volume"

        def updateGUI(self, caller=None, event=None) -> None:
            self.ui.applyButton.enabled = not self.running
            self.ui.cancelButton.enabled = self.running

        def onApplyButton(self) -> None:
            self.rememberModel("/models/mine")
            if self.ensureDependencies():
                self.startJob(lambda **callbacks: self.logic.process(**callbacks))

        def onJobFinished(self, results) -> None:
            self.finished.append(results)

    widget = DiffusionAnomalyWidget()
    widget.setup()
    return widget, node


def test_apply_progress_and_success(gui, monkeypatch):
    import DiffusionAnomalyLib.dependencies as dependencies

    monkeypatch.setattr(dependencies, "ensure_dependencies", lambda module: True)
    widget, node = _panel(gui)
    assert node.input == "first volume" and widget.ui.applyButton.enabled
    widget.onApplyButton()
    assert gui.settings["DiffusionAnomaly/ModelFolder"] == "/models/mine"
    job = widget.logic.jobs[-1]
    assert widget.running and widget._timer.active and gui.ui.progressBar.visible and gui.ui.cancelButton.enabled
    widget._poll()
    assert job.polled == 1
    job.progress = SimpleNamespace(fraction=0.42, text="slice 20 of 48")
    job.on_event({"event": "warning", "message": "CPU only"})
    assert gui.ui.progressBar.value == 42 and gui.ui.statusLabel.text == "slice 20 of 48"
    assert gui.status == ["CPU only"]
    results = SimpleNamespace(summary=lambda: "12.2 mL", warnings=["few brain slices"])
    job.finish(results=results)
    assert widget.finished == [results] and not widget.running and not widget._timer.active
    assert gui.ui.statusLabel.text == "Done. 12.2 mL" and not gui.ui.progressBar.visible
    assert gui.warnings == [("Anomaly segmentation", "few brain slices")]


def test_cancel_and_failure_leave_the_panel_ready(gui, monkeypatch):
    import DiffusionAnomalyLib.dependencies as dependencies
    from DiffusionAnomalyLib.engine import EngineCancelled

    monkeypatch.setattr(dependencies, "ensure_dependencies", lambda module: True)
    widget, _ = _panel(gui)
    widget.onApplyButton()
    widget.onCancelButton()
    job = widget.logic.jobs[-1]
    assert job.cancelled == 1 and gui.ui.statusLabel.text == "Cancelling..."
    job.finish(error=EngineCancelled())
    assert gui.ui.statusLabel.text.startswith("Cancelled") and not widget.running and gui.ui.applyButton.enabled
    widget.onApplyButton()
    widget.logic.jobs[-1].finish(error=RuntimeError("out of memory"))
    assert gui.errors == [("Anomaly segmentation", "out of memory")] and widget.finished == []


def test_declined_dependencies_or_a_failed_start_run_nothing(gui, monkeypatch):
    import DiffusionAnomalyLib.dependencies as dependencies

    monkeypatch.setattr(dependencies, "ensure_dependencies", lambda module: False)
    widget, _ = _panel(gui)
    widget.onApplyButton()
    assert not widget.logic.jobs and not widget.running
    monkeypatch.setattr(dependencies, "ensure_dependencies", lambda module: True)
    widget, _ = _panel(gui, fail_start=True)
    with pytest.raises(RuntimeError, match="could not start"):
        widget.onApplyButton()
    assert not gui.ui.progressBar.visible and not widget.running and not widget._timer.active

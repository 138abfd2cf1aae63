"""One module run: input nodes -> temporary files -> engine subprocess -> results into the scene (both modules).

The scene is touched only after the engine succeeded, in one step on the caller's thread; a failed or cancelled run
leaves it exactly as it was. The temporary folder is removed at the end (unless ``keep_files``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engine import EngineJob, UserError
from .nodes import write_volume

InputFiles = list[Path]
ArgsBuilder = Callable[[InputFiles, Path], list[str]]  # (input files, work folder) -> engine arguments
ResultsApplier = Callable[[Path, dict[str, str]], Any]  # (work folder, engine outputs) -> results object


def work_folder(prefix: str) -> Path:
    """A fresh temporary folder (in Slicer's temporary directory when running inside Slicer)."""
    base = None
    try:
        import slicer

        if hasattr(slicer, "app"):
            base = slicer.app.temporaryPath
    except ImportError:
        pass
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=base))


def check_volumes(nodes: Sequence[Any]) -> list[Any]:
    """The selected input volumes, with a clear message for a missing or empty one."""
    volumes = [node for node in nodes if node is not None]
    if not volumes:
        raise UserError("No input volume is selected. Select the MRI volume to process under Inputs.")
    for node in volumes:
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise UserError(f"{node.GetName()} is not a scalar (grey-level) volume. Select an MRI volume.")
        if node.GetImageData() is None:
            raise UserError(f"Volume {node.GetName()} has no voxels. Load the image again.")
        if node.GetImageData().GetNumberOfScalarComponents() != 1:
            raise UserError(f"Volume {node.GetName()} has several components per voxel. Select a single-channel "
                            f"volume.")
    if len({node.GetID() for node in volumes}) != len(volumes):
        raise UserError("The same volume is selected twice. Select one volume per modality.")
    return volumes


class SceneJob:
    """An engine run whose results go into the scene when it succeeds.

    ``poll()`` (from a GUI timer) or ``wait()``; afterwards ``results`` (what ``apply_results`` returned) or
    ``error`` (UserError-like message, EngineFailed, EngineCancelled or an exception while applying results).
    on_finished(job) is called once, on the polling thread.
    """

    def __init__(self, module: str, command: str, inputs: Sequence[Any], build_args: ArgsBuilder,
                 apply_results: ResultsApplier, *, on_event: Callable[[dict], None] | None = None,
                 on_log: Callable[[str], None] | None = None, on_finished: Callable[[SceneJob], None] | None = None,
                 keep_files: bool = False, python: str | None = None):
        self.workdir = work_folder(module)
        self.keep_files = keep_files
        self.results: Any = None
        self.error: Exception | None = None
        self._apply_results, self._on_finished = apply_results, on_finished
        self._done = False
        try:
            files = [write_volume(node, self.workdir / f"input{index}.nrrd") for index, node in enumerate(inputs)]
            args = build_args(files, self.workdir)
        except BaseException:
            self._cleanup()
            raise
        self.engine = EngineJob(command, args, self.workdir / "engine", on_event=on_event, on_log=on_log,
                                python=python)

    def start(self) -> SceneJob:
        try:
            self.engine.start()
        except OSError as error:
            self._cleanup()
            raise UserError(f"The engine could not be started ({error}). Check the Python executable "
                            f"{self.engine.argv[0]}.") from error
        return self

    @property
    def progress(self) -> Any:
        return self.engine.progress

    @property
    def cancelled(self) -> bool:
        return self.engine.cancelled

    def cancel(self) -> None:
        self.engine.cancel()

    def poll(self) -> bool:
        if self._done:
            return True
        if not self.engine.poll():
            return False
        self._done = True
        try:
            if self.engine.error is not None:
                self.error = self.engine.error
            else:
                self.results = self._apply_results(self.workdir, self.engine.outputs or {})
        except Exception as error:  # a result that cannot be shown must not leave the GUI busy
            self.error = error
        finally:
            self._cleanup()
        if self._on_finished is not None:
            self._on_finished(self)
        return True

    def wait(self, timeout: float | None = None) -> SceneJob:
        while not self.poll():
            self.engine.wait(timeout=timeout)
        return self

    def result_or_raise(self) -> Any:
        self.wait()
        if self.error is not None:
            raise self.error
        return self.results

    def _cleanup(self) -> None:
        if not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)


def read_report(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))

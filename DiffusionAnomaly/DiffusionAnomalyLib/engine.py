"""Run the diffusion engine as a subprocess: start, stream its JSON-lines progress, cancel, collect the result.

Shared by the DiffusionAnomaly and DiffusionAging modules (DiffusionAging imports it from here). Qt-free and
stdlib-only, so it works in the Slicer GUI (polled from a QTimer), in the Slicer Python console (blocking) and in
plain Python with the slicer-core wheel (tests).

The engine's protocol (Engine/src/diffusion_engine/progress.py): with ``--progress json`` every stdout line is one
JSON event (start, progress, end, warning, error, result, ...); ``--cancel-file F`` makes it stop at its next step
when F exists, writing nothing partial (exit code 130); exit code 2 is bad input with a message naming the fix.
Torch is imported only in the subprocess, so the GUI process never loads it and never freezes.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ENGINE_PACKAGE = "diffusion_engine"
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130
CANCEL_GRACE_S = 5.0  # after the cancel file, time for the engine to stop at its next step before SIGTERM
TERMINATE_GRACE_S = 3.0  # after SIGTERM (the engine turns it into a clean cancel), time before SIGKILL
STDERR_LINES_KEPT = 40


class UserError(Exception):
    """A problem the user can fix (no input, wrong model, ...); the message says what to do."""


class EngineFailed(Exception):
    """The engine ran and reported an error (its message names the file at fault and the fix)."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


class EngineCancelled(Exception):
    """The run was cancelled; nothing was written to the scene."""


# ------------------------------------------------------------------------------------------------ locating


def _source_engine_dirs() -> list[Path]:
    """Folders that may hold a bundled copy of the engine package, in order of preference."""
    here = Path(__file__).resolve().parent  # .../DiffusionAnomalyLib
    return [
        here.parent,  # installed extension: <qt-scripted-modules>/diffusion_engine next to DiffusionAnomalyLib
        here.parent.parent / "Engine" / "src",  # source checkout: <repo>/DiffusionAnomaly/DiffusionAnomalyLib
    ]


def engine_package_dir() -> Path | None:
    """The folder that contains the ``diffusion_engine`` package (without importing it, so torch stays unloaded)."""
    for folder in _source_engine_dirs():
        if (folder / ENGINE_PACKAGE / "__init__.py").is_file():
            return folder
    spec = importlib.util.find_spec(ENGINE_PACKAGE)
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    return None


def bundled_model_dir(name: str) -> Path | None:
    """Where the engine keeps a bundled model (e.g. "anomaly-demo"), or None if the engine is not found."""
    folder = engine_package_dir()
    return None if folder is None else folder / ENGINE_PACKAGE / "data" / "models" / name


def python_executable() -> str:
    """PythonSlicer inside Slicer (same site-packages, no GUI), this interpreter elsewhere.

    DIFFUSION_ENGINE_PYTHON overrides both (e.g. a separate virtual environment with a CUDA build of torch).
    """
    override = os.environ.get("DIFFUSION_ENGINE_PYTHON")
    if override:
        return override
    try:
        import slicer

        in_slicer_app = hasattr(slicer, "app")
    except ImportError:
        in_slicer_app = False
    if in_slicer_app:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def engine_environment() -> dict[str, str]:
    """The subprocess environment: the bundled engine on PYTHONPATH when it is not installed as a package."""
    env = dict(os.environ)
    folder = engine_package_dir()
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are written
    return env


def engine_command(command: str, args: Sequence[str], cancel_file: Path, python: str | None = None) -> list[str]:
    """The argument list (never a shell string) that runs one engine subcommand with JSON progress."""
    return [python or python_executable(), "-m", ENGINE_PACKAGE, "--progress", "json", "--cancel-file",
            str(cancel_file), command, *[str(a) for a in args]]


# ------------------------------------------------------------------------------------------------ progress


def parse_event(line: str) -> dict[str, Any] | None:
    """One engine stdout line -> its event dict, or None for a line that is not a JSON event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def _duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class ProgressTracker:
    """Turns progress events into a fraction and a line of text with the time left, per engine task."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._started: dict[str, tuple[float, int]] = {}
        self.fraction: float | None = None
        self.text = "starting the engine"

    def update(self, event: dict[str, Any]) -> bool:
        """Digest one event; True if the fraction or text changed."""
        kind, task = event.get("event"), str(event.get("task") or "working")
        if kind == "start":
            self._started[task] = (self._clock(), 0)
            self.fraction, self.text = 0.0, task
            return True
        if kind != "progress":
            return False
        done, total = event.get("done"), event.get("total")
        if not isinstance(done, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
            return False
        started, done_at_start = self._started.setdefault(task, (self._clock(), int(done)))
        self.fraction = min(1.0, max(0.0, done / total))
        text = f"{task}: {int(done)}/{int(total)}"
        if event.get("message"):
            text += f" ({event['message']})"
        elapsed, progressed = self._clock() - started, done - done_at_start
        if progressed > 0 and done < total:
            text += f", about {_duration_text(elapsed / progressed * (total - done))} left"
        self.text = text
        return True


# ------------------------------------------------------------------------------------------------ the job


def _terminate_tree(process: subprocess.Popen) -> None:
    """Ask the engine and its children to stop (the engine turns SIGTERM / CTRL_BREAK into a clean cancel)."""
    if process.poll() is not None:
        return
    try:
        if os.name == "nt":
            process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the group id is its pid
    except (ProcessLookupError, OSError):
        pass


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill the engine and everything it started, now."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        return
    with contextlib.suppress(ProcessLookupError, OSError):
        os.killpg(process.pid, signal.SIGKILL)


class EngineJob:
    """One engine subprocess. Call ``poll()`` regularly (GUI timer) or ``wait()``; callbacks run in that thread.

    on_event(event) gets every JSON event; on_log(line) every stderr line and non-JSON stdout line.
    After it finishes: ``outputs`` (the result event's paths) on success, else ``error`` (an exception).
    """

    def __init__(self, command: str, args: Sequence[str], workdir: str | os.PathLike[str], *,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_log: Callable[[str], None] | None = None, python: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.workdir = Path(workdir)
        self.cancel_file = self.workdir / "cancel"
        self.argv = engine_command(command, args, self.cancel_file, python)
        self.on_event, self.on_log = on_event, on_log
        self.progress = ProgressTracker(clock)
        self.warnings: list[str] = []
        self.outputs: dict[str, str] | None = None
        self.summary: dict[str, Any] = {}
        self.error: Exception | None = None
        self.returncode: int | None = None
        self._clock = clock
        self._events: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._error_message: str | None = None
        self._cancel_requested_at: float | None = None
        self._terminated_at: float | None = None
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []

    # -------------------------------------------------------------------------------------------- control

    def start(self) -> EngineJob:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cancel_file.unlink(missing_ok=True)
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True  # its own process group, so cancel can kill the whole tree
        self._process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, env=engine_environment(), cwd=self.workdir,
                                         text=True, encoding="utf-8", errors="replace", bufsize=1, **options)
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, name), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def cancel(self) -> None:
        """Ask the engine to stop (cancel file); poll() escalates to SIGTERM, then SIGKILL, if it does not."""
        if self.finished or self._cancel_requested_at is not None:
            return
        self.cancel_file.write_text("cancel", encoding="utf-8")
        self._cancel_requested_at = self._clock()

    def kill(self) -> None:
        """Stop the engine and its children now (e.g. when Slicer closes)."""
        if self._process is not None:
            if self._cancel_requested_at is None:
                self._cancel_requested_at = self._clock()
            _kill_tree(self._process)
            self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, EngineCancelled)

    # -------------------------------------------------------------------------------------------- polling

    def poll(self) -> bool:
        """Deliver pending events, escalate a pending cancel, and return True once the job has finished."""
        if self._process is None:
            raise RuntimeError("the engine job was not started")
        if self.finished:
            return True
        self._escalate_cancel()
        self._drain()
        if self._process.poll() is None:
            return False
        for reader in self._readers:
            reader.join(timeout=5)
        self._drain()
        self._finish(self._process.returncode)
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> EngineJob:
        """Block until the job finishes (console and tests); cancels it if ``timeout`` seconds pass."""
        deadline = None if timeout is None else self._clock() + timeout
        while not self.poll():
            if deadline is not None and self._clock() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        return self

    def _escalate_cancel(self) -> None:
        if self._cancel_requested_at is None or self._process.poll() is not None:
            return
        now = self._clock()
        if self._terminated_at is None and now - self._cancel_requested_at > CANCEL_GRACE_S:
            _terminate_tree(self._process)
            self._terminated_at = now
        elif self._terminated_at is not None and now - self._terminated_at > TERMINATE_GRACE_S:
            _kill_tree(self._process)

    def _read(self, stream: Any, name: str) -> None:
        for line in iter(stream.readline, ""):
            self._events.put((name, line.rstrip("\r\n")))
        stream.close()

    def _drain(self) -> None:
        while True:
            try:
                name, line = self._events.get_nowait()
            except queue.Empty:
                return
            event = parse_event(line) if name == "stdout" else None
            if event is None:
                if name == "stderr":
                    self._stderr.append(line)
                if self.on_log is not None and line:
                    self.on_log(line)
                continue
            self._handle(event)

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "result":
            self.outputs = {str(k): str(v) for k, v in (event.get("outputs") or {}).items()}
        elif kind == "error":
            self._error_message = str(event.get("message") or "")
        elif kind == "warning":
            self.warnings.append(str(event.get("message") or ""))
        elif kind == "summary":
            self.summary = {k: v for k, v in event.items() if k != "event"}
        self.progress.update(event)
        if self.on_event is not None:
            self.on_event(event)

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        if returncode == 0 and self.outputs is not None:
            return
        if self._cancel_requested_at is not None or returncode == EXIT_CANCELLED:
            self.error = EngineCancelled("cancelled; the scene was left as it was")
            return
        message = self._error_message or "\n".join(self._stderr).strip() or f"the engine exited with code {returncode}"
        self.error = EngineFailed(message, returncode)


def run_engine(command: str, args: Sequence[str], workdir: str | os.PathLike[str], **options: Any) -> EngineJob:
    """Start an engine job and wait for it (raises the job's error)."""
    job = EngineJob(command, args, workdir, **options).start().wait()
    if job.error is not None:
        raise job.error
    return job


_PROBE = ("import json, torch\n"
          "cuda = torch.cuda.is_available()\n"
          "info = {'torch': torch.__version__, 'cuda': cuda}\n"
          "if cuda:\n"
          "    p = torch.cuda.get_device_properties(0)\n"
          "    info.update(name=p.name, memory_gb=round(p.total_memory / 2**30, 1))\n"
          "print(json.dumps(info))\n")


def probe_device(python: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """What PyTorch sees in the engine's Python (GPU name and memory), without importing torch here."""
    completed = subprocess.run([python or python_executable(), "-c", _PROBE], capture_output=True, text=True,
                               timeout=timeout, env=engine_environment(), check=False)
    lines = [parse_event('{"event": "probe", "info": ' + line + "}") for line in completed.stdout.splitlines()
             if line.startswith("{")]
    if completed.returncode != 0 or not lines or lines[-1] is None:
        raise EngineFailed(f"PyTorch could not be started: {completed.stderr.strip()[-500:]}", completed.returncode)
    return lines[-1]["info"]

"""The CLI front-end: help, machine-readable progress, cancellation, error reporting."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from diffusion_engine import cli, progress
from diffusion_engine.errors import Cancelled, InputError
from diffusion_engine.fileio import atomic_path, plain_permissions


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name in cli.COMMAND_MODULES:
        assert name.replace("_", "-") in text


def test_import_does_not_load_torch() -> None:
    # The Slicer GUI process imports the package; torch must only load in the engine subprocess.
    code = "import sys, diffusion_engine, diffusion_engine.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_module_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "diffusion_engine", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "diffusion-engine" in result.stdout


def test_json_progress_events_and_cancel_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cancel = tmp_path / "cancel"
    progress.configure(json_lines=True, cancel_file=str(cancel))
    try:
        with progress.Progress(3, "demo") as bar:
            bar.update(message="one")
            cancel.touch()
            with pytest.raises(Cancelled):
                bar.update()
    finally:
        progress.configure(json_lines=False, cancel_file="")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0] == {"event": "start", "task": "demo", "total": 3}
    assert events[1]["event"] == "progress" and events[1]["done"] == 1 and events[1]["message"] == "one"
    assert events[-1] == {"event": "end", "task": "demo"}


def test_errors_become_exit_code_and_json_event(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def failing(args: object) -> dict[str, str]:
        raise InputError("image is 2D", path="/data/x.nii.gz", fix="pass a 3D volume")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["--progress", "json", "info", "whatever"])
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    args.run = failing
    try:
        assert cli.main([]) == 2
    finally:
        progress.configure(json_lines=False)
    captured = capsys.readouterr()
    event = json.loads(captured.out.splitlines()[-1])
    assert event["event"] == "error" and event["exit_code"] == 2
    assert event["message"] == "/data/x.nii.gz: image is 2D. Pass a 3D volume."
    assert "error: /data/x.nii.gz: image is 2D" in captured.err


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "label.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list((tmp_path / "out").iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list((tmp_path / "out").iterdir())) == 1


def test_atomic_outputs_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    with atomic_path(tmp_path / "atomic.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "atomic.json").stat().st_mode == plain.stat().st_mode
    (tmp_path / "plain").mkdir()
    staged = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as model and cohort folders are built
    plain_permissions(staged)
    assert staged.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_input_error_message_format() -> None:
    error = InputError("has NaN voxels.", path="a.nii", fix="replace them")
    assert str(error) == "a.nii: has NaN voxels. Replace them."

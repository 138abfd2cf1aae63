"""The ``diffusion-engine`` command: thin argparse front-ends over the Python API.

Each subcommand lives in ``commands/<name>.py`` and exposes ``register(subparsers)``; its handler is set
with ``parser.set_defaults(run=handler)`` and returns a dict of output paths, reported as the final
``result`` event. Command modules import torch and friends inside their handlers so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__, progress
from .errors import EngineError

COMMAND_MODULES = ("phantoms", "train", "calibrate", "anomaly", "import_checkpoint", "info", "evaluate", "restore",
                   "aging")

DESCRIPTION = """\
Generative diffusion models for brain MRI, on the local CPU or GPU.

Every command reads and writes NIfTI/NRRD (and reads DICOM series), maps results back to the input's
exact geometry, shows a progress bar, and with --progress json prints one JSON event per line for programs
such as the 3D Slicer modules. Errors name the file at fault and the fix; the exit code is 2 for bad
input and 130 when cancelled.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-engine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                        help="progress display: a bar on stderr (default), JSON lines on stdout, or nothing")
    parser.add_argument("--cancel-file", metavar="PATH",
                        help="stop cleanly (exit 130, no partial output) as soon as this file exists")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was typed, for records such as a model's
    progress.configure(json_lines=args.progress == "json", quiet=args.progress == "none",
                       cancel_file=args.cancel_file)
    progress.install_signal_handlers()
    try:
        outputs = args.run(args) or {}
    except EngineError as error:
        progress.emit("error", message=str(error), exit_code=error.exit_code)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    progress.emit("result", outputs=outputs)
    for label, value in outputs.items():
        if args.progress != "json":
            print(f"{label}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

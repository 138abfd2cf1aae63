"""All-or-nothing cohort folders: build in a hidden sibling folder, rename into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..fileio import plain_permissions
from .anatomy import Anatomy

COHORT_MARKER = "manifest.csv"  # an earlier cohort has one; --overwrite replaces nothing else


def check_output_folder(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a file, a non-empty folder (unless ``overwrite`` and it holds an earlier cohort)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError("the output path is a file", path=out, fix="give a folder path for the cohort")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError("the output folder is not empty", path=out,
                             fix="choose a new or empty folder, or pass --overwrite (overwrite=True) to replace "
                                 "an earlier cohort")
        if not (out / COHORT_MARKER).is_file():
            raise InputError(f"the output folder is not empty and holds no {COHORT_MARKER}, so it does not look "
                             "like an earlier cohort and will not be replaced", path=out,
                             fix="choose a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the parent folder ({error.strerror})", path=out.parent,
                         fix="choose a writable location") from None
    return out


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty hidden folder next to ``out``; on success it replaces ``out``, on any failure it vanishes."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield work
        plain_permissions(work)
        _move_into_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already after a successful move


def _move_into_place(work: Path, out: Path) -> None:
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, previous)
    try:
        os.replace(work, out)
    except OSError:
        if previous is not None:
            os.replace(previous, out)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def write_volume(anatomy: Anatomy, array: np.ndarray, path: Path) -> Path:
    """NIfTI in the template's physical frame (compressed); float32 images, uint8 masks."""
    sitk.WriteImage(anatomy.image(array), str(path), True)
    return path

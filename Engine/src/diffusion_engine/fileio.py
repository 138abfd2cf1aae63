"""Atomic output files: a reader never sees a half-written result, and a failed run leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz``, ``.nrrd``, ``.json``) because writers such as
    SimpleITK choose the format from the extension.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix="".join(final.suffixes) or ".tmp",
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            plain_permissions(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def plain_permissions(path: Path) -> None:
    """Give a file or folder made by tempfile (0600 / 0700) the permissions a plain open() or mkdir() would."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def results_folder(path: str | os.PathLike[str]) -> Path:
    """The folder an evaluation writes its results into, created when missing."""
    from .errors import InputError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder", path=folder, fix="choose an output folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder

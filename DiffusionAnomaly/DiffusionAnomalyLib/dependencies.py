"""First-run installation of what the engine needs, inside the Slicer application (shared by both modules).

torch comes from the PyTorch extension (PyTorchUtils picks the build that fits the GPU driver); the other engine
packages are installed with slicer.pydeps.pip_ensure (Slicer >= 5.11) or slicer.util.pip_install, never touching
Slicer's own numpy and SimpleITK. One confirmation covers both. Checks use package metadata only, so nothing heavy
is imported into the GUI process.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
SLICER_PROVIDED = ["numpy", "SimpleITK", "torch"]  # never replaced by a transitive dependency
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9.]*))?")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def missing_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines ("name>=version") not satisfied in this Python environment."""
    missing = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _REQUIREMENT.match(line.split("#", 1)[0])
        if not match:
            continue
        name, minimum = match.groups()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line.strip())
            continue
        if minimum and _version_tuple(installed) < _version_tuple(minimum):
            missing.append(line.strip())
    return missing


def torch_installed() -> bool:
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def ensure_dependencies(requester: str) -> bool:
    """Install what is missing after one confirmation; True when everything is in place (Slicer application only)."""
    import slicer

    missing = missing_requirements()
    need_torch = not torch_installed()
    if not missing and not need_torch:
        return True
    parts = (["PyTorch (through the PyTorch extension, matched to your GPU driver)"] if need_torch else []) + missing
    if not slicer.util.confirmOkCancelDisplay(
            f"{requester} runs a generative diffusion model and needs these Python packages, which are not "
            f"installed yet:\n\n  " + "\n  ".join(parts) + "\n\nInstall them now? This is done once, needs an "
            "internet connection and can take several minutes (PyTorch is large).",
            windowTitle=f"{requester}: install dependencies"):
        return False
    with _WaitCursor():
        if need_torch and not _install_torch():
            return False
        if missing:
            _install_packages(missing, requester)
    return not missing_requirements() and torch_installed()


class _WaitCursor:
    def __enter__(self) -> _WaitCursor:
        import qt
        import slicer

        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        return self

    def __exit__(self, *exc: object) -> None:
        import slicer

        slicer.app.restoreOverrideCursor()


def _install_torch() -> bool:
    import slicer

    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay("This module needs the PyTorch extension. Install 'PyTorch' with the Extensions "
                                 "Manager, restart Slicer and press Apply again.")
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
    if torch is None:
        slicer.util.errorDisplay("PyTorch could not be installed. Open the 'PyTorch Utils' module to install it "
                                 "manually (choose the computation backend that matches your GPU, or cpu).")
        return False
    return True


def _install_packages(requirements: list[str], requester: str) -> None:
    import slicer

    try:
        import slicer.pydeps as pydeps
    except ImportError:
        pydeps = None
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):
        pydeps.pip_ensure(pydeps.load_requirements(str(REQUIREMENTS)), skip_packages=SLICER_PROVIDED,
                          requester=requester)
    else:  # Slicer < 5.11: only the missing packages, so satisfied ones (numpy, SimpleITK) stay as they are
        slicer.util.pip_install(requirements)

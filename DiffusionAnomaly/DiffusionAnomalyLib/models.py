"""Model folders as the modules see them: which one to use, and what the panel needs from its model.json.

Only what the GUI needs before starting a run is read here (kind and input modalities, to label and count the
input selectors and fail early with a clear message); loading and validating the model is the engine's job.
Shared by both modules. Stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .engine import UserError, bundled_model_dir

CONFIG_NAME = "model.json"
DEMO_MODELS = {"anomaly": "anomaly-demo", "aging": "aging-demo"}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    kind: str
    modalities: tuple[str, ...]
    calibrated: bool
    bundled: bool  # the demo model that ships with the engine

    def describe(self) -> str:
        where = "bundled demo model" if self.bundled else str(self.path)
        inputs = ", ".join(m.upper() for m in self.modalities) or "?"
        state = "" if self.calibrated or self.kind != "anomaly" else "; not calibrated"
        return f"{where} ({self.kind}; inputs: {inputs}{state})"


def resolve_model(path: str | None, kind: str) -> ModelInfo:
    """The model folder to run: ``path``, or the bundled demo model when empty. Raises UserError with the fix."""
    bundled = not (path or "").strip()
    if bundled:
        demo = bundled_model_dir(DEMO_MODELS[kind])
        if demo is None or not (demo / CONFIG_NAME).is_file():
            raise UserError(f"The bundled demo {kind} model is not installed with this version of the extension. "
                            f"Choose a model folder (one that contains {CONFIG_NAME}) under Model.")
        folder = demo
    else:
        folder = Path(path).expanduser()
        if folder.is_file() and folder.name == CONFIG_NAME:
            folder = folder.parent
        if not folder.exists():
            raise UserError(f"Model folder {folder} was not found. Choose an existing model folder (one that "
                            f"contains {CONFIG_NAME}), or leave Model empty to use the bundled demo model.")
        if not (folder / CONFIG_NAME).is_file():
            raise UserError(f"{folder} is not a model folder: it has no {CONFIG_NAME}. Choose the folder written by "
                            f"`diffusion-engine train {kind}` (or import a checkpoint with "
                            f"`diffusion-engine import-checkpoint`).")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / CONFIG_NAME} cannot be read ({error}). Choose another model folder.") from None
    found = config.get("kind")
    if found != kind:
        raise UserError(f"{folder} is a model for {found!r}, not for {kind!r}. Choose a {kind} model folder.")
    modalities = (config.get("preprocessing") or {}).get("modalities") or []
    return ModelInfo(path=folder.resolve(), kind=kind, modalities=tuple(str(m) for m in modalities),
                     calibrated=bool(config.get("calibration")), bundled=bundled)


def check_input_count(model: ModelInfo, given: int) -> None:
    """One input volume per modality of the model, in its order."""
    needed = len(model.modalities)
    if needed and given != needed:
        names = ", ".join(m.upper() for m in model.modalities)
        raise UserError(f"The model needs {needed} input volume{'s' if needed > 1 else ''} ({names}, in this "
                        f"order) but {given} {'was' if given == 1 else 'were'} selected. Select one volume per "
                        f"modality.")

"""The demo data shipped inside the package: one phantom case per method, never seen in training or calibration.

    from diffusion_engine import segment_anomalies
    from diffusion_engine.demo import demo_case
    result = segment_anomalies("demo", demo_case("anomaly"))

On the command line the word ``demo`` stands for these images: ``diffusion-engine anomaly --input demo ...``.
Each folder's ``case.json`` records how the case was made and which files hold which modality.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo"
DEMO_WORD = "demo"


def demo_description(kind: str) -> dict:
    """The ``case.json`` of the demo case for ``kind`` ("anomaly", "aging", ...)."""
    path = DEMO_DATA / kind / "case.json"
    if not path.is_file():
        available = sorted(p.parent.name for p in DEMO_DATA.glob("*/case.json"))
        raise InputError(f"there is no bundled {kind} demo case", path=path,
                         fix=f"use one of: {', '.join(available) or 'none installed'}")
    return json.loads(path.read_text(encoding="utf-8"))


def demo_case(kind: str, modalities: tuple[str, ...] | list[str] | None = None) -> dict[str, Path]:
    """{modality: image path} of the demo case, in ``modalities`` order (default: every image of the case)."""
    images = demo_description(kind)["images"]
    wanted = list(images) if modalities is None else list(modalities)
    missing = [m for m in wanted if m not in images]
    if missing:
        raise InputError(f"the {kind} demo case has no {', '.join(missing)} image (it has {', '.join(images)})",
                         path=DEMO_DATA / kind, fix="give your own images with --input")
    return {m: DEMO_DATA / kind / images[m] for m in wanted}


def ground_truth(kind: str) -> Path | None:
    """The demo case's reference mask (lesions for "anomaly"), if it has one."""
    name = demo_description(kind).get("mask")
    return None if name is None else DEMO_DATA / kind / name

"""Store a trained model bundle as a bundled demo model: the same bundle with float16 weights (half the size in
git; they load as float32) and the command that trained it.

    python Engine/evaluations/store_demo_model.py TRAINED_MODEL TARGET_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffusion_engine.nets.bundle import load_bundle, save_bundle


def store(source: Path, target: Path) -> Path:
    bundle = load_bundle(source, device="cpu")
    config = bundle.config
    training = {**(config.get("training") or {}), "stored_as": "float16 copy of the trained float32 weights"}
    return save_bundle(target, {name: net.half() for name, net in bundle.networks.items()}, kind=bundle.kind,
                       schedule=config["schedule"], preprocessing=config["preprocessing"], labels=config["labels"],
                       calibration=config.get("calibration"), training=training)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(store(Path(sys.argv[1]), Path(sys.argv[2])))

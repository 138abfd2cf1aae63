"""diffusion_engine: generative diffusion models for brain MRI (anomaly segmentation, aging, restoration).

Importing the package is cheap and has no side effects: torch and SimpleITK load only when an API that
needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first access)
_LAZY = {
    "load_model": "nets.bundle",
    "load_bundle": "nets.bundle",
    "save_bundle": "nets.bundle",
    "ModelBundle": "nets.bundle",
    "update_bundle_config": "nets.bundle",
    "import_guided_diffusion": "nets.bundle",
    "UNetModel": "nets.unet",
    "EncoderUNetModel": "nets.unet",
    "build_network": "nets.unet",
    "build_preset": "nets.presets",
    "read_image": "volume",
    "read_case": "volume",
    "write_image": "volume",
    "to_model_slices": "volume",
    "from_model_slices": "volume",
    "to_model_grid": "volume",
    "SliceGeometry": "volume",
    "Normalisation": "volume",
    "restore_intensity": "volume",
    "load_slices": "datasets",
    "segment_anomalies": "anomaly.pipeline",
    "AnomalySettings": "anomaly.pipeline",
    "calibrate_model": "anomaly.calibrate",
    "train_anomaly_model": "anomaly.training",
    "age_counterfactual": "aging.pipeline",
    "AgingSettings": "aging.pipeline",
    "train_aging_model": "aging.training",
    "resolve_device": "devices",
    "make_anomaly_cohort": "phantoms",
    "make_aging_cohort": "phantoms",
    "read_manifest": "manifest",
    "EngineError": "errors",
    "InputError": "errors",
    "ModelError": "errors",
    "Cancelled": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

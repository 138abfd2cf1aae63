"""Named network configurations (guided-diffusion constructor kwargs) for training new models.

``in_channels``/``out_channels`` (one per MR modality) and ``num_classes`` (AnoFPDM: 0 = healthy slice,
1 = unhealthy; -1 at run time is the null label) are defaults: override them for the data at hand. A trained
model carries its own config in its bundle, so inference never needs these presets.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .unet import build_network

__all__ = ["PRESETS", "build_network", "build_preset", "preset_config"]

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-trainable epsilon UNet for tests and the bundled demo model
    "tiny": {
        "class": "UNetModel",
        "description": "64x64 epsilon UNet, width 32, about 1.6M parameters; trains on a laptop CPU",
        "config": {
            "image_size": 64, "in_channels": 1, "model_channels": 32, "out_channels": 1, "num_res_blocks": 1,
            "attention_resolutions": [8], "dropout": 0.0, "channel_mult": [1, 2, 2, 2], "num_classes": 2,
            "num_heads": 1, "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": False,
            "use_new_attention_order": False,
        },
    },
    # Restoration is local: with attention only in the middle block (guided-diffusion always has that one) the
    # UNet trains on small crops (four times cheaper per step at 32 px) and applies to slices of any size.
    "tiny-conv": {
        "class": "UNetModel",
        "description": "epsilon UNet without attention outside its middle block, width 32, about 1.5M parameters; "
                       "trains on crops",
        "config": {
            "image_size": 64, "in_channels": 1, "model_channels": 32, "out_channels": 1, "num_res_blocks": 1,
            "attention_resolutions": [], "dropout": 0.0, "channel_mult": [1, 2, 2, 2], "num_classes": None,
            "num_heads": 1, "num_head_channels": -1, "use_scale_shift_norm": True, "resblock_updown": False,
            "use_new_attention_order": False,
        },
    },
    "small": {
        "class": "UNetModel",
        "description": "64x64 epsilon UNet, width 64, about 10M parameters; CPU training in hours",
        "config": {
            "image_size": 64, "in_channels": 1, "model_channels": 64, "out_channels": 1, "num_res_blocks": 2,
            "attention_resolutions": [4, 8], "dropout": 0.1, "channel_mult": [1, 2, 2, 2], "num_classes": 2,
            "num_heads": 4, "num_head_channels": -1, "use_scale_shift_norm": True, "resblock_updown": False,
            "use_new_attention_order": False,
        },
    },
    # AnoFPDM's BraTS network (authors' code): attention at 32/16/8 pixels of a 128 image = factors 4, 8, 16.
    # Scale-shift norm with convolutional resampling (resblock_updown False) is the combination that gives the
    # published size: 96.3M parameters and 141 GFLOP per 128x128 evaluation (torch's FlopCounterMode).
    "paper": {
        "class": "UNetModel",
        "description": "AnoFPDM paper-scale 128x128 epsilon UNet, width 128, about 96M parameters (GPU training)",
        "config": {
            "image_size": 128, "in_channels": 4, "model_channels": 128, "out_channels": 4, "num_res_blocks": 2,
            "attention_resolutions": [4, 8, 16], "dropout": 0.1, "channel_mult": [1, 1, 2, 3, 4],
            "num_classes": 2, "num_heads": 4, "num_head_channels": -1, "use_scale_shift_norm": True,
            "resblock_updown": False, "use_new_attention_order": False,
        },
    },
    # ONLS age regressor R(x_t, t) on noisy slices; adaptive pooling accepts any slice size (e.g. 208x160)
    "regressor": {
        "class": "EncoderUNetModel",
        "description": "time-conditioned encoder for regression on noisy inputs (one output), about 0.6M parameters",
        "config": {
            "image_size": 64, "in_channels": 1, "model_channels": 32, "out_channels": 1, "num_res_blocks": 1,
            "attention_resolutions": [8], "dropout": 0.0, "channel_mult": [1, 2, 2, 2], "num_heads": 1,
            "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": False,
            "use_new_attention_order": False, "pool": "adaptive",
        },
    },
}


def preset_config(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """(class name, constructor kwargs) of a preset, with ``overrides`` applied (e.g. in_channels=2)."""
    if name not in PRESETS:
        raise KeyError(f"unknown network preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return preset["class"], {**copy.deepcopy(preset["config"]), **overrides}


def build_preset(name: str, **overrides: Any) -> nn.Module:
    """Build a freshly initialised network from a preset."""
    return build_network(*preset_config(name, **overrides))

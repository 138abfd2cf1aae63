"""What a trained restoration model is, and how it is saved in and read from a model bundle (kind "restore").

Networks (guided-diffusion UNets, stored as safetensors): ``eps`` always; ``schedule`` (m(x)) for CVDM's
pixel-wise schedule. CVDM's two monotone time networks and CVDM-simple's global m are a few hundred numbers that
bundles cannot store as networks (they hold UNets only), so they live in the ``calibration`` section as JSON
lists under "cvdm_schedule". ``labels`` records the task, the method and what the model was trained for
(noise range, super-resolution factors, condition channels), which inference checks its input against.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..nets.bundle import CONFIG_NAME, DEMO_NAMES, ModelBundle, for_inference, load_bundle, save_bundle
from ..schedule import Schedule
from ..volume import Normalisation
from .conditional import DEFAULT_TEMPERATURE, guided_eps
from .cvdm import LearnedSchedule

TASKS = ("denoise", "impute", "superres")
METHODS = ("ddpm", "conditional", "cvdm", "cvdm-simple", "cvdm-linear")
CVDM_KINDS = {"cvdm": "pixel", "cvdm-simple": "global", "cvdm-linear": "linear"}
NORMALISATION = Normalisation("onls")  # volume-level scaling: unlike per-slice min-max it is not moved by noise
DEMO_FOLDER = Path(__file__).resolve().parent.parent / "data" / "models"


def condition_channels(task: str) -> int:
    """Condition channels: the degraded slice, plus the observed-voxel mask for imputation."""
    return 2 if task == "impute" else 1


@dataclass
class RestoreModel:
    task: str
    method: str
    eps: nn.Module
    schedule: Schedule | None = None  # discrete schedule (ddpm, conditional)
    learned: LearnedSchedule | None = None  # CVDM schedule
    image_size: int = 64
    modality: str = "t1"
    info: dict[str, Any] = field(default_factory=dict)  # the bundle's labels section
    path: Path | None = None
    sampling_start: float = 1.0  # calibrated start of the sampling chain (1 = from pure noise, the papers' chain)

    @property
    def is_cvdm(self) -> bool:
        return self.method in CVDM_KINDS

    @property
    def native_resolution(self) -> bool:
        """Trained on crops: the model learned a local operation, so volumes are restored at their own pixel size
        rather than resampled to the training slice size."""
        return bool(self.info.get("crop"))

    @property
    def has_schedule_map(self) -> bool:
        """Only CVDM's pixel-wise schedule varies over the image (global and linear ones are one number)."""
        return self.learned is not None and self.learned.kind == "pixel"

    @property
    def probabilistic(self) -> bool:
        """Trained with the paper's p_cond(t) masking of the condition (conditional denoisers)."""
        return bool(self.info.get("probabilistic_conditioning"))

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", DEFAULT_TEMPERATURE))

    @property
    def enters_at_matched_step(self) -> bool:
        """Denoisers with a discrete schedule (DDPM, conditional DDPM) can take the noisy slice in at the step
        whose noise matches its own; CVDM's pixel-wise schedule has no single matching step."""
        return self.task == "denoise" and self.schedule is not None

    def denoiser_eps(self, noisy: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Noise prediction eps(x_t, t) for denoising ``noisy`` [B, 1, H, W]: the unconditional DDPM's, or the
        conditional model's p_cond-weighted blend of its conditioned and masked predictions."""
        if self.method == "ddpm":
            return self.eps
        return lambda x, t: guided_eps(self.eps, x, noisy, t, probabilistic=self.probabilistic,
                                       temperature=self.temperature)


def _tensor_lists(module: nn.Module) -> dict[str, Any]:
    return {name: value.detach().cpu().reshape(-1).tolist() for name, value in module.state_dict().items()
            if not name.startswith("pixel_net.")}


def save_restore_model(out: str | os.PathLike[str], model: RestoreModel, training: dict[str, Any]) -> Path:
    networks = {"eps": model.eps.cpu()}
    calibration: dict[str, Any] = {}
    if model.learned is not None:
        if model.learned.pixel_net is not None:
            networks["schedule"] = model.learned.pixel_net.cpu()
        calibration["cvdm_schedule"] = {"kind": model.learned.kind, "hidden": _hidden(model.learned),
                                        "tensors": _tensor_lists(model.learned)}
    preprocessing = {"modalities": [model.modality], "image_size": [model.image_size, model.image_size],
                     "normalisation": NORMALISATION.to_dict()}
    labels = {**model.info, "task": model.task, "method": model.method}
    return save_bundle(out, networks, kind="restore", schedule=model.schedule, preprocessing=preprocessing,
                       labels=labels, calibration=calibration, training=training)


def _hidden(schedule: LearnedSchedule) -> int:
    return 0 if schedule.kind == "linear" else int(schedule.tau_net.w2.numel())


def _learned_from_record(record: dict[str, Any], pixel_net: nn.Module | None, path: Path) -> LearnedSchedule:
    try:
        learned = LearnedSchedule(record["kind"], pixel_net, hidden=max(int(record["hidden"]), 1))
        state = learned.state_dict()
        tensors = {name: torch.tensor(values, dtype=state[name].dtype).reshape(state[name].shape)
                   for name, values in record["tensors"].items()}
        if pixel_net is not None:
            tensors.update({k: v for k, v in state.items() if k.startswith("pixel_net.")})
        learned.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ModelError(f"the CVDM schedule record is malformed ({error})", path=path,
                         fix="restore model.json from the original model folder") from error
    return learned.eval()


def demo_model_folder(task: str) -> Path:
    """Where the bundled demo model for ``task`` lives."""
    return DEMO_FOLDER / f"restore-{task}-demo"


def load_restore_model(path: str | os.PathLike[str] | None, *, task: str | None = None,
                       device: str | torch.device = "cpu") -> RestoreModel:
    """Load and check a restoration bundle; None or "demo" is the bundled demo model for ``task``."""
    if path in DEMO_NAMES:
        if task not in TASKS:
            raise ModelError("the demo restoration model depends on the task", fix=f"name one of {', '.join(TASKS)}")
        path = demo_model_folder(task)
        if not (path / CONFIG_NAME).is_file():
            raise ModelError(f"no demo {task} model is bundled with this installation", path=path,
                             fix=f"train one with `diffusion-engine train restore --task {task}` and pass --model")
    bundle: ModelBundle = for_inference(load_bundle(path, kind="restore", device=device))
    labels, config = bundle.config["labels"], bundle.config
    task, method = labels.get("task"), labels.get("method")
    if task not in TASKS or method not in METHODS:
        raise ModelError(f"unknown restoration task/method {task!r}/{method!r}", path=bundle.path,
                         fix=f"retrain with task one of {TASKS} and method one of {METHODS}")
    learned = None
    if method in CVDM_KINDS:
        record = config["calibration"].get("cvdm_schedule")
        if record is None:
            raise ModelError("a CVDM model without its learned schedule", path=bundle.path,
                             fix="copy the complete model folder")
        learned = _learned_from_record(record, bundle.networks.get("schedule"), bundle.path).to(device)
    elif bundle.config["schedule"] is None:
        raise ModelError("the model records no noise schedule", path=bundle.path, fix="retrain the model")
    preprocessing = config["preprocessing"]
    start = (config["calibration"] or {}).get("sampling_start", {}).get("value", 1.0)
    return RestoreModel(task=task, method=method, eps=bundle.networks["eps"], schedule=bundle.schedule(),
                        learned=learned, image_size=int(preprocessing["image_size"][0]),
                        modality=preprocessing["modalities"][0], info=dict(labels), path=bundle.path,
                        sampling_start=float(start))

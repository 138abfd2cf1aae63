"""One training loop for every model kind: EMA weights, resumable checkpoints, progress with the loss.

The loop knows nothing about diffusion: a method supplies ``loss_fn(network, batch) -> loss`` and a batch
sampler. Checkpoints are safetensors (weights, EMA weights, optimiser moments) + JSON (step, settings), so
resuming never unpickles anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError
from .fileio import atomic_path, write_text_atomic
from .progress import Progress


@dataclass
class TrainSettings:
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    warmup_steps: int = 200
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CUDA only; CPU runs stay fp32 for reproducibility

    def validate(self) -> None:
        for name, least in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("warmup_steps", 0)):
            if getattr(self, name) < least:
                raise InputError(f"{name} must be at least {least} (got {getattr(self, name)})",
                                 fix=f"pass --{name.replace('_', '-')} {least} or more")
        if not 0 < self.learning_rate < 1:
            raise InputError(f"learning rate {self.learning_rate} is out of range", fix="use e.g. 1e-4")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"EMA decay {self.ema_decay} must be in [0, 1)", fix="use e.g. 0.999")


class EMA:
    """Exponential moving average of a network's parameters (the weights that get shipped)."""

    def __init__(self, network: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in network.state_dict().items()}

    @torch.no_grad()
    def update(self, network: torch.nn.Module, step: int) -> None:
        # Warm-up the decay so early weights are not dominated by the random initialisation.
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, value in network.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.float(), 1 - decay)
            else:
                self.shadow[key].copy_(value)

    def copy_to(self, network: torch.nn.Module) -> None:
        network.load_state_dict({k: v.to(network.state_dict()[k].dtype) for k, v in self.shadow.items()})


def _learning_rate(settings: TrainSettings, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps))
    return settings.learning_rate * warm * (0.1 + 0.9 * cosine)


def _checkpoint_tensors(network: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"rng": generator.get_state()}
    tensors.update({f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()})
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.shadow.items()})
    names = {id(p): n for n, p in network.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim.{names[id(param)]}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    return tensors


def save_checkpoint(folder: Path, step: int, network: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, settings: TrainSettings, history: list[dict[str, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "checkpoint.safetensors") as tmp:
        save_file(_checkpoint_tensors(network, ema, optimizer, generator), str(tmp))
    write_text_atomic(folder / "checkpoint.json",
                      json.dumps({"step": step, "settings": asdict(settings), "history": history}, indent=1))


def load_checkpoint(folder: Path, network: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, EMA, optimiser moments and the batch generator, so a resumed run continues exactly."""
    meta = json.loads((folder / "checkpoint.json").read_text())
    tensors = load_file(str(folder / "checkpoint.safetensors"))
    try:
        network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as error:
        raise InputError("the checkpoint does not match this network configuration", path=folder,
                         fix="resume with the same settings, or start a new --out folder") from error
    generator.set_state(tensors["rng"])
    ema.shadow = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")}
    by_name = dict(network.named_parameters())
    for param_name, param in by_name.items():
        state = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                 if key.startswith(f"optim.{param_name}.") and key.count(".") == param_name.count(".") + 2}
        if state:
            optimizer.state[param] = state
    return int(meta["step"]), list(meta.get("history", []))


def train(network: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
          next_batch: Callable[[torch.Generator], Any], settings: TrainSettings, work_dir: Path,
          *, task: str = "training") -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train ``network`` in place; return it with EMA weights loaded, and the loss history.

    ``work_dir`` holds the resumable checkpoint: a run that finds one there continues from its step.
    """
    settings.validate()
    device = torch.device(settings.device)
    network.to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    ema = EMA(network, settings.ema_decay)
    generator = torch.Generator().manual_seed(settings.seed)  # every random draw (batches, t, noise) comes from it
    step, history = 0, []
    if (work_dir / "checkpoint.json").exists():
        step, history = load_checkpoint(work_dir, network, ema, optimizer, generator)
    use_amp = settings.amp and device.type == "cuda"
    running = None
    with Progress(settings.steps, task, unit="step") as bar:
        if step:
            bar.update(step, message="resumed")
        while step < settings.steps:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(network, next_batch(generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
            optimizer.step()
            step += 1
            ema.update(network, step)
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            if step % 50 == 0 or step == settings.steps:
                history.append({"step": step, "loss": running})
            if step % settings.checkpoint_every == 0 and step < settings.steps:
                save_checkpoint(work_dir, step, network, ema, optimizer, generator, settings, history)
            bar.update(loss=f"{running:.4f}")
    ema.copy_to(network)
    network.eval()
    return network, history

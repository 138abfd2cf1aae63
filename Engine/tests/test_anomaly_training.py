"""Training AnoFPDM's model end to end on a tiny cohort: a loadable, self-describing bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_engine import cli
from diffusion_engine.anomaly.training import balanced_batches, cfg_loss
from diffusion_engine.datasets import SliceSet
from diffusion_engine.errors import InputError
from diffusion_engine.nets.bundle import load_bundle
from diffusion_engine.schedule import linear_schedule


def test_train_command_writes_a_loadable_bundle(anomaly_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    code = cli.main(["--progress", "none", "train", "anomaly", "--manifest", str(anomaly_cohort), "--out", str(out),
                     "--image-size", "32", "--steps", "3", "--batch-size", "4", "--warmup-steps", "2",
                     "--checkpoint-every", "2", "--dropout", "0.1", "--half", "--device", "cpu"])
    assert code == 0
    bundle = load_bundle(out, kind="anomaly")
    assert bundle.config["networks"]["eps"]["config"]["dropout"] == 0.1  # the tiny preset has none
    assert bundle.config["training"]["settings"]["warmup_steps"] == 2
    assert bundle.config["training"]["settings"]["checkpoint_every"] == 2
    assert bundle.config["preprocessing"]["modalities"] == ["flair", "t2"]
    assert bundle.config["preprocessing"]["normalisation"]["method"] == "anofpdm"
    assert bundle.config["schedule"]["num_timesteps"] == 1000
    assert bundle.config["training"]["command"].startswith("diffusion-engine --progress none train anomaly --manifest")
    assert bundle.config["training"]["unhealthy_slices"] > 0
    assert bundle.config["training"]["weights_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in load_file(str(out / "eps.safetensors")).values())  # half the size
    net = bundle.networks["eps"]
    x = torch.zeros(2, 2, 32, 32)
    assert net(x, torch.tensor([5, 5]), torch.tensor([0, -1])).shape == x.shape


def test_extra_input_modalities_are_fed_but_not_scored(anomaly_cohort: Path, tmp_path: Path) -> None:
    from diffusion_engine.anomaly.pipeline import model_spec

    out = tmp_path / "model"
    code = cli.main(["--progress", "none", "train", "anomaly", "--manifest", str(anomaly_cohort), "--out", str(out),
                     "--image-size", "32", "--steps", "1", "--batch-size", "4", "--warmup-steps", "1",
                     "--modalities", "flair,t1,t2", "--score-modalities", "flair,t2", "--device", "cpu"])
    assert code == 0
    bundle = load_bundle(out, kind="anomaly")
    assert bundle.config["preprocessing"]["score_modalities"] == ["flair", "t2"]
    spec = model_spec(bundle)
    assert spec.modalities == ("flair", "t1", "t2") and spec.scored == [0, 2]
    assert bundle.networks["eps"](torch.zeros(1, 3, 32, 32), torch.tensor([5]), torch.tensor([0])).shape[1] == 3


@pytest.mark.parametrize("scored", [("t1",), (), ("flair", "flair")])
def test_training_refuses_score_modalities_outside_the_inputs(tmp_path: Path, anomaly_cohort: Path,
                                                              scored: tuple[str, ...]) -> None:
    from diffusion_engine.anomaly.training import train_anomaly_model

    with pytest.raises(InputError, match=r"score modalities .* must be distinct and among the modalities"):
        train_anomaly_model(anomaly_cohort, tmp_path / "model", score_modalities=scored)


def test_training_refuses_a_manifest_without_labels(tmp_path: Path, anomaly_cohort: Path) -> None:
    text = anomaly_cohort.read_text().splitlines()
    header = text[0].split(",")
    keep = [i for i, name in enumerate(header) if name != "healthy"]
    stripped = tmp_path / "manifest.csv"
    stripped.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in text) + "\n")
    for name in ("flair", "t2", "t1", "mask"):
        for f in anomaly_cohort.parent.glob(f"*_{name}.nii.gz"):
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(InputError, match="'healthy'"):
        from diffusion_engine.anomaly.training import train_anomaly_model

        train_anomaly_model(stripped, tmp_path / "model")


def test_training_refuses_dropout_outside_0_to_1(tmp_path: Path, anomaly_cohort: Path) -> None:
    from diffusion_engine.anomaly.training import train_anomaly_model

    with pytest.raises(InputError, match=r"dropout 1\.0 must be in"):
        train_anomaly_model(anomaly_cohort, tmp_path / "model", dropout=1.0)


def test_batches_are_class_balanced_and_drop_labels() -> None:
    images = torch.zeros(100, 1, 8, 8).numpy()
    unhealthy = torch.cat([torch.zeros(90), torch.ones(10)]).long().numpy()
    data = SliceSet(images=images, cases=["c"] * 100, slice_index=torch.arange(100).numpy(), unhealthy=unhealthy)
    sample = balanced_batches(data, 64, 1000, p_uncond=0.25, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    y = torch.cat([sample(generator)[1] for _ in range(50)])
    shares = [(y == c).float().mean().item() for c in (-1, 0, 1)]
    assert abs(shares[0] - 0.25) < 0.03  # label dropout for classifier-free guidance
    assert abs(shares[1] - shares[2]) < 0.05  # healthy and unhealthy equally often despite a 9:1 imbalance


def test_loss_is_noise_prediction_error() -> None:
    schedule = linear_schedule(1000)

    class Oracle(torch.nn.Module):  # knows the noise: predicts it exactly from x_t and x0
        def __init__(self, x0: torch.Tensor):
            super().__init__()
            self.x0 = x0

        def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
            return (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()

    x0, noise = torch.rand(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, y = torch.tensor([1, 10, 100, 900]), torch.tensor([0, 1, -1, 0])
    assert cfg_loss(schedule)(Oracle(x0), (x0, y, t, noise)).item() < 1e-8
    assert cfg_loss(schedule)(Oracle(x0 + 0.1), (x0, y, t, noise)).item() > 1e-4

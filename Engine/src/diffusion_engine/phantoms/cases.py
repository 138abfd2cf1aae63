"""One case of the anomaly cohort: a subject scanned with FLAIR, T2 and T1, healthy or with lesions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy
from .artefacts import draw_artefacts
from .contrast import draw_appearance, render
from .lesions import STYLES, draw_lesions
from .subject import make_subject

ANOMALY_MODALITIES = ("flair", "t2", "t1")
DIFFICULTIES = ("standard", "hard")
BIAS_STD = {"standard": (0.03, 0.08), "hard": (0.15, 0.25)}  # log-intensity std of the bias field


@dataclass(frozen=True, eq=False)
class AnomalyCase:
    name: str
    healthy: bool
    images: dict[str, np.ndarray]  # modality -> float32 [z, y, x]
    mask: np.ndarray  # uint8 lesion mask, empty for healthy subjects


def anomaly_case(anatomy: Anatomy, seed: int, index: int, *, healthy: bool, difficulty: str,
                 noise_free: bool = False) -> AnomalyCase:
    """Synthesise subject ``index``: its anatomy, appearance, (hard) artefacts and, unless healthy, lesions."""
    subject = make_subject(anatomy, seed, index)
    space = subject.space()
    appearance = draw_appearance(anatomy.shape, anatomy.spacing, subject.rng("appearance"), ANOMALY_MODALITIES,
                                 BIAS_STD[difficulty])
    compartments = []
    if difficulty == "hard":
        compartments += draw_artefacts(space, subject.sample(anatomy.ventricles), subject.rng("artefacts"))
    mask = np.zeros(anatomy.shape, dtype=np.uint8)
    if not healthy:
        lesions, mask = draw_lesions(space, STYLES[difficulty], subject.rng("lesions"))
        compartments += lesions
    noise = None if noise_free else subject.rng("noise")
    images = {m: render(appearance, m, space.tissues, space.brain, compartments, noise) for m in ANOMALY_MODALITIES}
    return AnomalyCase(name=subject.name, healthy=healthy, images=images, mask=mask)

"""Brain aging: one subject rendered at any age, with effects that grow with age in years.

Three effects, each a strictly increasing function of the subject's *brain age* (age + a person-specific
offset, so some subjects look older than they are) scaled by a personal atrophy rate:

    ventricles   a smooth outward warp around the lateral ventricles: the flow, for ``expansion(age)`` mm, of
                 the gradient of the smoothed ventricle mask (unit speed at its steepest, zero far away), so
                 the ventricles enlarge and push the tissue around them; a flow never folds
    cortex       grey matter at the outer surface turns into CSF (thinner cortex, wider sulci)
    white matter periventricular hyperintensities on FLAIR (hypointense on T1) where a fixed, subject-specific
                 score exceeds a threshold that falls with age: the lesion load only grows

Everything else (pose, shape, tissue levels, bias field) is the subject's own and identical at every visit;
only the noise differs between visits, as in a real rescan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy
from .contrast import Appearance, Compartment, draw_appearance, render
from .fields import smooth_noise, soft_inside
from .subject import Subject, make_subject

AGING_MODALITIES = ("t1", "flair")
AGE_LIMITS = (40.0, 100.0)  # where the effects below are calibrated
# Ventricular expansion (mm of flow at the ventricle wall): logistic in brain age plus a slow linear part
# that keeps it growing at younger ages; about 1.9 mm at 55, 4 mm at 70, 6.5 mm at 85, so the lateral
# ventricles roughly double between 55 and 85 (about 17 ml in the young-adult template).
EXPANSION_MAX_MM, EXPANSION_MIDPOINT, EXPANSION_WIDTH = 7.0, 75.0, 12.0
EXPANSION_LINEAR_MM_PER_YEAR, EXPANSION_LINEAR_ONSET = 0.03, 30.0
PULL_SMOOTHNESS_MM = 8.0
FLOW_STEP_MM = 1.0  # Euler steps this short keep every step one-to-one (the field varies over ~8 mm)
THINNING_PER_YEAR, THINNING_ONSET = 0.006, 20.0  # fraction of surface grey matter lost per year
OUTER_SURFACE_MM = 1.5
WMH_PROXIMITY_MM = 5.0  # decay length of the periventricular score
WMH_ONSET, WMH_PER_YEAR = 45.0, 0.016
BIAS_STD = (0.03, 0.08)


@dataclass(frozen=True)
class AgingProfile:
    """How one person ages: brain-age offset (years), atrophy rate and hyperintensity susceptibility."""

    offset_years: float
    rate: float
    wmh_load: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> AgingProfile:
        return cls(offset_years=float(np.clip(rng.normal(0.0, 4.0), -8.0, 8.0)), rate=float(rng.uniform(0.8, 1.2)),
                   wmh_load=float(rng.uniform(0.6, 1.4)))

    def expansion_mm(self, age: float) -> float:
        brain_age = age + self.offset_years
        logistic = EXPANSION_MAX_MM / (1.0 + np.exp(-(brain_age - EXPANSION_MIDPOINT) / EXPANSION_WIDTH))
        linear = EXPANSION_LINEAR_MM_PER_YEAR * max(brain_age - EXPANSION_LINEAR_ONSET, 0.0)
        return float(self.rate * (logistic + linear))

    def thinning(self, age: float) -> float:
        # At most 1.2 * 0.006 * (100 + 8 - 20) = 0.63 within AGE_LIMITS: never clipped there, so strictly increasing.
        return float(np.clip(self.rate * THINNING_PER_YEAR * (age + self.offset_years - THINNING_ONSET), 0.0, 1.0))

    def wmh_threshold(self, age: float) -> float:
        return 1.05 - self.wmh_load * WMH_PER_YEAR * (age + self.offset_years - WMH_ONSET)


@dataclass(frozen=True, eq=False)
class AgingMaps:
    """Template-grid maps the age effects need (computed once per anatomy)."""

    pull: np.ndarray  # (3, z, y, x) velocity towards the ventricles, voxels per mm of expansion
    outer_surface: np.ndarray  # weight of grey matter that borders outer CSF or the outside
    proximity: np.ndarray  # exp(-distance to the ventricles / WMH_PROXIMITY_MM)


@functools.lru_cache(maxsize=4)
def aging_maps(anatomy: Anatomy) -> AgingMaps:
    spacing = anatomy.spacing
    smoothed = ndi.gaussian_filter(anatomy.ventricles, PULL_SMOOTHNESS_MM / spacing)
    gradient = np.stack(np.gradient(smoothed)).astype(np.float32)
    gradient /= np.sqrt((gradient**2).sum(axis=0)).max() * spacing  # unit length (1 mm) at the steepest point
    outside = anatomy.csf * (1.0 - anatomy.ventricles) + (1.0 - anatomy.brain)
    outer = np.clip(2.0 * ndi.gaussian_filter(outside, OUTER_SURFACE_MM / spacing), 0.0, 1.0)
    distance_mm = ndi.distance_transform_edt(anatomy.ventricles < 0.5) * spacing
    proximity = np.exp(-distance_mm / WMH_PROXIMITY_MM).astype(np.float32)
    return AgingMaps(pull=gradient, outer_surface=outer.astype(np.float32), proximity=proximity)


@dataclass(frozen=True, eq=False)
class Visit:
    age: float
    images: dict[str, np.ndarray]  # modality -> float32 [z, y, x]
    ventricles: np.ndarray  # uint8 lateral-ventricle mask


class AgingSubject:
    """A subject whose anatomy can be rendered at any age."""

    def __init__(self, anatomy: Anatomy, seed: int, index: int, *, noise_free: bool = False):
        self.noise_free = noise_free
        self.subject: Subject = make_subject(anatomy, seed, index)
        self.profile = AgingProfile.draw(self.subject.rng("aging"))
        self.appearance: Appearance = draw_appearance(anatomy.shape, anatomy.spacing, self.subject.rng("appearance"),
                                                      AGING_MODALITIES, BIAS_STD)
        self.maps = aging_maps(anatomy)
        pull = np.stack([self.subject.sample_voxels(component) for component in self.maps.pull])
        # Only points with a noticeable velocity flow (elsewhere it is below 1e-3 of the largest, i.e. well
        # under a hundredth of a millimetre over the whole flow).
        speed = np.sqrt((pull**2).sum(axis=0))
        self._moving = np.flatnonzero(speed > 1e-3 * speed.max())
        self._pull = pull[:, self._moving]
        wmh_rng = self.subject.rng("white matter hyperintensities")
        self._wmh_field = smooth_noise(anatomy.shape, 1.5 / anatomy.spacing + 0.5, wmh_rng)[0]
        self._wmh_levels = {"flair": float(wmh_rng.uniform(1.5, 2.0)), "t1": float(wmh_rng.uniform(0.8, 0.9))}

    @property
    def name(self) -> str:
        return self.subject.name

    def visit(self, age: float, number: int) -> Visit:
        """The subject at ``age`` years; ``number`` only seeds the scan noise (none for a noise-free subject)."""
        coords = self._expanded(self.profile.expansion_mm(age))
        space = self.subject.space(coords)
        tissues = dict(space.tissues)
        lost = self.profile.thinning(age) * tissues["gm"] * self.subject.sample(self.maps.outer_surface, coords)
        tissues["gm"] = tissues["gm"] - lost
        tissues["csf"] = tissues["csf"] + lost
        proximity = self.subject.sample(self.maps.proximity, coords)
        score = proximity * (1.0 + 0.5 * self._wmh_field) + 0.12 * self._wmh_field
        wmh = soft_inside((self.profile.wmh_threshold(age) - score) / 0.05) * np.clip(1.5 * tissues["wm"], 0.0, 1.0)
        compartments = [Compartment(wmh, self._wmh_levels)]
        noise = None if self.noise_free else self.subject.rng(f"noise visit {number}")
        images = {m: render(self.appearance, m, tissues, space.brain, compartments, noise) for m in AGING_MODALITIES}
        ventricles = (self.subject.sample(self.subject.anatomy.ventricles, coords) >= 0.5) & space.brain
        return Visit(age=age, images=images, ventricles=ventricles.astype(np.uint8))

    def _expanded(self, expansion_mm: float) -> np.ndarray:
        """The subject's template coordinates carried along the ventricular flow for ``expansion_mm``."""
        steps = max(1, int(np.ceil(expansion_mm / FLOW_STEP_MM)))
        step = np.float32(expansion_mm / steps)
        moving = self.subject.coords[:, self._moving] + step * self._pull  # the first velocity is cached
        for _ in range(steps - 1):
            moving += step * np.stack([self.subject.sample_voxels(component, moving) for component in self.maps.pull])
        coords = self.subject.coords.copy()
        coords[:, self._moving] = moving
        return coords

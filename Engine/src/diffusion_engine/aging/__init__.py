"""ONLS counterfactual brain aging (Wang, ICLR 2024 Tiny Papers). Spec: shared/specs/onls.md.

Spec step -> function
- cross-sectional training of eps_theta and the noisy age regressor R(x_t, t) -> training.train_aging_model
- normalised age (the regressor's unit, zeta's unit)                         -> training.AgeScale
- DDIM inversion (abduction) on a strided grid                              -> onls.encode, onls.encoding_grid
- ONLS stop: first t with Var_batch R(x_t, t) < zeta; L = (t0 + 1) / T      -> onls.encode, onls.first_below
- fixed-L baseline (paper Table 2)                                          -> onls.timestep_for_level
- regressor guidance eps_hat = eps - c s_r sqrt(1 - abar_t) dR/dx_t         -> onls.guided_eps, onls.decode
- volume in / volume out, reports, warnings                                 -> pipeline.age_counterfactual
- Table 2 protocol on longitudinal pairs, ventricle volumes, age sweep      -> evaluate.run_evaluation
"""

from __future__ import annotations

from .onls import (
    GUIDANCE_VARIANTS,
    PAPER_ZETA,
    batch_variance,
    decode,
    encode,
    encoding_grid,
    first_below,
    guidance_strength,
    guided_eps,
    noise_level,
    regressor_with_gradient,
    timestep_for_level,
)

__all__ = [
    "GUIDANCE_VARIANTS",
    "PAPER_ZETA",
    "batch_variance",
    "decode",
    "encode",
    "encoding_grid",
    "first_below",
    "guidance_strength",
    "guided_eps",
    "noise_level",
    "regressor_with_gradient",
    "timestep_for_level",
]

"""Restoration of MR slices and volumes with generative diffusion models: denoising, imputation, super-resolution.

One idea per module:

    noise        noise-level estimation (Gaussian, Rician) and the matching timestep of a schedule
    degrade      degradations of model slices: Gaussian/Rician noise, dropped voxels/lines/boxes, downsampling
    denoise      noise-level-matched denoising with an ordinary DDPM (Daw et al. sec. 3.1)
    conditional  conditional DDPM with the degraded slice as input and p_cond(t) masking (Daw et al. sec. 3.2-3.3)
    cvdm         CVDM's learned pixel-wise schedule, its losses and ancestral sampling (Della Maggiora et al.)
"""

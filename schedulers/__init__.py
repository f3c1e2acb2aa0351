"""Hyper-SD sampling math as pure torch functions over a ``model(x, sigma) -> x0`` denoiser.

No ComfyUI import: the nodes wrap these, the trainer and the benchmarks call them directly.
"""
from .denoiser import DiscreteDenoiser
from .one_step import lcm_boundary_scalings, one_step_sigmas, sample_one_step, unit_variance_noise
from .tcd import sample_tcd, tcd_sigmas, tcd_timesteps
from .vp import (
    alphas_cumprod_from_sigmas,
    default_sigma_table,
    scaled_linear_alphas_cumprod,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
    timestep_to_sigma,
)

__all__ = [
    "DiscreteDenoiser",
    "alphas_cumprod_from_sigmas",
    "default_sigma_table",
    "lcm_boundary_scalings",
    "one_step_sigmas",
    "sample_one_step",
    "sample_tcd",
    "scaled_linear_alphas_cumprod",
    "sigma_to_timestep",
    "sigmas_from_alphas_cumprod",
    "tcd_sigmas",
    "tcd_timesteps",
    "timestep_to_sigma",
]

"""One-step sampling at a chosen timestep (Hyper-SDXL-1step-Unet, trained at t = 800).

The reference is diffusers ``LCMScheduler`` with ``timesteps=[t]``: the UNet sees the noisy latent
at t, predicts x0 and the scheduler returns the consistency-model boundary combination
``c_out(t) * x0 + c_skip(t) * x_vp``. At t = 800 ``c_skip`` is about 4e-9, so the output is
essentially the x0 prediction, but we keep the exact formula.
"""
from __future__ import annotations

import torch

from .tcd import _check_finite
from .vp import default_sigma_table

LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def one_step_sigmas(timestep: int = 800, sigma_table: torch.Tensor | None = None) -> torch.Tensor:
    """``[sigma(timestep), 0]``: e.g. [5.1110, 0] at the default 800."""
    table = default_sigma_table() if sigma_table is None else sigma_table
    if not isinstance(timestep, int) or not 1 <= timestep < len(table):
        raise ValueError(f"timestep must be an integer in [1, {len(table) - 1}], got {timestep!r}")
    return torch.stack([table[timestep], table.new_zeros(())])


def lcm_boundary_scalings(timestep: float) -> tuple[float, float]:
    """(c_skip, c_out) of diffusers' LCMScheduler for a discrete timestep."""
    scaled = timestep * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def unit_variance_noise(noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Scale unit noise to sigma space so the UNet input is that noise itself, as in diffusers'
    text-to-image pipelines, which start from ``randn`` whatever the first timestep is.

    ComfyUI does this only when the first sigma is the model's maximum; at t = 800 it scales by
    sigma instead, so the UNet would see 0.98 * noise.
    """
    sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
    return noise * (1 + sigma**2).sqrt()


@torch.no_grad()
def sample_one_step(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable: bool | None = None,
    sigma_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """One LCM boundary step from ``sigmas[0]`` to 0 (k-diffusion contract; ``model`` returns x0)."""
    if len(sigmas) != 2 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"one-step sampling needs sigmas [sigma_t, 0], got {len(sigmas)} values")
    from .vp import sigma_to_timestep

    extra_args = {} if extra_args is None else extra_args
    sigma = sigmas[0]
    timestep = int(sigma_to_timestep(sigma, sigma_table))
    denoised = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
    _check_finite(denoised, sigma, 0)
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    c_skip, c_out = lcm_boundary_scalings(timestep)
    x_vp = x / (1 + sigma**2).sqrt()
    return c_out * denoised + c_skip * x_vp

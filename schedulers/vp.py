"""Discrete variance-preserving (VP) noise schedules, as used by SD1.5 and SDXL.

Two scalings of the same noisy latent appear in this project:

* VP (diffusers): ``x_vp = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``; the UNet sees ``x_vp``.
* VE / sigma space (ComfyUI, k-diffusion): ``x = x0 + sigma_t * eps`` with
  ``sigma_t = sqrt((1 - abar_t) / abar_t)``, hence ``x_vp = x / sqrt(1 + sigma_t**2)``.

The samplers in this package work in sigma space and are exact as long as every sigma is a table
value, i.e. sits on one of the discrete training timesteps.
"""
from __future__ import annotations

import torch


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """abar_t for diffusers' "scaled_linear" betas (ComfyUI calls the same schedule "linear").

    Computed in float64 so float32 users get correctly rounded values.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + sigmas.to(torch.float64) ** 2)


_DEFAULT_TABLE: torch.Tensor | None = None


def default_sigma_table() -> torch.Tensor:
    """The SD1.5/SDXL sigma table (1000 entries, float64, ascending with timestep)."""
    global _DEFAULT_TABLE
    if _DEFAULT_TABLE is None:
        _DEFAULT_TABLE = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod())
    return _DEFAULT_TABLE


def sigma_to_timestep(sigma: torch.Tensor | float, sigma_table: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest discrete timestep to ``sigma`` in log-sigma distance, as ComfyUI's ModelSamplingDiscrete.

    ``sigma == 0`` maps to timestep 0 (the end of the chain).
    """
    table = default_sigma_table() if sigma_table is None else sigma_table
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log_table = table.to(torch.float64).log()
    log_sigma = sigma.clamp_min(float(table.min())).log()
    dists = (log_sigma.reshape(-1, 1) - log_table.reshape(1, -1)).abs()
    return dists.argmin(dim=1).reshape(sigma.shape)


def timestep_to_sigma(timestep: int | torch.Tensor, sigma_table: torch.Tensor | None = None) -> torch.Tensor:
    table = default_sigma_table() if sigma_table is None else sigma_table
    return table[torch.as_tensor(timestep, dtype=torch.long)]

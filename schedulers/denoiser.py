"""Turn a discrete-timestep UNet (eps or v prediction) into a k-diffusion denoiser.

``DiscreteDenoiser(unet_fn)(x, sigma, **cond)`` returns x0 for ``x = x0 + sigma * eps``; it calls
``unet_fn(x_vp, timestep, **cond)`` with the VP-scaled input and the nearest training timestep,
exactly what diffusers' pipelines feed the UNet at on-grid timesteps.
"""
from __future__ import annotations

import torch

from .vp import default_sigma_table, sigma_to_timestep

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiscreteDenoiser:
    def __init__(self, unet_fn, prediction_type: str = "epsilon", sigma_table: torch.Tensor | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet_fn = unet_fn
        self.prediction_type = prediction_type
        self.sigma_table = default_sigma_table() if sigma_table is None else sigma_table

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_timestep(sigma, self.sigma_table)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        timestep = self.timestep(sigma.cpu()).to(x.device)
        # Use the table sigma (float64 -> x.dtype) so off-grid rounding cannot leak into the scaling.
        sigma_t = self.sigma_table[timestep.cpu()].to(device=x.device, dtype=x.dtype).view(-1, *[1] * (x.ndim - 1))
        sigma_in = sigma.to(x.dtype).view_as(sigma_t)
        c_in = 1 / (1 + sigma_in**2).sqrt()
        out = self.unet_fn(x * c_in, timestep, **cond)
        if self.prediction_type == "epsilon":
            return x - sigma_in * out
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_vp - sqrt(1 - abar) v
        alpha = 1 / (1 + sigma_t**2).sqrt()
        return alpha * (x * c_in) - (sigma_t * alpha) * out

"""Sample grid: TCD at several step counts from the same noise (all math from schedulers/), plus a
1-step column of the full 1-step UNet (LCM boundary step at its timestep) when a run trains one."""
from __future__ import annotations

import numpy as np
import torch

from schedulers import (DiscreteDenoiser, one_step_sigmas, sample_one_step, sample_tcd, sigmas_from_alphas_cumprod,
                        tcd_sigmas)


@torch.no_grad()
def one_step_latents(unet, base, cond, noise, timestep, device):
    """The full 1-step UNet: schedulers.sample_one_step from unit-variance noise at `timestep` (800)."""
    table = sigmas_from_alphas_cumprod(base.abar.cpu().to(torch.float64))
    denoiser = DiscreteDenoiser(lambda x, t, **c: unet(x, t.to(device), **c).sample,
                                base.prediction_type, sigma_table=table)
    sigmas = one_step_sigmas(int(timestep), sigma_table=table).to(device)
    x = noise * (1 + sigmas[0] ** 2).sqrt().float()  # unit-variance VP noise, VE scaling
    return sample_one_step(denoiser, x, sigmas, extra_args=cond, disable=True, sigma_table=table)


@torch.no_grad()
def tcd_grid(unet, vae, base, encode, prompts, steps_list, eta, latent_shape, seed, device, one_step=None):
    """-> uint8 image array: one row per prompt, one column per step count (+ one for `one_step` =
    (full 1-step UNet, timestep): the same noise through schedulers.sample_one_step)."""
    table = sigmas_from_alphas_cumprod(base.abar.cpu().to(torch.float64))
    cond = encode(prompts)
    denoiser = DiscreteDenoiser(lambda x, t, **c: unet(x, t.to(device), **c).sample,
                                base.prediction_type, sigma_table=table)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *latent_shape), generator=g).to(device)
    rows = []
    for steps in steps_list:
        sigmas = tcd_sigmas(steps, sigma_table=table).to(device)
        x = noise * (1 + sigmas[0] ** 2).sqrt().float()  # unit-variance VP noise at t = 999, VE scaling
        gn = torch.Generator().manual_seed(seed + 1)
        sampler_noise = lambda s, sn: torch.randn(x.shape, generator=gn).to(device)  # noqa: E731
        latents = sample_tcd(denoiser, x, sigmas, extra_args=cond, disable=True, eta=eta,
                             noise_sampler=sampler_noise, sigma_table=table)
        img = vae.decode(latents.float() / vae.config.scaling_factor).sample
        rows.append(((img.clamp(-1, 1) + 1) * 127.5).round().byte().cpu())
    if one_step is not None:
        latents = one_step_latents(one_step[0], base, cond, noise, one_step[1], device)
        img = vae.decode(latents.float() / vae.config.scaling_factor).sample
        rows.append(((img.clamp(-1, 1) + 1) * 127.5).round().byte().cpu())
    cols = torch.stack(rows, 1)  # prompts, steps, C, H, W
    P, S, C, H, W = cols.shape
    grid = cols.permute(0, 3, 1, 4, 2).reshape(P * H, S * W, C)
    return grid.numpy().astype(np.uint8)

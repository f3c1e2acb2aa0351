"""The peer ComfyUI-TCD pack's per-step TCD math (JettHu/ComfyUI-TCD), re-derived for benchmarking.

Written from reading that pack, not copied: it precomputes abar at s_i = floor((1 - eta) * t_i)
(forcing the last one to 0) once per run; each step converts the k-diffusion x0 into eps, moves
to the VP point at s, then either re-noises to the next sigma (dividing by sqrt(abar_s) to return
to VE scaling) or rescales to VE without noise. Only used as a timing reference.
"""
from __future__ import annotations

import math

import torch

from schedulers import sigma_to_timestep


def peer_abar_s(sigmas: torch.Tensor, eta: float, abar_table: torch.Tensor) -> torch.Tensor:
    t = sigma_to_timestep(sigmas, (1 / abar_table - 1).sqrt())
    s = torch.floor((1 - eta) * t.to(torch.float64)).long()
    s[-1] = 0
    return abar_table[s].float()


@torch.no_grad()
def peer_sample_tcd(model, x, sigmas, abar_s, eta, noise_sampler):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        eps = (x - denoised) / sigmas[i]
        a = abar_s[i + 1]
        x = a.sqrt() * denoised + (1 - a).sqrt() * eps  # VP point at s
        if eta > 0 and sigmas[i + 1] > 0:
            x = x / a.sqrt() + noise_sampler() * (sigmas[i + 1] ** 2 + 1 - 1 / a).sqrt()
        else:
            x = x * math.sqrt(float(sigmas[i + 1]) ** 2 + 1)
    return x

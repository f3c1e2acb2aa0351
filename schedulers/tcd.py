"""Trajectory Consistency Distillation sampling (TCD paper, diffusers ``TCDScheduler``).

eta (the paper's gamma) sets how far back each step jumps before re-noising: from timestep t the
step predicts x0, moves deterministically to s = floor((1 - eta) * t_next) and then adds fresh
noise up to t_next. eta = 0 is a deterministic (DDIM-like) sampler, eta = 1 jumps to x0 at every
step and re-noises fully (LCM-like). Lower eta keeps more detail at several steps; the Hyper-SD
unified LoRA wants eta = 1 at 1 step.
"""
from __future__ import annotations

import math

import torch

from .vp import default_sigma_table, sigma_to_timestep

TCD_GRID_STEPS = 50  # diffusers' original_inference_steps: the trailing grid TCD picks its timesteps from


def tcd_timesteps(
    steps: int, denoise: float = 1.0, num_train_timesteps: int = 1000, original_inference_steps: int = TCD_GRID_STEPS
) -> list[int]:
    """The timesteps of diffusers ``TCDScheduler.set_timesteps(steps, strength=denoise)``.

    Steps are picked evenly (by index) from a trailing ``original_inference_steps`` DDIM grid
    truncated to the first ``denoise`` fraction: 4 steps -> [999, 759, 499, 259].
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise!r}")
    if steps > original_inference_steps:
        raise ValueError(
            f"steps={steps} exceeds the {original_inference_steps}-step TCD grid the timesteps are taken from"
        )
    skip = num_train_timesteps // original_inference_steps
    grid_len = int(original_inference_steps * denoise)
    if grid_len < steps:
        raise ValueError(
            f"denoise={denoise} leaves {grid_len} of {original_inference_steps} grid timesteps, fewer than "
            f"steps={steps}; raise denoise to at least {steps / original_inference_steps:.3f} or lower steps"
        )
    descending = [(i + 1) * skip - 1 for i in range(grid_len)][::-1]
    # np.linspace(0, n, steps, endpoint=False) floored, written without numpy.
    return [descending[math.floor(i * grid_len / steps)] for i in range(steps)]


def tcd_sigmas(steps: int, denoise: float = 1.0, sigma_table: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmas at :func:`tcd_timesteps` followed by a final 0, for ComfyUI's SIGMAS."""
    table = default_sigma_table() if sigma_table is None else sigma_table
    timesteps = tcd_timesteps(steps, denoise, num_train_timesteps=len(table))
    return torch.cat([table[timesteps], table.new_zeros(1)])


def _check_finite(denoised: torch.Tensor, sigma: torch.Tensor, step: int) -> None:
    # One float32 reduction instead of a full-size isfinite mask: NaN and inf propagate into the
    # sum, while finite latents cannot overflow float32. 5-20x cheaper per step on CPU.
    if not torch.isfinite(denoised.sum(dtype=torch.float32)):
        raise FloatingPointError(
            f"the model returned NaN/inf at step {step} (sigma={float(sigma):.4f}); "
            "check the model/LoRA weights and try a higher precision (e.g. fp32 or bf16 instead of fp16)"
        )


@torch.no_grad()
def sample_tcd(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable: bool | None = None,
    noise_sampler=None,
    eta: float = 0.3,
    sigma_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """TCD in k-diffusion form: ``model(x, sigma)`` returns x0 and ``x = x0 + sigma * eps``.

    Equivalent step by step to diffusers' ``TCDScheduler.step`` given the same per-step noise:
    in sigma space its re-noising ``sqrt(abar_prev/abar_s) x_s + sqrt(1 - abar_prev/abar_s) z``
    becomes ``x_s + sqrt(sigma_prev^2 - sigma_s^2) z``. Like diffusers, the last step lands on
    timestep 0 (abar_0 = 0.99915, not 1) and returns that VP sample, so outputs match exactly.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    table = (default_sigma_table() if sigma_table is None else sigma_table).to(torch.float64)
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    # The per-step schedule depends only on the sigmas, so it is looked up once (on the CPU) instead
    # of a log-distance search over the 1000-entry table and a device sync at every step.
    sigmas_cpu = sigmas.detach().to("cpu")
    t_next = sigma_to_timestep(sigmas_cpu[1:], table).tolist()
    last = [float(s) == 0.0 for s in sigmas_cpu[1:]]
    sigma_s_all = [table[0 if z else math.floor((1 - eta) * t)].to(x.dtype) for t, z in zip(t_next, last)]
    for i in _progress(range(n), disable):
        sigma, sigma_next, sigma_s = sigmas[i], sigmas[i + 1], sigma_s_all[i]
        denoised = model(x, sigma * s_in, **extra_args)
        _check_finite(denoised, sigma, i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        eps = (x - denoised) / sigma
        x = denoised + sigma_s * eps
        if last[i]:
            x = x / (1 + sigma_s**2).sqrt()  # VE at t=0 -> diffusers' VP sample
        elif eta > 0:
            x = x + (sigma_next**2 - sigma_s**2).clamp_min(0).sqrt() * noise_sampler(sigma, sigma_next)
    return x


def _progress(it, disable):
    if disable:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, disable=disable)

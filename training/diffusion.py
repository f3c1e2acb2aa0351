"""Variance-preserving (DDPM/DDIM) math shared by every stage: one definition of each conversion.

A noisy latent is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (diffusers' VP scaling). The
functions take abar per sample; its dtype decides the precision of the square roots (the stages
pass float64 tables, or tables already cast to the latent's dtype), and results are in the latent's
dtype. Sampling math for inference lives in `schedulers/` (sigma space); this is the training side.
"""
from __future__ import annotations

import torch


def abar_at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t per sample from a [num_train_timesteps] table, cast to `like`'s dtype and device."""
    return table.to(like.device)[t].to(like.dtype)


def vp_scales(abar: torch.Tensor, like: torch.Tensor):
    """(sqrt(abar), sqrt(1 - abar)) per sample, shaped to broadcast over `like`, in like's dtype."""
    a = abar.reshape(-1, *[1] * (like.ndim - 1))
    return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)


def ddim_point(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The point sqrt(abar) x0 + sqrt(1 - abar) eps: noising (eps = noise), a DDIM (eta 0) step
    (eps = the predicted noise) and, at abar = 1, x0 itself."""
    sa, s1 = vp_scales(abar, x0)
    return sa * x0 + s1 * eps


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    sa, s1 = vp_scales(abar, x)
    return (x - s1 * eps) / sa


def to_x0_eps(out: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction_type: str):
    """A UNet's output at x -> (x0, eps), for epsilon and v-prediction models."""
    sa, s1 = vp_scales(abar, x)
    if prediction_type == "epsilon":
        return (x - s1 * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - s1 * out, sa * out + s1 * x
    raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")


def trailing_grid(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing timestep grid, e.g. 4 -> [999, 749, 499, 249] (diffusers' "trailing" spacing)."""
    return [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]


def segment_boundaries(segments: int, n: int, num_train_timesteps: int = 1000) -> list[int]:
    """Grid indices (ascending, 0 = the clean sample) of the lower segment boundaries for `segments`
    segments on an n-point solver grid: the timesteps the TCD sampler visits at `segments` steps
    (schedulers.tcd_timesteps: 4 -> 759, 499, 259), so a TSCD LoRA lands exactly where it is sampled."""
    from schedulers import tcd_timesteps

    if num_train_timesteps % n:
        raise ValueError(f"a {n}-point solver grid does not divide {num_train_timesteps} timesteps; use 50")
    skip = num_train_timesteps // n
    visited = tcd_timesteps(segments, num_train_timesteps=num_train_timesteps)[1:]
    off = [t for t in visited if (t + 1) % skip]
    if off:
        raise ValueError(f"the TCD timesteps {off} of {segments} steps are not on the {n}-point solver grid; "
                         "use 50 (the TCD sampler's own grid) or a multiple of it")
    return [0] + sorted((t + 1) // skip for t in visited)


class DDIMGrid:
    """The TSCD solver grid: tau_j = round(j * T / n) - 1 for j = 1..n (n = 50: the trailing grid the TCD
    sampler picks its timesteps from); j = 0 is the clean sample (abar = 1)."""

    def __init__(self, abar: torch.Tensor, n: int):
        T = len(abar)
        self.n, self.num_train_timesteps = n, T
        self.timesteps = torch.tensor([round(j * T / n) - 1 for j in range(1, n + 1)], device=abar.device)
        one = torch.ones(1, dtype=abar.dtype, device=abar.device)
        self.abar = torch.cat([one, abar[self.timesteps]])  # index j = 0..n
        self._bounds = {}

    def timestep(self, j: torch.Tensor) -> torch.Tensor:
        """UNet timestep of grid point j (>= 1); j = 0 is clamped (its prediction is never used)."""
        return self.timesteps[(j - 1).clamp(min=0)]

    def _segment(self, j: torch.Tensor, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ascending boundary indices, position of j's segment among them): segments are (b, b']."""
        if segments not in self._bounds:
            bounds = segment_boundaries(segments, self.n, self.num_train_timesteps)
            self._bounds[segments] = torch.tensor(bounds, device=j.device)
        bounds = self._bounds[segments]
        return bounds, torch.searchsorted(bounds, j, right=False) - 1

    def boundary(self, j: torch.Tensor, segments: int) -> torch.Tensor:
        """The lower boundary of j's segment: the largest boundary index below j."""
        bounds, seg = self._segment(j, segments)
        return bounds[seg]

    def segment_top(self, j: torch.Tensor, segments: int) -> torch.Tensor:
        """The upper end of j's segment (b, b']: the grid point a `segments`-step TCD sampler starts that
        segment from (k = 4: 999, 759, 499, 259), so the student's input there is what sampling feeds it."""
        bounds, seg = self._segment(j, segments)
        return torch.cat([bounds[1:], torch.full_like(bounds[:1], self.n)])[seg]


def recommended_eta(steps: int) -> float:
    """TCD's eta for a Hyper-SD LoRA at `steps` steps: 1.0 at one step (Hyper-SD's advice for the unified
    LoRA), 0.3 above (less stochastic re-noising keeps more detail across steps)."""
    return 1.0 if steps == 1 else 0.3


# --- UNet conditioning -------------------------------------------------------------------------

def unet_kwargs(cond) -> dict:
    """`cond` is encoder_hidden_states or a dict of UNet kwargs (SDXL: + added_cond_kwargs)."""
    return dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def cat_kwargs(a: dict, b: dict) -> dict:
    """Batch-concatenate two UNet kwargs dicts (for one CFG forward)."""
    out = {}
    for k, v in a.items():
        if isinstance(v, dict):
            out[k] = cat_kwargs(v, b[k])
        elif torch.is_tensor(v):
            out[k] = torch.cat([v, b[k]])
        else:
            out[k] = v
    return out


def cat_cond_uncond(cond: dict, uncond: dict, batch_size: int) -> dict:
    """cond then uncond UNet kwargs in one batch (uncond may have batch 1: it is expanded)."""
    def rep(v):
        return v.expand(batch_size, *v.shape[1:]) if v.shape[0] == 1 else v
    out = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], rep(uncond["encoder_hidden_states"])])}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: torch.cat([v, rep(uncond["added_cond_kwargs"][k])])
                                    for k, v in cond["added_cond_kwargs"].items()}
    return out

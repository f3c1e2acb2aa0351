"""TSCD: segmented consistency distillation targets and loss (a stage plug-in, see stages.py).

Grid: N DDIM solver points tau_j = round(j * T / N) - 1 (j = 1..N, tau_N = T - 1); j = 0 is the
clean sample (abar = 1). With k segments the student maps x_j to the lower boundary of j's segment.
"""
from __future__ import annotations

import torch


class DDIMGrid:
    def __init__(self, abar: torch.Tensor, n: int):
        T = len(abar)
        self.n = n
        self.timesteps = torch.tensor([round(j * T / n) - 1 for j in range(1, n + 1)], device=abar.device)
        one = torch.ones(1, dtype=abar.dtype, device=abar.device)
        self.abar = torch.cat([one, abar[self.timesteps]])  # index j = 0..n

    def timestep(self, j: torch.Tensor) -> torch.Tensor:
        """UNet timestep of grid point j (>= 1); j = 0 is clamped (its prediction is never used)."""
        return self.timesteps[(j - 1).clamp(min=0)]

    def boundary(self, j: torch.Tensor, segments: int) -> torch.Tensor:
        seg = self.n // segments
        return torch.div(j - 1, seg, rounding_mode="floor") * seg


def _bcast(a, like):
    return a.view(-1, *[1] * (like.ndim - 1)).to(like.dtype)


def to_x0_eps(out, x, abar, prediction_type):
    """Model output at x (VP scaling) -> (x0, eps); abar is per-sample, float64."""
    a = abar.to(torch.float64)
    sa, s1 = _bcast(a.sqrt(), x), _bcast((1 - a).sqrt(), x)
    if prediction_type == "epsilon":
        return (x - s1 * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - s1 * out, sa * out + s1 * x
    raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")


def ddim_point(x0, eps, abar_to):
    """DDIM (eta 0) point at abar_to from predicted x0 and eps; abar_to = 1 gives x0."""
    a = abar_to.to(torch.float64)
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * eps


def _cat_cond(cond, uncond, batch_size):
    """Stack cond and uncond UNet kwargs for one teacher call (uncond may have batch 1)."""
    def rep(v):
        return v.expand(batch_size, *v.shape[1:]) if v.shape[0] == 1 else v
    out = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"],
                                               rep(uncond["encoder_hidden_states"])])}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: torch.cat([v, rep(uncond["added_cond_kwargs"][k])])
                                    for k, v in cond["added_cond_kwargs"].items()}
    return out


def distance(pred, target, kind="huber", huber_c=1e-3):
    diff = (pred.float() - target.float()) ** 2
    if kind == "l2":
        return diff.mean()
    return (torch.sqrt(diff + huber_c ** 2) - huber_c).mean()


def sample_j_and_w(u, n, w_min, w_max):
    """Grid index j in 1..n and CFG scale from the batch's uniforms (same numbers for any process count)."""
    j = (u[:, 0] * n).long().clamp(max=n - 1) + 1
    w = w_min + (w_max - w_min) * u[:, 1].to(torch.float64)
    return j, w


def tscd_targets(ctx, batch, segments):
    """-> (x_j, timestep, j, boundary, target) with target computed without gradient."""
    grid, pt = ctx.grid, ctx.prediction_type
    x0, noise, cond = batch["latents"], batch["noise"], batch["cond"]
    cfg = ctx.cfg.tscd
    j, w = sample_j_and_w(batch["u"], grid.n, cfg.w_min, cfg.w_max)
    b = grid.boundary(j, segments)
    x_j = ddim_point(x0, noise, grid.abar[j]).to(x0.dtype)
    t_j = grid.timestep(j)
    with torch.no_grad():
        with ctx.teacher():
            both = ctx.unet(torch.cat([x_j, x_j]), torch.cat([t_j, t_j]),
                            **_cat_cond(cond, batch["uncond"], len(x_j))).sample
        out_c, out_u = both.chunk(2)
        out = out_u + _bcast(w, out_u) * (out_c - out_u)
        x0_t, eps_t = to_x0_eps(out, x_j, grid.abar[j], pt)
        x_prev = ddim_point(x0_t, eps_t, grid.abar[j - 1]).to(x0.dtype)
        with ctx.target():
            out_prev = ctx.unet(x_prev, grid.timestep(j - 1), **cond).sample
        x0_p, eps_p = to_x0_eps(out_prev, x_prev, grid.abar[j - 1], pt)
        target = ddim_point(x0_p, eps_p, grid.abar[b])
        at_boundary = _bcast((j - 1 == b).to(torch.float64), target).to(target.dtype)
        target = at_boundary * x_prev + (1 - at_boundary) * target
    return x_j, t_j, j, b, target


def tscd_loss(ctx, batch, stage):
    x_j, t_j, j, b, target = tscd_targets(ctx, batch, stage.segments)
    out = ctx.student(x_j, t_j, **batch["cond"]).sample
    x0_s, eps_s = to_x0_eps(out, x_j, ctx.grid.abar[j], ctx.prediction_type)
    pred = ddim_point(x0_s, eps_s, ctx.grid.abar[b])
    loss = distance(pred, target, ctx.cfg.tscd.loss, ctx.cfg.tscd.huber_c)
    return loss, {"tscd_loss": float(loss.detach())}


PARAMS = {}  # plain TSCD has no stage params (the tscd: section holds its options)


def stage_loss(ctx, batch, stage):
    return tscd_loss(ctx, batch, stage)

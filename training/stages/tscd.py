"""TSCD: trajectory-segmented consistency distillation (Hyper-SD's first stage group).

The solver grid is diffusion.DDIMGrid: with k segments the student maps grid point x_j to the lower
boundary of j's segment, and the target is the EMA student's boundary prediction from the teacher's
CFG DDIM step x_{j-1} (or x_{j-1} itself when j - 1 is the boundary).
"""
from __future__ import annotations

import torch

from training.diffusion import cat_cond_uncond, ddim_point, to_x0_eps
from training.stages.base import U, Stage


def distance(pred, target, kind="huber", huber_c=1e-3):
    diff = (pred.float() - target.float()) ** 2
    if kind == "l2":
        return diff.mean()
    return (torch.sqrt(diff + huber_c ** 2) - huber_c).mean()


def sample_j_and_w(u, n, w_min, w_max):
    """Grid index j in 1..n and CFG scale from the batch's uniforms (same numbers for any process count)."""
    j = (u[:, U["tscd_j"]] * n).long().clamp(max=n - 1) + 1
    w = w_min + (w_max - w_min) * u[:, U["tscd_w"]].to(torch.float64)
    return j, w


@torch.no_grad()
def teacher_cfg_step(ctx, x_j, j, cond, uncond, w):
    """The frozen teacher's CFG DDIM step from grid point j to j - 1."""
    grid = ctx.grid
    t_j = grid.timestep(j)
    with ctx.teacher():
        both = ctx.unet(torch.cat([x_j, x_j]), torch.cat([t_j, t_j]), **cat_cond_uncond(cond, uncond, len(x_j))).sample
    out_c, out_u = both.chunk(2)
    out = out_u + w.view(-1, *[1] * (out_u.ndim - 1)).to(out_u.dtype) * (out_c - out_u)
    x0_t, eps_t = to_x0_eps(out, x_j, grid.abar[j], ctx.prediction_type)
    return ddim_point(x0_t, eps_t, grid.abar[j - 1]).to(x_j.dtype)


@torch.no_grad()
def boundary_target(ctx, x_prev, j, b, cond):
    """The EMA student's prediction at boundary b from x_{j-1}; x_{j-1} itself when j - 1 == b."""
    grid = ctx.grid
    with ctx.target():
        out_prev = ctx.unet(x_prev, grid.timestep(j - 1), **cond).sample
    x0_p, eps_p = to_x0_eps(out_prev, x_prev, grid.abar[j - 1], ctx.prediction_type)
    target = ddim_point(x0_p, eps_p, grid.abar[b])
    at_boundary = (j - 1 == b).to(torch.float64).view(-1, *[1] * (target.ndim - 1)).to(target.dtype)
    return at_boundary * x_prev + (1 - at_boundary) * target


def tscd_targets(ctx, batch, segments):
    """-> (x_j, timestep, j, boundary, target) with target computed without gradient."""
    grid, cfg = ctx.grid, ctx.cfg.tscd
    x0, cond = batch["latents"], batch["cond"]
    j, w = sample_j_and_w(batch["u"], grid.n, cfg.w_min, cfg.w_max)
    b = grid.boundary(j, segments)
    x_j = ddim_point(x0, batch["noise"], grid.abar[j]).to(x0.dtype)
    x_prev = teacher_cfg_step(ctx, x_j, j, cond, batch["uncond"], w)
    return x_j, grid.timestep(j), j, b, boundary_target(ctx, x_prev, j, b, cond)


def student_boundary(ctx, batch, x_j, t_j, j, b):
    """The student's prediction at the boundary, and its x0 (the adversarial term reads it)."""
    out = ctx.student(x_j, t_j, **batch["cond"]).sample
    x0_s, eps_s = to_x0_eps(out, x_j, ctx.grid.abar[j], ctx.prediction_type)
    return ddim_point(x0_s, eps_s, ctx.grid.abar[b]), x0_s


def tscd_loss(ctx, batch, segments):
    """-> (loss, student x0) of one TSCD step."""
    x_j, t_j, j, b, target = tscd_targets(ctx, batch, segments)
    pred, x0_s = student_boundary(ctx, batch, x_j, t_j, j, b)
    return distance(pred, target, ctx.cfg.tscd.loss, ctx.cfg.tscd.huber_c), x0_s


class TSCD(Stage):
    name = "tscd"  # no params: the config's tscd: section holds its options

    def loss(self, ctx, batch, stage):
        loss, _ = tscd_loss(ctx, batch, stage.segments)
        return loss, {"tscd_loss": float(loss.detach())}


STAGE = TSCD()

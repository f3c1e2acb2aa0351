"""Score-distillation stage (DMD-style) for one-step generation.

Generator: the student maps unit noise at timestep `t_gen` (999 for the unified LoRA, 800 for the
dedicated 1-step UNet) to x0 in one call. Distribution matching: noise x0 to a random t, the frozen
teacher with CFG gives the real x0 estimate, the fake-score network (the shared base with its own
"fake" LoRA, trained by plain denoising on the student's detached outputs) gives the fake one; the
generator gradient is (fake - real) normalised by mean|x0 - real| (DMD). An MSE regulariser ties x0 to
the teacher's multi-step output from the same noise. Two time-scale: the fake score updates every
step, the generator every `gen_every` steps. Mode "full" trains a separate UNet copy (full_unet.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.diffusion import abar_at, cat_kwargs, ddim_point, eps_to_x0, trailing_grid, unet_kwargs
from training.stages.base import U, EpsModel, OwnStudent, Stage, stage_randn

MODES = {"lora": 999, "full": 800}


def student_x0(student, noise, cond, t_gen: int, alphas_cumprod):
    """One-step output: the UNet sees unit-variance noise at t_gen (diffusers LCM/TCD convention)."""
    tt = torch.full((noise.shape[0],), t_gen, device=noise.device, dtype=torch.long)
    return eps_to_x0(noise, student(noise, tt, **unet_kwargs(cond)).sample, abar_at(alphas_cumprod, tt, noise))


def cfg_eps(unet, x, t, cond, uncond, guidance: float):
    if uncond is None or guidance == 1.0:
        return unet(x, t, **unet_kwargs(cond)).sample
    both = unet(torch.cat([x, x]), torch.cat([t, t]), **cat_kwargs(unet_kwargs(uncond), unet_kwargs(cond))).sample
    eps_u, eps_c = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def dm_loss(x0, teacher, fake, cond, uncond, guidance, t, noise, alphas_cumprod):
    """DMD distribution-matching surrogate: its gradient w.r.t. x0 is the normalised (fake - real)."""
    abar = abar_at(alphas_cumprod, t, x0)
    with torch.no_grad():
        x_t = ddim_point(x0, noise, abar)
        real = eps_to_x0(x_t, cfg_eps(teacher, x_t, t, cond, uncond, guidance), abar)
        fake_x0 = eps_to_x0(x_t, fake(x_t, t, **unet_kwargs(cond)).sample, abar)
        norm = (x0 - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-5)
        grad = (fake_x0 - real) / norm
    # DMD2's mean reduction: the step does not grow with the latent size (sum / B was C*H*W times larger)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach(), reduction="mean"), grad


def fake_score_loss(fake, x0, cond, t, noise, alphas_cumprod):
    """Denoising (eps) loss of the fake-score network on the student's detached outputs."""
    x_t = ddim_point(x0.detach(), noise, abar_at(alphas_cumprod, t, x0))
    return F.mse_loss(fake(x_t, t, **unet_kwargs(cond)).sample, noise)


@torch.no_grad()
def teacher_multistep_x0(teacher, noise, cond, uncond, guidance, alphas_cumprod, steps=8, t_start=999):
    """Regression reference: teacher DDIM with CFG from the same unit noise (t_start -> x0)."""
    grid = [t for t in trailing_grid(steps) if t <= t_start] or [t_start]
    x = noise
    for i, t in enumerate(grid):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = cfg_eps(teacher, x, tt, cond, uncond, guidance)
        x0 = eps_to_x0(x, eps, abar_at(alphas_cumprod, tt, x))
        if i + 1 < len(grid):
            x = ddim_point(x0, eps, abar_at(alphas_cumprod, torch.full_like(tt, grid[i + 1]), x))
    return x0


def generator_timestep(p: dict) -> int:
    """params.timestep, or the mode's default (999 for the LoRA, 800 for the full 1-step UNet)."""
    return int(p["timestep"]) or MODES[p["mode"]]


def is_full(stage) -> bool:
    return stage.type == "score_distill" and (stage.params or {}).get("mode", "lora") == "full"


def fake_score_step(ctx, x0, cond, t, noise):
    """Train the fake score (its own "fake" adapter on the shared base) on the student's detached output."""
    from training.distributed import all_reduce_grads

    fake_opt = ctx.persistent["fake_opt"]
    with ctx.adapters.only(["fake"], ["fake"]):
        fl = fake_score_loss(EpsModel(ctx.unet, ctx.abar, ctx.prediction_type), x0, cond, t, noise, ctx.abar)
        fake_opt.zero_grad(set_to_none=True)
        fl.backward()
        all_reduce_grads(ctx.accelerator, [q for g in fake_opt.param_groups for q in g["params"]])
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)
    return fl


def generator_loss(ctx, p, x0, batch, rand_t):
    """DMD surrogate + reg_weight * MSE to the teacher's multi-step output; -> (loss, logs)."""
    pt, abar, guidance = ctx.prediction_type, ctx.abar, float(p["guidance"])
    noise, cond, uncond = batch["noise"], batch["cond"], batch["uncond"]
    teacher = EpsModel(ctx.unet, abar, pt, ctx.teacher)
    fake = EpsModel(ctx.unet, abar, pt, lambda: ctx.adapters.only(["fake"]))
    dm, _ = dm_loss(x0, teacher, fake, cond, uncond, guidance, rand_t(U["dmd_t"]), stage_randn(ctx, x0, 13), abar)
    reg = x0.new_zeros(())
    if float(p["reg_weight"]) > 0:
        ref = teacher_multistep_x0(teacher, noise, cond, uncond, guidance, abar, int(p["reg_steps"]),
                                   generator_timestep(p))
        reg = F.mse_loss(x0.float(), ref.float())
    return dm + float(p["reg_weight"]) * reg, {"dmd_loss": float(dm.detach()), "dmd_reg": float(reg.detach())}


class ScoreDistill(Stage):
    name = "score_distill"
    # DMD2: the fake score trains every step, the generator every 5th (two time-scale rule), both at one
    # lr (fake_lr 0 = the generator's); timesteps for both scores in ~2%-98% of the range
    params = {"lr": 0.0, "mode": "lora", "timestep": 0, "guidance": 7.5, "gen_every": 5, "reg_weight": 0.25,
              "reg_steps": 4, "fake_lr": 0.0, "fake_rank": 0, "t_min": 20, "t_max": 980}

    def check_params(self, p, stage, key):
        if p["mode"] not in MODES:
            raise ValueError(f"config key '{key}.mode': must be one of {sorted(MODES)} ('lora': the unified LoRA at "
                             f"t = 999; 'full': the whole 1-step UNet at t = 800), got {p['mode']!r}")
        if not 0 <= int(p["timestep"]) < 1000 or not 0 <= int(p["t_min"]) < int(p["t_max"]) < 1000:
            raise ValueError(f"config key '{key}.timestep' / '{key}.t_min' / '{key}.t_max': need 0 < timestep < "
                             "1000 (0 = the mode's default) and 0 <= t_min < t_max < 1000")
        if int(p["gen_every"]) < 1 or int(p["reg_steps"]) < 1 or float(p["guidance"]) < 1:
            raise ValueError(f"config key '{key}': need gen_every >= 1, reg_steps >= 1, guidance >= 1")

    def build_persistent(self, unet, stages, cfg):
        """The fake-score network is a "fake" adapter on the shared frozen base (no UNet copy)."""
        from training.models.adapters import add_adapter

        p = self.resolved(stages[0])
        rank = int(p["fake_rank"]) or cfg.lora.rank
        params = add_adapter(unet, "fake", rank, float(rank), cfg.lora.targets)
        lr = float(p["fake_lr"]) or float(p["lr"]) or cfg.optim.lr
        return {"fake_opt": torch.optim.AdamW(params, lr=lr, weight_decay=0.0)}

    def setup(self, ctx, stage):
        if is_full(stage):
            from training.stages.full_unet import FULL_KEYS, ensure_full_unet

            return OwnStudent(*ensure_full_unet(ctx, self.resolved(stage)), keys=FULL_KEYS)
        return None

    def loss(self, ctx, batch, stage):
        p = self.resolved(stage)
        gen_step = (ctx.step - ctx.stage_start) % int(p["gen_every"]) == 0

        def rand_t(col):  # from the batch's uniforms: resume-exact, the same for any process count
            return (int(p["t_min"]) + batch["u"][:, col] * (int(p["t_max"]) - int(p["t_min"]))).long()

        with torch.set_grad_enabled(gen_step):
            x0 = student_x0(EpsModel(ctx.student, ctx.abar, ctx.prediction_type), batch["noise"], batch["cond"],
                            generator_timestep(p), ctx.abar)
        fl = fake_score_step(ctx, x0, batch["cond"], rand_t(U["fake_t"]), stage_randn(ctx, x0, 11))
        logs = {"fake_loss": float(fl.detach())}
        if not gen_step:
            return None, logs  # two time-scale update: the generator waits
        loss, gen_logs = generator_loss(ctx, p, x0, batch, rand_t)
        return loss, {**logs, **gen_logs}


STAGE = ScoreDistill()

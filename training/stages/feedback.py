"""Human-feedback stage (ReFL): climb a reward on images decoded from the student's one-step x0.

Per batch: start from unit noise at t = 999, run the student (the earlier stage LoRAs active) without
gradient along a trailing DDIM grid down to a random grid step (the last `late_fraction` of the grid; by
default any, t = 999 included: the start of a 1-step sample), then one student step with
gradient predicts x0, the VAE decodes it, the reward scores it and the loss is mean(ReLU(alpha -
reward)) (rewards above alpha no longer pull), plus the regulariser toward the earlier stages at that
step and (anchor_start) at t = 999. Only the stage's own LoRA adapter trains, so it is exported as a
separate LoRA and merged later.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.diffusion import abar_at, ddim_point, eps_to_x0, trailing_grid, unet_kwargs
from training.stages.base import U, EpsModel, Stage


@torch.no_grad()
def ddim_to(unet, noise, cond, grid: list[int], stop: int, alphas_cumprod):
    """Deterministic DDIM along `grid` from pure noise, stopping at grid[stop] (x_vp at that t)."""
    x = noise
    for i in range(stop):
        t, t_next = grid[i], grid[i + 1]
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = unet(x, tt, **unet_kwargs(cond)).sample
        a, a_next = abar_at(alphas_cumprod, tt, x), abar_at(alphas_cumprod, torch.full_like(tt, t_next), x)
        x = ddim_point(eps_to_x0(x, eps, a), eps, a_next)
    return x


def decode(vae, latents):
    scale = getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / scale + shift).sample


def late_x(unet, noise, cond, alphas_cumprod, stop: int, steps: int):
    """(x_t, timesteps) at grid[stop] of a `steps`-step trailing grid, reached without gradient."""
    grid = trailing_grid(steps)
    if not 0 <= stop < steps:
        raise ValueError(f"feedback.stop must be in [0, {steps - 1}] for {steps} steps, got {stop}")
    x_t = ddim_to(unet, noise, cond, grid, stop, alphas_cumprod)
    return x_t, torch.full((noise.shape[0],), grid[stop], device=noise.device, dtype=torch.long)


def one_step_x0(unet, x_t, tt, cond, alphas_cumprod):
    return eps_to_x0(x_t, unet(x_t, tt, **unet_kwargs(cond)).sample, abar_at(alphas_cumprod, tt, x_t))


def score(vae, reward, x0, prompts):
    images = decode(vae, x0)
    images = images.clamp(-1, 1) if getattr(reward, "input_range", (-1, 1))[0] < 0 else (images / 2 + 0.5).clamp(0, 1)
    return reward(images, prompts)


def refl_loss(unet, vae, reward, prompts, cond, noise, alphas_cumprod, stop: int, steps: int = 4,
              alpha: float = 1.0):
    """-> (ReFL loss, rewards) for a batch: no-grad DDIM to grid[stop], then one step with gradient to x0."""
    x_t, tt = late_x(unet, noise, cond, alphas_cumprod, stop, steps)
    r = score(vae, reward, one_step_x0(unet, x_t, tt, cond, alphas_cumprod), prompts)
    return F.relu(alpha - r).mean(), r.detach()


def late_stop(steps: int, late_fraction: float, u: float) -> int:
    """A late grid index from a uniform u: one of the last `late_fraction` of the grid (ReFL's late step)."""
    first = min(steps - 1, int(steps * (1 - late_fraction)))
    return first + min(steps - first - 1, int(u * (steps - first)))


def reward_options(p: dict) -> dict:
    """`reward_weights` is the local weights file of the reward ('weights' for tiny, 'mlp_weights' for
    laion_aesthetic, 'weights' for hpsv2); `reward_options` passes anything else through."""
    opts = dict(p["reward_options"] or {})
    if p["reward_weights"]:
        opts[{"laion_aesthetic": "mlp_weights"}.get(p["reward"], "weights")] = p["reward_weights"]
    return opts


class Feedback(Stage):
    name = "feedback"
    # late_fraction 1.0 (the stop step may be t = 999, where a 1-step sample starts), grad_scale 0.03 with
    # reg_weight 1.0, anchor_start: measured on the quality benchmark's task (docs/stages.md, "feedback"):
    # 0.5 / 1.0 / 0 broke 1-step sampling (align 0.670 -> 0.443); without the anchor one seed in three
    # collapsed at 1 step (0.453).
    params = {"lr": 0.0, "reward": "tiny", "reward_weights": "", "reward_options": {}, "alpha": 1.0, "steps": 4,
              "late_fraction": 1.0, "grad_scale": 0.03, "reg_weight": 1.0, "anchor_start": True}

    def check_params(self, p, stage, key):
        import difflib
        import os

        from training.models.rewards import REWARDS

        name = p["reward"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"config key '{key}.reward': expected a reward name or 'module:function', got {name!r}")
        if ":" not in name and name not in REWARDS:
            near = difflib.get_close_matches(name, REWARDS, n=1)
            raise ValueError(f"config key '{key}.reward': unknown reward {name!r}"
                             + (f"; did you mean {near[0]!r}?" if near else "")
                             + f" (known: {sorted(REWARDS)}, or 'module:function')")
        if p["reward_weights"] and not os.path.isfile(p["reward_weights"]):
            raise ValueError(f"config key '{key}.reward_weights': file not found: {p['reward_weights']}")
        if float(p["grad_scale"]) <= 0 or float(p["reg_weight"]) < 0:
            raise ValueError(f"config key '{key}.grad_scale' / '{key}.reg_weight': need grad_scale > 0 and "
                             f"reg_weight >= 0, got {p['grad_scale']}, {p['reg_weight']}")
        if not isinstance(p["anchor_start"], bool):
            raise ValueError(f"config key '{key}.anchor_start': expected true or false, got {p['anchor_start']!r}")
        if int(p["steps"]) < 1 or not 0 < float(p["late_fraction"]) <= 1:
            raise ValueError(f"config key '{key}.steps' / '{key}.late_fraction': need steps >= 1 and "
                             f"0 < late_fraction <= 1, got {p['steps']}, {p['late_fraction']}")

    def preflight(self, stage, index, device):
        """Build the reward before any training step, so a missing package / weights file fails at once."""
        from training.errors import ConfigError
        from training.models.rewards import RewardUnavailable, build_reward

        p = self.resolved(stage)
        try:
            reward = build_reward(p["reward"], **reward_options(p))
        except (RewardUnavailable, ValueError, TypeError, OSError) as e:
            raise ConfigError(f"config key 'stages[{index}].params.reward': {e}") from e
        best = getattr(reward, "max_reward", None)  # e.g. 0 for a log-probability
        if best is not None and float(p["alpha"]) > best:
            raise ConfigError(f"config key 'stages[{index}].params.alpha': {p['alpha']} is above the best reward "
                              f"{p['reward']!r} can give ({best}), so the hinge ReLU(alpha - reward) never switches "
                              f"off; pick alpha <= {best}")
        return reward.to(device) if isinstance(reward, torch.nn.Module) else reward

    def setup(self, ctx, stage):
        ctx.state["reward"] = ctx.resources.get(ctx.stage_index) or self.preflight(stage, ctx.stage_index, ctx.device)

    def loss(self, ctx, batch, stage):
        """grad_scale * mean(ReLU(alpha - reward)) + reg_weight * MSE(x0, the earlier stages' x0 at the same
        x_t): ReFL's hinge and gradient scale, and a tie to the previous stage so an easy optimum of the
        reward (a colour, a texture) cannot take over."""
        p = self.resolved(stage)
        steps = int(p["steps"])
        # the late step comes from the global batch's uniforms: the same for any process count and on resume
        stop = late_stop(steps, float(p["late_fraction"]), float(batch["step_u"][U["refl_stop"]]))
        student = EpsModel(ctx.student, ctx.abar, ctx.prediction_type)
        x_t, tt = late_x(student, batch["noise"], batch["cond"], ctx.abar, stop, steps)
        x0 = one_step_x0(student, x_t, tt, batch["cond"], ctx.abar)
        r = score(ctx.vae, ctx.state["reward"], x0, batch["captions"])
        hinge = F.relu(float(p["alpha"]) - r).mean()
        reg = x0.new_zeros(())
        if float(p["reg_weight"]) > 0:
            reg = F.mse_loss(x0.float(), previous_stage_x0(ctx, x_t, tt, batch["cond"]).float())
            if p["anchor_start"] and stop > 0:
                reg = reg + start_anchor(ctx, student, batch)
        loss = float(p["grad_scale"]) * hinge + float(p["reg_weight"]) * reg
        return loss, {"feedback_loss": float(hinge.detach()), "reward": float(r.detach().float().mean()),
                      "feedback_reg": float(reg.detach()), "stop_t": int(tt[0])}


def start_anchor(ctx, student, batch):
    """MSE of the 1-step x0 (from the batch's noise at t = 999) to the earlier stages' x0 there."""
    x_t, tt = late_x(student, batch["noise"], batch["cond"], ctx.abar, 0, 1)
    x0 = one_step_x0(student, x_t, tt, batch["cond"], ctx.abar)
    return F.mse_loss(x0.float(), previous_stage_x0(ctx, x_t, tt, batch["cond"]).float())


@torch.no_grad()
def previous_stage_x0(ctx, x_t, tt, cond):
    """x0 from the same x_t with the stage's own adapter off: what the earlier stages alone predict."""
    earlier = [a for a in ctx.adapters.active if a not in ctx.adapters.trainable]
    with ctx.adapters.only(earlier, []):
        return one_step_x0(EpsModel(ctx.unet, ctx.abar, ctx.prediction_type), x_t, tt, cond, ctx.abar)


STAGE = Feedback()

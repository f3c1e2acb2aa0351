"""Human-feedback stage (ReFL): climb a reward on images decoded from the student's one-step x0.

Per batch: start from unit noise at t = 999, run the student (the earlier stage LoRAs active) without
gradient along a trailing DDIM grid down to a random *late* grid step, then one student step with
gradient predicts x0, the VAE decodes it, the reward scores it and the loss is mean(ReLU(alpha -
reward)) (rewards above alpha no longer pull). Only the stage's own LoRA adapter trains, so it is
exported as a separate LoRA and merged later.
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


def refl_loss(unet, vae, reward, prompts, cond, noise, alphas_cumprod, stop: int, steps: int = 4,
              alpha: float = 1.0):
    """-> (ReFL loss, rewards) for a batch: no-grad DDIM to grid[stop], then one step with gradient to x0."""
    grid = trailing_grid(steps)
    if not 0 <= stop < steps:
        raise ValueError(f"feedback.stop must be in [0, {steps - 1}] for {steps} steps, got {stop}")
    x_t = ddim_to(unet, noise, cond, grid, stop, alphas_cumprod)
    tt = torch.full((noise.shape[0],), grid[stop], device=noise.device, dtype=torch.long)
    x0 = eps_to_x0(x_t, unet(x_t, tt, **unet_kwargs(cond)).sample, abar_at(alphas_cumprod, tt, x_t))
    images = decode(vae, x0)
    images = images.clamp(-1, 1) if getattr(reward, "input_range", (-1, 1))[0] < 0 else (images / 2 + 0.5).clamp(0, 1)
    r = reward(images, prompts)
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
    params = {"lr": 0.0, "reward": "tiny", "reward_weights": "", "reward_options": {}, "alpha": 1.0, "steps": 4,
              "late_fraction": 0.5}

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
        return reward.to(device) if isinstance(reward, torch.nn.Module) else reward

    def setup(self, ctx, stage):
        ctx.state["reward"] = ctx.resources.get(ctx.stage_index) or self.preflight(stage, ctx.stage_index, ctx.device)

    def loss(self, ctx, batch, stage):
        p = self.resolved(stage)
        steps = int(p["steps"])
        # the late step comes from the global batch's uniforms: the same for any process count and on resume
        stop = late_stop(steps, float(p["late_fraction"]), float(batch["step_u"][U["refl_stop"]]))
        student = EpsModel(ctx.student, ctx.abar, ctx.prediction_type)
        loss, r = refl_loss(student, ctx.vae, ctx.state["reward"], batch["captions"], batch["cond"],
                            batch["noise"], ctx.abar, stop, steps, float(p["alpha"]))
        return loss, {"feedback_loss": float(loss.detach()), "reward": float(r.float().mean()),
                      "stop_t": trailing_grid(steps)[stop]}


STAGE = Feedback()

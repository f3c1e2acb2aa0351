"""Human-feedback stage (ReFL): climb a reward on images decoded from the student's one-step x0.

Per batch: start from unit noise at t = 999, run the student (its previous-stage LoRA folded in
or active) without gradient along a trailing DDIM grid down to a random *late* grid step, then
one student step with gradient predicts x0, the VAE decodes it, the reward scores it and the loss
is mean(ReLU(alpha - reward)) (rewards above alpha no longer pull). Only the stage's own LoRA
adapter is trainable, so it is exported as a separate LoRA and merged later.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def trailing_grid(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing timestep grid, e.g. 4 -> [999, 749, 499, 249] (diffusers' "trailing" spacing)."""
    return [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]


def eps_to_x0(x_vp, eps, abar_t):
    return (x_vp - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


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


def _abar(alphas_cumprod, t, like):
    return alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, *[1] * (like.ndim - 1))


@torch.no_grad()
def ddim_to(unet, noise, cond, grid: list[int], stop: int, alphas_cumprod):
    """Deterministic DDIM along `grid` from pure noise, stopping at grid[stop] (x_vp at that t)."""
    x = noise
    for i in range(stop):
        t, t_next = grid[i], grid[i + 1]
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = unet(x, tt, **unet_kwargs(cond)).sample
        a, a_next = _abar(alphas_cumprod, tt, x), _abar(alphas_cumprod, torch.full_like(tt, t_next), x)
        x = a_next.sqrt() * eps_to_x0(x, eps, a) + (1 - a_next).sqrt() * eps
    return x


def decode(vae, latents):
    scale = getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / scale + shift).sample


def refl_loss(unet, vae, reward, prompts, cond, noise, alphas_cumprod, stop: int, steps: int = 4,
              alpha: float = 1.0, return_reward: bool = False):
    """ReFL loss for a batch: no-grad DDIM to grid[stop], then one step with gradient to x0."""
    grid = trailing_grid(steps)
    if not 0 <= stop < steps:
        raise ValueError(f"feedback.stop must be in [0, {steps - 1}] for {steps} steps, got {stop}")
    x_t = ddim_to(unet, noise, cond, grid, stop, alphas_cumprod)
    tt = torch.full((noise.shape[0],), grid[stop], device=noise.device, dtype=torch.long)
    x0 = eps_to_x0(x_t, unet(x_t, tt, **unet_kwargs(cond)).sample, _abar(alphas_cumprod, tt, x_t))
    images = decode(vae, x0)
    images = images.clamp(-1, 1) if getattr(reward, "input_range", (-1, 1))[0] < 0 else (images / 2 + 0.5).clamp(0, 1)
    r = reward(images, prompts)
    loss = F.relu(alpha - r).mean()
    return (loss, r.detach()) if return_reward else loss


def sample_stop(steps: int, late_fraction: float = 0.5, generator: torch.Generator | None = None) -> int:
    """A random late grid index: the last `late_fraction` of the grid (ReFL's 'late step')."""
    first = min(steps - 1, int(steps * (1 - late_fraction)))
    return int(torch.randint(first, steps, (1,), generator=generator))


def feedback_step(unet, vae, reward, optimizer, batch, alphas_cumprod, cfg: dict, generator=None):
    """One optimiser step of the feedback stage; batch = dict(prompts, cond, noise). Returns stats."""
    steps = int(cfg.get("steps", 4))
    stop = sample_stop(steps, float(cfg.get("late_fraction", 0.5)), generator)
    loss, r = refl_loss(unet, vae, reward, batch["prompts"], batch["cond"], batch["noise"], alphas_cumprod,
                        stop, steps, float(cfg.get("alpha", 1.0)), return_reward=True)
    weighted = float(cfg.get("weight", 1.0)) * loss
    optimizer.zero_grad(set_to_none=True)
    weighted.backward()
    optimizer.step()
    return {"feedback_loss": loss.item(), "reward": r.mean().item(), "stop_t": trailing_grid(steps)[stop]}


# --- training.run plug-in: ReFL on the student's own "feedback" LoRA (see docs/stages.md) ---------

PARAMS = {"lr": 0.0, "reward": "tiny", "reward_weights": "", "reward_options": {}, "alpha": 1.0, "steps": 4,
          "late_fraction": 0.5}


def reward_options(p: dict) -> dict:
    """`reward_weights` is the local weights file of the reward ('weights' for tiny, 'mlp_weights' for
    laion_aesthetic, 'weights' for hpsv2); `reward_options` passes anything else through."""
    opts = dict(p["reward_options"] or {})
    if p["reward_weights"]:
        opts[{"laion_aesthetic": "mlp_weights"}.get(p["reward"], "weights")] = p["reward_weights"]
    return opts


def check_params(p: dict, stage, key: str):
    import difflib
    import os

    from training.rewards import REWARDS

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


def preflight(stage, index: int, device):
    """Build the reward before any training step, so a missing package / weights file fails at once."""
    from training.config import ConfigError
    from training.rewards import RewardUnavailable, build_reward
    from training.stages import stage_params

    p = stage_params(stage, PARAMS)
    try:
        reward = build_reward(p["reward"], **reward_options(p))
    except (RewardUnavailable, ValueError, TypeError, OSError) as e:
        raise ConfigError(f"config key 'stages[{index}].params.reward': {e}") from e
    return reward.to(device) if isinstance(reward, torch.nn.Module) else reward


def setup(ctx, stage):
    ctx.state["reward"] = ctx.resources.get(ctx.stage_index) or preflight(stage, ctx.stage_index, ctx.device)


def stage_loss(ctx, batch, stage):
    from training.stages import EpsModel, stage_params

    p = stage_params(stage, PARAMS)
    steps = int(p["steps"])
    first = min(steps - 1, int(steps * (1 - float(p["late_fraction"]))))
    # the late step comes from the batch's uniforms: the same for any process count and on resume
    stop = first + min(steps - first - 1, int(float(batch.get("step_u", batch["u"][0])[4]) * (steps - first)))
    student = EpsModel(ctx.student, ctx.abar, ctx.prediction_type)
    loss, r = refl_loss(student, ctx.vae, ctx.state["reward"], batch["captions"], batch["cond"],
                        batch["noise"], ctx.abar, stop, steps, float(p["alpha"]), return_reward=True)
    return loss, {"feedback_loss": float(loss.detach()), "reward": float(r.float().mean()),
                  "stop_t": trailing_grid(steps)[stop]}

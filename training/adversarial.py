"""Adversarial term for TSCD: a discriminator on frozen teacher-UNet features (SDXL-Lightning style).

The frozen teacher encoder (down blocks + mid block) reads a noised sample at a timestep with its
text condition; small trainable heads turn each feature map into per-pixel logits. Gradients flow
through the frozen teacher to the input, so the student receives the generator loss. The weight
of the term grows as the segment count falls (Hyper-SD: more adversarial at fewer steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.feedback import unet_kwargs

DEFAULT_ADV_WEIGHTS = {8: 0.0, 4: 0.05, 2: 0.1, 1: 0.2}
LOSSES = ("hinge", "non_saturating")


class _StopForward(Exception):
    pass


def _head(channels: int) -> nn.Module:
    groups = 8 if channels % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                         nn.SiLU(), nn.Conv2d(channels, 1, 1))


class Discriminator(nn.Module):
    """Trainable heads on the frozen teacher's down-block and mid-block outputs.

    `forward(x_vp, timestep, cond) -> logits [B]` (cond: encoder_hidden_states or a UNet kwargs dict;
    mean over heads and positions). The teacher is stored outside the module's parameters so optimisers, state dicts
    and `.train()` only see the heads.
    """

    def __init__(self, teacher_unet: nn.Module):
        super().__init__()
        self._teacher = [teacher_unet]  # a list hides it from nn.Module registration
        teacher_unet.requires_grad_(False)
        channels = list(teacher_unet.config.block_out_channels) + [teacher_unet.config.block_out_channels[-1]]
        self.heads = nn.ModuleList(_head(c) for c in channels)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def features(self, x_vp, timestep, cond) -> list[torch.Tensor]:
        feats, hooks = [], []

        def keep(_m, _inp, out):
            feats.append(out[0] if isinstance(out, tuple) else out)

        def keep_and_stop(m, inp, out):
            keep(m, inp, out)
            raise _StopForward  # the up blocks are not needed: skip them

        unet = self.teacher
        hooks += [b.register_forward_hook(keep) for b in unet.down_blocks]
        hooks.append(unet.mid_block.register_forward_hook(keep_and_stop))
        try:
            unet(x_vp, timestep, **unet_kwargs(cond))
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        return feats

    def forward(self, x_vp, timestep, cond) -> torch.Tensor:
        feats = self.features(x_vp, timestep, cond)
        logits = [head(f.to(head[0].weight.dtype)).mean(dim=(1, 2, 3)) for head, f in zip(self.heads, feats)]
        return torch.stack(logits, 0).mean(0)


def _check_loss(kind):
    if kind not in LOSSES:
        raise ValueError(f"adversarial.loss must be one of {LOSSES}, got {kind!r}")


def discriminator_loss(real_logits, fake_logits, kind: str = "hinge") -> torch.Tensor:
    _check_loss(kind)
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_adv_loss(fake_logits, kind: str = "hinge") -> torch.Tensor:
    _check_loss(kind)
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def adv_weight_for_segments(k: int, cfg: dict | None = None) -> float:
    """Weight of the adversarial term at k segments; `cfg` maps segments -> weight (YAML str keys ok).

    `cfg` may be the mapping itself or an `adversarial` config section with `enabled` / `weights`.
    """
    if cfg is not None and ("weights" in cfg or "enabled" in cfg):
        if not cfg.get("enabled", True):
            return 0.0
        cfg = cfg.get("weights")
    table = {int(key): float(v) for key, v in (cfg or DEFAULT_ADV_WEIGHTS).items()}
    if int(k) not in table:
        raise ValueError(f"adversarial.weights has no entry for {k} segments (has {sorted(table)})")
    return table[int(k)]


def noise_to(x0, timestep, noise, alphas_cumprod) -> torch.Tensor:
    """VP noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (both sides of D see the same t, noise)."""
    abar = alphas_cumprod.to(x0.device)[timestep].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

"""The adversarial stage: TSCD plus an adversarial term from a discriminator on frozen teacher-UNet
features (SDXL-Lightning style).

The frozen teacher encoder (down blocks + mid block) reads a noised sample at a timestep with its
text condition; small trainable heads turn each feature map into per-pixel logits. Gradients flow
through the frozen teacher to the input, so the student receives the generator loss. The weight
of the term grows as the segment count falls (Hyper-SD: more adversarial at fewer steps).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from training.diffusion import ddim_point, unet_kwargs
from training.stages.base import U, Stage, stage_randn
from training.stages.tscd import distance, student_boundary, tscd_targets

# Measured on the quality benchmark's task (docs/stages.md): with a discriminator that learns, 0.1 / 0.2 at
# 2 / 1 segments outweigh the TSCD loss ~10x and raise 1-step FD 5569 -> 12299; 0.01 / 0.02 lower FD.
DEFAULT_ADV_WEIGHTS = {8: 0.0, 4: 0.005, 2: 0.01, 1: 0.02}
LOSSES = ("hinge", "non_saturating")
REAL_SOURCES = ("target", "data")  # the discriminator's real side: PCM's consistency target, or the data
# The fake side: the student's boundary prediction from the TSCD point x_j (PCM), or from the top of j's
# segment, where a few-step sampler actually calls the student (its worst and only sampled input).
FAKE_SOURCES = ("tscd", "sampler")


class _StopForward(Exception):
    pass


def _head(channels: int) -> nn.Module:
    groups = 8 if channels % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                         nn.SiLU(), nn.Conv2d(channels, 1, 1))


@contextlib.contextmanager
def no_checkpointing(unet):
    """Run the teacher's blocks without gradient checkpointing. The features are called with every adapter
    off, but their backward runs later, outside that context: a checkpointed block would be recomputed
    with the student's adapters on (wrong gradients, or a metadata error under bf16 autocast)."""
    on = getattr(unet, "is_gradient_checkpointing", False)
    if on:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if on:
            unet.enable_gradient_checkpointing()


class Discriminator(nn.Module):
    """Trainable heads on the frozen teacher's down-block and mid-block outputs.

    `forward(x_vp, timestep, cond) -> logits [B]` (cond: encoder_hidden_states or a UNet kwargs dict;
    mean over heads and positions). The teacher is stored outside the module's parameters so optimisers, state dicts
    and `.train()` only see the heads.
    """

    def __init__(self, teacher_unet: nn.Module, freeze: bool = True):
        super().__init__()
        self._teacher = [teacher_unet]  # a list hides it from nn.Module registration
        if freeze:  # training.run shares the UNet with the student LoRA: it handles freezing itself
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
            with no_checkpointing(unet):
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


# --- the stage: TSCD loss + the adversarial generator term (docs/stages.md) -------------------------

def discriminator_step(ctx, disc, opt, real, fake, t_d, cond, kind):
    """One update of the discriminator (outside DDP: gradients averaged by hand); returns its loss."""
    from training.distributed import all_reduce_grads

    with ctx.teacher():
        d_loss = discriminator_loss(disc(real, t_d, cond), disc(fake.detach(), t_d, cond), kind)
    opt.zero_grad(set_to_none=True)
    d_loss.backward()
    all_reduce_grads(ctx.accelerator, disc.parameters())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return d_loss


class Adversarial(Stage):
    name = "adversarial"
    params = {"enabled": True, "adv_weights": {str(k): v for k, v in DEFAULT_ADV_WEIGHTS.items()},
              "loss": "hinge", "disc_lr": 1e-3, "t_span": 0.25, "real": "data", "fake_from": "sampler"}

    def check_params(self, p, stage, key):
        if not 0 < float(p["t_span"]) <= 1:
            raise ValueError(f"config key '{key}.t_span': must be in (0, 1], got {p['t_span']}")
        if p["loss"] not in LOSSES:
            raise ValueError(f"config key '{key}.loss': {p['loss']!r} is not one of {list(LOSSES)}")
        if p["real"] not in REAL_SOURCES:
            raise ValueError(f"config key '{key}.real': {p['real']!r} is not one of {list(REAL_SOURCES)}")
        if p["fake_from"] not in FAKE_SOURCES:
            raise ValueError(f"config key '{key}.fake_from': {p['fake_from']!r} is not one of {list(FAKE_SOURCES)}")
        if p["fake_from"] == "sampler" and p["real"] == "target":
            raise ValueError(f"config key '{key}.real': 'target' is the consistency target of the TSCD point; "
                             "with fake_from: sampler the real side must be 'data'")
        try:
            adv_weight_for_segments(stage.segments, {"enabled": p["enabled"], "weights": p["adv_weights"]})
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"config key '{key}.adv_weights': {e}") from None

    def build_persistent(self, unet, stages, cfg):
        """One discriminator (and its optimizer) for all adversarial stages; checkpointed by the engine."""
        lr = float(self.resolved(stages[0])["disc_lr"])
        disc = Discriminator(unet, freeze=False).to(unet.device)
        return {"disc": disc, "disc_opt": torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.0, 0.99))}

    def loss(self, ctx, batch, stage):
        p = self.resolved(stage)
        w = adv_weight_for_segments(stage.segments, {"enabled": p["enabled"], "weights": p["adv_weights"]})
        x_j, t_j, j, b, target = tscd_targets(ctx, batch, stage.segments)
        pred, _ = student_boundary(ctx, batch, x_j, t_j, j, b)
        tl = distance(pred, target, ctx.cfg.tscd.loss, ctx.cfg.tscd.huber_c)
        if w == 0:
            return tl, {"tscd_loss": float(tl.detach())}
        cond, disc = batch["cond"], ctx.persistent["disc"]
        fake_x = pred if p["fake_from"] == "tscd" else sampler_prediction(ctx, batch, j, b, stage.segments)
        real_x = target.to(pred.dtype) if p["real"] == "target" else batch["latents"].to(pred.dtype)
        t_d, fake, real = diffused_pair(ctx, batch, fake_x, real_x, b, stage.segments, float(p["t_span"]),
                                        real_is_data=p["real"] == "data")
        d_loss = discriminator_step(ctx, disc, ctx.persistent["disc_opt"], real, fake, t_d, cond, p["loss"])
        with ctx.teacher():
            g_loss = generator_adv_loss(disc(fake, t_d, cond), p["loss"])
        return tl + w * g_loss, {"tscd_loss": float(tl.detach()), "adv_g": float(g_loss.detach()),
                                 "adv_d": float(d_loss.detach()), "adv_weight": w}


def sampler_prediction(ctx, batch, j, b, segments):
    """The student's boundary prediction (with gradient) from the top of j's segment: the data diffused to
    the timestep a `segments`-step sampler starts the segment from (t = 999 for one segment). From there
    its output differs most from the data, so the discriminator has something to learn; from a uniformly
    drawn TSCD point the student's output is mostly indistinguishable (docs/stages.md)."""
    top = ctx.grid.segment_top(j, segments)
    x_top = ddim_point(batch["latents"], batch["noise"], ctx.grid.abar[top]).to(batch["latents"].dtype)
    pred, _ = student_boundary(ctx, batch, x_top, ctx.grid.timestep(top), top, b)
    return pred


def diffused_pair(ctx, batch, pred, real_x, b, segments, t_span=1.0, real_is_data=False):
    """The (t, fake, real) the discriminator sees: the student's boundary prediction (fake), diffused forward
    from the boundary to a random t in [t_b, t_b + t_span * T / k) with fresh noise, and the real side at the
    same t. PCM's pair (`real: target`): the consistency target at the same boundary, diffused the same way,
    so D judges what the stage trains. `real: data`: the clean latents diffused straight to t (a sample of
    the true marginal there, as ADD / SDXL-Lightning's real side)."""
    grid, T = ctx.grid, ctx.grid.num_train_timesteps
    t_b = torch.where(b > 0, grid.timestep(b), torch.zeros_like(b))
    t_d = (t_b + batch["u"][:, U["adv_t"]] * (t_span * T / segments)).long().clamp(max=T - 1)
    ratio = ctx.abar[t_d] / grid.abar[b]  # abar(t_d) / abar(t_b): forward diffusion from the boundary
    fake = ddim_point(pred, stage_randn(ctx, pred, 3), ratio)
    real = ddim_point(real_x, stage_randn(ctx, pred, 5), ctx.abar[t_d] if real_is_data else ratio)
    return t_d, fake, real


STAGE = Adversarial()

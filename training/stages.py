"""Stage plug-ins: each `stages[i].type` in the config names a module with a loss function.

See docs/training.md ("Stage plug-in interface"). A stage module exposes

    stage_loss(ctx: StageContext, batch: dict, stage: StageConfig) -> (loss tensor, {name: float})
    setup(ctx, stage) -> None            # optional, called when the stage starts (also on resume)

The loop owns the optimizer, accumulation, EMA, checkpoints and export; a stage only computes a loss.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

STAGE_MODULES = {
    "tscd": "training.tscd",
    "adversarial": "training.adversarial",      # TSCD + adversarial term on teacher features
    "feedback": "training.feedback",            # ReFL human feedback, its own LoRA
    "score_distill": "training.score_distill",  # DMD-style 1-step, its own LoRA
}
# Each group trains its own LoRA adapter; later groups run on top of the earlier (frozen) ones.
GROUP_OF = {"tscd": "tscd", "adversarial": "tscd", "feedback": "feedback", "score_distill": "score_distill"}
GROUP_ORDER = ("tscd", "feedback", "score_distill")
ADAPTER_OF = {"tscd": "default", "feedback": "feedback", "score_distill": "dmd"}


def stage_params(stage, defaults: dict) -> dict:
    """stage.params over the module's defaults (unknown keys are rejected at config time)."""
    return {**defaults, **(stage.params or {})}


class EpsModel:
    """Calls a UNet and returns its output as epsilon (v-prediction converted), optionally inside a
    context (teacher = adapters off, fake score = its own adapter), so eps-based helpers work for both
    prediction types."""

    def __init__(self, unet, abar, prediction_type, context=None):
        self.unet, self.abar, self.pt, self.context = unet, abar, prediction_type, context

    def __call__(self, x, t, **kwargs):
        from types import SimpleNamespace

        from .tscd import to_x0_eps

        with (self.context() if self.context else contextlib.nullcontext()):
            out = self.unet(x, t, **kwargs).sample
        if self.pt != "epsilon":
            out = to_x0_eps(out, x, self.abar[t], self.pt)[1].to(x.dtype)
        return SimpleNamespace(sample=out)


def global_randn(ctx, like, salt: int):
    """Noise shaped like `like` (this process's slice of the batch), cut from ONE draw for the global
    batch seeded by (seed, step, salt): the same numbers per sample for any process count, and resume-exact."""
    import torch

    acc = ctx.accelerator
    n, r, b = acc.num_processes, acc.process_index, like.shape[0]
    g = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + ctx.step * 7 + salt)
    full = torch.randn((b * n, *like.shape[1:]), generator=g)
    return full[r * b:(r + 1) * b].to(like.device, like.dtype)


def known_stage_types() -> list[str]:
    return sorted(STAGE_MODULES)


def load_stage_module(stage_type: str):
    module = importlib.import_module(STAGE_MODULES[stage_type])
    if not callable(getattr(module, "stage_loss", None)):
        raise RuntimeError(f"stage type {stage_type!r}: module {module.__name__} has no stage_loss(ctx, batch, stage)")
    return module


@dataclass
class StageContext:
    """What a stage's loss may use. Tensors are on ctx.device; abar is float64 on ctx.device."""
    accelerator: Any
    student: Any                 # UNet with the LoRA (DDP-wrapped when distributed): call for gradients
    unet: Any                    # the unwrapped UNet (same weights) for no-grad calls
    vae: Any
    abar: Any                    # alphas_cumprod, float64 [num_train_timesteps]
    grid: Any                    # tscd.DDIMGrid
    prediction_type: str         # "epsilon" | "v_prediction"
    cfg: Any                     # TrainConfig
    encode_prompts: Callable     # list[str] -> unet kwargs dict (encoder_hidden_states, added_cond_kwargs)
    teacher: Callable = None     # context manager: LoRA disabled -> the frozen base model
    target: Callable = None      # context manager: EMA LoRA weights swapped in (no-op if ema_decay=0)
    step: int = 0                # global optimizer step (0-based)
    state: dict = field(default_factory=dict)  # per-stage scratch space (rebuilt by setup, not checkpointed)
    adapters: Any = None         # lora.AdapterStack: which LoRA adapters are active / trainable
    persistent: dict = field(default_factory=dict)  # discriminator, fake-score optimizer...: checkpointed
    stage_start: int = 0         # global step at which the current stage began
    resources: dict = field(default_factory=dict)  # {stage index: object from module.preflight} (rewards)
    stage_index: int = 0         # index of the current stage in cfg.stages (for error messages)
    resume_dir: str = None       # the checkpoint this run resumed from (a stage restores its own state)

    @property
    def device(self):
        return self.accelerator.device


def nullcontext():
    return contextlib.nullcontext()

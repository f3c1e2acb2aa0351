"""The stage protocol: what a stage type implements and what the engine hands it.

A stage type is a `Stage` subclass (one file per type, registered in stages/__init__.py). The engine
owns the optimizer, accumulation, EMA, checkpoints and export; a stage computes a loss:

    params                                  defaults of `stages[i].params` (unknown keys are config errors)
    check_params(p, stage, key)             raise ValueError naming `key` (config time)
    preflight(stage, index, device)         build what must fail before step 0 (a reward model)
    build_persistent(unet, stages, cfg)     networks + optimizers the stage owns (checkpointed)
    setup(ctx, stage) -> OwnStudent | None  when the stage starts (also on resume)
    loss(ctx, batch, stage) -> (loss | None, {name: float})   None: only the stage's helper trained
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

from training.diffusion import to_x0_eps

# Columns of batch["u"]: uniforms in [0, 1) drawn per sample for the GLOBAL batch (engine/batches.py),
# one column per random decision, so any process count and a resumed run make the same choices.
U = {"tscd_j": 0, "tscd_w": 1, "caption_dropout": 2, "adv_t": 3, "refl_stop": 4, "dmd_t": 5, "fake_t": 6}
# "refl_stop" is read from batch["step_u"] (the global batch's first row: one choice per step).
# Salts of `distributed.global_randn` (fresh noise per step): adversarial 3, fake score 11, DMD 13.


@dataclass
class StageContext:
    """What a stage's loss may use; built by the engine when a stage starts. Tensors are on ctx.device;
    abar is float64. Stages keep their own scratch in `state` and never reassign the other fields."""
    accelerator: Any
    student: Any                 # the module to call for gradients (DDP-wrapped for the first group)
    unet: Any                    # the unwrapped shared UNet (same weights) for no-grad calls
    vae: Any
    abar: Any                    # alphas_cumprod, float64 [num_train_timesteps]
    grid: Any                    # diffusion.DDIMGrid (the TSCD solver grid)
    prediction_type: str         # "epsilon" | "v_prediction"
    cfg: Any                     # config.TrainConfig
    teacher: Callable = None     # context manager: every adapter off -> the frozen base model
    target: Callable = None      # context manager: EMA weights of the TSCD LoRA swapped in
    adapters: Any = None         # models.adapters.AdapterStack: which adapters are active / trainable
    persistent: dict = field(default_factory=dict)  # discriminator, fake-score optimizer...: checkpointed
    resources: dict = field(default_factory=dict)   # {stage index: object from preflight} (rewards)
    stage_index: int = 0         # index of the current stage in cfg.stages (for error messages)
    stage_start: int = 0         # global step at which the current stage began
    step: int = 0                # global optimizer step (0-based), advanced by the engine
    state: dict = field(default_factory=dict)  # per-stage scratch space (rebuilt by setup, not checkpointed)

    @property
    def device(self):
        return self.accelerator.device


@dataclass
class OwnStudent:
    """Returned by `setup` when a stage trains a model of its own (score_distill mode full) instead of its
    group's LoRA: the engine calls `model` for gradients, steps `optimizer` beside the LoRA optimizer, and
    restores both from a checkpoint under `keys` when a run resumes inside the stage."""
    model: Any
    optimizer: Any
    keys: tuple = ("full_unet", "full_opt")


class Stage:
    name = ""
    params: dict = {}

    def resolved(self, stage) -> dict:
        """stage.params over the defaults (unknown keys were rejected at config time)."""
        return {**self.params, **(stage.params or {})}

    def check_params(self, p: dict, stage, key: str) -> None:
        pass

    def preflight(self, stage, index: int, device):
        return None

    def build_persistent(self, unet, stages, cfg) -> dict:
        return {}

    def setup(self, ctx: StageContext, stage) -> OwnStudent | None:
        return None

    def loss(self, ctx: StageContext, batch: dict, stage):
        raise NotImplementedError


class EpsModel:
    """Calls a UNet and returns its output as epsilon (v-prediction converted), optionally inside a
    context (teacher = adapters off, fake score = its own adapter), so eps-based helpers work for both
    prediction types."""

    def __init__(self, unet, abar, prediction_type, context=None):
        self.unet, self.abar, self.pt, self.context = unet, abar, prediction_type, context

    def __call__(self, x, t, **kwargs):
        from types import SimpleNamespace

        with (self.context() if self.context else contextlib.nullcontext()):
            out = self.unet(x, t, **kwargs).sample
        if self.pt != "epsilon":
            out = to_x0_eps(out, x, self.abar[t], self.pt)[1].to(x.dtype)
        return SimpleNamespace(sample=out)


def stage_randn(ctx: StageContext, like, salt: int):
    """Fresh noise for a stage's own draws (see distributed.global_randn)."""
    from training.distributed import global_randn

    return global_randn(ctx.accelerator, ctx.cfg.seed, ctx.step, like, salt)

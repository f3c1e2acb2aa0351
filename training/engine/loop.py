"""The training loop: switch stages at their boundaries, take optimizer steps, log and checkpoint."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from training.engine.batches import micro_batch
from training.errors import TrainingDiverged
from training.stages import GROUP_OF, get_stage
from training.stages.base import StageContext


@dataclass
class ActiveStage:
    index: int
    stage: Any                   # config.StageConfig
    plugin: Any                  # stages.base.Stage
    ctx: StageContext
    own: Any                     # stages.base.OwnStudent or None
    params: list                 # what this stage trains (its group's adapter, or its own model)


def stage_at(stages, step):
    """(index, stage) in force at global step `step` (0-based)."""
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i, s
    return len(stages) - 1, stages[-1]


def stage_context(run, index: int, student) -> StageContext:
    from training.diffusion import DDIMGrid

    t, base = run.train, run.base
    return StageContext(run.accelerator, student, t.unet, base.vae, base.abar,
                        DDIMGrid(base.abar, run.cfg.tscd.num_ddim_timesteps), base.prediction_type, run.cfg,
                        teacher=t.stack.disabled, target=t.ema.swapped, adapters=t.stack, persistent=t.persistent,
                        resources=run.resources, stage_index=index,
                        stage_start=sum(s.steps for s in run.cfg.stages[:index]), step=run.step)


def start_stage(run, index, stage) -> ActiveStage:
    """Switch adapters to the stage's group and build its context. DDP registered only the first group's
    adapter: later groups call the plain module and average their gradients by hand (optimizer_step)."""
    from training.engine.setup import adapters_for

    t, group, plugin = run.train, GROUP_OF[stage.type], get_stage(stage.type)
    t.stack.use(*adapters_for(group, t.groups, bool(t.init_rank)))
    ctx = stage_context(run, index, t.student if group == t.groups[0] else t.unet)
    if group == "tscd" and run.cfg.tscd.ema_restart and index > 0 and run.step == ctx.stage_start:
        t.ema.restart()  # only at the boundary itself: a run resumed inside the stage keeps its EMA
    own = plugin.setup(ctx, stage)
    if own is not None:
        ctx.student = own.model
        if run.step > ctx.stage_start:
            restore_own_student(run, own)
    params = [q for g in own.optimizer.param_groups for q in g["params"]] if own is not None else t.params[group]
    return ActiveStage(index, stage, plugin, ctx, own, params)


def restore_own_student(run, own):
    """Resumed inside a stage that trains its own model: the checkpoint holds the trained model + optimizer."""
    import training.engine.checkpoint as ckpt

    if not run.resume_dir:
        raise RuntimeError("a stage with its own model is under way but there is no resume checkpoint")
    ckpt.load_extra(run.resume_dir, dict(zip(own.keys, (own.model, own.optimizer))))


def optimizer_step(run, active: ActiveStage):
    """Accumulate grad_accum micro-batches, then one step of the LoRA optimizer (and the stage's own)."""
    from training.distributed import all_reduce_grads

    cfg, acc, t = run.cfg, run.accelerator, run.train
    ga, stage = cfg.optim.grad_accum, active.stage
    active.ctx.step = run.step
    for micro in range(ga):
        batch = micro_batch(run, run.step * ga + micro)
        sync = acc.no_sync(t.student) if micro < ga - 1 else contextlib.nullcontext()
        with sync, acc.autocast():
            loss, logs = active.plugin.loss(active.ctx, batch, stage)
            if loss is not None:  # None: this step only trained the stage's own helper (e.g. fake score)
                acc.backward(loss * stage.weight / ga)
    if acc.num_processes > 1 and GROUP_OF[stage.type] != t.groups[0]:
        all_reduce_grads(acc, active.params)  # outside DDP: averaged by hand
    if cfg.optim.max_grad_norm > 0:
        clip = [p for g in t.groups for p in t.params[g]] if active.own is None else active.params
        acc.clip_grad_norm_(clip, cfg.optim.max_grad_norm)
    t.opt.step()
    if active.own is not None:
        active.own.optimizer.step()
        active.own.optimizer.zero_grad(set_to_none=True)
    t.lr_sched.step()
    t.opt.zero_grad(set_to_none=True)
    t.ema.update()
    return loss, logs


def record_step(run, logger, active, loss, logs):
    run.step += 1
    row = {"lr": run.train.lr_sched.get_last_lr()[0], **logs}
    if loss is not None:
        row["loss"] = loss_global = float(run.accelerator.reduce(loss.detach().float().reshape(1), "mean"))
        if not math.isfinite(loss_global):  # the same global value on every process: all stop together
            s = active.stage
            raise TrainingDiverged(f"stage {active.index + 1}/{len(run.cfg.stages)} ({s.type}, k={s.segments}), step "
                                   f"{run.step}: the loss is {loss_global}; the run stopped before writing any "
                                   "LoRA. Lower optim.lr (or the stage's params.lr) or set optim.max_grad_norm.")
        run.losses.setdefault(active.index, []).append(loss_global)
    run.logs.setdefault(active.index, []).append(logs)
    s = active.stage
    logger.log(run.step, f"stage {active.index + 1}/{len(run.cfg.stages)} {s.type} k={s.segments}", row)


def save_stage_snapshot(run, active):
    """stages/snapshots/<i>_<type>_k<segments>.safetensors: the stage group's adapter as the stage ends (only
    that adapter: with model.init_lora or an earlier group the model is those plus this file), with the
    metadata of a run that ended there, so TSCD's k = 8 / 4 / 2 LoRAs can be used at their own step counts."""
    import os

    from training.lora_files.export import export_lora, lora_metadata
    from training.stages import ADAPTER_OF

    if not run.accelerator.is_main_process:
        return
    cfg, s, i = run.cfg, active.stage, active.index
    folder = os.path.join(run.out_dir, "stages", "snapshots")
    os.makedirs(folder, exist_ok=True)
    meta = lora_metadata(replace(cfg, stages=cfg.stages[:i + 1]), run.base.family, run.base.prediction_type)
    export_lora(run.train.unet, os.path.join(folder, f"{i + 1}_{s.type}_k{s.segments}.safetensors"), meta,
                ADAPTER_OF[GROUP_OF[s.type]])


def data_position(run):
    """A streamed source's position, every process's streams (a collective): saved with the checkpoint."""
    if run.data.stream is None:
        return None
    from training.data.run_stream import gather_position

    return gather_position(run.accelerator, run.data.stream)


def train_stages(run, show_bar=True):
    import training.engine.checkpoint as ckpt
    from training.engine.progress import RunLogger

    cfg = run.cfg
    logger = RunLogger(run.out_dir, cfg.total_steps, run.step, enabled=run.accelerator.is_main_process,
                       tensorboard=cfg.output.tensorboard, show_bar=show_bar)
    active = None
    run.train.student.train()
    while run.step < cfg.total_steps:
        index, stage = stage_at(cfg.stages, run.step)
        if active is None or index != active.index:
            active = start_stage(run, index, stage)
        loss, logs = optimizer_step(run, active)
        record_step(run, logger, active, loss, logs)
        if cfg.output.stage_snapshots and run.step == active.ctx.stage_start + stage.steps:
            save_stage_snapshot(run, active)
        if run.step % cfg.output.checkpoint_every == 0 or run.step == cfg.total_steps:
            ckpt.save_checkpoint(run, data_state=data_position(run))
    logger.close()
    if run.data.stream is not None:
        run.data.stream.close()
    run.train_seconds = time.time() - run.t_start
    final_state(run, active)
    if run.full_stage is not None:
        run.full_unet = run.train.persistent["full_unet"]


def final_state(run, active):
    """Resumed after a stage that trains its own UNet, or after the last step: restore that UNet from the
    checkpoint and switch the adapters as the last step left them, so the exports and samples.png equal an
    uninterrupted run's."""
    stages, full = run.cfg.stages, run.full_stage
    last = active
    if full is not None and "full_unet" not in run.train.persistent:
        last = start_stage(run, stages.index(full), full)
    if last is None or last.index != len(stages) - 1:
        start_stage(run, len(stages) - 1, stages[-1])

"""Setting a run up, in the order that makes it reproducible: the output folder, data, the base model
(the shipped tiny teacher by default), the adapters and stage networks, the optimizer, resume, the cache.

Random draws happen in a fixed order (seeded twice: before the data and before the adapters), so the
same config gives the same LoRA bit for bit on any machine with the same torch build."""
from __future__ import annotations

import os
import shutil
import sys
import time

import torch

from training.config import to_dict
from training.engine.output import check_output_dir, prepare_output
from training.engine.state import Run, RunData, Trainables
from training.errors import ConfigError
from training.stages import ADAPTER_OF, get_stage, plan_groups


def start_run(cfg, resume=None, overwrite=False, base=None, dataset=None) -> Run:
    """Accelerator, output folder and config.json, the dataset, reward preflight, the base model
    (`base` / `dataset` given: used instead of cfg.model.base / cfg.data)."""
    from accelerate import Accelerator

    from training.models.adapters import check_targets
    from training.models.base import load_base
    from training.stages.score_distill import is_full

    t_start = time.time()
    accelerator = Accelerator(mixed_precision=cfg.optim.mixed_precision)
    micro_global = check_batch_split(cfg, accelerator.num_processes)
    check_output_dir(cfg.output.dir, resume, overwrite)  # before anything loads: nothing is deleted yet
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, dataset, micro_global, accelerator)
    resources = {i: r for i, s in enumerate(cfg.stages)
                 if (r := get_stage(s.type).preflight(s, i, accelerator.device)) is not None}
    base = load_base(cfg.model) if base is None else base
    check_targets(base.unet, cfg.lora.targets)
    place_frozen_base(base, cfg, accelerator.device)
    # data, rewards and the model loaded: only now may a previous run's folder be replaced
    started = prepare_output(cfg.output.dir, resume, overwrite, accelerator)
    return Run(cfg, accelerator, cfg.output.dir, base, data, resources, t_start=t_start, output_started=started,
               full_stage=next((s for s in cfg.stages if is_full(s)), None))


def write_run_files(run: Run, copy_teacher: bool) -> None:
    """config.json and (the shipped tiny teacher loaded) a copy of the teacher's file."""
    from training.files import save_json_atomic

    if run.accelerator.is_main_process:
        save_json_atomic(to_dict(run.cfg), os.path.join(run.out_dir, "config.json"))
    if copy_teacher:
        copy_tiny_teacher(run.out_dir, run.accelerator)


def check_batch_split(cfg, n_proc: int) -> int:
    """The global micro-batch (optim.batch_size / grad_accum), which every process must share evenly."""
    if cfg.optim.batch_size % (cfg.optim.grad_accum * n_proc):
        raise ConfigError(f"config key 'optim.batch_size': {cfg.optim.batch_size} must be divisible by "
                          f"optim.grad_accum ({cfg.optim.grad_accum}) x processes ({n_proc})")
    return cfg.optim.batch_size // cfg.optim.grad_accum


def build_data(cfg, dataset, micro_global, accelerator) -> RunData:
    """`dataset`, or cfg.data built: an indexed dataset with its same-bucket sampler, or a streamed one."""
    from training.data import build_dataset, is_streaming
    from training.data.sampler import BucketBatchSampler

    if dataset is None and is_streaming(cfg.data):
        from training.data.run_stream import build_stream

        return RunData(None, None, stream=build_stream(cfg, micro_global, accelerator))
    ds = dataset if dataset is not None else build_dataset(to_dict(cfg)["data"])
    return RunData(ds, BucketBatchSampler(ds.bucket_ids, micro_global, seed=cfg.seed))


def copy_tiny_teacher(out_dir, accelerator):
    """The tiny teacher is shipped (training/models/tiny_teacher.safetensors, loaded by build_tiny; made by
    python -m training.models.tiny_pretrain): a copy goes into the output folder, for the record."""
    from training.files import writing
    from training.models import tiny

    path = os.path.join(out_dir, "tiny_teacher.safetensors")
    if accelerator.is_main_process:
        with writing(path):
            shutil.copyfile(tiny.TEACHER_PATH, path)
    accelerator.wait_for_everyone()


def place_frozen_base(base, cfg, device):
    for m in [base.unet, base.vae, *base.text_encoders]:
        m.requires_grad_(False).to(device).eval()
    base.abar = base.abar.to(device)
    if cfg.optim.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()


def attach_trainables(run: Run) -> None:
    """One adapter per LoRA group, the stages' own networks, the init LoRA, the optimizer and schedule."""
    from diffusers.optimization import get_scheduler

    from training.models.adapters import EMA, AdapterStack, add_adapter

    cfg, unet = run.cfg, run.base.unet
    torch.manual_seed(cfg.seed)
    # LoRA groups: every group but a full-UNet score distillation (its student is a separate UNet copy)
    groups = [g for g in plan_groups(cfg.stages) if not (g == "score_distill" and run.full_stage is not None)]
    params = {g: add_adapter(unet, ADAPTER_OF[g], cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) for g in groups}
    persistent = {}
    for stype in dict.fromkeys(s.type for s in cfg.stages):
        persistent.update(get_stage(stype).build_persistent(unet, [s for s in cfg.stages if s.type == stype], cfg))
    init_rank = attach_init_lora(unet, cfg.model.init_lora)
    stack = AdapterStack(unet)
    stack.use(*adapters_for(groups[0], groups, bool(init_rank)))
    ema = EMA(params.get("tscd", []), cfg.tscd.ema_decay)
    opt = torch.optim.AdamW([{"params": params[g], "lr": group_lr(cfg, g)} for g in groups], lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    lr_sched = get_scheduler(cfg.optim.lr_scheduler, opt, num_warmup_steps=cfg.optim.warmup_steps,
                             num_training_steps=cfg.total_steps)
    student, opt = run.accelerator.prepare(unet, opt)
    run.train = Trainables(groups, params, init_rank, stack, ema, persistent, opt, lr_sched, student,
                           run.accelerator.unwrap_model(student))


def attach_init_lora(unet, path: str) -> int:
    """model.init_lora as the frozen "init" adapter under every stage; returns its rank (0: none)."""
    if not path:
        return 0
    from training.lora_files.kohya import load_kohya
    from training.models.adapters import add_kohya_adapter

    try:
        return add_kohya_adapter(unet, "init", load_kohya(path), f"LoRA {path}")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config key 'model.init_lora': {e}") from None


def group_lr(cfg, group):
    """A group's learning rate: `params.lr` of its first stage (feedback / score_distill), else optim.lr.
    The lr schedule scales every group alike."""
    from training.stages import GROUP_OF

    first = next(s for s in cfg.stages if GROUP_OF[s.type] == group)
    return float((first.params or {}).get("lr") or cfg.optim.lr)


def adapters_for(group, groups, has_init):
    """(active, trainable) adapters while `group` trains: the earlier groups (and init_lora) stay on, frozen.
    A group without an adapter (score_distill mode full) gets every LoRA group active and none trainable."""
    upto = groups[: groups.index(group) + 1] if group in groups else groups
    active = (["init"] if has_init else []) + [ADAPTER_OF[g] for g in upto]
    return active, [ADAPTER_OF[group]] if group in groups else []


def resume(run: Run, resume_arg) -> None:
    import training.engine.checkpoint as ckpt

    run.resume_dir = ckpt.resolve_resume(resume_arg, run.out_dir) if resume_arg else None
    if run.resume_dir:
        run.step = ckpt.load_checkpoint(run, run.resume_dir)
        if run.data.stream is not None:
            from training.data.run_stream import restore_position

            restore_position(run.data.stream, ckpt.load_data_state(run.resume_dir), run.resume_dir)


def attach_data(run: Run) -> None:
    """data.cache_dir: swap in the cached dataset; encode the empty prompt once (the unconditional branch)."""
    from training.models.text import text_embeddings

    if run.cfg.data.cache_dir:
        from training.data.run_cache import CachedText, build_run_cache

        t0 = time.time()
        pixels = run.data.dataset
        run.data.dataset, stats = build_run_cache(run.cfg, pixels, run.base, run.device, run.accelerator)
        stats["seconds"] = round(time.time() - t0, 3)
        run.data.cache_stats, run.data.cached_text = stats, CachedText(run.base, run.device, pixels)
        if run.accelerator.is_main_process:
            print(f"data cache {stats['dir']}: {stats['reused']} reused, {stats['encoded']} encoded (latents + "
                  f"{stats['text']}) in {stats['seconds']} s", file=sys.stderr, flush=True)
    if run.data.stream is not None and run.data.stream.kind == "latents":
        from training.data.run_stream import latent_shard_text

        run.data.cached_text = latent_shard_text(run)
    cached = run.data.cached_text
    run.data.empty_text = cached.empty if cached is not None else text_embeddings(run.base, [""], run.device)

"""The end of a run (main process): each stage group's LoRA, the unified LoRA, the 1-step UNet folder,
samples.png and metrics.json."""
from __future__ import annotations

import os
import time

from training.engine.report import print_summary, quality
from training.stages import ADAPTER_OF


def finish_run(run) -> None:
    if run.accelerator.is_main_process:
        write_outputs(run)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def write_outputs(run) -> None:
    from training.files import save_json_atomic, save_png_atomic
    from training.lora_files.export import export_stages_and_merge, lora_metadata

    cfg, base, t = run.cfg, run.base, run.train
    t.unet.eval()
    lora_path = os.path.join(run.out_dir, cfg.output.name + ".safetensors")
    meta = lora_metadata(cfg, base.family, base.prediction_type)
    merge_report = export_stages_and_merge(t.unet, run.out_dir, lora_path, meta,
                                           [(g, ADAPTER_OF[g]) for g in t.groups], cfg.output.merge_rank,
                                           cfg.lora.rank, bool(t.init_rank))
    full_report, one_step = export_one_step_unet(run)
    teacher_dir = export_teacher(run)
    t0 = time.time()
    save_png_atomic(sample_grid(run, one_step), os.path.join(run.out_dir, "samples.png"))
    metrics = {"lora": lora_path, "lora_keys": merge_report.pop("keys"), "steps": cfg.total_steps,
               "train_seconds": run.train_seconds, "sample_seconds": time.time() - t0, "family": base.family,
               "prediction_type": base.prediction_type, "merge": merge_report, "full_unet": full_report,
               "data_cache": run.data.cache_stats, "teacher_pipeline": teacher_dir,
               "data": data_stats(run.data.dataset),
               "data_stream": run.data.stream.stats if run.data.stream is not None else None,
               "stages": [stage_summary(s, run.losses.get(i, []), run.logs.get(i, []))
                          for i, s in enumerate(cfg.stages)]}
    metrics["quality"] = quality(run)
    save_json_atomic(metrics, os.path.join(run.out_dir, "metrics.json"))
    if run.summary:
        print_summary(run, metrics)


def data_stats(dataset):
    """What docs/data.md promises: images found, read, unreadable (by name), missing captions, buckets."""
    stats = getattr(dataset, "stats", None)
    keys = ("num_found", "num_ok", "num_unreadable", "unreadable_files", "num_missing_captions", "num_buckets")
    return {k: stats[k] for k in keys if k in stats} if isinstance(stats, dict) else None


def export_one_step_unet(run):
    """mode full: <name>_1step_unet/ (diffusers layout) -> (report, (unet, timestep) for the sample grid)."""
    if run.full_unet is None:
        return None, None
    from training.lora_files.export import export_full_unet, full_unet_metadata
    from training.stages import get_stage
    from training.stages.score_distill import generator_timestep

    cfg, base, full = run.cfg, run.base, run.full_unet
    full.eval()
    t_gen = generator_timestep(get_stage("score_distill").resolved(run.full_stage))
    folder = os.path.join(run.out_dir, cfg.output.name + "_1step_unet")
    path = export_full_unet(full, folder, full_unet_metadata(base.family, base.prediction_type, t_gen, cfg.model.base))
    report = {"folder": folder, "file": path, "timestep": t_gen, "parameters": sum(p.numel() for p in full.parameters())}
    return report, (full, t_gen)


def export_teacher(run):
    """The tiny default's teacher as a diffusers pipeline folder (<output.dir>/teacher/); None otherwise."""
    if run.cfg.model.base != "tiny":
        return None
    from training.lora_files.export import export_teacher_pipeline
    from training.stages.full_unet import folded_unet_copy

    plain = folded_unet_copy(run.train.unet, []).eval()  # the base weights without any adapter
    return export_teacher_pipeline(run.base, plain, os.path.join(run.out_dir, "teacher"))


def sample_grid(run, one_step):
    """samples.png: the teacher column (output.teacher_steps DDIM steps with CFG) and the LoRA at each of
    output.sample_steps, at the eta the run recommends (or output.sample_eta), from the same noise."""
    from training.engine.samples import labelled_grid, sample_columns

    cfg, base, unet, out = run.cfg, run.base, run.train.unet, run.cfg.output
    res = cfg.data.resolution // (2 ** (len(base.vae.config.block_out_channels) - 1))
    teacher = (run.train.stack.disabled, out.teacher_steps, out.teacher_guidance) if out.teacher_steps else None
    labels, images = sample_columns(unet, base, run.encode, out.sample_prompts, out.sample_steps, out.sample_eta,
                                    (unet.config.in_channels, res, res), cfg.seed, run.device, teacher, one_step)
    return labelled_grid(labels, images, out.sample_prompts)


def stage_summary(stage, losses, logs=(), n=3):
    """Loss at the start vs the end of a stage (means of the first / last n steps: single steps are noisy),
    and the same for every logged component (tscd_loss, adv_g, reward, fake_loss, dmd_reg, ...)."""
    nan = float("nan")
    parts = {}
    for row in logs:
        for k, v in row.items():
            parts.setdefault(k, []).append(float(v))

    def mean(values):
        return sum(values) / len(values) if values else nan

    return {"logs_start": {k: mean(v[:n]) for k, v in parts.items()},
            "logs_end": {k: mean(v[-n:]) for k, v in parts.items()},
            "type": stage.type, "segments": stage.segments, "steps": stage.steps, "logged_steps": len(losses),
            "loss_start": mean(losses[:n]), "loss_end": mean(losses[-n:]),
            "first_loss": losses[0] if losses else nan, "last_loss": losses[-1] if losses else nan,
            "mean_loss": mean(losses)}

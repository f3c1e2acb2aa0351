"""`python -m training.run [--config FILE] [--set key=value ...] [--resume latest] [--overwrite]`.

Trains Hyper-SD stages in order (TSCD 8 -> 4 -> 2 -> 1 with the adversarial term, human feedback, score distillation) and merges their LoRAs into one. See docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

from .config import ConfigError, load_config, to_dict


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[2])
    p.add_argument("--config", help="YAML or JSON config (default: the embedded tiny CPU run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def prepare_output(out_dir, resume, overwrite, accelerator):
    if accelerator.is_main_process:
        if os.path.isdir(out_dir) and os.listdir(out_dir) and not resume:
            if not overwrite:
                raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass --overwrite "
                                      "to replace it or --resume latest to continue")
            shutil.rmtree(out_dir)
        os.makedirs(out_dir, exist_ok=True)
    accelerator.wait_for_everyone()


def tiny_teacher(base, cfg, ds, out_dir, accelerator):
    """Pre-train the tiny teacher once (main process), save it, and load it everywhere."""
    from safetensors.torch import load_file

    from . import tiny
    from .data import collate
    from .export import save_file_atomic

    path = os.path.join(out_dir, "tiny_teacher.safetensors")
    if accelerator.is_main_process and not os.path.exists(path):
        batch = collate([ds[i] for i in range(len(ds))])
        tiny.pretrain_tiny(base.unet, base.vae, base.text_encoders[0], base.tokenizers[0],
                           batch["pixel_values"], batch["caption"], base.abar, steps=cfg.model.tiny_pretrain_steps,
                           vae_steps=cfg.model.tiny_vae_steps, seed=cfg.seed)
        state = {f"unet.{k}": v for k, v in base.unet.state_dict().items()}
        state.update({f"vae.{k}": v for k, v in base.vae.state_dict().items()})
        save_file_atomic({k: v.contiguous() for k, v in state.items()}, path)
    accelerator.wait_for_everyone()
    state = load_file(path)
    base.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    base.vae.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vae.")})


def stage_at(stages, step):
    """(index, stage) in force at global step `step` (0-based)."""
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i, s
    return len(stages) - 1, stages[-1]


def micro_batch(ds, sampler, m, cfg, accelerator, base, encode, device, dtype, cached_text=None, empty_text=None):
    """Global micro-batch m: this process's slice plus randoms drawn for the whole global batch.
    With data.cache_dir the batch carries `latents` (no VAE encode) and text embeddings (`cached_text`).
    `empty_text`: the empty prompt's embeddings, encoded once per run (the unconditional branch)."""
    from .data import collate
    from .models import embeds_to_unet_kwargs, repeat_embeds, text_embeddings

    per_epoch = len(sampler)
    epoch, pos = divmod(m, per_epoch)
    if hasattr(ds, "set_epoch"):  # a CachedDataset has nothing to re-augment
        ds.set_epoch(epoch)
    global_idx = sampler.global_batches(epoch)[pos]
    n, r = accelerator.num_processes, accelerator.process_index
    b = len(global_idx) // n
    batch = collate([ds[i] for i in global_idx[r * b:(r + 1) * b]])
    if "latents" in batch:
        # the VAE's memory layout (e.g. channels-last): the UNet's float results depend on it
        latents = batch["latents"].to(device, torch.float32).contiguous(memory_format=cached_text.latent_format)
    else:
        with torch.no_grad():
            px = batch["pixel_values"].to(device, torch.float32)
            latents = base.vae.encode(px).latent_dist.mean * base.vae.config.scaling_factor
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + m + 17)
    noise = torch.randn((len(global_idx), *latents.shape[1:]), generator=g)[r * b:(r + 1) * b]
    u_all = torch.rand((len(global_idx), 8), generator=g, dtype=torch.float64)
    u = u_all[r * b:(r + 1) * b]
    captions = [c if float(uu[2]) >= cfg.data.caption_dropout else "" for c, uu in zip(batch["caption"], u)]
    hw = batch.get("original_size"), batch.get("crop_top_left"), batch.get("target_size")
    if cached_text is not None and "prompt_embeds" in batch:
        keep = [float(uu[2]) >= cfg.data.caption_dropout for uu in u]  # dropped -> encode("") (as above)
        cond, uncond = cached_text.cond_uncond(batch, keep, hw)
    else:
        cond = encode(captions, *hw)
        empty = empty_text if empty_text is not None else text_embeddings(base, [""], device)
        uncond = embeds_to_unet_kwargs(base, repeat_embeds(empty, len(captions)), device, *hw)
    return {"latents": latents.to(dtype), "noise": noise.to(device, dtype), "u": u.to(device),
            "step_u": u_all[0].to(device),  # per-step choices shared by the global batch (e.g. the ReFL stop step)
            "cond": cond, "uncond": uncond, "captions": captions}


def train(cfg, args):
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from . import checkpoint as ckpt
    from .data import BucketBatchSampler, build_dataset
    from .logging_utils import RunLogger
    from .adversarial import _all_reduce_grads
    from .lora import EMA, AdapterStack, add_kohya_adapter, add_lora, add_named_lora
    from .merge import load_kohya
    from .models import encode_prompts, load_base, text_embeddings
    from .stages import ADAPTER_OF, GROUP_OF, StageContext, load_stage_module
    from .tscd import DDIMGrid

    t_start = time.time()
    full_stage = check_full_unet_plan(cfg)
    accelerator = Accelerator(mixed_precision=cfg.optim.mixed_precision)
    out_dir = cfg.output.dir
    n_proc = accelerator.num_processes
    micro_global = cfg.optim.batch_size // cfg.optim.grad_accum
    if cfg.optim.batch_size % (cfg.optim.grad_accum * n_proc):
        raise ConfigError(f"config key 'optim.batch_size': {cfg.optim.batch_size} must be divisible by "
                          f"optim.grad_accum ({cfg.optim.grad_accum}) x processes ({n_proc})")
    prepare_output(out_dir, args.resume, args.overwrite, accelerator)
    if accelerator.is_main_process:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
    torch.manual_seed(cfg.seed)
    ds = build_dataset(to_dict(cfg)["data"])
    sampler = BucketBatchSampler(ds.bucket_ids, micro_global, seed=cfg.seed)
    resources = {}  # e.g. reward models: built before step 0 so a missing weights file fails at once
    for i, s in enumerate(cfg.stages):
        module = load_stage_module(s.type)
        if hasattr(module, "preflight"):
            resources[i] = module.preflight(s, i, accelerator.device)
    base = load_base(cfg.model)
    if cfg.model.base == "tiny":
        tiny_teacher(base, cfg, ds, out_dir, accelerator)
    device = accelerator.device
    for m in [base.unet, base.vae, *base.text_encoders]:
        m.requires_grad_(False).to(device).eval()
    base.abar = base.abar.to(device)
    if cfg.optim.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    torch.manual_seed(cfg.seed)
    groups = plan_groups(cfg.stages)
    # LoRA groups: every group but a full-UNet score distillation (its student is a separate UNet copy)
    groups = [g for g in groups if not (g == "score_distill" and full_stage is not None)]
    adapter_params = {}
    if "tscd" in groups:  # first, so a TSCD-only run initialises exactly as before
        adapter_params["tscd"] = add_lora(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    for g in groups:
        if g != "tscd":
            adapter_params[g] = add_named_lora(base.unet, ADAPTER_OF[g], cfg.lora.rank, cfg.lora.alpha,
                                               cfg.lora.targets)
    persistent = {}
    for stype in dict.fromkeys(s.type for s in cfg.stages):
        module = load_stage_module(stype)
        if hasattr(module, "build_persistent"):
            persistent.update(module.build_persistent(base.unet, [s for s in cfg.stages if s.type == stype], cfg))
    init_rank = 0
    if cfg.model.init_lora:
        init_rank = add_kohya_adapter(base.unet, "init", load_kohya(cfg.model.init_lora), "config key 'model.init_lora'")
    stack = AdapterStack(base.unet)
    stack.use(*adapters_for(groups[0], groups, bool(init_rank)))
    params = [p for g in groups for p in adapter_params[g]]
    ema = EMA(adapter_params.get("tscd", []), cfg.tscd.ema_decay)
    opt = torch.optim.AdamW([{"params": adapter_params[g], "lr": group_lr(cfg, g)} for g in groups], lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    lr_sched = get_scheduler(cfg.optim.lr_scheduler, opt, num_warmup_steps=cfg.optim.warmup_steps,
                             num_training_steps=cfg.total_steps)
    student, opt = accelerator.prepare(base.unet, opt)
    accelerator.register_for_checkpointing(lr_sched, ema)
    unet = accelerator.unwrap_model(student)

    step = 0
    resume = ckpt.resolve_resume(args.resume, out_dir) if args.resume else None
    if resume:
        step = ckpt.load_checkpoint(accelerator, resume)
        ckpt.load_extra(resume, persistent)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.optim.mixed_precision, torch.float32)
    cache_stats, cached_text = None, None
    if cfg.data.cache_dir:
        from .train_cache import CachedText, build_run_cache

        t0 = time.time()
        ds_pixels = ds
        ds, cache_stats = build_run_cache(cfg, ds, base, device, accelerator)
        cache_stats["seconds"] = round(time.time() - t0, 3)
        cached_text = CachedText(base, device, ds_pixels)
        if accelerator.is_main_process:
            print(f"data cache {cache_stats['dir']}: {cache_stats['reused']} reused, {cache_stats['encoded']} "
                  f"encoded (latents + {cache_stats['text']}) in {cache_stats['seconds']} s", file=sys.stderr,
                  flush=True)

    def encode(prompts, size_hw=None, crop_tl=None, target_hw=None):
        return encode_prompts(base, prompts, device, size_hw, crop_tl, target_hw)

    # The text encoders are frozen: the unconditional branch's embeddings are the same every step.
    empty_text = cached_text.empty if cached_text is not None else text_embeddings(base, [""], device)

    ctx = StageContext(accelerator, student, unet, base.vae, base.abar, DDIMGrid(base.abar, cfg.tscd.num_ddim_timesteps),
                       base.prediction_type, cfg, encode, teacher=stack.disabled, target=ema.swapped,
                       adapters=stack, persistent=persistent, resources=resources, resume_dir=resume)
    logger = RunLogger(out_dir, cfg.total_steps, step, enabled=accelerator.is_main_process,
                       tensorboard=cfg.output.tensorboard, show_bar=not args.quiet)
    stage_losses, stage_logs, current, module = {}, {}, None, None
    ga = cfg.optim.grad_accum
    student.train()
    while step < cfg.total_steps:
        idx, stage = stage_at(cfg.stages, step)
        if idx != current:
            current, module = idx, load_stage_module(stage.type)
            group = GROUP_OF[stage.type]
            stack.use(*adapters_for(group, groups, bool(init_rank)))
            ctx.state, ctx.stage_index, ctx.stage_start = {}, idx, sum(s.steps for s in cfg.stages[:idx])
            # DDP registered only the first group's adapter: later groups call the plain module and
            # average their gradients by hand (below), so DDP never waits for frozen parameters
            ctx.student = student if group == groups[0] else unet
            ctx.step = step
            if hasattr(module, "setup"):
                module.setup(ctx, stage)  # mode full: ctx.student = its own UNet copy
            # what the loop steps: the group's LoRA (shared optimizer) or a stage's own model + optimizer
            own_opt = ctx.persistent.get("full_opt") if group not in groups else None
            train_params = ([q for g in own_opt.param_groups for q in g["params"]] if own_opt is not None
                            else adapter_params[group])
        ctx.step = step
        logs = {}
        for micro in range(ga):
            batch = micro_batch(ds, sampler, step * ga + micro, cfg, accelerator, base, encode, device, dtype,
                                cached_text, empty_text)
            sync = accelerator.no_sync(student) if micro < ga - 1 else _null()
            with sync, accelerator.autocast():
                loss, logs = module.stage_loss(ctx, batch, stage)
                if loss is not None:  # None: this step only trained the stage's own helper (e.g. fake score)
                    accelerator.backward(loss * stage.weight / ga)
        if n_proc > 1 and group != groups[0]:
            # DDP registered only the first group's LoRA as trainable: average later groups (and the
            # full-UNet copy) by hand
            _all_reduce_grads(accelerator, train_params)
        if cfg.optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params if own_opt is None else train_params, cfg.optim.max_grad_norm)
        opt.step()
        if own_opt is not None:
            own_opt.step()
            own_opt.zero_grad(set_to_none=True)
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        step += 1
        row = {"lr": lr_sched.get_last_lr()[0], **logs}
        if loss is not None:
            row["loss"] = loss_global = float(accelerator.reduce(loss.detach().float().reshape(1), "mean"))
            stage_losses.setdefault(idx, []).append(loss_global)
        stage_logs.setdefault(idx, []).append(logs)
        logger.log(step, f"stage {idx + 1}/{len(cfg.stages)} {stage.type} k={stage.segments}", row)
        if step % cfg.output.checkpoint_every == 0 or step == cfg.total_steps:
            ckpt.save_checkpoint(accelerator, out_dir, step, cfg.output.keep_checkpoints, persistent)
    logger.close()
    train_time = time.time() - t_start
    full_unet = None
    if full_stage is not None:
        from .score_distill import ensure_full_unet

        # resumed from the last checkpoint: the loop did not run, restore the copy from it
        ctx.stage_index = cfg.stages.index(full_stage)
        ctx.stage_start, ctx.step = sum(s.steps for s in cfg.stages[:ctx.stage_index]), step
        full_unet = ensure_full_unet(ctx, full_stage)
    if accelerator.is_main_process:
        finish(cfg, base, unet, encode, out_dir, stage_losses, stage_logs, train_time, device, groups, init_rank,
               full_unet, full_stage, cache_stats)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def check_full_unet_plan(cfg):
    """The score_distill stage with params.mode full (or None); plan limits of that mode as config errors."""
    from .score_distill import is_full

    full_stage = next((s for s in cfg.stages if is_full(s)), None)
    if full_stage is not None:
        fi = cfg.stages.index(full_stage)
        if plan_groups(cfg.stages) == ["score_distill"]:
            raise ConfigError(f"config key 'stages[{fi}].params.mode': 'full' needs an earlier tscd / adversarial / "
                              "feedback stage in the same run (the loop's LoRA optimizer would be empty); "
                              "use mode 'lora' for score distillation alone on model.init_lora")
        if cfg.optim.mixed_precision == "fp16":
            raise ConfigError(f"config key 'stages[{fi}].params.mode': 'full' steps its own optimizer outside "
                              "accelerate's fp16 grad scaler; set optim.mixed_precision to no or bf16")
    return full_stage


def plan_groups(stages):
    """Stage groups in order of first appearance (each group trains its own LoRA adapter)."""
    from .stages import GROUP_OF

    return list(dict.fromkeys(GROUP_OF[s.type] for s in stages))


def group_lr(cfg, group):
    """A group's learning rate: `params.lr` of its first stage (feedback / score_distill), else optim.lr.
    The lr schedule scales every group alike."""
    from .stages import GROUP_OF

    first = next(s for s in cfg.stages if GROUP_OF[s.type] == group)
    return float((first.params or {}).get("lr") or cfg.optim.lr)


def adapters_for(group, groups, has_init):
    """(active, trainable) adapters while `group` trains: the earlier groups (and init_lora) stay on, frozen.
    A group without an adapter (score_distill mode full) gets every LoRA group active and none trainable."""
    from .stages import ADAPTER_OF

    upto = groups[: groups.index(group) + 1] if group in groups else groups
    active = (["init"] if has_init else []) + [ADAPTER_OF[g] for g in upto]
    return active, [ADAPTER_OF[group]] if group in groups else []


def finish(cfg, base, unet, encode, out_dir, stage_losses, stage_logs, train_time, device, groups, init_rank,
           full_unet=None, full_stage=None, cache_stats=None):
    from .sampling import save_png_atomic, tcd_grid

    unet.eval()
    lora_path = os.path.join(out_dir, cfg.output.name + ".safetensors")
    meta = lora_metadata_for(cfg, base)
    merge_report = export_stages_and_merge(cfg, unet, out_dir, lora_path, meta, groups, init_rank)
    one_step, full_report = None, None
    if full_unet is not None:
        from .score_distill import PARAMS, export_full_unet, full_unet_metadata, generator_timestep
        from .stages import stage_params

        full_unet.eval()
        t_gen = generator_timestep(stage_params(full_stage, PARAMS))
        folder = os.path.join(out_dir, cfg.output.name + "_1step_unet")
        path = export_full_unet(full_unet, folder, full_unet_metadata(base.family, base.prediction_type, t_gen,
                                                                      cfg.model.base))
        full_report = {"folder": folder, "file": path, "timestep": t_gen,
                       "parameters": sum(p.numel() for p in full_unet.parameters())}
        one_step = (full_unet, t_gen)
    res = cfg.data.resolution // (2 ** (len(base.vae.config.block_out_channels) - 1))
    t0 = time.time()
    grid = tcd_grid(unet, base.vae, base, lambda p: encode(p), cfg.output.sample_prompts, cfg.output.sample_steps,
                    cfg.output.sample_eta, (unet.config.in_channels, res, res), cfg.seed, device, one_step=one_step)
    save_png_atomic(grid, os.path.join(out_dir, "samples.png"))
    metrics = {"lora": lora_path, "lora_keys": merge_report.pop("keys"), "steps": cfg.total_steps,
               "train_seconds": train_time, "sample_seconds": time.time() - t0, "family": base.family,
               "prediction_type": base.prediction_type, "merge": merge_report, "full_unet": full_report,
               "data_cache": cache_stats,
               "stages": [stage_summary(s, stage_losses.get(i, []), stage_logs.get(i, []))
                          for i, s in enumerate(cfg.stages)]}
    tmp = os.path.join(out_dir, ".tmp-metrics.json")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "metrics.json"))


def stage_summary(stage, losses, logs=(), n=3):
    """Loss at the start vs the end of a stage (means of the first / last n steps: single steps are noisy),
    and the same for every logged component (tscd_loss, adv_g, reward, fake_loss, dmd_reg, ...)."""
    nan = float("nan")
    head, tail = losses[:n], losses[-n:]
    parts = {}
    for row in logs:
        for k, v in row.items():
            parts.setdefault(k, []).append(float(v))
    return {"logs_start": {k: sum(v[:n]) / len(v[:n]) for k, v in parts.items()},
            "logs_end": {k: sum(v[-n:]) / len(v[-n:]) for k, v in parts.items()},"type": stage.type, "segments": stage.segments, "steps": stage.steps, "logged_steps": len(losses),
            "loss_start": sum(head) / len(head) if head else nan, "loss_end": sum(tail) / len(tail) if tail else nan,
            "first_loss": losses[0] if losses else nan, "last_loss": losses[-1] if losses else nan,
            "mean_loss": sum(losses) / len(losses) if losses else nan}


def lora_metadata_for(cfg, base):
    from .export import lora_metadata

    return lora_metadata(cfg, base.family, base.prediction_type)


def export_stages_and_merge(cfg, unet, out_dir, lora_path, meta, groups, init_rank):
    """stages/<i>_<group>.safetensors per group, then ONE unified kohya LoRA (exact rank concatenation,
    or an SVD re-rank with `output.merge_rank`), with the merge error measured against the sum of deltas."""
    from .export import export_lora
    from .merge import merge_exact, peft_to_kohya, save_kohya, svd_rerank
    from .stages import ADAPTER_OF

    report = {"stage_files": []}
    for i, g in enumerate(groups):
        path = os.path.join(out_dir, "stages", f"{i + 1}_{g}.safetensors")
        export_lora(unet, path, {**meta, "hypersd.stage_group": g}, adapter=ADAPTER_OF[g])
        report["stage_files"].append(path)
    names = (["init"] if init_rank else []) + [ADAPTER_OF[g] for g in groups]
    if len(names) == 1 and not cfg.output.merge_rank:
        # one adapter: write it as is (true alpha, its own rank); nothing to merge
        report.update(keys=export_lora(unet, lora_path, meta, adapter=names[0]), rank=cfg.lora.rank,
                      merged_from=names, rel_error=0.0)
        return report
    parts = [peft_to_kohya(unet, n) for n in names]
    merged = merge_exact(parts)
    if cfg.output.merge_rank:
        merged, _, overall = svd_rerank(merged, cfg.output.merge_rank)
        report["svd_rel_error"] = overall
    want_sq = err_sq = worst = 0.0
    for name, m in merged.items():  # what the written (fp32) file holds vs the exact sum of stage deltas
        want = sum(p[name].delta() for p in parts if name in p)
        got = _fp32_delta(m)
        err = (got - want).norm().item()
        want_sq, err_sq = want_sq + want.norm().item() ** 2, err_sq + err ** 2
        worst = max(worst, (got - want).abs().max().item())
    rank = max(m.rank for m in merged.values())
    save_kohya(lora_path, merged, {**meta, "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                                   "hypersd.merged_from": json.dumps(names)})
    report.update(keys=3 * len(merged), rank=rank, merged_from=names, rel_error=(err_sq / max(want_sq, 1e-30)) ** 0.5,
                  max_abs_error=worst)
    return report


def _fp32_delta(m):
    from .merge import LoraModule

    return LoraModule(m.down.float(), m.up.float(), m.alpha).delta()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from .data import DataError
    from .models import ModelError

    try:
        cfg = load_config(args.config, args.set)
        return train(cfg, args)
    except (ConfigError, DataError, ModelError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()

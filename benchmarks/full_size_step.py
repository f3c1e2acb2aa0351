"""One configuration of the full-size training-step benchmark, run in a fresh process (its peak memory is
its own): a real-architecture UNet with random weights, the adapters of one stage as
training.engine.setup.attach_trainables lays them out, and timed optimizer steps of either

* a product stage (`tscd`, `feedback`, `dmd_gen`, `dmd_fake`): the stage's own `loss` (training/stages)
  with a StageContext as training.engine.loop builds it, then the loop's backward / clip / AdamW / EMA;
* `lcm`: the diffusers LCM-LoRA recipe step (benchmarks.speed_train.lcm_lora_step) on its own peft LoRA.

Time: wall clock and this thread's CPU time (torch runs 1 intra-op thread on the CPU, so the step's compute
is on this thread; CPU time is far less sensitive than wall time to other jobs on a shared machine).
Memory: peak RSS sampled every 2 ms by a thread (CPU; large blocks are mmap-ed, see full_size.py, so
freed memory leaves RSS at once), or torch.cuda.max_memory_allocated on a GPU. A guard ends the
process when its RSS passes `rss_limit_gb`, so the benchmark cannot take a shared machine down.
"""
from __future__ import annotations

import os
import resource
import threading
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from benchmarks.full_size_models import LCM_TARGETS, build_aesthetic_reward, build_unet, build_vae, unet_conditioning

GB = 1024**3
# variant -> (index of its stage in the shipped config's stage list, LoRA groups on the UNet in the run)
STAGES = {"tscd": (0, ["tscd"]), "feedback": (4, ["tscd", "feedback"]),
          "dmd_gen": (5, ["tscd", "feedback", "score_distill"]), "dmd_fake": (5, ["tscd", "feedback", "score_distill"])}
MODES = {"fp32": (torch.float32, "no"), "amp": (torch.float32, "bf16"), "bf16": (torch.bfloat16, "bf16")}


class PeakRSS:
    """Peak resident memory of this process, sampled by a thread; exits the process past `limit`."""

    def __init__(self, limit_gb: float, interval: float = 0.002):
        self.limit, self.interval = limit_gb * GB, interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while True:
            rss = self.now()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                print(f"RSS {rss / GB:.2f} GB passed the limit {self.limit / GB:.1f} GB: stopping", flush=True)
                os._exit(3)
            time.sleep(self.interval)

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak


class CudaPeak:
    def __init__(self, device):
        self.device = device

    def now(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self.now()

    @property
    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages an op makes while this mode is on (outputs that alias an input,
    views and in-place results, are not new): what a step allocates (activations, temporaries, grads),
    exactly and untouched by the allocator or other processes; the CPU's torch.cuda.max_memory_allocated.
    `mark(name)` records the peak so far under `name` and restarts it from the live bytes."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.marks = {}
        self.seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage):
        if storage in self.seen:
            return
        n = storage.nbytes()
        self.seen[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n):
        self.live -= n

    def mark(self, name: str):
        self.marks[name] = self.peak
        self.peak = self.live


def prime_optimizers(optimizers) -> None:
    """Create every optimizer's AdamW state with one zero-gradient step (weight decay nudges the LoRA
    weights, harmless here), so a tracked step allocates only what every step allocates."""
    for opt in optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def shipped_config(family: str):
    from pathlib import Path

    from training.config import load_config

    return load_config(str(Path(__file__).resolve().parent.parent / "training" / "configs" / f"{family}.yaml"))


def attach_ours(unet, cfg, variant: str, lean: bool = False):
    """The adapters, optimizer and EMA of the stage as attach_trainables makes them (LoRA groups up to the
    stage's, each as its own adapter; the fake-score adapter + optimizer for DMD); -> (stack, ema, opt,
    all trainable params, persistent)."""
    from training.engine.setup import adapters_for, group_lr
    from training.models.adapters import EMA, AdapterStack, add_adapter
    from training.stages import ADAPTER_OF, get_stage

    index, groups = STAGES[variant]
    if lean:  # only the stage's own group (+ the fake score): the earlier, frozen groups and the EMA are left
        groups = groups[-1:]  # out to fit SDXL in the CPU's memory; the memory model adds them back
    params = {g: add_adapter(unet, ADAPTER_OF[g], cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) for g in groups}
    persistent = {}
    if "score_distill" in groups:
        persistent = get_stage("score_distill").build_persistent(unet, [cfg.stages[index]], cfg)
    stack = AdapterStack(unet)
    stack.use(*adapters_for(groups[-1], groups, False))
    ema = EMA(params.get("tscd", []), cfg.tscd.ema_decay)
    opt = torch.optim.AdamW([{"params": params[g], "lr": group_lr(cfg, g)} for g in groups], lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    return stack, ema, opt, [p for g in groups for p in params[g]], persistent


def stage_context(acc, unet, cfg, variant, stack, ema, persistent, resources, vae):
    """training.engine.loop.stage_context without a Run: the same fields, the shipped config's grid."""
    from training.diffusion import DDIMGrid
    from training.models.base import scheduler_abar
    from training.stages.base import StageContext

    abar = scheduler_abar().to(acc.device)
    index = STAGES[variant][0]
    start = sum(s.steps for s in cfg.stages[:index])
    # DMD's two time-scale rule: the generator trains on every gen_every-th step of the stage, only the fake
    # score on the others; dmd_gen times the first kind, dmd_fake the second
    step = start + (1 if variant == "dmd_fake" else 0)
    return StageContext(acc, unet, unet, vae, abar, DDIMGrid(abar, cfg.tscd.num_ddim_timesteps), "epsilon", cfg,
                        teacher=stack.disabled, target=ema.swapped, adapters=stack, persistent=persistent,
                        resources=resources, stage_index=index, stage_start=start, step=step)


def make_batch(family, batch, latent, dtype, device, gen):
    """What engine/batches.micro_batch hands a stage: latents and noise in the run's dtype, the uniforms
    table u (float64), text conditioning as the encoders return it (fp32)."""
    from training.engine.batches import U_WIDTH

    cond, uncond = unet_conditioning(family, batch, gen, device=device)
    u = torch.rand((batch, U_WIDTH), generator=gen, dtype=torch.float64)
    return {"latents": torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype),
            "noise": torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype),
            "u": u.to(device), "step_u": u[0].to(device), "cond": cond, "uncond": uncond,
            "captions": ["a photo of a cat"] * batch}


def ours_step_fn(spec, unet, cfg, acc, dtype, gen):
    """One optimizer step of a product stage, as training.engine.loop.optimizer_step takes it (grad_accum 1)."""
    from training.stages import get_stage

    variant = spec["variant"]
    stage = cfg.stages[STAGES[variant][0]]
    plugin = get_stage(stage.type)
    stack, ema, opt, params, persistent = attach_ours(unet, cfg, variant, spec.get("lean", False))
    vae, resources = None, {}
    if variant == "feedback":  # the product loads the VAE and the reward in fp32 (models/base.py, rewards.py)
        vae = build_vae(spec["family"], device=acc.device).requires_grad_(False)
        resources = {STAGES[variant][0]: build_aesthetic_reward(device=acc.device)}
    ctx = stage_context(acc, unet, cfg, variant, stack, ema, persistent, resources, vae)
    plugin.setup(ctx, stage)
    unet.train()

    def step(phase=None):
        batch = make_batch(spec["family"], spec["batch"], spec["latent"], dtype, acc.device, gen)
        with acc.autocast():
            loss, logs = plugin.loss(ctx, batch, stage)
            if loss is not None:
                acc.backward(loss * stage.weight)
        if phase is not None:
            phase("loss_backward")
        if cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        return {k: v for k, v in logs.items() if k in ("stop_t",)}
    extra = sum(p.numel() for m in [vae, *resources.values()] if m is not None for p in m.parameters())
    return step, [opt, *[o for k, o in persistent.items() if k.endswith("_opt")]], extra


def lcm_step_fn(spec, unet, cfg, acc, dtype, gen):
    """diffusers' LCM-LoRA recipe on its own peft LoRA (rank / alpha of the shipped config, the script's
    target modules), AdamW with the shipped lr / betas / weight decay, grad-norm clip 1."""
    from training.models.adapters import add_adapter
    from training.models.base import scheduler_abar

    from benchmarks.speed_train import lcm_lora_step

    params = add_adapter(unet, "lcm", cfg.lora.rank, cfg.lora.alpha, LCM_TARGETS, trainable=True)
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    abar = scheduler_abar().float().to(acc.device)
    unet.train()

    def step(phase=None):
        b = make_batch(spec["family"], spec["batch"], spec["latent"], dtype, acc.device, gen)
        lcm_lora_step(unet, opt, b["latents"], b["cond"], b["uncond"], gen, abar, (cfg.tscd.w_min, cfg.tscd.w_max),
                      cfg.tscd.huber_c, acc.autocast, params, after_backward=phase and (lambda: phase("loss_backward")))
        return {}
    return step, [opt], 0


def run_config(spec: dict) -> dict:
    """Build, warm up, time `spec["steps"]` steps; -> times, memory at each phase, parameter counts."""
    from accelerate import Accelerator

    from benchmarks.full_size_models import count_params

    torch.manual_seed(0)
    dtype, mixed = MODES[spec["mode"]]
    acc = Accelerator(mixed_precision=mixed, cpu=spec["device"] == "cpu")
    cuda = acc.device.type == "cuda"
    mem = CudaPeak(acc.device) if cuda else PeakRSS(spec["rss_limit_gb"])
    sync = (lambda: torch.cuda.synchronize(acc.device)) if cuda else (lambda: None)
    import diffusers.models  # noqa: F401  (imported before "start": library code is not the model's memory)
    import peft  # noqa: F401

    phases = {"start": mem.now()}
    unet = build_unet(spec["family"], dtype, acc.device).requires_grad_(False)
    if spec["checkpointing"]:
        unet.enable_gradient_checkpointing()
    phases["weights"] = mem.now()
    cfg = shipped_config(spec["family"])
    fn = lcm_step_fn if spec["variant"] == "lcm" else ours_step_fn
    step, optimizers, extra_params = fn(spec, unet, cfg, acc, dtype, torch.Generator().manual_seed(0))
    phases["adapters"] = mem.now()
    lora_all = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    times, cpu_times, peaks, logs = [], [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        before = mem.reset()
        t0, c0 = time.perf_counter(), time.thread_time()
        info = step()
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.thread_time() - c0)
            peaks.append({"before": before, "peak": mem.peak, "after": mem.now()})
            logs.append(info)
    tracked = tracked_step(step, optimizers) if spec.get("track") else None
    return {**spec, "tracked_bytes": tracked, "device_name": torch.cuda.get_device_name(acc.device) if cuda else "cpu",
            "memory_kind": "cuda_max_memory_allocated" if cuda else "rss_sampled",
            "step_s": times, "step_cpu_s": cpu_times, "step_logs": logs, "phases_bytes": phases, "steps_bytes": peaks,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "unet_params": count_params(unet) - lora_all, "lora_params_all": lora_all,
            "lora_params_trainable": sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad),
            # parameters with AdamW state (what trained), the EMA's copy of the TSCD LoRA, VAE + reward (feedback)
            "adam_params": sum(p.numel() for o in optimizers for p in o.state),
            "ema_params": 0 if spec["variant"] == "lcm" else sum(p.numel() for n, p in unet.named_parameters()
                                                                 if "lora_" in n and ".default." in n),
            "extra_params": extra_params, "torch_threads": torch.get_num_threads()}



def tracked_step(step, optimizers) -> dict:
    """One more step under TensorPeak, its optimizers' state made beforehand: the peak bytes the step adds
    over what persists, during loss + backward and during clip + optimizer step."""
    prime_optimizers(optimizers)
    tracker = TensorPeak()
    with tracker:
        step(tracker.mark)
    tracker.mark("optimizer")
    return {**tracker.marks, "peak": max(tracker.marks.values()), "live_after": tracker.live}

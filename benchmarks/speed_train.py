"""Speed benchmark, part 3: one training step of the trainer's TSCD loss (``training.stages.tscd``) vs
a diffusers train_lcm_distill_lora_sd.py-style LCM-LoRA step (the reference recipe, rewritten here), and
each vs the sum of its own UNet passes; every variant in fresh subprocesses for its peak RSS
(``python -m benchmarks.speed --_train-one NAME``)."""
from __future__ import annotations

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from schedulers import scaled_linear_alphas_cumprod

ROOT = Path(__file__).resolve().parent.parent
TRAIN = dict(batch=4, size=32, seq=77, rank=8, steps=5)


def _lora_unet(size, rank):
    from training.models.adapters import add_adapter
    from training.models.tiny import tiny_unet

    unet = tiny_unet(sample_size=size).eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    params = add_adapter(unet, "default", rank, float(rank), targets, trainable=True)
    unet.train()
    return unet, params


def ours_train_step_fn(unet, params, batch, gen):
    """One optimizer step of the trainer's TSCD loss (training.stages.tscd), k = 4 segments."""
    from training.diffusion import DDIMGrid
    from training.models.adapters import AdapterStack
    from training.stages import tscd

    abar = scaled_linear_alphas_cumprod()
    cfg = SimpleNamespace(tscd=SimpleNamespace(w_min=3.0, w_max=8.0, loss="huber", huber_c=1e-3))
    stack = AdapterStack(unet)
    stack.use(["default"], ["default"])
    ctx = SimpleNamespace(student=unet, unet=unet, abar=abar, grid=DDIMGrid(abar, 48), prediction_type="epsilon",
                          cfg=cfg, teacher=stack.disabled, target=contextlib.nullcontext)
    opt = torch.optim.AdamW(params, lr=1e-4)
    stage = SimpleNamespace(segments=4)
    b, size = batch, TRAIN["size"]

    def step():
        data = {"latents": torch.randn(b, 4, size, size, generator=gen), "noise": torch.randn(b, 4, size, size, generator=gen),
                "cond": {"encoder_hidden_states": torch.randn(b, TRAIN["seq"], 32, generator=gen)},
                "uncond": {"encoder_hidden_states": torch.zeros(1, TRAIN["seq"], 32)}, "u": torch.rand(b, 2, generator=gen)}
        loss, _ = tscd.tscd_loss(ctx, data, stage.segments)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def reference_lcm_step_fn(unet, params, batch, gen):
    """The reference step on the tiny UNet: fresh latents and text states each step (lcm_lora_step)."""
    abar = scaled_linear_alphas_cumprod().float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, size = batch, TRAIN["size"]

    def step():
        latents = torch.randn(b, 4, size, size, generator=gen)
        cond = {"encoder_hidden_states": torch.randn(b, TRAIN["seq"], 32, generator=gen)}
        lcm_lora_step(unet, opt, latents, cond, {"encoder_hidden_states": torch.zeros(b, TRAIN["seq"], 32)}, gen, abar)
    return step


def lcm_boundary(t, sigma_data=0.5, scale=10.0):
    t = t.float() * scale
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def lcm_lora_step(unet, opt, latents, cond, uncond, gen, abar, w_range=(3.0, 8.0), huber_c=1e-3,
                  autocast=contextlib.nullcontext, clip_params=None, after_backward=None):
    """diffusers train_lcm_distill_lora_sd.py's step, rewritten: DDIM solver (50 steps), teacher CFG as two
    passes with the adapters off, boundary-condition scalings, target from the same LoRA UNet under
    no_grad, huber loss, AdamW. `cond` / `uncond` are UNet kwargs (SDXL: with added_cond_kwargs);
    `autocast` is the mixed-precision context; `clip_params`: clip their grad norm at 1 (the script's
    max_grad_norm); `after_backward()` is called between backward and the optimizer (memory phases)."""
    skip = 1000 // 50
    ddim_t = torch.arange(1, 51, device=latents.device) * skip - 1
    b = len(latents)

    def x0_of(eps, x, t):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    idx = torch.randint(0, 50, (b,), generator=gen).to(latents.device)
    start = ddim_t[idx]
    prev = (start - skip).clamp_min(0)
    cs0, co0 = lcm_boundary(start)
    cs, co = lcm_boundary(prev)
    noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
    a = abar[start].view(-1, 1, 1, 1).to(latents.dtype)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    w = torch.empty(b, 1, 1, 1).uniform_(*w_range, generator=gen).to(latents.device)
    with autocast():
        pred = cs0 * noisy + co0 * x0_of(unet(noisy, start, **cond).sample, noisy, start)
        with torch.no_grad():
            unet.disable_adapters()
            e_c = unet(noisy, start, **cond).sample
            e_u = unet(noisy, start, **uncond).sample
            unet.enable_adapters()
            x0_c, x0_u = x0_of(e_c, noisy, start), x0_of(e_u, noisy, start)
            x0 = x0_c + w * (x0_c - x0_u)
            eps = e_c + w * (e_c - e_u)
            ap = abar[prev].view(-1, 1, 1, 1)
            x_prev = (ap.sqrt() * x0 + (1 - ap).sqrt() * eps).to(noisy.dtype)
            target = cs * x_prev + co * x0_of(unet(x_prev, prev, **cond).sample, x_prev, prev)
        loss = (torch.sqrt((pred.float() - target.float()) ** 2 + huber_c**2) - huber_c).mean()
    loss.backward()
    if after_backward is not None:
        after_backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)  # after the step, as the script does: no grads held between steps
    return loss


def unet_passes_fn(unet, batch, teacher_batches):
    """The UNet passes of a step alone: student fwd+bwd, then no-grad passes of the given batch sizes."""
    size = TRAIN["size"]

    def step():
        x = torch.randn(batch, 4, size, size)
        t = torch.full((batch,), 500)
        unet(x, t, torch.randn(batch, TRAIN["seq"], 32)).sample.float().pow(2).mean().backward()
        with torch.no_grad():
            for n in teacher_batches:
                unet(torch.randn(n, 4, size, size), torch.full((n,), 500), torch.randn(n, TRAIN["seq"], 32))
    return step


def train_one(name: str) -> dict:
    """Run in a fresh process: median step time and peak RSS growth of one training-step variant."""
    torch.manual_seed(0)
    unet, params = _lora_unet(TRAIN["size"], TRAIN["rank"])
    gen = torch.Generator().manual_seed(0)
    b = TRAIN["batch"]
    fns = {"ours_tscd": lambda: ours_train_step_fn(unet, params, b, gen),
           "reference_lcm_lora": lambda: reference_lcm_step_fn(unet, params, b, gen),
           "ours_unet_floor": lambda: unet_passes_fn(unet, b, [2 * b, b]),
           "reference_unet_floor": lambda: unet_passes_fn(unet, b, [b, b, b])}
    step = fns[name]()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warmup
    times = []
    for _ in range(TRAIN["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"name": name, "step_ms": statistics.median(times) * 1e3, "step_times_ms": [t * 1e3 for t in times], "peak_rss_growth_mib": (peak - rss0) / 1024, "peak_rss_mib": peak / 1024}


def training_step(rounds: int = 2):
    """Each variant in fresh subprocesses, `rounds` rounds in alternating order (ABCD, DCBA, ...);
    step time = median over all rounds' steps, peak RSS growth = max over rounds."""
    names = ["ours_tscd", "reference_lcm_lora", "ours_unet_floor", "reference_unet_floor"]
    runs = {n: [] for n in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            out = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--_train-one", name], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {}
    for name, rs in runs.items():
        times = [t for r in rs for t in r["step_times_ms"]]
        rows[name] = {"name": name, "step_ms": statistics.median(times), "step_ms_min": min(times), "step_times_ms": times,
                      "peak_rss_growth_mib": max(r["peak_rss_growth_mib"] for r in rs),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "processes": len(rs)}
    r = {"config": dict(TRAIN, dtype="float32", rounds=rounds), **rows}
    r["ours_vs_reference"] = rows["ours_tscd"]["step_ms"] / rows["reference_lcm_lora"]["step_ms"]
    r["ours_vs_reference_min"] = rows["ours_tscd"]["step_ms_min"] / rows["reference_lcm_lora"]["step_ms_min"]
    r["ours_over_own_unet_floor"] = rows["ours_tscd"]["step_ms"] / rows["ours_unet_floor"]["step_ms"]
    r["reference_over_own_unet_floor"] = rows["reference_lcm_lora"]["step_ms"] / rows["reference_unet_floor"]["step_ms"]
    return r

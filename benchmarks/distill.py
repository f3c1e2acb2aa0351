"""Segmented consistency distillation for the quality benchmark (pixel-space tiny UNet + LoRA).

k = 1 is single-segment consistency distillation (LCM-LoRA style: the student maps x_t to x0);
k > 1 is TSCD: the student maps x_t to the lower boundary of t's segment, trained in stages
k = 8 -> 4 -> 2 -> 1 from the previous stage. Segment boundaries are the TCD timesteps of k steps
(k=4: 759, 499, 259) so that a k-step TCD run lands exactly on the boundaries.

Written against diffusers' train_lcm_distill_lora_sd.py recipe: DDIM solver on a 50-step grid,
teacher with classifier-free guidance, target = the same LoRA UNet under no_grad, pseudo-Huber
loss. This is the benchmark's own compact version, used until training/ exposes a TSCD step.
"""
from __future__ import annotations

import torch

from schedulers import scaled_linear_alphas_cumprod, tcd_timesteps

GRID_SKIP = 20  # 50-step DDIM solver grid: timesteps 19, 39, ..., 999
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2"]


def add_lora(unet, rank: int = 16):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def segment_boundaries(k: int) -> torch.Tensor:
    """Lower boundaries (descending) of the k segments; -1 stands for x0 (t = 0 with abar = 1)."""
    return torch.tensor(tcd_timesteps(k)[1:] + [-1]) if k > 1 else torch.tensor([-1])


def boundary_of(t: torch.Tensor, k: int) -> torch.Tensor:
    b = segment_boundaries(k)
    below = b.view(1, -1) < t.view(-1, 1)  # descending b: first True is the largest boundary < t
    return b[below.float().argmax(1)]


def _abar(abar_table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = torch.where(t >= 0, abar_table[t.clamp_min(0)], torch.ones_like(abar_table[0:1]))
    return a.view(-1, 1, 1, 1).float()


def ddim_to(x_t, eps, a_t, a_s):
    """DDIM (deterministic) jump from abar a_t to abar a_s given the eps prediction."""
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def pseudo_huber(a, b, c: float = 0.001):
    return ((a.float() - b.float()) ** 2 + c * c).sqrt().sub(c).mean()


def cd_loss(unet, x0, cond, uncond, k: int, guidance: float, gen: torch.Generator, abar_table):
    """One consistency-distillation loss on a clean batch (LoRA on = student, LoRA off = teacher)."""
    n = x0.shape[0]
    idx = torch.randint(1, 1000 // GRID_SKIP, (n,), generator=gen)
    t, t_prev = idx * GRID_SKIP + GRID_SKIP - 1, idx * GRID_SKIP - 1
    s = boundary_of(t, k)
    a_t, a_prev, a_s = _abar(abar_table, t), _abar(abar_table, t_prev), _abar(abar_table, s)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    student = ddim_to(x_t, unet(x_t, t, cond).sample, a_t, a_s)
    with torch.no_grad():
        unet.disable_adapters()
        e_c, e_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.chunk(2)
        unet.enable_adapters()
        x_prev = ddim_to(x_t, e_u + guidance * (e_c - e_u), a_t, a_prev)
        target = ddim_to(x_prev, unet(x_prev, t_prev, cond).sample, a_prev, a_s)
        at_boundary = (t_prev == s).view(-1, 1, 1, 1)
        target = torch.where(at_boundary, x_prev, target)
    return pseudo_huber(student, target)


def distill(unet, data_fn, stages: list[tuple[int, int]], guidance: float, lr: float, seed: int, log=print):
    """Train the LoRA through `stages` = [(k, steps), ...]; data_fn(gen) -> (x0, cond, uncond)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    abar = scaled_linear_alphas_cumprod()
    unet.train()
    for k, steps in stages:
        for step in range(steps):
            x0, cond, uncond = data_fn(gen)
            loss = cd_loss(unet, x0, cond, uncond, k, guidance, gen, abar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % max(1, steps // 4) == 0 or step == steps - 1:
                log(f"  k={k} step {step + 1}/{steps} loss {float(loss):.5f}")
    unet.eval()
    return unet


"""samples.png: the teacher (multi-step DDIM with CFG) beside the distilled LoRA at each step count from
the same noise, labelled and upscaled, plus a column for the full 1-step UNet when a run trains one.
All sampling math comes from schedulers/ (TCD; eta 0 is DDIM on the trailing grid)."""
from __future__ import annotations

import numpy as np
import torch

from schedulers import (DiscreteDenoiser, one_step_sigmas, sample_one_step, sample_tcd, sigmas_from_alphas_cumprod,
                        tcd_sigmas)
from training.diffusion import cat_cond_uncond, recommended_eta

CELL = 128  # pixels per image in samples.png (nearest-neighbour upscale of small models' outputs)


def denoiser(unet, base, device, uncond=None, guidance=1.0):
    """schedulers' k-diffusion denoiser over the UNet; with `uncond`, classifier-free guidance."""
    def unet_fn(x, t, **cond):
        t = t.to(device)
        if uncond is None or guidance == 1.0:
            return unet(x, t, **cond).sample
        both = unet(torch.cat([x, x]), torch.cat([t, t]), **cat_cond_uncond(cond, uncond, len(x))).sample
        out_c, out_u = both.chunk(2)
        return out_u + guidance * (out_c - out_u)
    table = sigmas_from_alphas_cumprod(base.abar.cpu().to(torch.float64))
    return DiscreteDenoiser(unet_fn, base.prediction_type, sigma_table=table), table


@torch.no_grad()
def tcd_latents(model, table, cond, noise, steps, eta, seed, device):
    """TCD at `steps` steps from unit-variance noise at t = 999 (per-step noise from `seed`)."""
    sigmas = tcd_sigmas(steps, sigma_table=table).to(device)
    x = noise * (1 + sigmas[0] ** 2).sqrt().float()  # unit-variance VP noise at t = 999, VE scaling
    gn = torch.Generator().manual_seed(seed)
    sampler_noise = lambda s, sn: torch.randn(x.shape, generator=gn).to(device)  # noqa: E731
    return sample_tcd(model, x, sigmas, extra_args=cond, disable=True, eta=eta, noise_sampler=sampler_noise,
                      sigma_table=table)


@torch.no_grad()
def one_step_latents(unet, base, cond, noise, timestep, device):
    """The full 1-step UNet: schedulers.sample_one_step from unit-variance noise at `timestep` (800)."""
    model, table = denoiser(unet, base, device)
    sigmas = one_step_sigmas(int(timestep), sigma_table=table).to(device)
    x = noise * (1 + sigmas[0] ** 2).sqrt().float()  # unit-variance VP noise, VE scaling
    return sample_one_step(model, x, sigmas, extra_args=cond, disable=True, sigma_table=table)


def decode_uint8(vae, latents):
    img = vae.decode(latents.float() / vae.config.scaling_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()


@torch.no_grad()
def sample_columns(unet, base, encode, prompts, steps_list, eta, latent_shape, seed, device, teacher=None,
                   one_step=None):
    """-> (labels, images uint8 [prompts, columns, C, H, W]) from the same noise. teacher = (context
    manager with every adapter off, steps, guidance); eta < 0: the recommended eta per step count."""
    cond = encode(prompts)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *latent_shape), generator=g).to(device)
    labels, cols = [], []
    if teacher is not None:
        off, t_steps, guidance = teacher
        model, table = denoiser(unet, base, device, encode([""] * len(prompts)), guidance)
        with off():
            cols.append(decode_uint8(base.vae, tcd_latents(model, table, cond, noise, t_steps, 0.0, seed + 1, device)))
        labels.append(f"teacher {t_steps} steps (cfg {guidance:g})")
    model, table = denoiser(unet, base, device)
    for steps in steps_list:
        e = recommended_eta(steps) if eta < 0 else eta
        cols.append(decode_uint8(base.vae, tcd_latents(model, table, cond, noise, steps, e, seed + 1, device)))
        labels.append(f"LoRA {steps} step{'s' if steps > 1 else ''} (eta {e:g})")
    if one_step is not None:
        cols.append(decode_uint8(base.vae, one_step_latents(one_step[0], base, cond, noise, one_step[1], device)))
        labels.append(f"1-step UNet (t={one_step[1]})")
    return labels, torch.stack(cols, 1)


def labelled_grid(labels, images, prompts, cell=CELL) -> np.ndarray:
    """uint8 [P, S, C, H, W] -> one RGB array: a header row of column labels, prompts above each row."""
    from PIL import Image, ImageDraw

    P, S = images.shape[:2]
    head, gap = 30, 14
    canvas = Image.new("RGB", (S * cell, head + P * (gap + cell)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for s, label in enumerate(labels):
        for k, part in enumerate(_two_lines(label)):
            draw.text((s * cell + 3, 2 + 12 * k), part, fill=(0, 0, 0))
    for p in range(P):
        top = head + p * (gap + cell)
        draw.text((3, top + 1), prompts[p], fill=(0, 0, 0))
        for s in range(S):
            tile = Image.fromarray(images[p, s].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (s * cell, top + gap))
    return np.asarray(canvas)


def _two_lines(label):
    words = label.split(" (")
    return [words[0]] + [f"({w}" for w in words[1:]]

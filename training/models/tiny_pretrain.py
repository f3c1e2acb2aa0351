"""Pre-train the tiny default teacher once and ship it: the command that made
training/models/tiny_teacher.safetensors.

    OMP_NUM_THREADS=1 python -m training.models.tiny_pretrain --out training/models/tiny_teacher.safetensors

On the generated task (training.data.sources: red / green / blue / yellow circles and squares on grey,
"a red circle"), seed 0, on the CPU:
1. the tiny VAE: reconstruction (MSE on the posterior mean + a small KL term); then `scaling_factor`
   = 1 / std of the data's latents, so the UNet sees unit-variance latents as in SD;
2. the tiny UNet and the tiny CLIP text encoder together: epsilon prediction on SD's scaled-linear
   schedule, 10% of captions replaced by "" (CFG's unconditional branch).
Deterministic: the same command on the same torch build and thread count rewrites the same tensors
(tests/test_tiny_teacher.py checks it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from training.models import tiny

SETTINGS = {"seed": 0, "num_images": 512, "image_size": 32, "vae_steps": 300, "vae_batch": 32, "vae_lr": 2e-3,
            "unet_steps": 2000, "unet_batch": 32, "unet_lr": 2e-3, "caption_dropout": 0.1}


def fit_one_cycle(params, steps: int, lr: float, loss_fn, name: str = "", pct_start: float = 0.15, log_every=100,
                  log=None):
    """AdamW + one-cycle schedule for `steps` steps of loss_fn(); returns the mean loss of the last 10%.
    Also the quality benchmark's teacher and classifier training (benchmarks/models.py)."""
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=pct_start)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tail = []
    for step in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if name and (step + 1) % log_every == 0:
            log(f"{name} step {step + 1}/{steps} loss {float(loss.detach()):.4f}")
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    return sum(tail) / len(tail)


def train_vae(vae, pixels, steps, batch, lr, gen) -> dict:
    def loss_fn():
        x = pixels[torch.randint(len(pixels), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        return (vae.decode(post.mean).sample - x).pow(2).mean() + 1e-6 * post.kl().mean()

    vae.train()
    loss = fit_one_cycle(vae.parameters(), steps, lr, loss_fn, "vae")
    vae.eval()
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
        mse = float((vae.decode(mean).sample - pixels).pow(2).mean())
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    return {"vae_loss": loss, "vae_mse": mse, "scaling_factor": scale}


def train_denoiser(unet, text_encoder, tokenizer, latents, captions, abar, s, gen) -> dict:
    """Epsilon prediction, text encoder trained jointly; `s` = SETTINGS."""
    prompts = sorted(set(captions)) + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    which = torch.tensor([prompts.index(c) for c in captions])
    abar = abar.float()

    def loss_fn():
        idx = torch.randint(len(latents), (s["unet_batch"],), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < s["caption_dropout"]
        prompt = torch.where(drop, len(prompts) - 1, which[idx])
        t = torch.randint(0, len(abar), (len(idx),), generator=gen)
        eps = torch.randn(latents[idx].shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        ehs = text_encoder(ids)[0][prompt]                # encode the few prompts once, pick per sample
        return (unet(a.sqrt() * latents[idx] + (1 - a).sqrt() * eps, t, ehs).sample - eps).pow(2).mean()

    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    loss = fit_one_cycle(params, s["unet_steps"], s["unet_lr"], loss_fn, "unet")
    unet.eval()
    text_encoder.eval()
    return {"unet_loss": loss}


def pretrain(settings: dict | None = None):
    """-> (Base with the trained tiny teacher, {name: figure}) for SETTINGS updated by `settings`."""
    from training.data import build_dataset, collate
    from training.models.base import Base, scheduler_abar

    s = dict(SETTINGS, **(settings or {}))
    torch.manual_seed(s["seed"])
    ds = build_dataset({"num_images": s["num_images"], "resolution": s["image_size"], "seed": s["seed"]})
    batch = collate([ds[i] for i in range(len(ds))])
    base = Base(tiny.tiny_unet(), tiny.tiny_vae(), [tiny.tiny_text_encoder()], [tiny.tiny_tokenizer()], "sd15",
                "epsilon", scheduler_abar())
    gen = torch.Generator().manual_seed(s["seed"])
    t0 = time.time()
    stats = train_vae(base.vae, batch["pixel_values"], s["vae_steps"], s["vae_batch"], s["vae_lr"], gen)
    stats["vae_seconds"] = time.time() - t0
    with torch.no_grad():
        latents = base.vae.encode(batch["pixel_values"]).latent_dist.mean * base.vae.config.scaling_factor
    stats["latent_std"] = float(latents.std())
    stats.update(train_denoiser(base.unet, base.text_encoders[0], base.tokenizers[0], latents, batch["caption"],
                                base.abar, s, gen))
    stats["seconds"] = time.time() - t0
    for m in (base.unet, base.vae, base.text_encoders[0]):
        m.requires_grad_(False).eval()
    return base, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.models.tiny_pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=tiny.TEACHER_PATH, help="output .safetensors (default: the shipped file)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting ({', '.join(SETTINGS)}); the shipped file uses the defaults")
    args = p.parse_args(argv)
    settings = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in SETTINGS:
            p.error(f"unknown setting {k!r}; expected one of {', '.join(SETTINGS)}")
        settings[k] = type(SETTINGS[k])(v)
    threads = torch.get_num_threads()
    if threads != 1:
        print(f"note: {threads} threads; the shipped teacher is made with OMP_NUM_THREADS=1 (float sums differ "
              "with the thread count, so only a 1-thread run reproduces it bit for bit)", file=sys.stderr)
    base, stats = pretrain(settings)
    command = f"OMP_NUM_THREADS={threads} python -m training.models.tiny_pretrain" + "".join(
        f" --set {kv}" for kv in args.set)
    meta = {"command": command, "settings": json.dumps(dict(SETTINGS, **settings)),
            "torch": torch.__version__, "threads": str(threads),
            "stats": json.dumps({k: round(v, 6) for k, v in stats.items()})}
    tiny.save_teacher(base, args.out, meta)
    print(json.dumps({k: round(v, 4) for k, v in stats.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation of the quality benchmark's rows: sampling through the product's schedulers, the metrics
(attribute accuracy, Frechet distance of classifier features, distance to the teacher's 25-step output,
diversity) and loading a row's LoRA file (what the training engine wrote) onto the teacher."""
from __future__ import annotations

import torch

from benchmarks import shapes
from schedulers import DiscreteDenoiser, sample_tcd, tcd_sigmas
from training.evaluate import frechet_distance


def lora_student(teacher, make_unet, lora_path):
    """The teacher with a kohya LoRA file (as the engine exported it) loaded as the active adapter "student"."""
    from training.lora_files.kohya import load_kohya
    from training.models.adapters import add_kohya_adapter

    unet = make_unet()
    unet.load_state_dict(teacher.state_dict())
    add_kohya_adapter(unet, "student", load_kohya(str(lora_path)), str(lora_path))
    unet.set_adapter("student")
    unet.requires_grad_(False)
    return unet.eval()


# --- sampling through the product's schedulers ------------------------------------------------------

def denoiser(unet, guidance: float):
    """The product's DiscreteDenoiser over `unet` (a student has its LoRA active), with CFG when guidance != 1."""
    def unet_fn(x, t, cond, uncond):
        if guidance == 1.0:
            return unet(x, t, cond).sample
        e_c, e_u = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.chunk(2)
        return e_u + guidance * (e_c - e_u)

    return DiscreteDenoiser(unet_fn)


@torch.no_grad()
def generate(model, noise, cond, uncond, steps, eta, seed):
    sigmas = tcd_sigmas(steps).float()
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # unit-variance VP noise at t=999, as diffusers starts
    gen = torch.Generator().manual_seed(seed)
    ns = lambda s, sn: torch.randn(noise.shape, generator=gen)  # noqa: E731
    out = sample_tcd(model, x, sigmas, extra_args={"cond": cond, "uncond": uncond}, disable=True,
                     noise_sampler=ns, eta=eta)
    return out.clamp(-1, 1)


def diversity(images, labels) -> float:
    """Mean pairwise RMS pixel distance between samples of the same prompt drawn from different noise,
    averaged over the prompts that occur at least twice (0 = every noise gives the same picture)."""
    per_prompt = []
    for lab in labels.unique(dim=0):
        group = images[(labels == lab).all(1)].flatten(1)
        if len(group) > 1:
            d = torch.cdist(group.double(), group.double()) / group.shape[1] ** 0.5
            per_prompt.append(float(d.sum() / (len(group) * (len(group) - 1))))
    return sum(per_prompt) / len(per_prompt)


@torch.no_grad()
def score(clf, images, labels, real_feats, reference):
    feats, logits = clf(images)
    acc = [float((lg.argmax(1) == labels[:, i]).float().mean()) for i, lg in enumerate(logits)]
    row = {f"acc_{k}": a for k, a in zip(shapes.ATTRIBUTES, acc)}
    row["align"] = sum(acc) / len(acc)
    row["fd"] = frechet_distance(feats, real_feats)
    row["dist25"] = None if reference is None else float((images - reference).pow(2).mean().sqrt())
    row["diversity"] = diversity(images, labels)
    return row


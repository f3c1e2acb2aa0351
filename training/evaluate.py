"""Does a model draw its captions? Samples of the generated task scored by the attribute classifier.

`generate` samples with the repo's own TCD (schedulers/; eta 0 is DDIM on the trailing grid) and
optional CFG; `sample_accuracy` scores those samples per attribute (training/models/attributes.py);
`teacher_accuracy` is the teacher's figure (25 DDIM steps with CFG). For a distilled LoRA pass its
UNet (adapters on) as `unet`, `guidance=1` and the step count and eta it is meant for.
"""
from __future__ import annotations

import torch

from training.data.sources import COLOURS, SHAPES, generated_caption

TASK_CAPTIONS = [generated_caption(c, s) for c in COLOURS for s in SHAPES]
TEACHER_GUIDANCE = 3.0     # the tiny teacher's CFG scale for teacher_accuracy (docs/training.md: the sweep)


@torch.no_grad()
def generate(base, captions: list[str], steps: int = 25, guidance: float = 1.0, seed: int = 0, eta: float = 0.0,
             unet=None, device="cpu") -> torch.Tensor:
    """Images [-1, 1] BCHW, one per caption: TCD from noise of `seed` (eta 0: DDIM on the trailing grid),
    with the sample grid's own sampler (engine/samples.py). `unet` defaults to base.unet (pass the
    student, adapters on, for a LoRA)."""
    from training.engine.samples import denoiser, tcd_latents
    from training.models.text import encode_prompts

    unet = base.unet if unet is None else unet
    cond = encode_prompts(base, list(captions), device)
    uncond = encode_prompts(base, [""] * len(captions), device) if guidance != 1.0 else None
    model, table = denoiser(unet, base, device, uncond, guidance)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(captions), unet.config.in_channels, size, size), generator=g).to(device)
    latents = tcd_latents(model, table, cond, noise, steps, eta, seed + 1, device)
    vae = base.vae
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1).float()


def sample_accuracy(base, steps: int = 25, guidance: float = TEACHER_GUIDANCE, seeds=range(8), captions=None,
                    eta: float = 0.0, unet=None, classifier=None, device="cpu", return_images: bool = False):
    """Attribute accuracy of samples: every caption (default: the task's 8) x every seed, one batch per
    seed. -> {colour, shape, mean, all, n} (+ "images", "captions" with return_images)."""
    from training.models.attributes import attribute_scores, train_attribute_classifier

    clf = classifier if classifier is not None else train_attribute_classifier(0)
    captions = list(captions or TASK_CAPTIONS)
    images = torch.cat([generate(base, captions, steps, guidance, seed, eta, unet, device).cpu() for seed in seeds])
    all_captions = captions * len(list(seeds))
    scores = attribute_scores(clf, images, all_captions)
    if return_images:
        scores.update(images=images, captions=all_captions)
    return scores


def teacher_accuracy(base, guidance: float = TEACHER_GUIDANCE, steps: int = 25, seeds=range(8), **kw) -> dict:
    """The teacher's attribute accuracy: 25-step DDIM (TCD eta 0) with CFG over the task's 8 captions x seeds."""
    return sample_accuracy(base, steps=steps, guidance=guidance, seeds=seeds, **kw)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (FID's formula; use the
    attribute classifier's `features` of samples vs ground-truth renders from `render_set`)."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm_psd(m):
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    s1 = sqrtm_psd(c1)
    cross = sqrtm_psd(s1 @ c2 @ s1)
    return float((m1 - m2).pow(2).sum() + torch.trace(c1 + c2 - 2 * cross))

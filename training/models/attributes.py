"""The attribute classifier of the generated task: does an image show the colour and shape its caption names?

A small CNN trained in a few seconds on ground-truth renders of `training.data.sources.generated_records`
(another seed than any training data). It is the default run's text-alignment metric
(`attribute_accuracy`, the CLIP-score analogue), its feature extractor for a Frechet distance
(`features`, the penultimate layer) and, through `caption_log_prob`, the feedback stage's reward
`attributes` (training/models/rewards.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data.sources import ATTRIBUTES, generated_records, parse_generated_caption

SIZE = 32                 # the classifier's input side; other sizes are resized to it
RENDER_SEED = 1000        # renders for seed s come from generated_records(seed=RENDER_SEED + s)
_CACHE: dict = {}


class AttributeClassifier(nn.Module):
    """Images [-1, 1] BCHW -> (penultimate features [B, 64], {attribute: logits})."""

    def __init__(self):
        super().__init__()
        self.features_net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.SiLU(), nn.Flatten(), nn.Linear(64 * (SIZE // 8) ** 2, 64), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(64, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.heads["shape"].weight.dtype)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.features_net(x)

    def forward(self, images):
        f = self.features(images)
        return f, {k: h(f) for k, h in self.heads.items()}


def render_set(num: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, list[str]]:
    """Ground-truth renders of the generated task: (images [-1, 1] [num, 3, size, size], captions)."""
    import numpy as np

    records = generated_records(num, size, seed)
    arr = np.stack([np.asarray(r.load(), dtype=np.float32) for r in records])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0, [r.caption for r in records]


def caption_labels(captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [B, n_attributes] long, known [B] bool): the attribute indices each caption names;
    captions that are not of the task ("" included) are marked unknown (labels 0)."""
    parsed = [parse_generated_caption(c) for c in captions]
    labels = [[ATTRIBUTES[k].index(p[k]) if p else 0 for k in ATTRIBUTES] for p in parsed]
    return (torch.tensor(labels, dtype=torch.long, device=device),
            torch.tensor([p is not None for p in parsed], device=device))


def train_attribute_classifier(seed: int = 0, steps: int = 200, num: int = 512, lr: float = 3e-3,
                               batch: int = 32) -> AttributeClassifier:
    """Train on `num` renders of generated_records(seed=RENDER_SEED + seed) with pixel noise, blur and
    brightness jitter (robust to a VAE's blur and samplers' residual noise); deterministic for a seed on
    a given torch build; cached per process."""
    key = (seed, steps, num, lr, batch)
    if key in _CACHE:
        return _CACHE[key]
    images, captions = render_set(num, RENDER_SEED + seed)
    labels, _ = caption_labels(captions)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = AttributeClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.2)
    for _ in range(steps):
        idx = torch.randint(num, (batch,), generator=gen)
        blur = torch.rand(batch, 1, 1, 1, generator=gen)
        x = (1 - blur) * images[idx] + blur * F.avg_pool2d(images[idx], 3, 1, 1, count_include_pad=False)
        x = x + 0.1 * torch.randn(x.shape, generator=gen)
        x = x + 0.1 * (torch.rand(batch, 1, 1, 1, generator=gen) - 0.5)      # brightness jitter
        _, logits = clf(x.clamp(-1, 1))
        loss = sum(F.cross_entropy(lg, labels[idx, i]) for i, lg in enumerate(logits.values()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.requires_grad_(False).eval()
    _CACHE[key] = clf
    return clf


@torch.no_grad()
def attribute_scores(clf: AttributeClassifier, images: torch.Tensor, captions: list[str]) -> dict:
    """Exact-match accuracy vs the caption per attribute, their mean ("mean") and all at once ("all"),
    over the images whose caption belongs to the task."""
    labels, known = caption_labels(captions, images.device)
    _, logits = clf(images)
    hits = torch.stack([lg.argmax(1) == labels[:, i] for i, lg in enumerate(logits.values())], 1)[known]
    out = {k: float(hits[:, i].float().mean()) for i, k in enumerate(logits)}
    out["mean"] = sum(out[k] for k in logits) / len(logits)
    out["all"] = float(hits.all(1).float().mean())
    out["n"] = int(known.sum())
    return out


def attribute_accuracy(clf: AttributeClassifier, images: torch.Tensor, captions: list[str]) -> float:
    """Mean over attributes of exact-match accuracy vs the caption (images [-1, 1] BCHW)."""
    return attribute_scores(clf, images, captions)["mean"]


def caption_log_prob(clf: AttributeClassifier, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Differentiable mean over attributes of log p(caption's value | image), [B]; 0 where the caption
    is not of the task (the empty prompt)."""
    labels, known = caption_labels(captions, images.device)
    _, logits = clf(images)
    logp = torch.stack([F.log_softmax(lg.float(), 1).gather(1, labels[:, i:i + 1]).squeeze(1)
                        for i, lg in enumerate(logits.values())], 0).mean(0)
    return torch.where(known, logp, torch.zeros_like(logp))


class AttributeReward(nn.Module):
    """Reward `attributes`: mean log p(caption's colour and shape | image) under the classifier trained
    from `seed` (a few seconds, deterministic) or loaded from a local safetensors file `weights`."""

    input_range = (-1.0, 1.0)
    max_reward = 0.0      # a log-probability: the feedback stage's alpha must be <= 0

    def __init__(self, seed: int = 0, weights: str | None = None):
        super().__init__()
        if weights:
            from safetensors.torch import load_file

            self.clf = AttributeClassifier()
            self.clf.load_state_dict(load_file(weights))
        else:
            self.clf = train_attribute_classifier(seed)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, prompts):
        return caption_log_prob(self.clf, images, list(prompts))

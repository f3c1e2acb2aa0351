"""The quality benchmark's own models: the pixel-space teacher UNet (trained from scratch on the shapes
task) and the attribute classifier that scores text alignment (and, trained on another split, serves
as the feedback stage's reward)."""
from __future__ import annotations

import torch

from benchmarks import shapes
from benchmarks.report import log
from schedulers import scaled_linear_alphas_cumprod


# UNet levels: "unet3" = 16 -> 8 -> 4 px (a 4x4 bottleneck where each cell sits in one quadrant, so the
# caption's position can be placed); "unet2" (16 -> 8, the first version) never learned position.
ARCH = "unet3"
BLOCKS = {"unet2": (32, 64), "unet3": (32, 64, 64)}


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    blocks = BLOCKS[ARCH]
    return UNet2DConditionModel(
        sample_size=shapes.SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D",) * len(blocks),
        up_block_types=("CrossAttnUpBlock2D",) * len(blocks),
        cross_attention_dim=shapes.EMBED_DIM, attention_head_dim=8, norm_num_groups=8)


class Task:
    """The training split: labels and images (seed 1) and the fixed text encoder."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.text = shapes.TextEncoder()
        self.labels = shapes.sample_labels(cfg["n_train"], seed=1)
        self.images = shapes.make_images(self.labels, seed=1)

    def batch(self, gen, n):
        idx = torch.randint(len(self.labels), (n,), generator=gen)
        return self.images[idx], self.text(self.labels[idx]), self.text.empty(n)


# --- teacher ---------------------------------------------------------------------------------

def fit(model, lr: float, steps: int, pct_start: float, loss_fn, name: str, log_every: int):
    """AdamW + OneCycle for `steps` steps of loss_fn() (the teacher's and the classifiers' training): the
    trainer's own loop (training/models/tiny_pretrain.py)."""
    from training.models.tiny_pretrain import fit_one_cycle

    model.train()
    fit_one_cycle(model.parameters(), steps, lr, loss_fn, name, pct_start, log_every, log)
    return model.eval()


def train_teacher(task, cfg):
    """Epsilon denoising from scratch on the training split, 10% caption dropout (CFG's unconditional branch)."""
    unet = make_unet()
    abar = scaled_linear_alphas_cumprod().float()
    gen = torch.Generator().manual_seed(0)

    def loss_fn():
        x0, cond, uncond = task.batch(gen, cfg["teacher_batch"])
        drop = torch.rand(len(x0), 1, 1, generator=gen) < 0.1  # unconditional branch for CFG
        cond = torch.where(drop, uncond, cond)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        return (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, cond).sample - eps).pow(2).mean()

    return fit(unet, cfg["teacher_lr"], cfg["teacher_steps"], 0.3, loss_fn, "teacher", 100)


# --- attribute classifier (metric) ----------------------------------------------------------------

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        c = torch.nn
        self.features = c.Sequential(
            c.Conv2d(3, 32, 3, padding=1), c.SiLU(), c.Conv2d(32, 32, 3, padding=1, stride=2), c.SiLU(),
            c.Conv2d(32, 64, 3, padding=1), c.SiLU(), c.Conv2d(64, 64, 3, padding=1, stride=2), c.SiLU(),
            c.Flatten(), c.Linear(64 * 16, 64), c.SiLU())
        self.heads = c.ModuleList([c.Linear(64, len(v)) for v in shapes.ATTRIBUTES.values()])

    def forward(self, x):
        f = self.features(x)
        return f, [h(f) for h in self.heads]


def train_classifier(labels, images, cfg, seed: int = 0):
    """Attribute classifier on ground-truth images (`seed`: init and batch order)."""
    torch.manual_seed(seed)
    clf = Classifier()
    gen = torch.Generator().manual_seed(2 + seed)

    def loss_fn():
        idx = torch.randint(len(labels), (64,), generator=gen)
        x = images[idx] + 0.05 * torch.randn(images[idx].shape, generator=gen)  # robust to sampler noise
        _, logits = clf(x.clamp(-1, 1))
        return sum(torch.nn.functional.cross_entropy(lg, labels[idx, i]) for i, lg in enumerate(logits))

    return fit(clf, cfg["clf_lr"], cfg["clf_steps"], 0.2, loss_fn, f"classifier(seed {seed})", 500)


@torch.no_grad()
def heldout_accuracy(clf, labels, images) -> dict:
    _, logits = clf(images)
    acc = {k: float((lg.argmax(1) == labels[:, i]).float().mean()) for i, (k, lg) in enumerate(zip(shapes.ATTRIBUTES, logits))}
    acc["mean"] = sum(acc.values()) / len(acc)
    acc["all_three"] = float(torch.stack([lg.argmax(1) == labels[:, i] for i, lg in enumerate(logits)]).all(0).float().mean())
    return acc


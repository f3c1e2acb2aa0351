"""The quality benchmark's rows trained by the product's training engine (`training.engine.run_training`).

Every student is one engine run on the benchmark's pixel-space teacher; this module only adapts the
benchmark's task to the engine's inputs, the stage code is the trainer's own (training/stages/):

* `pixel_base`: `models.base.Base` with the teacher UNet, an identity "VAE" (`PixelVAE`: pixels are the
  latents, so the engine's latent size equals the image size) and `text_fn` = the benchmark's caption
  embedding (`shapes.TextEncoder`; the empty prompt is the unconditional branch);
* `ShapesDataset`: ground-truth images with their captions, {"pixel_values", "caption"} per sample;
* `AttributeReward`: the feedback stage's reward through the product's reward interface
  (`params.reward: "benchmarks.stages:AttributeReward"`, `params.reward_weights`: the cached reward
  classifier): the mean log-probability of the caption's colour, shape and position;
* `engine_config` / `train_run`: the run's `TrainConfig` (the benchmark's stage plan and budget) and
  the run itself, cached: the run folder (the engine's LoRA files, metrics.json) is keyed by the config.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks import shapes

REWARD = "benchmarks.stages:AttributeReward"


class PixelVAE(torch.nn.Module):
    """Identity 'VAE' for pixel-space models: encode(px).latent_dist.mean == px, decode(x).sample == x."""

    def __init__(self):
        super().__init__()
        # one level: the engine's sample grid uses resolution // 2 ** (levels - 1) = the pixel size
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, block_out_channels=(3,))

    def encode(self, px):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=px))

    def decode(self, x):
        return SimpleNamespace(sample=x)


class ShapesDataset(torch.utils.data.Dataset):
    """Ground-truth shape images (in [-1, 1]) with their captions; one bucket (every image is 16x16)."""

    def __init__(self, labels: torch.Tensor, images: torch.Tensor):
        self.labels, self.images = labels, images
        self.bucket_ids = [0] * len(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "caption": shapes.caption(self.labels[i])}


class AttributeReward(torch.nn.Module):
    """reward(images, prompts) = mean over (colour, shape, position) of log p(caption's value | image)
    under an attribute classifier loaded from `weights`; 0 for the empty prompt (no caption to match)."""

    input_range = (-1.0, 1.0)

    def __init__(self, weights: str):
        from safetensors.torch import load_file

        from benchmarks.models import Classifier

        super().__init__()
        self.clf = Classifier()
        self.clf.load_state_dict(load_file(weights))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, prompts):
        parsed = [shapes.parse_caption(p) for p in prompts]
        keep = torch.tensor([p is not None for p in parsed], device=images.device)
        labels = torch.tensor([p or (0, 0, 0) for p in parsed], device=images.device)
        _, logits = self.clf(images)
        logp = [F.log_softmax(lg, 1).gather(1, labels[:, i:i + 1]).squeeze(1) for i, lg in enumerate(logits)]
        return torch.where(keep, torch.stack(logp, 0).mean(0), torch.zeros_like(logp[0]))


def pixel_base(teacher, make_unet, text: shapes.TextEncoder):
    """A fresh copy of the teacher as the engine's base model (the engine adds its adapters to it)."""
    from training.models.base import Base, scheduler_abar

    unet = make_unet()
    unet.load_state_dict(teacher.state_dict())
    return Base(unet, PixelVAE(), [], [], "sd15", "epsilon", scheduler_abar(),
                text_fn=lambda prompts, device: {"prompt_embeds": text.captions(list(prompts)).to(device)})


def engine_config(stages: list[dict], *, seed: int, rank: int, lr: float, batch: int, warmup: int,
                  guidance: float, init_lora: str = "", snapshots: bool = False):
    """The run's TrainConfig: the product's defaults but for the benchmark's budget, LoRA rank, teacher CFG
    (tscd.w_min = w_max) and pixel-space data; checkpoints only at the end; `snapshots`: keep each stage's
    LoRA as it ends (output.stage_snapshots)."""
    from training.config import load_config

    prompts = [shapes.caption((0, 1, 0)), shapes.caption((2, 0, 3))]
    sets = {"seed": seed, "model.base": "benchmarks.models:make_unet (pixel space)", "model.family": "sd15",
            "model.prediction_type": "epsilon", "model.init_lora": init_lora, "data.resolution": shapes.SIZE,
            "lora.rank": rank, "lora.alpha": rank, "tscd.w_min": guidance, "tscd.w_max": guidance,
            "optim.lr": lr, "optim.weight_decay": 0.0, "optim.batch_size": batch,
            "optim.warmup_steps": warmup,
            "output.checkpoint_every": 10 ** 9, "output.keep_checkpoints": 1, "output.stage_snapshots": snapshots,
            "output.sample_steps": json.dumps([1, 4]), "output.sample_prompts": json.dumps(prompts),
            "stages": json.dumps(stages)}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def run_key(cfg, cache_root: Path) -> str:
    """Hash of the run's config with every stage's params resolved over its defaults; paths inside the
    cache (init LoRA, reward weights) count by their name under it, so a moved cache still hits."""
    from training.config import to_dict
    from training.stages import get_stage

    tree = to_dict(cfg)
    tree["output"]["dir"] = ""
    # resolved params: a changed stage default retrains the runs that use it instead of reusing them
    tree["stages"] = [{**st, "params": get_stage(s.type).resolved(s)} for st, s in zip(tree["stages"], cfg.stages)]
    text = json.dumps(tree, sort_keys=True).replace(str(cache_root), "<cache>")
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def train_run(cfg, run_id: str, cache: Path, make_base, dataset, log=print) -> tuple[Path, dict]:
    """Run the engine into cache/<run_id>-<config hash>/ unless a finished run is there (its metrics.json,
    written last); -> (run folder, metrics). make_base() builds the base model only when it trains."""
    from training.engine import run_training

    out = cache / f"{run_id}-{run_key(cfg, cache)}"
    cfg.output.dir = str(out)
    metrics = out / "metrics.json"
    if metrics.exists():
        log(f"loaded {out}")
        return out, json.loads(metrics.read_text())
    plan = " -> ".join(f"{s.type} k={s.segments} x{s.steps}" for s in cfg.stages)
    log(f"training {out.name}: {plan} (batch {cfg.optim.batch_size})")
    run_training(cfg, overwrite=True, show_bar=False, base=make_base(), dataset=dataset, summary=False)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the LoRA files are the cached model
    result = json.loads(metrics.read_text())
    for i, s in enumerate(result["stages"]):
        log(f"  stage {i + 1} {s['type']} k={s['segments']}: loss {s['loss_start']:.4f} -> {s['loss_end']:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in s["logs_end"].items()))
    log(f"  trained in {result['train_seconds']:.0f} s")
    return out, result

"""Later Hyper-SD stages on the quality benchmark's pixel-space students.

Thin adapters around the product's stage modules, used as they are:

* feedback (ReFL): ``training.feedback.feedback_step`` with a reward that has ground truth: the
  log-probability, under an attribute classifier, of the caption's colour, shape and position
  (a miniature of human feedback). The reward classifier is trained on a different split and seed
  than the evaluation classifier, so the metric is not the optimised function.
* score distillation (DMD): ``training.score_distill.DMDStage`` in "lora" mode (1-step generator at
  t = 999, fake score = teacher copy + its own LoRA, MSE regulariser to the teacher's multi-step
  output from the same noise).

Both start from the TSCD student with its LoRA folded into the weights (the stage's docstrings:
"previous-stage LoRA folded in") and train only a fresh stage LoRA added by
``training.merge.add_stage_lora``. The pixel-space task has no VAE: ``PixelVAE`` is the identity.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks import shapes
from schedulers import scaled_linear_alphas_cumprod


class PixelVAE:
    """Identity 'VAE' for pixel-space models (decode(x).sample == x)."""

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)

    def decode(self, x):
        return SimpleNamespace(sample=x)


class AttributeReward:
    """reward(images, labels) = mean over (colour, shape, position) of log p(caption's value | image)."""

    input_range = (-1.0, 1.0)

    def __init__(self, clf):
        self.clf = clf.eval().requires_grad_(False)

    def __call__(self, images, labels):
        _, logits = self.clf(images)
        logp = [F.log_softmax(lg, 1).gather(1, labels[:, i:i + 1]).squeeze(1) for i, lg in enumerate(logits)]
        return torch.stack(logp, 0).mean(0)


def fused_copy(student, make_unet):
    """A plain UNet whose weights are `student`'s base weights with its active LoRA merged in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    s = copy.deepcopy(student)
    s.enable_adapters()
    for m in s.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    sd = {k.replace(".base_layer", ""): v for k, v in s.state_dict().items() if "lora_" not in k}
    plain = make_unet()
    plain.load_state_dict(sd)
    plain.eval()
    return plain


def stage_unet(make_unet, adapter: str, rank: int):
    """Structure of a cached stage student: plain UNet + one stage LoRA named `adapter`."""
    from training.merge import add_stage_lora

    unet = make_unet()
    add_stage_lora(unet, adapter, rank)
    unet.requires_grad_(False)
    unet.eval()
    return unet


def _prompts(task, gen, n):
    labels = torch.stack([torch.randint(len(v), (n,), generator=gen) for v in shapes.ATTRIBUTES.values()], 1)
    return labels, task.text(labels), task.text.empty(n)


def train_feedback(tscd_student, make_unet, reward, task, cfg: dict, seed: int, log=print):
    """ReFL fine-tuning of the folded TSCD student; returns the UNet with its 'feedback' LoRA active."""
    from training.feedback import feedback_step
    from training.merge import add_stage_lora

    unet = fused_copy(tscd_student, make_unet)
    params = add_stage_lora(unet, "feedback", cfg["stage_rank"])
    opt = torch.optim.AdamW(params, lr=cfg["feedback_lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    abar = scaled_linear_alphas_cumprod().float()
    stage_cfg = {"steps": 4, "late_fraction": cfg["feedback_late_fraction"], "alpha": 0.0, "weight": 1.0}
    vae = PixelVAE()
    n = cfg["stage_steps"]
    unet.train()
    for step in range(n):
        labels, cond, _ = _prompts(task, gen, cfg["distill_batch"])
        noise = torch.randn(len(labels), 3, shapes.SIZE, shapes.SIZE, generator=gen)
        stats = feedback_step(unet, vae, reward, opt, {"prompts": labels, "cond": cond, "noise": noise}, abar,
                              stage_cfg, generator=gen)
        if step % max(1, n // 4) == 0 or step == n - 1:
            log(f"  feedback step {step + 1}/{n} loss {stats['feedback_loss']:.4f} reward {stats['reward']:.4f} "
                f"t={stats['stop_t']}")
    unet.eval()
    return unet


def train_dmd(tscd_student, teacher, make_unet, task, cfg: dict, seed: int, log=print):
    """DMD (1-step, 'lora' mode) on the folded TSCD student; returns the UNet with its 'dmd' LoRA active."""
    from training.score_distill import DMDStage, teacher_multistep_x0

    unet = fused_copy(tscd_student, make_unet)
    frozen_teacher = copy.deepcopy(teacher).eval()
    abar = scaled_linear_alphas_cumprod().float()
    stage = DMDStage(unet, frozen_teacher, abar, {
        "mode": "lora", "rank": cfg["stage_rank"], "lr": cfg["dmd_lr"], "fake_lr": cfg["dmd_lr"],
        "guidance": cfg["guidance"], "gen_every": cfg["dmd_gen_every"], "reg_weight": cfg["dmd_reg_weight"],
        "seed": seed})
    gen = torch.Generator().manual_seed(seed)
    n = cfg["stage_steps"]
    unet.train()
    stage.fake.train()
    for step in range(n):
        labels, cond, uncond = _prompts(task, gen, cfg["distill_batch"])
        noise = torch.randn(len(labels), 3, shapes.SIZE, shapes.SIZE, generator=gen)
        ref = teacher_multistep_x0(frozen_teacher, noise, cond, uncond, cfg["guidance"], abar,
                                   steps=cfg["dmd_ref_steps"])
        stats = stage.step({"cond": cond, "uncond": uncond, "noise": noise, "reference": ref})
        if step % max(1, n // 4) == 0 or step == n - 1:
            log("  dmd step {}/{} {}".format(step + 1, n, " ".join(f"{k} {v:.4f}" for k, v in stats.items())))
    unet.eval()
    return unet

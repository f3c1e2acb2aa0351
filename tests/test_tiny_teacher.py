"""The shipped tiny default teacher: it draws its captions, and its command regenerates it.

- the attribute classifier (training/models/attributes.py) is ~perfect on held-out ground-truth renders
  and gives a differentiable reward ("attributes" in training/models/rewards.py);
- the shipped teacher (training/models/tiny_teacher.safetensors) draws the caption's colour and shape
  (25 DDIM steps with CFG, every task caption x 2 seeds);
- `python -m training.models.tiny_pretrain` regenerates the shipped tensors bit for bit (single-threaded
  CPU, fixed seeds) on the torch version that made them.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_attribute_classifier_is_exact_on_heldout_renders_and_a_differentiable_reward():
    from training.models.attributes import attribute_scores, caption_log_prob, render_set, train_attribute_classifier
    from training.models.rewards import RewardModel, build_reward

    clf = train_attribute_classifier(0)
    images, captions = render_set(128, 7777)
    scores = attribute_scores(clf, images, captions)
    print(f"held-out attribute accuracy {scores}")
    assert scores["mean"] >= 0.99 and scores["all"] >= 0.98
    wrong = [c.replace("circle", "SQ").replace("square", "circle").replace("SQ", "square") for c in captions]
    assert caption_log_prob(clf, images, captions).mean() > caption_log_prob(clf, images, wrong).mean() + 2
    reward = build_reward("attributes")
    assert isinstance(reward, RewardModel) and reward.max_reward == 0.0
    img = images[:3].clone().requires_grad_(True)
    r = reward(img, ["a red circle", "", "a blue square"])
    assert r.shape == (3,) and r[1] == 0.0                  # the empty prompt names nothing
    r.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_shipped_teacher_draws_its_captions():
    from training.evaluate import TEACHER_GUIDANCE, teacher_accuracy
    from training.models.base import load_tiny_base

    base = load_tiny_base()
    assert base.unet.config.cross_attention_dim == base.text_encoders[0].config.hidden_size
    assert base.vae.config.latent_channels == base.unet.config.in_channels == 4
    scores = teacher_accuracy(base, guidance=TEACHER_GUIDANCE, steps=25, seeds=range(2))
    print(f"shipped teacher, 25 DDIM steps, CFG {TEACHER_GUIDANCE}: {scores}")
    assert scores["n"] == 16 and scores["mean"] >= 0.9


@pytest.mark.slow
def test_pretrain_command_regenerates_the_shipped_file(tmp_path):
    from safetensors import safe_open

    from training.models.tiny import TEACHER_PATH

    with safe_open(TEACHER_PATH, "pt") as f:
        meta = f.metadata()
        shipped = {k: f.get_tensor(k) for k in f.keys()}
    if meta["torch"] != torch.__version__:
        pytest.skip(f"shipped teacher made with torch {meta['torch']}, this is {torch.__version__}: "
                    "float results of training differ across builds")
    out = tmp_path / "teacher.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "training.models.tiny_pretrain", "--out", str(out)], cwd=ROOT, env=env,
                   check=True, timeout=900)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["settings"] == meta["settings"] and f.metadata()["scaling_factor"] == meta["scaling_factor"]
        again = {k: f.get_tensor(k) for k in f.keys()}
    assert set(again) == set(shipped)
    worst = max((again[k] - shipped[k]).abs().max().item() for k in shipped)
    print(f"regenerated vs shipped teacher: max abs diff {worst}")
    # single-threaded CPU, seeded draws: bit for bit (2 threads already differ by ~1e-4 after 60 steps)
    assert worst == 0.0

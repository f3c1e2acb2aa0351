"""Benchmarks: the quality benchmark runs end to end in --quick mode, and the peer-TCD reference
math used by the speed benchmark agrees with our sampler (so the timing compares like with like)."""
import json

import torch

from benchmarks import peer_tcd, quality, shapes, stages
from schedulers import sample_tcd, scaled_linear_alphas_cumprod, tcd_sigmas


def test_peer_tcd_reference_matches_sample_tcd():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    noises = [torch.randn_like(x) for _ in range(8)]
    denoise = lambda x, sigma, **kw: 0.7 * x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()  # noqa: E731
    for steps, eta in ((1, 1.0), (4, 0.3), (8, 0.0), (8, 0.7)):
        sigmas = tcd_sigmas(steps)
        it = iter(noises)
        ours = sample_tcd(denoise, x * sigmas[0], sigmas, disable=True, eta=eta, noise_sampler=lambda s, sn: next(it))
        it2 = iter(noises)
        abar_s = peer_tcd.peer_abar_s(sigmas, eta, scaled_linear_alphas_cumprod()).double()
        peer = peer_tcd.peer_sample_tcd(denoise, x * sigmas[0], sigmas, abar_s, eta, lambda: next(it2))
        torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-5)  # peer keeps abar in float32


def test_shapes_ground_truth_is_learnable_and_distinct():
    labels = torch.tensor([[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 3]])
    imgs = shapes.make_images(labels, seed=0)
    assert imgs.shape == (4, 3, shapes.SIZE, shapes.SIZE)
    for i in range(1, 4):  # changing any one attribute changes the image
        assert (imgs[i] - imgs[0]).abs().max() > 0.5
    assert shapes.caption(labels[3]) == "a red square at the bottom right"
    enc = shapes.TextEncoder()
    assert not torch.equal(enc(labels[:1]), enc(labels[1:2]))


def test_frechet_distance_zero_for_same_and_positive_for_shifted():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(quality.frechet_distance(f, f)) < 1e-6
    assert quality.frechet_distance(f, f + 1.0) > 7.5  # |mu shift|^2 = 8


def test_quality_quick_end_to_end(tmp_path):
    quality.main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "quality_quick.json").read_text())
    rows = result["rows"]
    models = {r["model"] for r in rows}
    assert {"teacher (DDIM)", "CD k=1 (LCM-style) + LCM", "TSCD 8-4-2-1 + TCD", "TSCD + feedback (ReFL) + TCD",
            "TSCD + score distillation (DMD) + TCD", "TSCD + 2 more k=1 steps (control) + TCD"} <= models
    for name in ("eval_classifier", "reward_classifier"):
        assert 0.0 <= result["classifier_heldout_accuracy"][name]["mean"] <= 1.0
    assert {r["steps"] for r in rows} == {1, 4, 25}  # --quick evaluates 1 and 4 steps (full: 1, 2, 4, 8)
    for r in rows:
        assert 0.0 <= r["align"] <= 1.0 and r["fd"] >= 0.0
    t4 = next(r for r in rows if r["model"] == "teacher (DDIM)" and r["steps"] == 4)
    t1 = next(r for r in rows if r["model"] == "teacher (DDIM)" and r["steps"] == 1)
    assert t4["dist25"] < t1["dist25"]  # more DDIM steps get closer to the 25-step solution
    for name in ("quality_quick.md", "quality_quick.png", "quality_quick_samples.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # cached: a second run loads instead of training
    assert list((tmp_path / "cache").glob("quick-*/teacher.safetensors"))


def test_fused_copy_matches_the_lora_student_and_reward_is_differentiable():
    from benchmarks.distill import add_lora

    unet = quality.make_unet()
    add_lora(unet, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    x, t, ehs = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([999, 259]), torch.randn(2, 3, shapes.EMBED_DIM, generator=g)
    fused = stages.fused_copy(unet, quality.make_unet)
    with torch.no_grad():
        want = unet(x, t, ehs).sample
        assert not hasattr(fused, "peft_config")
        torch.testing.assert_close(fused(x, t, ehs).sample, want, rtol=1e-4, atol=1e-4)
        unet.disable_adapters()
        assert (unet(x, t, ehs).sample - want).abs().max() > 1e-3  # the LoRA did change the output

    reward = stages.AttributeReward(quality.Classifier())
    labels = torch.tensor([[0, 1, 2], [3, 0, 1]])
    img = torch.zeros(2, 3, 16, 16, requires_grad=True)
    r = reward(img, labels)
    assert r.shape == (2,) and bool((r <= 0).all())  # mean log-probability
    r.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0

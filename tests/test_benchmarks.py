"""Benchmarks: the quality benchmark runs end to end in --quick mode through the product's training
engine (and evaluates exactly the LoRA the engine trained), and the peer-TCD reference math used by the
speed benchmark agrees with our sampler (so the timing compares like with like)."""
import copy
import json

import pytest
import torch

from benchmarks import evaluate, models, peer_tcd, quality, shapes, stages
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
    # captions parse back to their labels (the engine's text_fn and the reward read strings)
    assert all(shapes.parse_caption(shapes.caption(lab)) == tuple(lab.tolist()) for lab in labels)
    texts = [shapes.caption(labels[0]), ""]
    torch.testing.assert_close(enc.captions(texts), torch.cat([enc(labels[:1]), enc.empty(1)]))
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.parse_caption("a photo of a cat")


def test_frechet_distance_zero_for_same_and_positive_for_shifted():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(evaluate.frechet_distance(f, f)) < 1e-6
    assert evaluate.frechet_distance(f, f + 1.0) > 7.5  # |mu shift|^2 = 8


def test_quality_quick_end_to_end(tmp_path):
    quality.main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "quality_quick.json").read_text())
    rows = result["rows"]
    models_seen = {r["model"] for r in rows}
    assert {"teacher (DDIM)", "CD k=1 (LCM-style) + LCM", "TSCD 8-4-2-1 + TCD", "TSCD + feedback (ReFL) + TCD",
            "TSCD + score distillation (DMD) + TCD", "TSCD + 2 more k=1 steps (control) + TCD",
            "TSCD + DMD (lr 1e-4, generator every 5th step) + TCD"} <= models_seen
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
    assert list((tmp_path / "cache").glob("quick-*/teacher.safetensors"))
    # every student is an engine run (its config.json, stage LoRA files) with the benchmark's stage plan
    plans = {}
    for name, lora in result["loras"].items():
        run_cfg = json.loads((tmp_path / lora).parent.joinpath("config.json").read_text())
        plans[name] = [(s["type"], s["segments"], s["steps"]) for s in run_cfg["stages"]], run_cfg["model"]["init_lora"]
    assert plans["CD k=1 (LCM-style)"] == ([("tscd", 1, 4)], "")
    assert plans["TSCD 8-4-2-1"] == ([("tscd", 8, 1), ("tscd", 4, 1), ("tscd", 2, 1), ("tscd", 1, 1)], "")
    tscd_lora = str(tmp_path / result["loras"]["TSCD 8-4-2-1"]).replace("hyper_sd_lora", "stages/1_tscd")
    assert plans["TSCD + feedback (ReFL)"] == ([("feedback", 1, 2)], tscd_lora)
    assert plans["TSCD + score distillation (DMD)"] == ([("score_distill", 1, 2)], tscd_lora)
    assert plans["TSCD + 2 more k=1 steps (control)"] == ([("tscd", 1, 2)], tscd_lora)


def test_engine_run_on_the_pixel_model_is_what_evaluation_loads(tmp_path):
    """One engine run (TSCD then feedback with the benchmark's reward) on the pixel-space UNet: the unified
    LoRA file it writes, loaded by the evaluation, reproduces the trained UNet; the cache key ignores
    where the cache lives."""
    weights = tmp_path / "reward.safetensors"
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file(models.Classifier().state_dict(), str(weights))
    labels = shapes.sample_labels(8, seed=1)
    teacher = models.make_unet().eval()
    text = shapes.TextEncoder()
    feedback = {"type": "feedback", "segments": 1, "steps": 1,
                "params": {"reward": stages.REWARD, "reward_weights": str(weights), "alpha": 0.0}}
    cfg = stages.engine_config([{"type": "tscd", "segments": 2, "steps": 1}, feedback], seed=0, rank=4, lr=1e-2,
                               batch=4, warmup=0, guidance=3.0)
    dataset = stages.ShapesDataset(labels, shapes.make_images(labels, seed=1))
    folder, metrics = stages.train_run(cfg, "t", tmp_path / "runs",
                                       lambda: stages.pixel_base(teacher, models.make_unet, text), dataset)
    assert [s["type"] for s in metrics["stages"]] == ["tscd", "feedback"]
    assert metrics["stages"][1]["logs_end"]["reward"] < 0  # a mean log-probability
    moved = copy.deepcopy(cfg)  # the same cache under another folder: paths inside it count by their name
    moved.stages[1].params["reward_weights"] = str(tmp_path / "moved" / "reward.safetensors")
    assert stages.run_key(moved, tmp_path / "moved") == stages.run_key(cfg, tmp_path) != stages.run_key(moved, tmp_path)
    student = evaluate.lora_student(teacher, models.make_unet, folder / "hyper_sd_lora.safetensors")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([999, 259])
    ehs = text.captions([shapes.caption(labels[0]), ""])
    with torch.no_grad():
        got, base_out = student(x, t, ehs).sample, teacher(x, t, ehs).sample
        # the same run again from its cache folder: the engine is not called, the metrics are read back
        again = stages.train_run(cfg, "t", tmp_path / "runs", lambda: pytest.fail("retrained"), None)
    assert again[0] == folder
    assert (got - base_out).abs().max() > 1e-4  # the LoRA changed the model
    # a second engine run, kept in memory, trains the same LoRA bit for bit: compare with its UNet
    from training.engine import run_training
    cfg.output.dir = str(tmp_path / "again")
    run = run_training(cfg, show_bar=False, base=stages.pixel_base(teacher, models.make_unet, text), dataset=dataset)
    with torch.no_grad():
        torch.testing.assert_close(run.train.unet.cpu()(x, t, ehs).sample, got, rtol=1e-4, atol=1e-5)


def test_attribute_reward_reads_captions_and_is_differentiable(tmp_path):
    from safetensors.torch import save_file
    from training.models.rewards import build_reward

    weights = tmp_path / "reward.safetensors"
    save_file(models.Classifier().state_dict(), str(weights))
    reward = build_reward(stages.REWARD, weights=str(weights))  # as the feedback stage builds it
    img = torch.zeros(3, 3, 16, 16, requires_grad=True)
    prompts = [shapes.caption((0, 1, 2)), shapes.caption((3, 0, 1)), ""]
    r = reward(img, prompts)
    assert r.shape == (3,) and bool((r[:2] < 0).all()) and r[2].item() == 0.0  # log-probabilities; "" scores 0
    r.sum().backward()
    assert img.grad is not None and img.grad[:2].abs().sum() > 0
    vae = stages.PixelVAE()
    px = torch.randn(1, 3, 16, 16)
    assert vae.encode(px).latent_dist.mean is px and vae.decode(px).sample is px

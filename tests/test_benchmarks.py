"""Benchmarks: the quality benchmark runs end to end in --quick mode through the product's training
engine (and evaluates exactly the LoRA the engine trained), and the peer-TCD reference math used by the
speed benchmark agrees with our sampler (so the timing compares like with like)."""
import copy
import json

import pytest
import torch

from benchmarks import evaluate, models, peer_tcd, plans, quality, shapes, stages
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


def test_quality_subset_of_rows_and_seeds(tmp_path):
    """--rows / --seeds / --tag: only the named rows (plus TSCD under them and the control beside them) are
    trained, only the claims those rows can test are made, and the outputs carry the tag."""
    quality.main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                  "--rows", "feedback", "--seeds", "2-3", "--tag", "sub"])
    result = json.loads((tmp_path / "out" / "quality_sub.json").read_text())
    assert result["seeds"] == [2, 3] and result["tag"] == "sub" and result["mode"] == "quick"
    assert {r["row"] for r in result["rows"]} == {"teacher", "tscd", "tscd_k2", "control", "feedback"}
    assert {r["seed"] for r in result["rows"] if r["row"] == "feedback"} == {2, 3}
    assert list(result["claims"]) == ["c"] and result["claims"]["c"]["mean_over_steps"]["seeds"] == [2, 3]
    assert (tmp_path / "out" / "quality_sub_claim_c.png").stat().st_size > 0
    assert not list((tmp_path / "out").glob("quality_sub_claim_[abde].png"))
    assert list((tmp_path / "cache").glob("quick-*/teacher.safetensors"))  # the cache is keyed by mode, not tag


@pytest.mark.parametrize("args, message", [(["--rows", "feedbak"], "unknown row"), (["--seeds", "5-3"], "distinct seeds"),
                                           (["--seeds", "x"], "expected seeds"), (["--tag", "a/b"], "--tag")])
def test_quality_bad_arguments_exit_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        quality.main(["--quick", "--out", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_paired_t_critical_value_by_seed_count():
    from benchmarks.claims import paired
    a = {s: 1.0 + 0.01 * (s % 3) for s in range(12)}
    b = {s: 1.0 for s in range(12)}
    p = paired(a, b)
    assert p["t_crit"] == 1.796 and p["verdict"] == "supported"  # df 11, not the normal 1.645


def test_quality_quick_end_to_end(tmp_path):
    quality.main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "quality_quick.json").read_text())
    rows, seeds = result["rows"], result["seeds"]
    assert seeds == [0, 1]
    # every student row was trained and evaluated once per seed, on the whole sampler grid
    for label in plans.ROWS.values():
        for eta in (0.0, 0.3, 1.0):
            for steps in (1, 2):
                assert sorted(r["seed"] for r in rows if (r["model"], r["eta"], r["steps"]) == (label, eta, steps)) == seeds
    k2 = [r for r in rows if r["model"] == plans.snapshot_label(2)]  # TSCD's k = 2 LoRA at its own 2 steps
    assert {r["steps"] for r in k2} == {2} and len(k2) == 3 * len(seeds)
    teacher = [r for r in rows if r["row"] == "teacher"]
    assert {(r["steps"], r["eta"]) for r in teacher} >= {(25, 0.0), (1, 0.0), (2, 1.0)} and {r["seed"] for r in teacher} == {None}
    for r in rows:
        assert 0.0 <= r["align"] <= 1.0 and r["fd"] >= 0.0 and r["diversity"] > 0.0 and r["dist25"] >= 0.0
    t1, t2 = (next(r for r in teacher if (r["steps"], r["eta"]) == (s, 0.0)) for s in (1, 2))
    assert t2["dist25"] < t1["dist25"]  # more DDIM steps get closer to the 25-step solution
    cell = next(c for c in result["summary"] if c["model"] == plans.ROWS["tscd"] and (c["steps"], c["eta"]) == (1, 1.0))
    assert cell["n_seeds"] == 2 and cell["align_sd"] >= 0.0
    verdicts = {"supported", "contradicted", "inconclusive", "mixed", "partly supported"}
    assert set(result["claims"]) == set("abcde") and all(c["verdict"] in verdicts for c in result["claims"].values())
    assert result["claims"]["a"]["by_steps"]["2"]["dist25"]["seeds"] == seeds  # paired seed for seed (JSON keys)
    for name in ["quality_quick.md", "quality_quick_samples.png"] + [f"quality_quick_claim_{c}.png" for c in "abcde"]:
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "## Claims" in (tmp_path / "out" / "quality_quick.md").read_text()
    assert list((tmp_path / "cache").glob("quick-*/teacher.safetensors"))
    # every student is an engine run (its config.json) with the benchmark's stage plan and the row's seed
    for key, folder in result["runs"].items():
        row, seed = key.rsplit("-s", 1)
        run_cfg = json.loads((tmp_path / folder / "config.json").read_text())
        plan = [(s["type"], s["segments"], s["steps"]) for s in run_cfg["stages"]]
        init = run_cfg["model"]["init_lora"]
        assert run_cfg["seed"] == int(seed)
        expected = {"cd_full": [("tscd", 1, 4)], "cd_last": [("tscd", 1, 1)],
                    "tscd": [("tscd", 8, 1), ("tscd", 4, 1), ("tscd", 2, 1), ("tscd", 1, 1)],
                    "control": [("tscd", 2, 1), ("tscd", 1, 1)], "adversarial": [("adversarial", 2, 1), ("adversarial", 1, 1)],
                    "feedback": [("feedback", 1, 2)], "dmd": [("score_distill", 1, 2)],
                    "unified": [("adversarial", 2, 1), ("adversarial", 1, 1), ("feedback", 1, 2), ("score_distill", 1, 2)]}
        assert plan == expected[row]
        own_tscd = str(tmp_path / result["runs"][f"tscd-s{seed}"] / "stages" / "1_tscd.safetensors")
        assert init == (own_tscd if row in plans.ON_TSCD else "")
    assert (tmp_path / result["runs"]["tscd-s0"] / "stages" / "snapshots" / "3_tscd_k2.safetensors").exists()


def test_claims_are_paired_over_seeds():
    """A difference that every seed shows beats the seeds' spread ("supported"); one the seeds disagree on does
    not, even with the same mean; lower-is-better metrics flip the direction."""
    from benchmarks import claims

    assert claims.paired({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.8, 1: 0.7, 2: 0.76})["verdict"] == "supported"
    mixed = claims.paired({0: 1.0, 1: 0.6, 2: 0.85}, {0: 0.8, 1: 0.7, 2: 0.76})
    assert mixed["verdict"] == "inconclusive" and abs(mixed["mean_diff"] - 0.0633) < 1e-3
    fd = claims.paired({0: 10.0, 1: 12.0, 2: 11.0}, {0: 20.0, 1: 21.0, 2: 23.0}, lower_is_better=True)
    assert fd["verdict"] == "supported" and fd["mean_diff"] < 0
    assert claims.paired({0: 20.0, 1: 21.0, 2: 23.0}, {0: 10.0, 1: 12.0, 2: 11.0}, True)["verdict"] == "contradicted"


def test_diversity_is_zero_for_identical_samples_and_grows_with_spread():
    labels = torch.tensor([[0, 0, 0]] * 3 + [[1, 1, 1]] * 3)
    same = torch.ones(6, 3, 4, 4)
    assert evaluate.diversity(same, labels) == 0.0
    spread = same + torch.arange(6).view(6, 1, 1, 1)  # within each prompt: 0, 1, 2 apart (3 - 5 likewise)
    assert abs(evaluate.diversity(spread, labels) - 4 / 3) < 1e-9  # mean pairwise |i - j| over {0, 1, 2}


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


def test_run_key_changes_with_a_stage_default(tmp_path, monkeypatch):
    """The cache key holds each stage's resolved params: a changed default in the stage code retrains the
    runs that use it instead of reusing runs trained under the old default."""
    from benchmarks import stages
    from training.config import load_config
    from training.stages import get_stage

    cfg = load_config(None, [])  # the default plan has a feedback stage
    before = stages.run_key(cfg, tmp_path)
    feedback = get_stage("feedback")
    monkeypatch.setattr(feedback, "params", {**feedback.params, "grad_scale": 0.5})
    assert stages.run_key(cfg, tmp_path) != before
    monkeypatch.undo()
    assert stages.run_key(cfg, tmp_path) == before


def _quality_result(seeds, gain, config=None):
    """A minimal quality_<tag>.json: control and feedback rows at 1/2/4/8 steps, recommended eta."""
    from training.diffusion import recommended_eta
    rows = [{"model": "teacher DDIM + CFG", "row": "teacher", "seed": None, "steps": 25, "eta": 0.0, "align": 0.9,
             "fd": 700.0}]
    for seed in seeds:
        for row, extra in (("control", 0.0), ("feedback", gain + 0.001 * seed)):
            rows += [{"model": plans.ROWS[row], "row": row, "seed": seed, "steps": s, "eta": recommended_eta(s),
                      "align": 0.7 + extra, "fd": 500.0} for s in (1, 2, 4, 8)]
    return {"benchmark": "quality", "config": {"seeds": list(seeds), "n_eval": 64, **(config or {})}, "rows": rows}


def test_pool_tests_claims_over_the_seeds_of_several_runs(tmp_path, capsys):
    from benchmarks import pool
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_quality_result((3, 4), 0.01)))
    b.write_text(json.dumps(_quality_result((9, 10, 11), 0.01)))
    pooled = pool.pool([a, b])
    c = pooled["claims"]["c"]["mean_over_steps"]
    assert pooled["seeds"] == [3, 4, 9, 10, 11] and sorted(c["seeds"]) == [3, 4, 9, 10, 11]
    assert c["verdict"] == "supported" and c["seeds_agreeing"] == 5 and list(pooled["claims"]) == ["c"]
    assert pool.main([str(a), str(b)]) == 0 and "**supported**" in capsys.readouterr().out
    # each file alone has fewer seeds: the pooled t is the one a single run with all five seeds gives
    assert pool.pool([a])["claims"]["c"]["mean_over_steps"]["t_crit"] == 6.314


@pytest.mark.parametrize("second, message", [
    (_quality_result((4, 5), 0.01), "also in"),                                # a seed in both runs
    (_quality_result((9,), 0.01, {"n_eval": 32}), "differs from"),               # another task / budget
    ({"benchmark": "speed", "rows": []}, "not a quality benchmark result"),
])
def test_pool_refuses_runs_it_cannot_pool(second, message, tmp_path, capsys):
    from benchmarks import pool
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_quality_result((3, 4), 0.01)))
    b.write_text(json.dumps(second))
    assert pool.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(b) in err

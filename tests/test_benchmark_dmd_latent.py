"""benchmarks/dmd_latent.py: the DMD-vs-control comparison on the default latent task. The arms are the
product's engine runs with the plans the benchmark names (the default plan's DMD stage on the prefix's
LoRA, a same-length TSCD control), the claims read lower FD as better, and bad arguments exit 2 before
anything is written. The end-to-end run uses toy budgets (a smoke test, not a measurement)."""
import json

import pytest

from benchmarks import dmd_latent
from training.config import StageConfig, TrainConfig


def test_arms_are_the_default_plan_split_at_its_dmd_stage():
    default = TrainConfig().stages
    prefix = dmd_latent.prefix_config(7)
    assert prefix.seed == 7 and [s.type for s in prefix.stages] == [s.type for s in default if s.type != "score_distill"]
    dmd = dmd_latent.continuation_config(7, "/x.safetensors", "dmd", 90, {"guidance": 3.0})
    control = dmd_latent.continuation_config(7, "/x.safetensors", "control", 90, {"guidance": 3.0})
    default_dmd = next(s for s in default if s.type == "score_distill")
    assert [(s.type, s.segments, s.steps) for s in dmd.stages] == [("score_distill", 1, 90)]
    assert dmd.stages[0].params == {**default_dmd.params, "guidance": 3.0}
    assert default_dmd.params["guidance"] == 5.0 and default_dmd.steps == 60  # the default plan is not modified
    assert [(s.type, s.segments, s.steps) for s in control.stages] == [("tscd", 1, 90)]
    assert dmd.model.init_lora == control.model.init_lora == "/x.safetensors"


def test_claims_read_lower_fd_as_better():
    def arm(fd1, fd4):
        return {1: {"fd_teacher": fd1, "fd_gt": fd1, "accuracy": 1.0}, 4: {"fd_teacher": fd4, "fd_gt": 0.0, "accuracy": 1.0}}

    per_seed = {s: {"dmd": arm(10.0 + s, 5.1 + 0.1 * s), "control": arm(20.0, 5.0)} for s in range(4)}
    claims = dmd_latent.dmd_claims(per_seed)
    assert claims["fd_teacher_1"]["verdict"] == "supported" and claims["fd_teacher_1"]["mean_diff"] == pytest.approx(-8.5)
    assert claims["fd_teacher_4"]["verdict"] == "contradicted" and claims["fd_teacher_4"]["seeds_agreeing"] == 0
    assert claims["accuracy_1"]["verdict"] == "inconclusive" and claims["accuracy_1"]["mean_diff"] == 0.0


@pytest.mark.parametrize("args, message", [(["--seeds", "x"], "expected seeds"), (["--steps", "0"], "--steps"),
                                           (["--param", "gen_evry=5"], "unknown score_distill param"),
                                           (["--param", "guidance"], "key=value"), (["--tag", "a/b"], "--tag")])
def test_bad_arguments_exit_2_before_writing(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        dmd_latent.main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_end_to_end_at_toy_budgets(tmp_path, monkeypatch, capsys):
    def tiny_prefix(seed):
        return TrainConfig(seed=seed, stages=[StageConfig(segments=1, steps=2)])

    monkeypatch.setattr(dmd_latent, "prefix_config", tiny_prefix)
    monkeypatch.setattr(dmd_latent, "EVAL_SEEDS", range(1))
    argv = ["--seeds", "0,1", "--steps", "2", "--param", "gen_every=1", "--threads", "1", "--tag", "toy",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    dmd_latent.main(argv)
    result = json.loads((tmp_path / "out" / "dmd_latent_toy.json").read_text())
    assert result["seeds"] == [0, 1] and result["dmd_params"] == {"gen_every": 1}
    for per_arm in result["per_seed"].values():
        assert set(per_arm) == set(dmd_latent.ARMS)
        for rows in per_arm.values():
            assert set(rows) == {str(s) for s in dmd_latent.STEPS}
            assert all(0 <= r["accuracy"] <= 1 and r["fd_teacher"] >= 0 and r["fd_gt"] >= 0 for r in rows.values())
    assert set(result["claims"]) == {*dmd_latent.CLAIMS, *dmd_latent.REPORTED} and result["claims"]["fd_teacher_4"]["seeds"] == [0, 1]
    # each continuation is an engine run on the prefix's unified LoRA of the same seed
    runs = sorted((tmp_path / "cache" / "dmd-latent").iterdir())
    assert len(runs) == 6
    for folder in runs:
        cfg = json.loads((folder / "config.json").read_text())
        if not folder.name.startswith("prefix"):
            prefix = next(r for r in runs if r.name.startswith(f"prefix-s{cfg['seed']}-"))
            assert cfg["model"]["init_lora"] == str(prefix / "hyper_sd_lora.safetensors")
            assert cfg["stages"][0]["type"] == ("score_distill" if folder.name.startswith("dmd") else "tscd")
    assert "| fd_teacher_4 |" in (tmp_path / "out" / "dmd_latent_toy.md").read_text()
    capsys.readouterr()
    dmd_latent.main(argv)  # cached: only evaluates
    assert "training" not in capsys.readouterr().out

"""Config schema: unknown keys suggest the nearest key, bad values name the key, bad paths are clear."""
import json

import pytest

from training.config import ConfigError, load_config


def test_defaults_valid():
    cfg = load_config()
    assert [(s.type, s.segments) for s in cfg.stages] == [
        ("tscd", 8), ("tscd", 4), ("tscd", 2), ("tscd", 1), ("feedback", 1), ("score_distill", 1)]
    assert cfg.tscd.num_ddim_timesteps == 50


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(None, ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match="did you mean 'output'"):
        load_config(None, ["outptu.dir=x"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tscd:\n  num_ddim_timestep: 48\n")
    with pytest.raises(ConfigError, match="tscd.num_ddim_timestep.*num_ddim_timesteps"):
        load_config(str(p))


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("optim.lr=abc", "optim.lr"), ("lora.rank=0", "lora.rank"),
    ("tscd.loss=l3", "tscd.loss"), ("tscd.ema_decay=1.5", "tscd.ema_decay"),
    ("tscd.w_min=9", "tscd.w_min"), ("optim.mixed_precision=fp8", "optim.mixed_precision"),
    ("tscd.num_ddim_timesteps=48", "tscd.num_ddim_timesteps"), ("tscd.num_ddim_timesteps=40", "tscd.num_ddim_timesteps"),
    ('stages=[{"type": "tscdd", "segments": 8, "steps": 1}]', "stages[0].type"),
    ('stages=[{"segments": 8, "step": 1}]', "stages[0].step"),
    ("data.resolution=4", "data.resolution"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(None, [override])


def test_json_config_and_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"optim": {"lr": 1e-4}, "stages": [{"segments": 2, "steps": 5}]}))
    cfg = load_config(str(p), ["optim.batch_size=4", "lora.targets=to_q,to_v"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.batch_size == 4 and cfg.total_steps == 5
    assert cfg.lora.targets == ["to_q", "to_v"]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_shipped_configs_load():
    import glob
    files = glob.glob("training/configs/*.yaml")
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f)
        assert cfg.model.base != "tiny"


FB = {"type": "feedback", "segments": 1, "steps": 1}


@pytest.mark.parametrize("stages, key, extra", [
    ([FB], r"stages\[0\]\.type", "model.init_lora"),                                  # feedback before any TSCD
    ([{"segments": 8, "steps": 1}, {"type": "score_distill", "segments": 2, "steps": 1}],
     r"stages\[1\]\.segments", "segments: 1"),
    ([{"segments": 8, "steps": 1}, {"type": "score_distill", "segments": 1, "steps": 1}, FB],
     r"stages\[2\]\.type", "out of order"),
    ([{"segments": 8, "steps": 1}, {**FB, "params": {"reward": "laion_aesthetc"}}],
     r"stages\[1\]\.params\.reward", "did you mean 'laion_aesthetic'"),
    ([{"segments": 8, "steps": 1}, {**FB, "params": {"reward_weights": "/nonexistent/reward.safetensors"}}],
     r"stages\[1\]\.params\.reward_weights", "/nonexistent/reward.safetensors"),
    ([{"segments": 8, "steps": 1}, {**FB, "params": {"anchor_start": "no"}}],
     r"stages\[1\]\.params\.anchor_start", "true or false"),
    ([{"type": "adversarial", "segments": 8, "steps": 1, "params": {"adv_weight": {"8": 1}}}],
     r"stages\[0\]\.params\.adv_weight", "did you mean 'adv_weights'"),
    ([{"type": "adversarial", "segments": 6, "steps": 1}], r"stages\[0\]\.params\.adv_weights", "6 segments"),
    ([{"segments": 8, "steps": 1, "params": {"reward": "tiny"}}], r"stages\[0\]\.params\.reward", "valid keys"),
    ([{"segments": 8, "steps": 1}, {"type": "score_distill", "segments": 1, "steps": 1, "params": {"mode": "whole"}}],
     r"stages\[1\]\.params\.mode", "'full': the whole 1-step UNet"),
])
def test_bad_stage_plans_name_the_key(stages, key, extra):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(None, ["stages=" + json.dumps(stages)])
    assert extra in str(e.value)


def test_init_lora_must_exist_and_enables_a_later_stage_alone(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_lora.*not found"):
        load_config(None, ["model.init_lora=/nonexistent/lora.safetensors", "stages=" + json.dumps([FB])])
    lora = _kohya_file(tmp_path / "tscd.safetensors")
    cfg = load_config(None, [f"model.init_lora={lora}", "stages=" + json.dumps([FB])])
    assert cfg.stages[0].type == "feedback"


def test_shipped_configs_run_every_stage_type():
    import glob
    for f in glob.glob("training/configs/*.yaml"):
        types = [s.type for s in load_config(f).stages]
        assert {"tscd", "adversarial", "feedback", "score_distill"} <= set(types), f
        reward = [s.params.get("reward") for s in load_config(f).stages if s.type == "feedback"]
        assert reward == ["laion_aesthetic"], f


def test_default_plan_uses_the_stage_fixes():
    """The embedded default: DMD2's update ratio at the lr that lets DMD move the 1-step samples, a feedback
    reward with a reachable alpha and a regulariser, TSCD boundaries on the TCD grid; no adversarial term
    (it lowered the default task's 1-step accuracy)."""
    cfg = load_config(None, [])
    by_type = {s.type: s for s in cfg.stages}
    assert set(by_type) == {"tscd", "feedback", "score_distill"}
    assert by_type["score_distill"].params["gen_every"] >= 5
    # DMD at optim.lr: at 1e-4 its 12 generator updates left the 1-step samples where they were (dmd_latent)
    from training.engine.setup import group_lr
    assert group_lr(cfg, "score_distill") == cfg.optim.lr == 1e-3
    fb = by_type["feedback"].params
    assert fb["reward"] == "attributes" and fb["alpha"] <= 0 and fb["reg_weight"] > 0 and fb["lr"] < cfg.optim.lr
    assert cfg.tscd.num_ddim_timesteps == 50 and cfg.output.sample_eta == -1


@pytest.mark.parametrize("override, key, expected", [
    ("data.caption_dropout=1.5", "data.caption_dropout", "[0, 1]"), ("tscd.huber_c=-1", "tscd.huber_c", "> 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps", ">= 0"), ("optim.max_grad_norm=-1", "optim.max_grad_norm", ">= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay", ">= 0"), ("optim.lr=inf", "optim.lr", "finite"),
    ("optim.lr=nan", "optim.lr", "finite"), ("optim.lr=0", "optim.lr", "> 0"),
    ('stages=[{"segments": 8, "steps": 1, "weight": Infinity}]', r"stages[0].weight", "finite"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value) and expected in str(e.value)


def test_range_edges_are_accepted():
    cfg = load_config(None, ["data.caption_dropout=1", "optim.warmup_steps=0", "optim.max_grad_norm=0",
                             "optim.weight_decay=0"])
    assert cfg.data.caption_dropout == 1.0 and cfg.optim.max_grad_norm == 0


@pytest.mark.parametrize("name, text, expected", [
    ("bad.yaml", "optim:\n  lr: [1, 2\n", "line 3"),
    ("list.yaml", "- optim\n- data\n", "expected a mapping of sections"),
    ("tag.yaml", "optim: !!python/object/apply:os.system ['touch MARKER']\n", "line 1"),
    ("bad.json", '{"optim": {"lr": 1e-3,}}', "line 1, column 23: not valid JSON"),
    ("list.json", "[1, 2]", "expected a mapping of sections"),
])
def test_malformed_config_files_name_the_file_and_line(tmp_path, monkeypatch, name, text, expected):
    """Each is one ConfigError naming the file (and the line); a YAML tag is never constructed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / name), ["optim.lr=1e-4"])  # an override on top, as the CLI does
    assert str(tmp_path / name) in str(e.value) and expected in str(e.value)
    assert not (tmp_path / "MARKER").exists()


def test_non_utf8_config_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"optim:\n  lr: 1e-4 # \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8"):
        load_config(str(p))


def _kohya_file(path):
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(path))
    return path


class _Planted:
    """A pickle whose loading would run code (it would create `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content, expected", [
    ("pickle", "is not a readable safetensors file"), (b"\x00" * 3, "is not a readable safetensors file"),
    ("empty_safetensors", "no kohya LoRA keys"),
])
def test_init_lora_that_is_not_a_kohya_safetensors_names_the_key_and_file(tmp_path, content, expected):
    import pickle

    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "init.safetensors"
    if content == "pickle":
        lora.write_bytes(pickle.dumps(_Planted(tmp_path / "MARKER")))
    elif content == "empty_safetensors":
        save_file({"x": torch.zeros(1)}, str(lora))
    else:
        lora.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.init_lora={lora}", "stages=" + json.dumps([FB])])
    assert "'model.init_lora'" in str(e.value) and str(lora) in str(e.value) and expected in str(e.value)
    assert not (tmp_path / "MARKER").exists()

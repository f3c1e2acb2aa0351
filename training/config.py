"""Training config: dataclass schema, YAML/JSON loading, `--set key=value` overrides, validation.

Unknown keys are errors that suggest the nearest valid key; bad values name the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, get_origin, get_type_hints

from training.errors import ConfigError, DataError
from training.models.adapters import UNET_LORA_TARGETS


@dataclass
class ModelConfig:
    base: str = "tiny"            # "tiny" | diffusers folder | .safetensors file | hub id
    family: str = "auto"          # auto | sd15 | sdxl
    prediction_type: str = "auto"  # auto | epsilon | v_prediction
    single_file_config: str = ""  # local diffusers config folder for single-file checkpoints
    revision: str = ""
    init_lora: str = ""           # kohya LoRA of a previous run: a frozen base under every stage here


@dataclass
class DataConfig:
    source: str = "generated"     # "generated" (tiny shapes) or a folder / .jsonl manifest
    resolution: int = 32
    num_generated: int = 64
    caption_dropout: float = 0.0
    cache_dir: str = ""           # "" = off; else precomputed VAE latents + text embeddings (docs/data.md)
    extra: dict = field(default_factory=dict)  # data.DatasetOptions keys (bucketing, center_crop, ...)


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: list = field(default_factory=lambda: list(UNET_LORA_TARGETS))


@dataclass
class TSCDConfig:
    num_ddim_timesteps: int = 50      # the TCD sampler's trailing grid (segment boundaries lie on it)
    w_min: float = 3.0
    w_max: float = 8.0
    loss: str = "huber"           # huber | l2
    huber_c: float = 0.001
    ema_decay: float = 0.95       # 0 = target from the student's own LoRA (stop-grad)
    ema_restart: bool = False     # at each new TSCD stage, restart the EMA target from the live LoRA


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: str = "constant_with_warmup"  # constant | constant_with_warmup | cosine | linear
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    batch_size: int = 8           # GLOBAL batch per optimizer step (all processes x accumulation)
    grad_accum: int = 1
    mixed_precision: str = "no"   # no | fp16 | bf16
    gradient_checkpointing: bool = False


@dataclass
class OutputConfig:
    dir: str = "outputs/hyper-sd-tiny"
    name: str = "hyper_sd_lora"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_steps: list = field(default_factory=lambda: [1, 2, 4, 8])
    sample_prompts: list = field(default_factory=lambda: ["a red circle", "a blue square", "a green square",
                                                          "a yellow circle"])
    sample_eta: float = -1.0      # -1: the eta the run recommends per step count (1.0 at 1 step, else 0.3)
    teacher_steps: int = 25       # the teacher column of samples.png (DDIM with CFG); 0 = no column
    teacher_guidance: float = 3.0   # the tiny teacher draws every caption at 1.5-6 (docs/training.md)
    tensorboard: bool = False
    merge_rank: int = 0           # 0: exact merge (ranks add up); > 0: SVD re-rank, error in metrics.json
    stage_snapshots: bool = False  # also write each stage's LoRA as it ends (stages/snapshots/): e.g. TSCD's k-step LoRAs


@dataclass
class StageConfig:
    type: str = "tscd"
    segments: int = 8
    steps: int = 30
    weight: float = 1.0
    params: dict = field(default_factory=dict)  # stage-type specific options


def _default_stages():
    """The stage groups in order, sized for a 2-core CPU (docs/training.md, "Measured"). TSCD at 2 and 1
    segments runs without the adversarial term: on this task it lowered 1-step accuracy (docs/stages.md)."""
    tscd = [StageConfig(segments=8, steps=80), StageConfig(segments=4, steps=80)]
    low = [StageConfig(segments=2, steps=100), StageConfig(segments=1, steps=120)]
    feedback = StageConfig(type="feedback", segments=1, steps=40,
                           params={"reward": "attributes", "alpha": -0.05, "reg_weight": 1.0, "lr": 1e-4})
    dmd = StageConfig(type="score_distill", segments=1, steps=60,  # lr: optim.lr (docs/stages.md, dmd_latent)
                      params={"guidance": 5.0, "gen_every": 5, "reg_weight": 1.0})
    return tscd + low + [feedback, dmd]


@dataclass
class TrainConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tscd: TSCDConfig = field(default_factory=TSCDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    stages: list = field(default_factory=_default_stages)

    @property
    def total_steps(self):
        return sum(s.steps for s in self.stages)


CHOICES = {
    "model.family": ("auto", "sd15", "sdxl"),
    "model.prediction_type": ("auto", "epsilon", "v_prediction"),
    "tscd.loss": ("huber", "l2"),
    "optim.lr_scheduler": ("constant", "constant_with_warmup", "cosine", "linear"),
    "optim.mixed_precision": ("no", "fp16", "bf16"),
}
POSITIVE = {"data.resolution", "lora.rank", "tscd.num_ddim_timesteps", "optim.batch_size",
            "optim.grad_accum", "output.checkpoint_every", "output.log_every", "optim.lr",
            "lora.alpha", "output.keep_checkpoints", "tscd.huber_c"}
NON_NEGATIVE = {"optim.weight_decay": "0 = no weight decay", "optim.warmup_steps": "0 = no warmup",
                "optim.max_grad_norm": "0 = no clipping"}
UNIT_INTERVAL = {"tscd.ema_decay": "[0, 1)", "data.caption_dropout": "[0, 1]"}  # ema_decay 1 would never move


def _coerce(value, typ, key):
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ in (list, dict):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                if typ is list:
                    value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, typ):
            return value
    raise ConfigError(f"config key '{key}': expected {typ.__name__}, got {value!r}")


def _unknown(key, valid):
    near = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown(full, names)
        typ = hints[key]
        if key == "stages" and cls is TrainConfig:
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"config key 'stages': expected a JSON list of stages ({e})") from e
            if not isinstance(value, list) or not value:
                raise ConfigError("config key 'stages': expected a non-empty list of stage mappings")
            kwargs[key] = [_build(StageConfig, s, f"stages[{i}].") for i, s in enumerate(value)]
        elif dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, full + ".")
        else:
            kwargs[key] = _coerce(value, get_origin(typ) or typ, full)
    return cls(**kwargs)


def _set_dotted(tree, key, value, cls=TrainConfig):
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts):
        if part.startswith("stages[") or (i > 0 and parts[i - 1] == "stages" and part.isdigit()):
            raise ConfigError(f"--set {key}: set stages with --set stages='[...]' (JSON)")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]), names)
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = node.setdefault(part, {})


def validate(cfg: TrainConfig) -> TrainConfig:
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
    _validate_finite(cfg)
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {_get(cfg, key)!r}")
    for key, why in NON_NEGATIVE.items():
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"config key '{key}': must be >= 0 ({why}), got {_get(cfg, key)!r}")
    for key, interval in UNIT_INTERVAL.items():
        value = _get(cfg, key)
        if not (0.0 <= value < 1.0 or (value == 1.0 and interval.endswith("]"))):
            raise ConfigError(f"config key '{key}': must be in {interval}, got {value!r}")
    t = cfg.tscd
    if not 1.0 <= t.w_min <= t.w_max:
        raise ConfigError(f"config keys 'tscd.w_min'/'tscd.w_max': need 1 <= w_min <= w_max, got {t.w_min}, {t.w_max}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas': expected two numbers in [0, 1), got {cfg.optim.betas}")
    if not cfg.lora.targets:
        raise ConfigError("config key 'lora.targets': need at least one target module name")
    from training.stages import known_stage_types
    for i, s in enumerate(cfg.stages):
        if s.type not in known_stage_types():
            near = difflib.get_close_matches(s.type, known_stage_types(), n=1)
            raise ConfigError(f"config key 'stages[{i}].type': unknown stage type {s.type!r}"
                              + (f"; did you mean {near[0]!r}?" if near else f"; known: {known_stage_types()}"))
        if s.steps < 1:
            raise ConfigError(f"config key 'stages[{i}].steps': must be >= 1, got {s.steps}")
        _validate_segments(s, i, t.num_ddim_timesteps)
        if s.weight <= 0:
            raise ConfigError(f"config key 'stages[{i}].weight': must be > 0, got {s.weight}")
    _validate_stage_plan(cfg)
    _validate_data(cfg.data)
    if t.num_ddim_timesteps > 1000:
        raise ConfigError("config key 'tscd.num_ddim_timesteps': must be <= 1000")
    if cfg.output.checkpoint_every < 1:
        raise ConfigError("config key 'output.checkpoint_every': must be >= 1")
    _validate_samples(cfg.output)
    return cfg


def _validate_finite(cfg):
    """Every float key (stages' weights too) is a finite number: inf / nan reach the optimizer otherwise."""
    import math

    sections = [(f.name + ".", getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))]
    sections += [(f"stages[{i}].", s) for i, s in enumerate(cfg.stages)]
    for prefix, section in sections:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{prefix}{f.name}': must be a finite number, got {value!r}")


def _validate_samples(out):
    """samples.png settings, checked before training (not after it, when the grid is drawn)."""
    for n in out.sample_steps:
        if not isinstance(n, int) or not 1 <= n <= 50:
            raise ConfigError(f"config key 'output.sample_steps': entries must be ints in 1..50 (TCD picks them "
                              f"from a 50-step grid), got {n!r}")
    if not (out.sample_eta == -1 or 0 <= out.sample_eta <= 1):
        raise ConfigError(f"config key 'output.sample_eta': must be in [0, 1], or -1 for the recommended eta "
                          f"per step count, got {out.sample_eta}")
    if not 0 <= out.teacher_steps <= 50 or out.teacher_guidance < 1:
        raise ConfigError(f"config key 'output.teacher_steps' / 'output.teacher_guidance': need 0..50 steps "
                          f"(0 = no teacher column) and guidance >= 1, got {out.teacher_steps}, {out.teacher_guidance}")
    if not out.sample_prompts or not all(isinstance(p, str) for p in out.sample_prompts):
        raise ConfigError(f"config key 'output.sample_prompts': expected a non-empty list of strings, "
                          f"got {out.sample_prompts!r}")


def _validate_segments(stage, i, n):
    """A stage's segment boundaries are the TCD sampler's timesteps at `segments` steps; they must lie on
    the n-point solver grid (diffusion.segment_boundaries)."""
    from training.diffusion import segment_boundaries

    if stage.segments < 1 or stage.segments > n:
        raise ConfigError(f"config key 'stages[{i}].segments': {stage.segments} must be in 1..{n} "
                          f"(tscd.num_ddim_timesteps)")
    try:
        segment_boundaries(stage.segments, n)
    except ValueError as e:
        raise ConfigError(f"config key 'tscd.num_ddim_timesteps' ({n}) with stages[{i}].segments = "
                          f"{stage.segments}: {e}") from None


def _validate_stage_plan(cfg):
    """Stage order, per-type params (unknown keys suggest the nearest), reward names, weights files."""
    from training.lora_files.kohya import kohya_file_problem
    from training.stages import get_stage, validate_stage_plan

    m = cfg.model
    if m.init_lora and (why := kohya_file_problem(m.init_lora)):  # header only: a pickle is never opened
        raise ConfigError(f"config key 'model.init_lora': {why}")
    if cfg.output.merge_rank < 0:
        raise ConfigError(f"config key 'output.merge_rank': must be >= 0 (0 = exact merge), got {cfg.output.merge_rank}")
    try:
        validate_stage_plan(cfg.stages, m.init_lora)
        for i, s in enumerate(cfg.stages):
            stage_type = get_stage(s.type)
            for key in s.params:
                if key not in stage_type.params:
                    raise _unknown(f"stages[{i}].params.{key}", list(stage_type.params) or ["(none)"])
            stage_type.check_params(stage_type.resolved(s), s, f"stages[{i}].params")
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _validate_full_unet_plan(cfg)


def _validate_full_unet_plan(cfg):
    """score_distill mode full: the limits of that mode."""
    from training.stages import plan_groups
    from training.stages.score_distill import is_full

    full = next((i for i, s in enumerate(cfg.stages) if is_full(s)), None)
    if full is None:
        return
    if plan_groups(cfg.stages) == ["score_distill"]:
        raise ConfigError(f"config key 'stages[{full}].params.mode': 'full' needs an earlier tscd / adversarial / "
                          "feedback stage in the same run (the loop's LoRA optimizer would be empty); "
                          "use mode 'lora' for score distillation alone on model.init_lora")
    if cfg.optim.mixed_precision == "fp16":
        raise ConfigError(f"config key 'stages[{full}].params.mode': 'full' steps its own optimizer outside "
                          "accelerate's fp16 grad scaler; set optim.mixed_precision to no or bf16")


def _validate_data(data_cfg):
    """The data section as the dataset builder reads it; data.cache_dir needs deterministic preprocessing
    (cached latents cannot be re-augmented)."""
    from training.data import DatasetOptions

    try:
        DatasetOptions.from_dict(dataclasses.asdict(data_cfg))
    except DataError as e:
        raise ConfigError(str(e)) from e
    if not data_cfg.cache_dir:
        return
    extra = data_cfg.extra or {}
    if extra.get("random_flip", False):
        raise ConfigError("config key 'data.cache_dir' needs deterministic preprocessing, but "
                          "'data.extra.random_flip' is true: set it to false or leave data.cache_dir empty")
    if not extra.get("center_crop", True):
        raise ConfigError("config key 'data.cache_dir' needs deterministic preprocessing, but "
                          "'data.extra.center_crop' is false: set it to true or leave data.cache_dir empty")


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    from training.config_file import read_config_file

    tree: dict[str, Any] = read_config_file(path) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value)
    return validate(_build(TrainConfig, tree, ""))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

"""Recommended sampler settings for fast LoRAs that are not official Hyper-SD release files.

Users mix up the few-step LoRA families (LCM-LoRA, SDXL-Lightning, DMD2, PCM, TCD, Hyper-SD) and
run them with the wrong sampler. ``recommended_settings`` recognises a file, in this order, by

1. the ``hypersd.*`` metadata this project's trainer writes (training/lora_files/export.py), so a
   LoRA you trained brings its own settings;
2. its file name (the names the authors publish, renamed copies usually keep the family's word);
3. the name stored in its metadata (``modelspec.title``, ``ss_output_name``, ``name``);

and returns the family's published settings (docs/nodes.md lists each row with its source). An
unknown file keeps the pack's defaults and says so. Pure Python: no ComfyUI, no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

META_NAME_KEYS = ("modelspec.title", "ss_output_name", "name")
TRAINER_KEYS = ("hypersd.recommended_steps", "hypersd.recommended_cfg", "hypersd.recommended_sampler",
                "hypersd.recommended_eta", "hypersd.recommended_scheduler")


@dataclass(frozen=True)
class Preset:
    family: str
    steps: int
    cfg: float
    sampler: str  # ComfyUI sampler_name
    scheduler: str  # ComfyUI scheduler
    eta: float  # for HyperSDTCDSampler: 1.0 makes TCD an LCM step, 0.0 a DDIM step
    source: str  # where the recommendation is published
    recognised_by: str = ""  # "file name", "metadata modelspec.title", ...

    def describe(self) -> str:
        how = f" by {self.recognised_by}" if self.recognised_by else ""
        return (f"settings: {self.family}{how}: {self.steps} steps, cfg {self.cfg:g}, {self.sampler} + "
                f"{self.scheduler}, eta {self.eta:g} ({self.source})")


UNKNOWN = Preset("unknown file", 4, 1.0, "tcd", "tcd", 0.3,
                 "not a Hyper-SD release or a known fast-LoRA family by name or metadata: the pack's defaults, "
                 "those of the unified Hyper-SD LoRA with TCD")

HYPER_SD = "https://huggingface.co/ByteDance/Hyper-SD"
LIGHTNING = "https://huggingface.co/ByteDance/SDXL-Lightning"
DMD2 = "https://huggingface.co/tianweiy/DMD2"
PCM = "https://huggingface.co/wangfuyun/PCM_Weights"
TCD = "https://huggingface.co/h1t/TCD-SDXL-LoRA"
LCM = "https://huggingface.co/latent-consistency/lcm-lora-sdxl"
# PCM normal-CFG LoRAs: the middle of the model card's range (4 steps: 2.5-3.5, 8 steps: 3-6, any: 2-9)
PCM_NORMAL_CFG = {4: 3.0, 8: 4.5, 16: 5.5}


def _words(name: str) -> str:
    """'Hyper-SDXL-8steps-CFG-lora.safetensors' -> 'hyper sdxl 8steps cfg lora'."""
    stem = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = re.sub(r"\.safetensors$", "", stem, flags=re.IGNORECASE)
    return " " + re.sub(r"[^a-z0-9]+", " ", stem.lower()).strip() + " "


def _steps(words: str) -> int | None:
    m = re.search(r" (\d{1,2}) ?steps? ", words)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


def _hyper(words: str) -> Preset | None:
    if not re.search(r" hyper ?sd", words) or re.search(r" (sd3|flux)", words):
        return None  # SD3 / FLUX Hyper LoRAs need their scale 0.125: only the release names carry it
    steps = _steps(words) or 1
    if " cfg " in words:
        return Preset("Hyper-SD CFG LoRA", steps, 5.0, "euler", "sgm_uniform", 0.0, HYPER_SD)
    if steps == 1:
        return Preset("Hyper-SD unified LoRA", 1, 1.0, "tcd", "tcd", 1.0, HYPER_SD)
    return Preset("Hyper-SD N-step LoRA", steps, 1.0, "euler", "sgm_uniform", 0.0, HYPER_SD)


def _lightning(words: str) -> Preset | None:
    if " lightning " not in words:
        return None
    return Preset("SDXL-Lightning", _steps(words) or 4, 1.0, "euler", "sgm_uniform", 0.0, LIGHTNING)


def _dmd2(words: str) -> Preset | None:
    if " dmd2 " not in words and " dmd " not in words:
        return None
    # lcm + sgm_uniform at 4 steps visits timesteps 999, 749.25, 499.5, 249.75: DMD2's 999/749/499/249
    return Preset("DMD2", _steps(words) or 4, 1.0, "lcm", "sgm_uniform", 1.0, DMD2)


def _pcm(words: str) -> Preset | None:
    if " pcm " not in words:
        return None
    steps = _steps(words)
    if " lcmlike " in words:
        return Preset("PCM (LCM-like)", steps or 4, 1.0, "lcm", "sgm_uniform", 1.0, PCM)
    if " smallcfg " in words and steps:
        return Preset("PCM small-CFG", steps, 1.0, "euler", "sgm_uniform", 0.0, PCM)
    if " normalcfg " in words and steps:
        return Preset("PCM normal-CFG", steps, PCM_NORMAL_CFG.get(steps, 5.5), "euler", "sgm_uniform", 0.0, PCM)
    return None  # e.g. PCM's SD3 files: flow matching with a shift, no preset here


def _tcd(words: str) -> Preset | None:
    if " tcd " not in words:
        return None
    return Preset("TCD-LoRA", _steps(words) or 4, 1.0, "tcd", "tcd", 0.3, TCD)


def _lcm(words: str) -> Preset | None:
    if " lcm " not in words:
        return None
    return Preset("LCM-LoRA", _steps(words) or 4, 1.0, "lcm", "sgm_uniform", 1.0, LCM)


# First match wins: Hyper-SD before TCD (a name may mention both), PCM's "lcmlike" before LCM.
NAME_RULES = (_hyper, _lightning, _dmd2, _pcm, _tcd, _lcm)


def preset_from_name(name: str) -> Preset | None:
    words = _words(name)
    for rule in NAME_RULES:
        preset = rule(words)
        if preset is not None:
            return preset
    return None


def _number(meta: dict, key: str, kind, lo: float, hi: float):
    raw = meta.get(key)
    try:
        value = kind(str(raw).strip())
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{key}={raw!r} is outside [{lo:g}, {hi:g}]")
    return value


def _choice(value: str, key: str, allowed) -> str:
    if allowed is not None and value not in allowed:
        raise ValueError(f"{key}={value!r} is not a sampler/scheduler this ComfyUI has")
    return value


def preset_from_trainer_metadata(meta: dict, samplers=None, schedulers=None) -> Preset | None:
    """The settings a LoRA trained by this project recommends for itself (ValueError if malformed)."""
    if "hypersd.recommended_steps" not in meta:
        return None
    sampler = _choice(str(meta.get("hypersd.recommended_sampler", "tcd")), "hypersd.recommended_sampler", samplers)
    default_scheduler = "tcd" if sampler == "tcd" else "sgm_uniform"
    scheduler = _choice(str(meta.get("hypersd.recommended_scheduler", default_scheduler)),
                        "hypersd.recommended_scheduler", schedulers)
    steps = _number(meta, "hypersd.recommended_steps", int, 1, 1000)
    # absent keys: the trainer's own defaults (training/diffusion.py recommended_eta, cfg 1)
    eta = (_number(meta, "hypersd.recommended_eta", float, 0.0, 1.0) if "hypersd.recommended_eta" in meta
           else 1.0 if steps == 1 else 0.3)
    cfg = _number(meta, "hypersd.recommended_cfg", float, 0.0, 100.0) if "hypersd.recommended_cfg" in meta else 1.0
    family = f"LoRA trained by this pack ({meta.get('hypersd.base_family', 'unknown family')})"
    return Preset(family, steps, cfg, sampler, scheduler, eta, "the file's hypersd.* metadata", "metadata")


def recommended_settings(name: str, metadata: dict | None = None, samplers=None,
                         schedulers=None) -> tuple[Preset, list[str]]:
    """(settings, notes) for a LoRA file that is not an official release; notes say what was ignored.

    ``samplers`` / ``schedulers``: the names this ComfyUI offers (None: not checked)."""
    meta = {str(k): v for k, v in (metadata or {}).items()}
    notes = []
    try:
        trained = preset_from_trainer_metadata(meta, samplers, schedulers)
    except ValueError as e:
        trained = None
        notes.append(f"hypersd.* metadata ignored: {e}")
    if trained is not None:
        return trained, notes
    preset = preset_from_name(name)
    if preset is not None:
        return replace(preset, recognised_by="file name"), notes
    for key in META_NAME_KEYS:
        if isinstance(meta.get(key), str) and (preset := preset_from_name(meta[key])) is not None:
            return replace(preset, recognised_by=f"metadata {key}={meta[key]!r}"), notes
    return UNKNOWN, notes

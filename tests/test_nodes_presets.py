"""Fast-LoRA family presets (nodes/lora/presets.py): the settings the loader outputs for files that are
not official Hyper-SD releases. No ComfyUI; the real-ComfyUI check is in tests/test_workflows_comfyui.py."""
import re
from types import SimpleNamespace

import pytest

from nodes.lora.presets import UNKNOWN, preset_from_name, recommended_settings
from training.lora_files.export import lora_metadata
from workflows.wfkit import REPO

# (file name as published or commonly renamed, family, steps, cfg, sampler, scheduler, eta)
PUBLISHED = [
    ("lcm-lora-sdv1-5.safetensors", "LCM-LoRA", 4, 1.0, "lcm", "sgm_uniform", 1.0),
    ("lcm_lora_sdxl.safetensors", "LCM-LoRA", 4, 1.0, "lcm", "sgm_uniform", 1.0),
    ("sdxl_lightning_2step_lora.safetensors", "SDXL-Lightning", 2, 1.0, "euler", "sgm_uniform", 0.0),
    ("sdxl_lightning_8step_lora.safetensors", "SDXL-Lightning", 8, 1.0, "euler", "sgm_uniform", 0.0),
    ("dmd2_sdxl_4step_lora_fp16.safetensors", "DMD2", 4, 1.0, "lcm", "sgm_uniform", 1.0),
    ("pcm_sdxl_smallcfg_2step_converted.safetensors", "PCM small-CFG", 2, 1.0, "euler", "sgm_uniform", 0.0),
    ("pcm_sd15_normalcfg_8step_converted.safetensors", "PCM normal-CFG", 8, 4.5, "euler", "sgm_uniform", 0.0),
    ("pcm_sdxl_normalcfg_4step_converted.safetensors", "PCM normal-CFG", 4, 3.0, "euler", "sgm_uniform", 0.0),
    ("pcm_sdxl_lcmlike_lora_converted.safetensors", "PCM (LCM-like)", 4, 1.0, "lcm", "sgm_uniform", 1.0),
    ("TCD-SDXL-LoRA.safetensors", "TCD-LoRA", 4, 1.0, "tcd", "tcd", 0.3),
    ("tcd_sd15_lora.safetensors", "TCD-LoRA", 4, 1.0, "tcd", "tcd", 0.3),
    ("sdxl_hyper_sd_4step_lora.safetensors", "Hyper-SD N-step LoRA", 4, 1.0, "euler", "sgm_uniform", 0.0),
    ("Hyper-SDXL-8steps-CFG-lora (copy).safetensors", "Hyper-SD CFG LoRA", 8, 5.0, "euler", "sgm_uniform", 0.0),
    ("hyper-sd15-1step-lora-renamed.safetensors", "Hyper-SD unified LoRA", 1, 1.0, "tcd", "tcd", 1.0),
]


@pytest.mark.parametrize("name, family, steps, cfg, sampler, scheduler, eta", PUBLISHED)
def test_published_file_names_get_their_family_settings(name, family, steps, cfg, sampler, scheduler, eta):
    preset, notes = recommended_settings(f"/models/loras/sub/{name}", {})
    assert (preset.family, preset.steps, preset.cfg, preset.sampler, preset.scheduler, preset.eta) == (
        family, steps, cfg, sampler, scheduler, eta)
    assert preset.recognised_by == "file name" and notes == []
    assert preset.source.startswith("https://huggingface.co/")


@pytest.mark.parametrize("name", ["my_style_lora.safetensors", "lcmlike.safetensors",
                                  "pcm_deterministic_4step_shift3.safetensors",
                                  "Hyper-FLUX.1-dev-8steps-lora-copy.safetensors", "lightning2.safetensors",
                                  "tcdx.safetensors"])
def test_unknown_names_keep_the_defaults_and_say_so(name):
    preset, _ = recommended_settings(name, {})
    assert preset is UNKNOWN
    assert (preset.steps, preset.cfg, preset.sampler, preset.scheduler, preset.eta) == (4, 1.0, "tcd", "tcd", 0.3)
    assert "unknown file" in preset.describe() and "defaults" in preset.describe()


def _trained_metadata(segments: int, family="SD15") -> dict:
    stage = SimpleNamespace(type="tscd", segments=segments, steps=100)
    cfg = SimpleNamespace(stages=[stage], lora=SimpleNamespace(rank=8, alpha=8.0), model=SimpleNamespace(base="tiny"))
    return lora_metadata(cfg, family, "epsilon")


@pytest.mark.parametrize("segments, eta", [(1, 1.0), (4, 0.3)])
def test_a_lora_trained_here_brings_its_own_settings(segments, eta):
    """The trainer's real metadata writer, read back: the name would say LCM, the metadata wins."""
    meta = _trained_metadata(segments)
    preset, notes = recommended_settings("lcm_lora_renamed.safetensors", meta, ["euler", "lcm", "tcd"],
                                         ["sgm_uniform", "tcd"])
    assert (preset.steps, preset.cfg, preset.sampler, preset.scheduler, preset.eta) == (segments, 1.0, "tcd", "tcd",
                                                                                           eta)
    assert preset.recognised_by == "metadata" and "SD15" in preset.family and notes == []


@pytest.mark.parametrize("key, value, message", [
    ("hypersd.recommended_steps", "four", "is not an integer"),
    ("hypersd.recommended_steps", "0", "outside"),
    ("hypersd.recommended_eta", "1.5", "outside"),
    ("hypersd.recommended_sampler", "warp_drive", "not a sampler/scheduler this ComfyUI has"),
])
def test_malformed_trainer_metadata_is_ignored_with_a_note(key, value, message):
    meta = {**_trained_metadata(4), key: value}
    preset, notes = recommended_settings("sdxl_lightning_4step_lora.safetensors", meta, ["euler", "tcd"],
                                         ["sgm_uniform", "tcd"])
    assert preset.family == "SDXL-Lightning"  # falls back to the name
    assert len(notes) == 1 and key in notes[0] and message in notes[0]


def test_a_renamed_file_is_recognised_by_the_name_in_its_metadata():
    preset, _ = recommended_settings("fast.safetensors", {"modelspec.title": "SDXL-Lightning 4-step LoRA"})
    assert preset.family == "SDXL-Lightning" and preset.steps == 4
    assert preset.recognised_by.startswith("metadata modelspec.title")


def test_dmd2_preset_visits_dmd2s_timesteps():
    """ComfyUI's sgm_uniform: linspace(999, 0, steps + 1)[:-1] (comfy/samplers.py normal_scheduler with sgm)."""
    preset = preset_from_name("dmd2_sdxl_4step_lora.safetensors")
    n = preset.steps
    timesteps = [999 - 999 * i / n for i in range(n)]
    assert [round(t) for t in timesteps] == [999, 749, 500, 250]
    assert max(abs(a - b) for a, b in zip(timesteps, [999, 749, 499, 249])) < 1.0


def test_docs_table_lists_every_family_with_its_source():
    text = (REPO / "docs" / "nodes.md").read_text()
    section = text.split("### Settings for other fast-LoRA families", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for name, family, steps, cfg, sampler, scheduler, eta in PUBLISHED:
        preset = preset_from_name(name)
        row = rows.get(family)
        assert row is not None, f"docs/nodes.md presets table lacks {family}"
        assert preset.source in row and f"{sampler} + {scheduler}" in row, row
    assert re.search(r"hypersd\.\*", section) and "unknown file" in section

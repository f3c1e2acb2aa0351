"""Smoke tests against a real ComfyUI 0.3.64 (skipped without COMFYUI_PATH).

Core behaviour first (ComfyUI starts, loads the tiny checkpoints as the intended model family and
runs a 1-step txt2img), then the pack itself (imported without failure, fast, nodes registered).
"""
from __future__ import annotations

import time

import pytest
from PIL import Image

from .harness import PACK_DIR_NAME, core_txt2img_prompt

# The budget for importing the pack inside ComfyUI. ComfyUI prints import times with
# 0.1 s resolution, so "0.1" means < 0.15 s and passes, "0.2" fails.
PACK_IMPORT_BUDGET_S = 0.2


def test_server_starts_and_lists_core_nodes(comfy_server):
    info = comfy_server.object_info()
    for node in ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                 "SaveImage", "LoraLoader", "UNETLoader"):
        assert node in info, f"core node {node} missing from /object_info"


def _core_txt2img(comfy_server, tiny_models, family):
    ckpt = tiny_models.sd15_checkpoint if family == "sd15" else tiny_models.sdxl_checkpoint
    name = comfy_server.add_model("checkpoints", ckpt)
    assert name in comfy_server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"][
        "required"]["ckpt_name"][0]
    log_before = len(comfy_server.log())
    prompt = core_txt2img_prompt(name, seed=1, filename_prefix=f"smoke_{family}")
    result = comfy_server.run_prompt(prompt)
    assert result.ok, result.error_text() + comfy_server.log_tail()
    paths = result.image_paths()
    assert len(paths) == 1 and paths[0].is_file(), result.outputs
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)
    run_log = comfy_server.log()[log_before:]
    # ComfyUI logs detection, then weights it could not place; a tiny file must load cleanly.
    assert "unet missing" not in run_log and "unet unexpected" not in run_log, run_log[-3000:]
    assert "Missing VAE keys" not in run_log, run_log[-3000:]
    print(f"{family}: 1-step 64x64 txt2img took {result.seconds:.1f} s (incl. checkpoint load)")


def test_pack_imports_without_failure(comfy_server):
    entry = comfy_server.pack_import()
    assert entry is not None, f"ComfyUI never imported custom_nodes/{PACK_DIR_NAME}\n{comfy_server.log_tail()}"
    assert not entry.failed, f"IMPORT FAILED for the pack\n{comfy_server.log_tail(12000)}"
    assert entry.seconds < PACK_IMPORT_BUDGET_S, f"pack import took {entry.seconds} s (budget 0.2 s)"


def test_pack_registers_hypersd_nodes(comfy_server):
    info = comfy_server.object_info()
    ours = sorted(name for name in info if name.startswith("HyperSD"))
    assert ours, "no HyperSD* node in /object_info"
    for name in ours:
        for section in ("required", "optional"):
            for input_name, spec in info[name]["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def _with_core_lora(prompt: dict, lora_name: str, strength: float = 1.0) -> dict:
    prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["ckpt", 0], "lora_name": lora_name, "strength_model": strength}}
    prompt["sampler"]["inputs"]["model"] = ["lora", 0]
    return prompt


def _core_kohya_lora(comfy_server, tiny_models, tmp_path, family):
    """The kohya builder names modules the way ComfyUI maps them: no 'lora key not loaded'."""
    from .tiny_checkpoints import SD15_UNET, SDXL_UNET
    from .tiny_loras import ATTENTION_TARGETS, build_kohya_lora

    spec, ckpt = (SD15_UNET, tiny_models.sd15_checkpoint) if family == "sd15" else \
        (SDXL_UNET, tiny_models.sdxl_checkpoint)
    targets = ATTENTION_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj", "conv1")
    lora = build_kohya_lora(tmp_path / f"tiny-{family}-kohya.safetensors", spec, rank=2, alpha=1.0, targets=targets)
    ckpt_name = comfy_server.add_model("checkpoints", ckpt)
    lora_name = comfy_server.add_model("loras", lora)
    log_before = len(comfy_server.log())
    result = comfy_server.run_prompt(_with_core_lora(core_txt2img_prompt(ckpt_name, seed=3), lora_name))
    assert result.ok, result.error_text()
    run_log = comfy_server.log()[log_before:]
    assert "lora key not loaded" not in run_log, run_log[-3000:]


def test_core_lora_loader_drops_peft_attention_keys(comfy_server, tiny_models, tmp_path):
    """Reference fact (ComfyUI issues 3163/9753): diffusers-PEFT attention keys are not loaded by core."""
    from .tiny_checkpoints import SD15_UNET
    from .tiny_loras import build_peft_lora

    lora = build_peft_lora(tmp_path / "tiny-sd15-peft.safetensors", SD15_UNET, rank=2)
    ckpt_name = comfy_server.add_model("checkpoints", tiny_models.sd15_checkpoint)
    lora_name = comfy_server.add_model("loras", lora)
    log_before = len(comfy_server.log())
    result = comfy_server.run_prompt(_with_core_lora(core_txt2img_prompt(ckpt_name, seed=4), lora_name))
    assert result.ok, result.error_text()
    run_log = comfy_server.log()[log_before:]
    assert "lora key not loaded: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" \
        in run_log, run_log[-3000:]


# Grouped by family so ComfyUI loads each checkpoint once (its cache keeps the last loader output).
def test_core_txt2img_on_tiny_sd15_checkpoint(comfy_server, tiny_models):
    _core_txt2img(comfy_server, tiny_models, "sd15")


def test_core_lora_loader_maps_every_kohya_key_of_tiny_sd15_lora(comfy_server, tiny_models, tmp_path):
    """The kohya builder names modules the way ComfyUI maps them: no 'lora key not loaded'."""
    _core_kohya_lora(comfy_server, tiny_models, tmp_path, "sd15")


def test_core_txt2img_on_tiny_sdxl_checkpoint(comfy_server, tiny_models):
    _core_txt2img(comfy_server, tiny_models, "sdxl")


def test_core_lora_loader_maps_every_kohya_key_of_tiny_sdxl_lora(comfy_server, tiny_models, tmp_path):
    _core_kohya_lora(comfy_server, tiny_models, tmp_path, "sdxl")


_DETECT_SCRIPT = """
import sys
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, ".")
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_detection, comfy.utils
for path in sys.stdin.read().split():
    sd = comfy.utils.load_torch_file(path)
    # full checkpoints carry "model.diffusion_model."; UNet-only files (UNETLoader) no prefix
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in sd) else ""
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    print("DETECTED", type(config).__name__ if config is not None else None)
"""


def test_tiny_checkpoints_are_detected_as_intended_family(comfyui_path, comfyui_python, tiny_models):
    """ComfyUI's own shape-based detection, run in ComfyUI's interpreter."""
    import subprocess

    paths = [tiny_models.sd15_checkpoint, tiny_models.sdxl_checkpoint, tiny_models.sd15_unet, tiny_models.sdxl_unet]
    proc = subprocess.run([comfyui_python, "-c", _DETECT_SCRIPT], cwd=comfyui_path, capture_output=True, text=True,
                          input="\n".join(map(str, paths)), timeout=300)
    detected = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("DETECTED")]
    assert detected == ["SD15", "Segmind_Vega", "SD15", "Segmind_Vega"], proc.stdout + proc.stderr[-3000:]

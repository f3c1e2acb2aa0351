"""The Hyper-SD nodes inside real ComfyUI 0.3.64 (skipped without COMFYUI_PATH).

* in-process (tests/comfyui/nodes_inprocess.py under ComfyUI's python): pack loaded by ComfyUI's
  custom-node loader; TCD via SamplerCustom and via plain KSampler(tcd, tcd), the 1-step sampler,
  all compared with VP-space references written from the reference doc's formulas; LoRA loader on
  kohya and PEFT files checked weight by weight, on the UNet and on real ComfyUI CLIPs (SD1.5 CLIP-L,
  SDXL CLIP-L + CLIP-G) for every text-encoder key format; every bad input's error message.
* server: `main.py --cpu` with the pack in custom_nodes: import line without failure and < 0.2 s,
  /object_info lists every node and `tcd` in KSampler's sampler and scheduler lists, the loader's
  sampler/scheduler combo outputs carry KSampler's option lists.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH not set (needs a real ComfyUI checkout)")]
REPO = Path(__file__).resolve().parents[2]
PY = os.environ.get("COMFYUI_PYTHON") or (
    "/work/comfy-venv/bin/python" if os.path.exists("/work/comfy-venv/bin/python") else sys.executable)
NODE_IDS = ["HyperSDLoraLoader", "HyperSDOneStepSampler", "HyperSDOneStepScheduler", "HyperSDTCDSampler",
            "HyperSDTCDScheduler"]
PARITY_TOL = 1e-5  # relative max error vs the float64 VP references (float32 model)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc") / "report.json"
    env = dict(os.environ, COMFYUI_PATH=COMFY, HYPERSD_CHECK_OUT=str(out), HF_HUB_OFFLINE="1")
    proc = subprocess.run([PY, str(REPO / "tests/comfyui/nodes_inprocess.py")], env=env, capture_output=True,
                          text=True, timeout=900, cwd=COMFY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_pack_loads_through_comfyui_loader(report):
    assert report["import_ok"] is True
    assert set(NODE_IDS) <= set(report["nodes"])
    assert report["tcd_in_lists"] == [True, True, True, True]
    assert report["heavy_modules_imported_by_pack"] == []
    assert report["model_family"] == "SD15"


@pytest.mark.parametrize("key", ["samplercustom_tcd_1step_rel_err", "samplercustom_tcd_4step_rel_err",
                                 "ksampler_tcd_1step_rel_err", "ksampler_tcd_4step_rel_err", "one_step_rel_err"])
def test_sampling_matches_vp_reference(report, key):
    assert report[key] < PARITY_TOL, report[key]


def test_schedules(report):
    assert report["tcd_1step_sigmas"] == [14.6146, 0.0]
    assert report["tcd_4step_sigmas"][0] == 14.6146 and len(report["tcd_4step_sigmas"]) == 5
    assert report["one_step_sigmas"] == [5.111, 0.0]
    # ComfyUI's default sigma-scaled start noise would be visibly different: the check can fail.
    assert report["one_step_vs_sigma_scaled_noise_rel_err"] > 100 * PARITY_TOL


@pytest.mark.parametrize("fmt", ["kohya", "peft", "peft_base_model", "diffusers_old"])
@pytest.mark.parametrize("tag,family", [("sd15", "SD15"), ("sdxl", "SDXL")])
def test_lora_applied_fully(report, tag, family, fmt):
    r = report[f"lora_{tag}_{fmt}"]
    assert r["lora_key_not_loaded"] == 0
    assert r["changed_weights"] == r["expected_changed"] > 30
    assert r["max_abs_err"] < 1e-6  # vs base + strength * alpha/rank * up @ down, computed here
    assert f"applied {r['expected_changed']}/{r['expected_changed']} modules to {family}" in r["info"]
    assert report[f"base_model_unchanged_{tag}"] is True


def test_release_outputs_and_scale(report):
    r = report["releases"]
    assert r["Hyper-SD15-1step-lora"]["outputs"] == [1, 1.0, "tcd", "tcd", 1.0]
    assert r["Hyper-SD15-8steps-CFG-lora"]["outputs"] == [8, 5.0, "euler", "sgm_uniform", 0.0]
    assert r["Hyper-SD3-8steps-CFG-lora"]["outputs"] == [8, 5.0, "euler", "simple", 0.0]
    assert "strength model 0.5," in r["Hyper-SD15-1step-lora"]["info"]
    assert "strength model 0.0625," in r["Hyper-SD3-8steps-CFG-lora"]["info"]  # 0.5 x 0.125


def test_sdxl_model_is_sdxl_family(report):
    assert report["sdxl_model_family"] == "Segmind_Vega"


@pytest.mark.parametrize("tag", ["sd15", "sdxl"])
def test_core_loader_drops_peft_attention_but_ours_does_not(report, tag):
    assert report[f"core_loader_{tag}_peft_not_loaded"] > 0
    assert report[f"lora_{tag}_peft"]["lora_key_not_loaded"] == 0


TE_FORMATS = {"sd15": ["kohya_te", "kohya_te1", "peft", "peft_base_model", "diffusers", "diffusers_lora",
                        "diffusers_old"],
              "sdxl": ["kohya", "peft", "diffusers", "diffusers_old"]}
# Modules a TE LoRA targets: q/k/v/out_proj (+ mlp fc1/fc2 except old diffusers, attention only) of
# CLIP-L layers 0, 5, 11 (SD1.5) or CLIP-L 0, 11 + CLIP-G 0, 17, 31 (SDXL).
TE_EXPECTED = {"sd15": {"clip_l": 3}, "sdxl": {"clip_l": 2, "clip_g": 3}}
TE_CASES = [(tag, fmt) for tag, fmts in TE_FORMATS.items() for fmt in fmts]
TE_TOL = 1e-5  # float32 weights vs float64 base + strength * scale * up @ down


@pytest.mark.parametrize("tag,fmt", TE_CASES)
def test_text_encoder_lora_applied_fully(report, tag, fmt):
    """Every targeted CLIP weight equals base + strength_clip * scale * up @ down; nothing else moved."""
    assert report[f"te_{tag}_clip_class"] == {"sd15": "SD1ClipModel", "sdxl": "SDXLClipModel"}[tag]
    assert report[f"te_{tag}_clip_dtypes"] == ["torch.float32"]
    r = report[f"te_{tag}_{fmt}"]
    per_layer = 4 if fmt == "diffusers_old" else 6
    expected = {enc: layers * per_layer for enc, layers in TE_EXPECTED[tag].items()}
    n = sum(expected.values())
    assert r["lora_key_not_loaded"] == 0, r
    assert r["expected_changed"] == r["changed_weights"] == r["clip_patches"] == n, r
    assert r["changed_is_expected"] is True  # exactly the targeted weights changed, every other tensor equal
    assert r["changed_per_encoder"] == expected
    assert r["model_patches"] == 0  # a TE-only LoRA adds nothing to the UNet
    assert r["max_abs_err"] < TE_TOL < r["max_abs_delta"] / 100, r  # the check can fail: deltas are ~1e-1
    family = {"sd15": "SD15", "sdxl": "SDXL"}[tag]
    assert f"applied {n}/{n} modules to {family}" in r["info"] and "clip 0.6" in r["info"]
    assert report[f"te_{tag}_base_clip_unchanged"] is True


@pytest.mark.parametrize("tag,fmt", [("sd15", "peft_base_model"), ("sd15", "diffusers_old"),
                                     ("sdxl", "diffusers_old")])
def test_core_loader_drops_text_encoder_keys_ours_applies(report, tag, fmt):
    """ComfyUI's own loader drops every tensor of these TE formats; the node applies all of them."""
    r = report[f"te_{tag}_{fmt}"]
    assert r["core_not_loaded"] == r["tensors"] > 0 and r["core_clip_patches"] == 0, r
    assert r["lora_key_not_loaded"] == 0 and r["clip_patches"] == r["expected_changed"]


@pytest.mark.parametrize("tag,fmt", [("sd15", "kohya_te1"), ("sd15", "peft"), ("sdxl", "kohya"), ("sdxl", "peft")])
def test_core_loader_agrees_on_formats_it_maps(report, tag, fmt):
    """Where ComfyUI maps the keys itself (kohya, PEFT `text_encoder.`/`text_encoder_2.`) both patch the same
    modules with the same patches (the node applies them itself, from the key map it matched with)."""
    r = report[f"te_{tag}_{fmt}"]
    assert r["core_not_loaded"] == 0 and r["core_clip_patches"] == r["clip_patches"], r
    assert r["patches_equal_core"] is True


@pytest.mark.parametrize("tag", ["sd15", "sdxl"])
def test_unet_patches_equal_core_and_key_map_built_once(report, tag):
    """On a kohya UNet LoRA the node's patches equal core load_lora_for_models' entry by entry (same weights,
    strengths and adapter tensors), and ComfyUI's key map is built once a load (it was built twice:
    once for matching, once inside load_lora_for_models)."""
    assert report[f"lora_{tag}_kohya_patches_equal_core"] is True
    assert report[f"lora_{tag}_kohya_key_map_builds"] == {"unet": 1, "clip": 0}


def test_mixed_unet_and_text_encoder_lora(report):
    """UNet + TE LoRA in one file: both parts applied with a CLIP; without one the UNet part is applied
    and the skipped text-encoder tensors are counted in the info."""
    r = report["te_sd15_mixed"]
    unet_modules, te_modules = r["unet_tensors"] // 3, r["te_tensors"] // 2  # kohya up/down/alpha, PEFT A/B
    w, wo = r["with_clip"], r["no_clip"]
    assert w["model_patches"] == unet_modules > 0 and w["clip_patches"] == te_modules == 18, r
    assert f"applied {unet_modules + te_modules}/{unet_modules + te_modules} modules to SD15" in w["info"]
    assert wo["model_patches"] == unet_modules and wo["clip_patches"] is None, r
    assert f"applied {unet_modules}/{unet_modules} modules" in wo["info"]
    assert f"{r['te_tensors']} text-encoder tensors skipped (no CLIP connected)" in wo["info"]
    assert w["lora_key_not_loaded"] == wo["lora_key_not_loaded"] == 0


EXPECTED_ERRORS = {
    "wrong_family": "this LoRA is for SDXL but the model is SD15",
    "zero_match": "none of the 1 LoRA modules match this SD15 model",
    "truncated": "is truncated or corrupt",
    "pickle": "is not a .safetensors file",
    "missing": "'missing.safetensors' is not in the loras folder",
    "dotdot": "contains '..'",
    "absolute": "is an absolute path",
    "release_offline": "download https://huggingface.co/ByteDance/Hyper-SD/resolve/main/Hyper-SD15-4steps-lora.safetensors and put it at",
    "steps_0": "HyperSDTCDScheduler: steps must be an integer >= 1",
    "denoise_0": "HyperSDTCDScheduler: denoise must be in (0, 1]",
    "eta_1.5": "HyperSDTCDSampler eta: expected a value in [0, 1]",
    "timestep_0": "HyperSDOneStepScheduler timestep: expected an integer in [1, 999]",
    "timestep_1000": "HyperSDOneStepScheduler timestep: expected an integer in [1, 999]",
    "nan_tcd": "TCD sampler: the model returned NaN/inf at step 0",
    "nan_one_step": "HyperSDOneStepSampler: the model returned NaN/inf at step 0",
    "sd15_lora_on_sdxl": "this LoRA is for SD15 but the model is SDXL",
    "te_only_no_clip_sd15": "te_sd15_peft.safetensors has no UNet LoRA keys (text-encoder only) and no CLIP is connected",
    "te_only_no_clip_sdxl": "te_sdxl_peft.safetensors has no UNet LoRA keys (text-encoder only) and no CLIP is connected",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_bad_input_errors(report, case):
    msg = report["errors"][case]
    assert msg is not None and msg.startswith("ValueError: ") and EXPECTED_ERRORS[case] in msg, msg


# -- server (harness fixtures from conftest.py) -------------------------------------------------------

def test_server_import_line(comfy_server):
    entry = comfy_server.pack_import()
    assert entry is not None, comfy_server.log_tail()
    assert not entry.failed and entry.seconds < 0.2, entry


def test_object_info_lists_nodes_and_tcd(comfy_server):
    info = comfy_server.object_info()
    for node in NODE_IDS:
        assert node in info, node
    ks = info["KSampler"]["input"]["required"]
    assert "tcd" in ks["sampler_name"][0] and "tcd" in ks["scheduler"][0]
    assert "tcd" in info["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
    assert "tcd" in info["BasicScheduler"]["input"]["required"]["scheduler"][0]
    loader = info["HyperSDLoraLoader"]
    sampler_out = loader["output"][loader["output_name"].index("sampler_name")]
    scheduler_out = loader["output"][loader["output_name"].index("scheduler")]
    # Combo outputs carry KSampler's own option lists, so the link validates as the same type.
    assert sampler_out == ks["sampler_name"][0] and scheduler_out == ks["scheduler"][0]
    for node in NODE_IDS:
        for section in ("required", "optional"):
            for name, spec in info[node]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_prompt_loader_outputs_drive_ksampler(comfy_server, tiny_models, tmp_path):
    """Checkpoint -> HyperSDLoraLoader (PEFT file) -> KSampler whose steps/cfg/sampler_name/scheduler
    are links from the loader's outputs -> VAEDecode -> SaveImage, through /prompt."""
    from .tiny_loras import build_peft_lora

    ckpt = comfy_server.add_model("checkpoints", tiny_models.sd15_checkpoint)
    lora = comfy_server.add_model("loras", build_peft_lora(tmp_path / "tiny-peft.safetensors"))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "HyperSDLoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "release": "none (use lora_name)", "lora_name": lora,
            "strength_model": 1.0, "strength_clip": 1.0, "download_missing": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a cat"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": ["2", 2], "cfg": ["2", 3], "sampler_name": ["2", 4], "scheduler": ["2", 5], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "hypersd_nodes"}},
    }
    result = comfy_server.run_prompt(prompt)
    assert result.ok, result.error_text()
    assert len(result.image_paths()) == 1
    log = comfy_server.log()
    assert "lora key not loaded" not in log
    assert "HyperSD LoRA: tiny-peft.safetensors: applied" in log

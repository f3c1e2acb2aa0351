"""The Hyper-SD nodes inside real ComfyUI 0.3.64 (skipped without COMFYUI_PATH).

* in-process (tests/comfyui/nodes_inprocess.py under ComfyUI's python): pack loaded by ComfyUI's
  custom-node loader; TCD via SamplerCustom and via plain KSampler(tcd, tcd), the 1-step sampler,
  all compared with VP-space references written from the reference doc's formulas; LoRA loader on
  kohya and PEFT files checked weight by weight; every bad input's error message.
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
    from . import tiny_checkpoints as tc

    ckpt = comfy_server.add_model("checkpoints", tiny_models.sd15_checkpoint)
    lora = comfy_server.add_model("loras", tc.build_peft_lora(tmp_path / "tiny-peft.safetensors"))
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

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
import re
import socket
import subprocess
import sys
import time
import urllib.request
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


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_applied_fully(report, fmt):
    r = report[f"lora_{fmt}"]
    assert r["lora_key_not_loaded"] == 0
    assert r["changed_weights"] == r["expected_changed"] == report["lora_modules_in_tiny_model"] > 40
    assert r["max_abs_err"] < 1e-6
    assert f"applied {r['expected_changed']}/{r['expected_changed']} modules to SD15" in r["info"]
    assert report["base_model_unchanged"] is True


def test_core_loader_drops_peft_attention_but_ours_does_not(report):
    assert report["core_loader_peft_not_loaded"] > 0 and report["lora_peft"]["lora_key_not_loaded"] == 0


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
}


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_bad_input_errors(report, case):
    msg = report["errors"][case]
    assert msg is not None and msg.startswith("ValueError: ") and EXPECTED_ERRORS[case] in msg, msg


# -- server ---------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui_hyper_sd")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([PY, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base)], cwd=COMFY, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                object_info = json.load(urllib.request.urlopen(url + "/object_info", timeout=10))
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        else:
            object_info = None
        log.flush()
        yield object_info, (base / "server.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_server_import_line(server):
    _, text = server
    line = [ln for ln in text.splitlines() if ln.rstrip().endswith("custom_nodes/comfyui_hyper_sd")]
    assert len(line) == 1, text[-3000:]
    assert "IMPORT FAILED" not in line[0]
    seconds = float(re.search(r"([\d.]+) seconds", line[0]).group(1))
    assert seconds < 0.2, line[0]


def test_object_info_lists_nodes_and_tcd(server):
    info, text = server
    assert info is not None, text[-3000:]
    for node in NODE_IDS:
        assert node in info, node
    ks = info["KSampler"]["input"]["required"]
    assert "tcd" in ks["sampler_name"][0] and "tcd" in ks["scheduler"][0]
    assert "tcd" in info["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
    loader = info["HyperSDLoraLoader"]
    sampler_out = loader["output"][loader["output_name"].index("sampler_name")]
    scheduler_out = loader["output"][loader["output_name"].index("scheduler")]
    # Combo outputs carry KSampler's own option lists, so the link validates as the same type.
    assert sampler_out == ks["sampler_name"][0] and scheduler_out == ks["scheduler"][0]
    for node in NODE_IDS:
        for section in ("required", "optional"):
            for name, spec in info[node]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"

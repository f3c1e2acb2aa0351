"""In-process checks of the Hyper-SD nodes inside real ComfyUI (run with ComfyUI's python).

    COMFYUI_PATH=/work/ComfyUI HYPERSD_CHECK_OUT=OUT.json $COMFYUI_PYTHON tests/comfyui/nodes_inprocess.py

Loads the pack through ComfyUI's own custom-node loader, builds a tiny SD1.5-shaped UNet with
ComfyUI's UNetModel (random weights, detected by ComfyUI as SD15), runs the core SamplerCustom and
KSampler nodes with the pack's samplers, and compares against references written in VP space from
the reference doc's formulas (not through schedulers/). LoRAs: UNet LoRAs on the tiny UNets, and
text-encoder LoRAs on full-size random-weight CLIPs built by ComfyUI's own text-encoder loader
(SD1.5: CLIP-L; SDXL: CLIP-L + CLIP-G), patched weights read back as ComfyUI runs them. Prints
nothing but writes a JSON report that tests/comfyui/test_nodes_comfyui.py asserts on. The checks
live in ``inprocess/``; importing this file does nothing until ``main()`` runs.
"""
import json
import os
import tempfile
import time

import torch

from inprocess.comfy_env import Run, bootstrap, captured_logs, load_model, load_pack, tiny_sd15_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sdxl_checks(run):
    import tiny_checkpoints as tc

    from inprocess.te_lora import te_checks
    from inprocess.unet_lora import lora_checks

    t0 = time.perf_counter()
    model = load_model(tc.random_weights(tc.SDXL_UNET.ldm_shapes(), 0, dtype=torch.float32))
    run.results["sdxl_model_family"] = type(model.model.model_config).__name__
    run.results["sdxl_model_load_seconds"] = time.perf_counter() - t0
    lora_checks(run, model, "sdxl", ("kohya", "peft", "peft_base_model", "diffusers_old"))
    te_checks(run, model, "sdxl")
    errors = {}
    run.capture(errors, "sd15_lora_on_sdxl", lambda: run.nodes()["HyperSDLoraLoader"].execute(
        model=model, release="none (use lora_name)", lora_name="tiny_sd15_kohya.safetensors",
        strength_model=1.0, strength_clip=1.0, download_missing=False))  # made for the tiny SD1.5 model
    run.add_errors(errors)


def sd15_checks(run):
    from inprocess.errors import error_checks
    from inprocess.sampling import sampling_checks
    from inprocess.te_lora import te_checks
    from inprocess.unet_lora import lora_checks

    t0 = time.perf_counter()
    model = load_model(tiny_sd15_state_dict())
    run.results["model_family"] = type(model.model.model_config).__name__
    run.results["model_load_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampling_checks(run, model)
    run.results["sampling_seconds"] = time.perf_counter() - t0
    lora_checks(run, model, "sd15", ("kohya", "peft", "peft_base_model", "diffusers_old"))
    error_checks(run, model)
    te_checks(run, model, "sd15")


def main(comfy_path: str, out_path: str) -> dict:
    bootstrap(comfy_path)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(loras=os.path.join(tmp, "loras"))
        with captured_logs(run):
            load_pack(run, tmp, REPO)
            sd15_checks(run)
            sdxl_checks(run)
    with open(out_path, "w") as f:
        json.dump(run.results, f, indent=1, default=str)
    return run.results


if __name__ == "__main__":
    main(os.environ["COMFYUI_PATH"], os.environ["HYPERSD_CHECK_OUT"])

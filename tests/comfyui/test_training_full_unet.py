"""The 1-step UNet that `score_distill` mode full exports (training.lora_files.export.export_full_unet, a
diffusers-layout state dict) in real ComfyUI 0.3.64, run in ComfyUI's own interpreter.

1. Full-size shapes: ComfyUI's diffusers-UNet detection (`model_detection.model_config_from_diffusers_unet`,
   the branch `load_diffusion_model_state_dict` takes for diffusers keys, i.e. UNETLoader's path) only
   recognises real configs (320 channels, SD1.5 / SDXL depths). The key/shape list our exporter writes for
   diffusers UNets with the SD1.5 and SDXL configs (built on the meta device, no weights) is detected as
   SD15 / SDXL and ComfyUI's `unet_to_diffusers` mapping covers every key.
2. Real weights, tiny: a tiny SD1.5-shaped UNet (the comfy helper's tiny checkpoint shapes) is exported by
   export_full_unet; its keys go through ComfyUI's own unet_to_diffusers mapping (detected from the tiny
   LDM UNet), the result loads with `comfy.sd.load_diffusion_model` as SD15, and ComfyUI's UNet gives the
   diffusers UNet's output (the tiny diffusers file itself is not detectable: see 1).
"""
from __future__ import annotations

import json
import subprocess

import torch
from safetensors.torch import save_file

from .test_training_lora import _sd15_shaped_unet

SD15 = dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8)
SDXL = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

COMFY_SCRIPT = r'''
import json, sys
root, args = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
sys.argv = [sys.argv[0], "--cpu"]  # comfy.cli_args parses sys.argv on import (once enabled)
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_detection as md, comfy.sd, comfy.utils
from safetensors.torch import load_file, save_file
report = {}
for name, shapes in json.load(open(args["shapes"])).items():
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = md.model_config_from_diffusers_unet(sd)
    mapping = comfy.utils.unet_to_diffusers(cfg.unet_config) if cfg else {}
    report[name] = {"detected": type(cfg).__name__ if cfg else None,
                    "unmapped": [k for k in sd if k not in mapping][:5], "n_keys": len(sd)}
try:  # the tiny diffusers file itself: ComfyUI matches diffusers UNet configs exactly (recorded, not asserted)
    comfy.sd.load_diffusion_model(args["exported"])
    report["tiny_diffusers_file_direct"] = "loaded"
except RuntimeError as e:
    report["tiny_diffusers_file_direct"] = str(e).splitlines()[0][:80]
ref = comfy.utils.load_torch_file(args["tiny_ldm_unet"])
mapping = comfy.utils.unet_to_diffusers(md.model_config_from_unet(ref, "").unet_config)
ours = comfy.utils.load_torch_file(args["exported"])
ldm = {mapping[k]: v for k, v in ours.items() if k in mapping}
report["tiny"] = {"unmapped": [k for k in ours if k not in mapping][:5], "n_keys": len(ours)}
save_file(ldm, args["ldm_out"])
patcher = comfy.sd.load_diffusion_model(args["ldm_out"], model_options={"dtype": torch.float32})
report["tiny"]["detected"] = type(patcher.model.model_config).__name__
report["tiny"]["not_filled"] = [k for k in patcher.model.diffusion_model.state_dict() if k not in ldm][:5]
io = load_file(args["io"])
with torch.no_grad():
    out = patcher.model.diffusion_model(io["x"], timesteps=io["t"], context=io["ehs"])
report["tiny"]["max_err"] = (out.float() - io["want"]).abs().max().item()
report["tiny"]["scale"] = io["want"].abs().max().item()
print("REPORT " + json.dumps(report))
'''


def _shapes(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return {k: list(v.shape) for k, v in unet.state_dict().items()}


def test_exported_1step_unet_is_detected_and_loads_in_comfyui(comfyui_path, comfyui_python, tiny_models, tmp_path):
    from training.lora_files.export import export_full_unet, full_unet_metadata

    unet = _sd15_shaped_unet().eval()
    with torch.no_grad():
        for p in unet.parameters():  # a "trained" UNet: every weight moved
            p.add_(torch.randn_like(p) * 0.01)
    path = export_full_unet(unet, str(tmp_path / "hyper_1step_unet"), full_unet_metadata("sd15", "epsilon", 800))
    g = torch.Generator().manual_seed(0)
    io = {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([800.0, 800.0]),
          "ehs": torch.randn(2, 77, 768, generator=g)}
    with torch.no_grad():
        io["want"] = unet(io["x"], io["t"], io["ehs"]).sample
    save_file(io, str(tmp_path / "io.safetensors"))
    (tmp_path / "shapes.json").write_text(json.dumps({"sd15": _shapes(SD15), "sdxl": _shapes(SDXL)}))
    args = {"shapes": str(tmp_path / "shapes.json"), "tiny_ldm_unet": str(tiny_models.sd15_unet),
            "exported": path, "ldm_out": str(tmp_path / "ldm_unet.safetensors"), "io": str(tmp_path / "io.safetensors")}
    p = subprocess.run([comfyui_python, "-c", COMFY_SCRIPT, str(comfyui_path), json.dumps(args)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("REPORT "))[7:])
    print(json.dumps(report))
    assert report["sd15"]["detected"] == "SD15" and not report["sd15"]["unmapped"], report["sd15"]
    assert report["sdxl"]["detected"] == "SDXL" and not report["sdxl"]["unmapped"], report["sdxl"]
    tiny = report["tiny"]
    assert not tiny["unmapped"] and not tiny["not_filled"], tiny
    assert tiny["detected"] == "SD15"
    assert tiny["max_err"] < 1e-5, tiny  # fp32 (9.5e-7 measured; output scale ~1.7)

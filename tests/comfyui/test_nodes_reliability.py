"""Bad models and bad LoRA files through a real ComfyUI 0.3.64 server (issue 13 items 5, 6, 7, 10).

* Model kinds: the tiny SD1.5 checkpoint with its sampling patched by ComfyUI's own ModelSamplingSD3,
  ModelSamplingFlux, ModelSamplingContinuousEDM and ModelSamplingDiscrete (lcm) nodes in the graph, sampled
  through every TCD / 1-step path; each must stop with one error naming the node and the model kind (they
  all ran silently before). ModelSamplingDiscrete v_prediction still samples.
* KSampler / BasicScheduler ``tcd`` at denoise 0.05: the error names the steps and denoise the user entered.
* LoRA files: ranks that disagree, LoHa, LoKr (also Tucker), a mixed file, an empty file. Images from the
  pack's loader are compared with ComfyUI's core LoraLoaderModelOnly and with no LoRA at all.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from . import tiny_lycoris
from .tiny_checkpoints import SD15_UNET, atomic_save
from .tiny_loras import kohya_lora_state_dict, lora_weights

NEEDS = "needs a discrete-timestep eps or v-prediction model (SD1.5, SD2, SDXL: ComfyUI's ModelSamplingDiscrete)"
PATCHES = {  # ComfyUI node that re-patches model_sampling -> (inputs, the kind the error must name)
    "sd3": ("ModelSamplingSD3", {"shift": 3.0}, "flow matching (SD3, AuraFlow, ...) [ModelSamplingDiscreteFlow + CONST]"),
    "flux": ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 64},
             "flow matching (FLUX) [ModelSamplingFlux + CONST]"),
    "edm": ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 120.0, "sigma_min": 0.002},
            "continuous EDM sigmas [ModelSamplingContinuousEDM + EDM]"),
    "lcm": ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False},
            "LCM's 50-step distilled table (ModelSamplingDiscrete 'lcm') [ModelSamplingDiscreteDistilled + LCM]"),
}
# path -> (node whose execution fails, how the message starts)
PATHS = {
    "ksampler_tcd_tcd": ("KSampler", "KSampler scheduler 'tcd'"),
    "ksampler_tcd_normal": ("KSampler", "TCD sampler (KSampler 'tcd' / HyperSDTCDSampler)"),
    "tcd_scheduler": ("HyperSDTCDScheduler", "HyperSDTCDScheduler"),
    "tcd_sampler": ("SamplerCustom", "TCD sampler (KSampler 'tcd' / HyperSDTCDSampler)"),
    "one_step_scheduler": ("HyperSDOneStepScheduler", "HyperSDOneStepScheduler"),
    "one_step_sampler": ("SamplerCustom", "HyperSDOneStepSampler"),
}


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _base_graph(ckpt: str, prefix: str) -> dict:
    return {"ckpt": _node("CheckpointLoaderSimple", ckpt_name=ckpt),
            "pos": _node("CLIPTextEncode", text="a cat", clip=["ckpt", 1]),
            "latent": _node("EmptyLatentImage", width=64, height=64, batch_size=1),
            "decode": _node("VAEDecode", samples=["run", 0], vae=["ckpt", 2]),
            "save": _node("SaveImage", images=["decode", 0], filename_prefix=prefix)}


def _ksampler(model, sampler: str, scheduler: str, steps: int = 2, denoise: float = 1.0) -> dict:
    return _node("KSampler", model=model, positive=["pos", 0], negative=["pos", 0], latent_image=["latent", 0],
                 seed=3, steps=steps, cfg=1.0, sampler_name=sampler, scheduler=scheduler, denoise=denoise)


def _custom(model, sampler: dict, sigmas: dict) -> dict:
    return {"sampler": sampler, "sigmas": sigmas,
            "run": _node("SamplerCustom", model=model, add_noise=True, noise_seed=3, cfg=1.0, positive=["pos", 0],
                         negative=["pos", 0], sampler=["sampler", 0], sigmas=["sigmas", 0],
                         latent_image=["latent", 0])}


def _sampling_path(path: str, model) -> dict:
    euler = _node("KSamplerSelect", sampler_name="euler")
    normal = _node("BasicScheduler", model=model, scheduler="normal", steps=1, denoise=1.0)
    return {
        "ksampler_tcd_tcd": lambda: {"run": _ksampler(model, "tcd", "tcd")},
        "ksampler_tcd_normal": lambda: {"run": _ksampler(model, "tcd", "normal")},
        "tcd_scheduler": lambda: _custom(model, euler, _node("HyperSDTCDScheduler", model=model, steps=2, denoise=1.0)),
        "tcd_sampler": lambda: _custom(model, _node("HyperSDTCDSampler", eta=0.3), normal),
        "one_step_scheduler": lambda: _custom(model, euler, _node("HyperSDOneStepScheduler", model=model, timestep=800)),
        "one_step_sampler": lambda: _custom(model, _node("HyperSDOneStepSampler", unit_variance_noise=True), normal),
    }[path]()


def _patched_graph(ckpt: str, patch, path: str) -> dict:
    graph = _base_graph(ckpt, f"hypersd_kind_{path}")
    model = ["ckpt", 0]
    if patch is not None:
        class_type, inputs = patch
        graph["patch"] = _node(class_type, model=model, **inputs)
        model = ["patch", 0]
    graph.update(_sampling_path(path, model))
    return graph


@pytest.fixture(scope="module")
def ckpt(comfy_server, tiny_models) -> str:
    return comfy_server.add_model("checkpoints", tiny_models.sd15_checkpoint)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("kind", sorted(PATCHES))
def test_tcd_and_one_step_refuse_flow_edm_and_lcm_models(comfy_server, ckpt, kind, path):
    class_type, inputs, described = PATCHES[kind]
    result = comfy_server.run_prompt(_patched_graph(ckpt, (class_type, inputs), path))
    err = result.error()
    assert not result.ok and err is not None, f"{kind} / {path} sampled silently"
    node, starts = PATHS[path]
    msg = err["exception_message"]
    assert err["node_type"] == node and err["exception_type"].endswith("ValueError"), result.error_text()
    assert msg.startswith(f"{starts}: {NEEDS}; this model samples as {described}"), msg


@pytest.mark.parametrize("path", sorted(PATHS))
def test_v_prediction_discrete_model_still_samples(comfy_server, ckpt, path):
    patch = ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False})
    result = comfy_server.run_prompt(_patched_graph(ckpt, patch, path))
    assert result.ok, result.error_text()
    assert len(result.image_paths()) == 1


def test_ksampler_tcd_low_denoise_names_the_steps_the_user_entered(comfy_server, ckpt):
    """Issue 13 item 10: 4 steps at denoise 0.05 reported 'steps=80', a number the user never entered."""
    graph = _base_graph(ckpt, "hypersd_denoise")
    graph["run"] = _ksampler(["ckpt", 0], "tcd", "tcd", steps=4, denoise=0.05)
    err = comfy_server.run_prompt(graph).error()
    assert err["node_type"] == "KSampler", err
    assert err["exception_message"].startswith(
        "KSampler scheduler 'tcd': steps 4 at denoise 0.05 make KSampler ask the scheduler for int(4 / 0.05) = 80 "
        "steps and keep the last 4, but TCD picks its timesteps from a 50-step grid. Raise denoise to at least 0.08"), err
    graph = _base_graph(ckpt, "hypersd_denoise_basic")
    graph.update(_custom(["ckpt", 0], _node("KSamplerSelect", sampler_name="tcd"),
                         _node("BasicScheduler", model=["ckpt", 0], scheduler="tcd", steps=4, denoise=0.05)))
    err = comfy_server.run_prompt(graph).error()
    assert err["node_type"] == "BasicScheduler"
    assert err["exception_message"].startswith("BasicScheduler scheduler 'tcd': steps 4 at denoise 0.05 make "
                                               "BasicScheduler ask the scheduler for int(4 / 0.05) = 80 steps"), err
    graph = _base_graph(ckpt, "hypersd_denoise_ok")
    graph["run"] = _ksampler(["ckpt", 0], "tcd", "tcd", steps=4, denoise=0.5)  # 8 <= 50: the last 4 of 8
    assert comfy_server.run_prompt(graph).ok


# -- LoRA files --------------------------------------------------------------------------------------

def _lora_graph(ckpt: str, prefix: str, lora: str | None, loader: str = "HyperSDLoraLoader") -> dict:
    graph = _base_graph(ckpt, prefix)
    model = ["ckpt", 0]
    if lora is not None and loader == "HyperSDLoraLoader":
        graph["lora"] = _node("HyperSDLoraLoader", model=model, clip=["ckpt", 1], release="none (use lora_name)",
                              lora_name=lora, strength_model=1.0, strength_clip=1.0, download_missing=False)
        model = ["lora", 0]
    elif lora is not None:
        graph["lora"] = _node("LoraLoaderModelOnly", model=model, lora_name=lora, strength_model=1.0)
        model = ["lora", 0]
    graph["run"] = _ksampler(model, "euler", "normal", steps=2)
    return graph


class _Images:
    """Runs LoRA graphs and returns (image as uint8 array, this prompt's part of the server log)."""

    def __init__(self, server, ckpt):
        self.server, self.ckpt, self.count = server, ckpt, 0

    def run(self, lora: str | None, loader: str = "HyperSDLoraLoader"):
        self.count += 1
        start = len(self.server.log())
        result = self.server.run_prompt(_lora_graph(self.ckpt, f"hypersd_lora_{self.count}", lora, loader))
        log = self.server.log()[start:]
        if not result.ok:
            return result.error(), log
        return np.asarray(Image.open(result.image_paths()[0])), log


@pytest.fixture(scope="module")
def images(comfy_server, ckpt):
    return _Images(comfy_server, ckpt)


@pytest.fixture(scope="module")
def no_lora(images):
    return images.run(None)[0]


def _add(comfy_server, tmp_path, name: str, sd: dict) -> str:
    return comfy_server.add_model("loras", atomic_save(sd, tmp_path / name))


def test_rank_mismatch_is_refused_not_applied_as_a_no_op(comfy_server, images, no_lora, tmp_path):
    """Issue 13 item 6: ComfyUI's core loader skips every module ('mat1 and mat2 shapes cannot be
    multiplied', image == no LoRA); the pack's loader used to report them applied. Now: one error."""
    name = _add(comfy_server, tmp_path, "rank_mismatch.safetensors", tiny_lycoris.rank_mismatch_state_dict())
    core, core_log = images.run(name, loader="LoraLoaderModelOnly")
    assert np.array_equal(core, no_lora) and "mat1 and mat2 shapes cannot be multiplied" in core_log
    err, _ = images.run(name)
    assert err["node_type"] == "HyperSDLoraLoader", err
    assert err["exception_message"].startswith(
        "lora_name: rank_mismatch.safetensors has 32 broken LoRA module(s), e.g. "
        "'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight': lora_down has "
        "rank 4 but lora_up has rank 8"), err
    assert "the file is refused and nothing is applied" in err["exception_message"]


@pytest.mark.parametrize("kind,build,modules", [("LoHa", tiny_lycoris.loha_state_dict, 15),
                                                ("LoKr", tiny_lycoris.lokr_state_dict, 15)])
def test_lycoris_is_applied_like_comfyuis_own_loader_and_counted(comfy_server, images, no_lora, tmp_path, kind,
                                                                 build, modules):
    """Issue 13 item 7: LoHa / LoKr files were refused ('none of the 0 LoRA modules match')."""
    name = _add(comfy_server, tmp_path, f"tiny_{kind.lower()}.safetensors", build())
    core, _ = images.run(name, loader="LoraLoaderModelOnly")
    ours, log = images.run(name)
    assert isinstance(ours, np.ndarray), ours
    assert np.array_equal(ours, core) and np.abs(ours.astype(int) - no_lora).max() > 20
    assert f"HyperSD LoRA: {name}: applied {modules}/{modules} modules to SD15 ({modules} {kind}; " in log
    assert "ERROR" not in log and "lora key not loaded" not in log


def test_tucker_lokr_is_applied_where_comfyuis_loader_skips_it(comfy_server, images, no_lora, tmp_path):
    """ComfyUI 0.3.64 skips Tucker LoKr modules (torch.kron refuses einsum's non-contiguous w2: an ERROR
    line, the image unchanged by them); the pack precomputes w2 and applies what the file describes."""
    sd = tiny_lycoris.lokr_state_dict(tucker=True)
    convs = [k for k in sd if k.endswith(".lokr_t2")]
    tucker = _add(comfy_server, tmp_path, "tiny_lokr_tucker.safetensors", sd)
    full = _add(comfy_server, tmp_path, "tiny_lokr_tucker_full.safetensors", tiny_lycoris.tucker_as_full_w2(sd))
    core_tucker, core_log = images.run(tucker, loader="LoraLoaderModelOnly")
    assert core_log.count("view size is not compatible") == len(convs) == 3
    expected, _ = images.run(full, loader="LoraLoaderModelOnly")
    ours, log = images.run(tucker)
    assert np.array_equal(ours, expected) and not np.array_equal(ours, core_tucker)
    assert "applied 15/15 modules to SD15 (15 LoKr; " in log and "ERROR" not in log


def test_mixed_file_info_reports_what_was_applied(comfy_server, images, tmp_path):
    loha = {k: v for k, v in tiny_lycoris.loha_state_dict().items() if "attn1_to_q" in k}
    lokr = {k: v for k, v in tiny_lycoris.lokr_state_dict().items() if "conv1" in k}
    lora = kohya_lora_state_dict(lora_weights(SD15_UNET, targets=("attn2.to_out.0",)), alpha=4.0)
    name = _add(comfy_server, tmp_path, "tiny_mixed.safetensors",
                {**loha, **lokr, **lora, "bundle_emb.cat.string_to_param.*": torch.zeros(1, 768)})
    ours, log = images.run(name)
    assert isinstance(ours, np.ndarray), ours
    assert (f"HyperSD LoRA: {name}: applied 11/11 modules to SD15 (4 LoHa, 3 LoKr, 4 LoRA; tensors: 38 kohya, "
            "1 unknown); strength model 1, clip 1; 1 tensors of unknown kind not applied, e.g. "
            "['bundle_emb.cat.string_to_param.*']") in log
    assert "lora key not loaded" not in log and "ERROR" not in log


def test_empty_file_says_empty_with_a_clip_connected(comfy_server, images, tmp_path):
    name = _add(comfy_server, tmp_path, "empty.safetensors", {})
    err, _ = images.run(name)
    assert err["exception_message"].strip() == "lora_name: empty.safetensors contains no tensors (an empty LoRA file)"

"""Kohya export with the true alpha: diffusers load_lora_weights reproduces the student UNet (fp32)."""
import torch
from safetensors import safe_open

from training.models import tiny
from training.lora_files.export import adapter_state_dict, export_lora
from training.models.adapters import add_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def _student(rank=4, alpha=2.0):
    unet = tiny.tiny_unet()
    params = add_adapter(unet, "default", rank, alpha, TARGETS, trainable=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: give every layer a visible effect
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet.eval()


def test_kohya_keys_and_true_alpha(tmp_path):
    unet = _student(rank=4, alpha=2.0)
    sd = adapter_state_dict(unet)
    alphas = [k for k in sd if k.endswith(".alpha")]
    assert alphas and all(float(sd[k]) == 2.0 for k in alphas)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in sd
    assert all(k.startswith("lora_unet_") for k in sd)
    path = tmp_path / "l.safetensors"
    export_lora(unet, str(path), {"hypersd.base_family": "sd15"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["hypersd.base_family"] == "sd15"
        assert set(f.keys()) == set(sd)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_diffusers_load_lora_weights_reproduces_student(tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    student = _student(rank=4, alpha=2.0)
    path = tmp_path / "lora.safetensors"
    export_lora(student, str(path))
    pipe = StableDiffusionPipeline(vae=tiny.tiny_vae(), text_encoder=tiny.tiny_text_encoder(),
                                   tokenizer=tiny.tiny_tokenizer(), unet=tiny.tiny_unet(),
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 250])
    with torch.no_grad():
        base_out = pipe.unet(x, t, ehs).sample
        pipe.load_lora_weights(str(path))
        loaded = pipe.unet(x, t, ehs).sample
        ref = student(x, t, ehs).sample
    err = (loaded - ref).abs().max().item()
    effect = (ref - base_out).abs().max().item()
    print(f"parity max abs err {err:.3e}, LoRA effect {effect:.3e}")
    assert effect > 1e-2      # the LoRA changes the output, so the comparison means something
    assert err < 1e-5


def test_outputs_get_the_permissions_open_would_give(tmp_path):
    """Atomic writes go through mkstemp / mkdtemp (0600 / 0700); the finished files and folders get the
    umask's permissions like any new file, so e.g. a ComfyUI running as another user can read the LoRA."""
    import os
    import stat

    from training.files import atomic_folder, save_file_atomic, save_json_atomic

    old = os.umask(0o022)
    try:
        save_file_atomic({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
        save_json_atomic({"a": 1}, str(tmp_path / "metrics.json"))
        with atomic_folder(str(tmp_path / "teacher")) as tmp:
            open(os.path.join(tmp, "x.json"), "w").close()
    finally:
        os.umask(old)
    for name, mode in (("lora.safetensors", 0o644), ("metrics.json", 0o644), ("teacher", 0o755)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name

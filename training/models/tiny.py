"""Tiny built-in models for the default run and the tests (no downloads).

The default run needs a teacher that means something: `load_tiny_teacher` loads the shipped tiny teacher
(training/models/tiny_teacher.safetensors: VAE, UNet and text encoder pre-trained on the generated task
by `python -m training.models.tiny_pretrain`).
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def tiny_unet(sample_size=8, cross_attention_dim=32, prediction_type=None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=32)


def tiny_tokenizer(max_length=77):
    """CLIP tokenizer over a 514-entry byte-level vocab (256 bytes, 256 bytes+</w>, 2 specials)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length)


def tiny_text_encoder(hidden_size=32):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden_size, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return CLIPTextModel(config)


TEACHER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_teacher.safetensors")
PARTS = ("unet", "vae", "text_encoder")


def save_teacher(base, path: str, metadata: dict) -> None:
    """The tiny Base's UNet, VAE and text encoder in one safetensors file (keys "<part>.<name>");
    the VAE scaling factor goes into the metadata."""
    from training.files import save_file_atomic

    models = dict(zip(PARTS, (base.unet, base.vae, base.text_encoders[0])))
    state = {f"{p}.{k}": v.detach().contiguous() for p, m in models.items() for k, v in m.state_dict().items()}
    meta = dict(metadata, format="hyper-sd-tiny-teacher-1", scaling_factor=repr(float(base.vae.config.scaling_factor)))
    save_file_atomic(state, path, metadata={k: str(v) for k, v in meta.items()})


def load_tiny_teacher(path: str = TEACHER_PATH):
    """The shipped tiny teacher's (unet, vae, text_encoder, tokenizer), frozen, VAE scaling factor set
    (training.models.base.load_tiny_base wraps them in a Base)."""
    from safetensors import safe_open

    from training.errors import ModelError

    if not os.path.isfile(path):
        raise ModelError(f"tiny teacher weights {path} are missing: run "
                         "python -m training.models.tiny_pretrain --out " + path)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    unet, vae, text_encoder = tiny_unet(), tiny_vae(), tiny_text_encoder()
    for part, model in zip(PARTS, (unet, vae, text_encoder)):
        model.load_state_dict({k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")})
        model.requires_grad_(False).eval()
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return unet, vae, text_encoder, tiny_tokenizer()

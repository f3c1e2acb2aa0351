"""Tiny built-in models for the default run and the tests (no downloads).

The default run needs a teacher that means something, so `pretrain_tiny` briefly fits the tiny
VAE (reconstruction) and the tiny UNet (epsilon denoising with 10% caption dropout, so CFG has an
unconditional branch) on the generated shapes data set. A random-weight teacher would make the
distillation meaningless.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def tiny_unet(sample_size=16, cross_attention_dim=32, prediction_type=None):
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
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
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


def pretrain_tiny(unet, vae, text_encoder, tokenizer, pixels, captions, abar, steps=300, vae_steps=200,
                  batch_size=16, lr=2e-3, seed=0):
    """Fit the tiny VAE then the tiny UNet on the data; deterministic for a given seed (CPU)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for _ in range(vae_steps):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        loss = (vae.decode(post.mean).sample - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        embeds = text_encoder(ids)[0]
    cond, uncond = embeds[:-1], embeds[-1:]
    abar = abar.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        ehs = torch.where(torch.rand(batch_size, 1, 1, generator=g) < 0.1, uncond, cond[idx])
        t = torch.randint(0, len(abar), (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (unet(xt, t, ehs).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    return float(loss.detach())

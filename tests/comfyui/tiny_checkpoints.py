"""Tiny, seeded, random-weight model files that a real ComfyUI 0.3.64 loads as SD1.5 / SDXL.

ComfyUI picks the model family from UNet shapes only (comfy/model_detection.py): SD1.5 needs
model_channels 320, context_dim 768 and conv proj_in; the SDXL family needs 320 channels, linear
proj_in, context_dim 2048, adm_in_channels 2816 and an exact per-block transformer_depth list
([0, 0, 1, 1, 2, 2] = Segmind_Vega, an SDXL subclass). channel_mult and the number of levels are
free, so every level here keeps 320 channels. The text encoders (CLIP-L 12x768; CLIP-G 32x1280)
and the VAE (ch 128, ch_mult [1, 2, 4, 4]) have fixed configs in ComfyUI: they are full size and
dominate the file size (SD1.5 ~0.46 GB, SDXL ~1.9 GB in fp16). ComfyUI never initialises weights
that a file lacks, so nothing is left out.

The state-dict layout is written from the LDM (CompVis/SGM) architecture, not copied from ComfyUI.
Diffusers-format UNets are not built: ComfyUI only recognises those when they match one of its
fixed full-size configs (smallest SDXL-family one: KOALA-700M); use ``unet_only`` (LDM keys, no
prefix) for UNETLoader instead.

``UNetSpec.diffusers_modules()`` lists the UNet's LoRA-targetable modules (diffusers paths) with
their shapes; LoRA files for these models are built in ``tiny_loras.py``.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

CLIP_VOCAB = 49408
CLIP_POSITIONS = 77


# --------------------------------------------------------------------------------------------------
# UNet description


@dataclass(frozen=True)
class UNetSpec:
    """An LDM UNet: every level has ``model_channels`` channels (channel_mult all ones)."""

    model_channels: int
    levels: int
    res_blocks: int  # per level (input side; the output side has res_blocks + 1)
    transformer_depth: tuple  # per input res block
    transformer_depth_output: tuple  # per output res block, in output order
    transformer_depth_middle: int  # >= 0: res-attn-res; -1: a single res block
    context_dim: int
    linear_proj: bool  # SDXL: linear proj_in/out; SD1.5: 1x1 conv
    adm_in_channels: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    # --- LDM key layout -----------------------------------------------------------------------
    def ldm_blocks(self):
        """Yield (ldm_prefix, diffusers_prefix, kind, extra) for every block, in LDM order."""
        n = self.res_blocks
        index = 1
        for level in range(self.levels):
            for i in range(n):
                depth = self.transformer_depth[level * n + i]
                yield f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{i}", "res", 1
                if depth:
                    yield f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{i}", "attn", depth
                index += 1
            if level != self.levels - 1:
                yield f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", "down", None
                index += 1
        if self.transformer_depth_middle >= -1:
            yield "middle_block.0", "mid_block.resnets.0", "res", 1
        if self.transformer_depth_middle >= 0:
            yield "middle_block.1", "mid_block.attentions.0", "attn", max(1, self.transformer_depth_middle)
            yield "middle_block.2", "mid_block.resnets.1", "res", 1
        index = 0
        for up_level in range(self.levels):
            for i in range(n + 1):
                depth = self.transformer_depth_output[up_level * (n + 1) + i]
                yield f"output_blocks.{index}.0", f"up_blocks.{up_level}.resnets.{i}", "res", 2
                slot = 1
                if depth:
                    yield f"output_blocks.{index}.1", f"up_blocks.{up_level}.attentions.{i}", "attn", depth
                    slot = 2
                if i == n and up_level != self.levels - 1:
                    yield f"output_blocks.{index}.{slot}", f"up_blocks.{up_level}.upsamplers.0", "up", None
                index += 1

    def ldm_shapes(self) -> dict:
        """LDM state-dict key -> shape, without the 'model.diffusion_model.' prefix."""
        c, t = self.model_channels, self.time_embed_dim
        shapes = {"time_embed.0.weight": (t, c), "time_embed.0.bias": (t,),
                  "time_embed.2.weight": (t, t), "time_embed.2.bias": (t,),
                  "input_blocks.0.0.weight": (c, 4, 3, 3), "input_blocks.0.0.bias": (c,),
                  "out.0.weight": (c,), "out.0.bias": (c,), "out.2.weight": (4, c, 3, 3), "out.2.bias": (4,)}
        if self.adm_in_channels:
            shapes.update({"label_emb.0.0.weight": (t, self.adm_in_channels), "label_emb.0.0.bias": (t,),
                           "label_emb.0.2.weight": (t, t), "label_emb.0.2.bias": (t,)})
        for ldm, _, kind, extra in self.ldm_blocks():
            if kind == "res":
                shapes.update(_res_block_shapes(ldm, c * extra, c, t))
            elif kind == "attn":
                shapes.update(_transformer_shapes(ldm, c, extra, self.context_dim, self.linear_proj))
            elif kind == "down":
                shapes.update({f"{ldm}.op.weight": (c, c, 3, 3), f"{ldm}.op.bias": (c,)})
            else:
                shapes.update({f"{ldm}.conv.weight": (c, c, 3, 3), f"{ldm}.conv.bias": (c,)})
        return shapes

    def diffusers_modules(self) -> dict:
        """Diffusers module path -> weight shape, for modules a LoRA can target (Linear/Conv2d)."""
        c, t, ctx = self.model_channels, self.time_embed_dim, self.context_dim
        modules = {}
        for _, diff, kind, extra in self.ldm_blocks():
            if kind == "res":
                modules[f"{diff}.conv1"] = (c, c * extra, 3, 3)
                modules[f"{diff}.time_emb_proj"] = (c, t)
                modules[f"{diff}.conv2"] = (c, c, 3, 3)
                if extra != 1:
                    modules[f"{diff}.conv_shortcut"] = (c, c * extra, 1, 1)
            elif kind == "attn":
                proj = (c, c) if self.linear_proj else (c, c, 1, 1)
                modules[f"{diff}.proj_in"] = proj
                modules[f"{diff}.proj_out"] = proj
                for j in range(extra):
                    block = f"{diff}.transformer_blocks.{j}"
                    for attn in ("attn1", "attn2"):
                        kv_in = c if attn == "attn1" else ctx
                        modules[f"{block}.{attn}.to_q"] = (c, c)
                        modules[f"{block}.{attn}.to_k"] = (c, kv_in)
                        modules[f"{block}.{attn}.to_v"] = (c, kv_in)
                        modules[f"{block}.{attn}.to_out.0"] = (c, c)
                    modules[f"{block}.ff.net.0.proj"] = (8 * c, c)
                    modules[f"{block}.ff.net.2"] = (c, 4 * c)
            else:
                modules[f"{diff}.conv"] = (c, c, 3, 3)
        return modules


def _res_block_shapes(prefix: str, cin: int, cout: int, temb: int) -> dict:
    shapes = {f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
              f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
              f"{prefix}.emb_layers.1.weight": (cout, temb), f"{prefix}.emb_layers.1.bias": (cout,),
              f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
              f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)}
    if cin != cout:
        shapes[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        shapes[f"{prefix}.skip_connection.bias"] = (cout,)
    return shapes


def _transformer_shapes(prefix: str, c: int, depth: int, context_dim: int, linear: bool) -> dict:
    proj = (c, c) if linear else (c, c, 1, 1)
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
              f"{prefix}.proj_in.weight": proj, f"{prefix}.proj_in.bias": (c,),
              f"{prefix}.proj_out.weight": proj, f"{prefix}.proj_out.bias": (c,)}
    for j in range(depth):
        b = f"{prefix}.transformer_blocks.{j}"
        for attn, kv_in in (("attn1", c), ("attn2", context_dim)):
            shapes.update({f"{b}.{attn}.to_q.weight": (c, c), f"{b}.{attn}.to_k.weight": (c, kv_in),
                           f"{b}.{attn}.to_v.weight": (c, kv_in), f"{b}.{attn}.to_out.0.weight": (c, c),
                           f"{b}.{attn}.to_out.0.bias": (c,)})
        for norm in ("norm1", "norm2", "norm3"):
            shapes.update({f"{b}.{norm}.weight": (c,), f"{b}.{norm}.bias": (c,)})
        shapes.update({f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
                       f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,)})
    return shapes


# SD1.5-shaped: 1 level, 1 res block, 1 transformer everywhere (~26M parameters).
SD15_UNET = UNetSpec(model_channels=320, levels=1, res_blocks=1, transformer_depth=(1,),
                     transformer_depth_output=(1, 1), transformer_depth_middle=1, context_dim=768,
                     linear_proj=False)
# SDXL family, detected as Segmind_Vega: transformer_depth [0, 0, 1, 1, 2, 2], all levels 320 ch.
SDXL_UNET = UNetSpec(model_channels=320, levels=3, res_blocks=2, transformer_depth=(0, 0, 1, 1, 2, 2),
                     transformer_depth_output=(0, 0, 0, 1, 1, 1, 2, 2, 2), transformer_depth_middle=-1,
                     context_dim=2048, linear_proj=True, adm_in_channels=2816)


# --------------------------------------------------------------------------------------------------
# Text encoders and VAE (fixed sizes in ComfyUI)


def clip_l_shapes(prefix: str, layers: int = 12, width: int = 768) -> dict:
    """Hugging Face CLIPTextModel keys (SD1.5 'cond_stage_model.transformer.text_model.')."""
    shapes = {f"{prefix}embeddings.token_embedding.weight": (CLIP_VOCAB, width),
              f"{prefix}embeddings.position_embedding.weight": (CLIP_POSITIONS, width),
              f"{prefix}final_layer_norm.weight": (width,), f"{prefix}final_layer_norm.bias": (width,)}
    for i in range(layers):
        layer = f"{prefix}encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (width, width)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}.{norm}.weight"] = (width,)
            shapes[f"{layer}.{norm}.bias"] = (width,)
        shapes.update({f"{layer}.mlp.fc1.weight": (4 * width, width), f"{layer}.mlp.fc1.bias": (4 * width,),
                       f"{layer}.mlp.fc2.weight": (width, 4 * width), f"{layer}.mlp.fc2.bias": (width,)})
    return shapes


def open_clip_g_shapes(prefix: str, layers: int = 32, width: int = 1280) -> dict:
    """open_clip text tower keys (SDXL 'conditioner.embedders.1.model.')."""
    shapes = {f"{prefix}token_embedding.weight": (CLIP_VOCAB, width),
              f"{prefix}positional_embedding": (CLIP_POSITIONS, width),
              f"{prefix}ln_final.weight": (width,), f"{prefix}ln_final.bias": (width,),
              f"{prefix}text_projection": (width, width), f"{prefix}logit_scale": ()}
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}"
        shapes.update({f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
                       f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                       f"{block}.mlp.c_fc.weight": (4 * width, width), f"{block}.mlp.c_fc.bias": (4 * width,),
                       f"{block}.mlp.c_proj.weight": (width, 4 * width), f"{block}.mlp.c_proj.bias": (width,)})
        for norm in ("ln_1", "ln_2"):
            shapes[f"{block}.{norm}.weight"] = (width,)
            shapes[f"{block}.{norm}.bias"] = (width,)
    return shapes


def vae_shapes(prefix: str = "first_stage_model.", ch: int = 128, ch_mult=(1, 2, 4, 4), res_blocks: int = 2,
               z: int = 4) -> dict:
    """LDM AutoencoderKL keys (the SD1.5/SDXL VAE layout)."""
    shapes = {}

    def resnet(p, cin, cout):
        shapes.update({f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,),
                       f"{p}.conv1.weight": (cout, cin, 3, 3), f"{p}.conv1.bias": (cout,),
                       f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
                       f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)})
        if cin != cout:
            shapes.update({f"{p}.nin_shortcut.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.bias": (cout,)})

    def mid(p, c):
        resnet(f"{p}.mid.block_1", c, c)
        shapes.update({f"{p}.mid.attn_1.norm.weight": (c,), f"{p}.mid.attn_1.norm.bias": (c,)})
        for name in ("q", "k", "v", "proj_out"):
            shapes.update({f"{p}.mid.attn_1.{name}.weight": (c, c, 1, 1), f"{p}.mid.attn_1.{name}.bias": (c,)})
        resnet(f"{p}.mid.block_2", c, c)

    enc, dec = f"{prefix}encoder", f"{prefix}decoder"
    shapes.update({f"{enc}.conv_in.weight": (ch, 3, 3, 3), f"{enc}.conv_in.bias": (ch,)})
    cin = ch
    for level, mult in enumerate(ch_mult):
        cout = ch * mult
        for i in range(res_blocks):
            resnet(f"{enc}.down.{level}.block.{i}", cin, cout)
            cin = cout
        if level != len(ch_mult) - 1:
            shapes.update({f"{enc}.down.{level}.downsample.conv.weight": (cout, cout, 3, 3),
                           f"{enc}.down.{level}.downsample.conv.bias": (cout,)})
    mid(enc, cin)
    shapes.update({f"{enc}.norm_out.weight": (cin,), f"{enc}.norm_out.bias": (cin,),
                   f"{enc}.conv_out.weight": (2 * z, cin, 3, 3), f"{enc}.conv_out.bias": (2 * z,),
                   f"{prefix}quant_conv.weight": (2 * z, 2 * z, 1, 1), f"{prefix}quant_conv.bias": (2 * z,),
                   f"{prefix}post_quant_conv.weight": (z, z, 1, 1), f"{prefix}post_quant_conv.bias": (z,)})
    cin = ch * ch_mult[-1]
    shapes.update({f"{dec}.conv_in.weight": (cin, z, 3, 3), f"{dec}.conv_in.bias": (cin,)})
    mid(dec, cin)
    for level in reversed(range(len(ch_mult))):
        cout = ch * ch_mult[level]
        for i in range(res_blocks + 1):
            resnet(f"{dec}.up.{level}.block.{i}", cin, cout)
            cin = cout
        if level != 0:
            shapes.update({f"{dec}.up.{level}.upsample.conv.weight": (cout, cout, 3, 3),
                           f"{dec}.up.{level}.upsample.conv.bias": (cout,)})
    shapes.update({f"{dec}.norm_out.weight": (cin,), f"{dec}.norm_out.bias": (cin,),
                   f"{dec}.conv_out.weight": (3, cin, 3, 3), f"{dec}.conv_out.bias": (3,)})
    return shapes


# --------------------------------------------------------------------------------------------------
# Random weights


def _is_norm(key: str) -> bool:
    return any(part in key for part in ("norm", "ln_", "layer_norm", "in_layers.0", "out_layers.0", "out.0."))


def random_weights(shapes: dict, seed: int, dtype=torch.float16) -> dict:
    """Seeded weights that keep activations bounded: norms 1/0, biases 0, weights ~N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("logit_scale"):
            out[key] = torch.tensor(math.log(100.0), dtype=dtype)
        elif key.endswith("bias") or key.endswith("_bias"):
            out[key] = torch.zeros(shape, dtype=dtype)
        elif _is_norm(key) and len(shape) == 1:
            out[key] = torch.ones(shape, dtype=dtype)
        elif "embedding" in key:
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            out[key] = (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)
    return out


def atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def sd15_checkpoint_shapes() -> dict:
    shapes = {f"model.diffusion_model.{k}": v for k, v in SD15_UNET.ldm_shapes().items()}
    shapes.update(clip_l_shapes("cond_stage_model.transformer.text_model."))
    shapes.update(vae_shapes())
    return shapes


def sdxl_checkpoint_shapes() -> dict:
    shapes = {f"model.diffusion_model.{k}": v for k, v in SDXL_UNET.ldm_shapes().items()}
    shapes.update(clip_l_shapes("conditioner.embedders.0.transformer.text_model."))
    shapes.update(open_clip_g_shapes("conditioner.embedders.1.model."))
    shapes.update(vae_shapes())
    return shapes


def build_sd15_checkpoint(path, seed: int = 0) -> Path:
    return atomic_save(random_weights(sd15_checkpoint_shapes(), seed), path)


def build_sdxl_checkpoint(path, seed: int = 0) -> Path:
    return atomic_save(random_weights(sdxl_checkpoint_shapes(), seed), path)


def build_unet_only(path, spec: UNetSpec = SD15_UNET, seed: int = 0) -> Path:
    """LDM-key UNet without prefix: ComfyUI's UNETLoader (models/diffusion_models) detects it."""
    return atomic_save(random_weights(spec.ldm_shapes(), seed), path)


# --------------------------------------------------------------------------------------------------
# Cached set for a test session


@dataclass
class TinyModels:
    """Builds each file once under ``root`` (a session tmp dir, or $HYPERSD_TINY_MODEL_CACHE)."""

    root: Path
    _built: dict = field(default_factory=dict)

    def _cached(self, name: str, build) -> Path:
        path = Path(self.root) / name
        if not path.exists():
            build(path)
        return path

    @property
    def sd15_checkpoint(self) -> Path:
        return self._cached("tiny-sd15.safetensors", build_sd15_checkpoint)

    @property
    def sdxl_checkpoint(self) -> Path:
        return self._cached("tiny-sdxl-vega.safetensors", build_sdxl_checkpoint)

    @property
    def sd15_unet(self) -> Path:
        return self._cached("tiny-sd15-unet.safetensors", lambda p: build_unet_only(p, SD15_UNET))

    @property
    def sdxl_unet(self) -> Path:
        return self._cached("tiny-sdxl-unet.safetensors", lambda p: build_unet_only(p, SDXL_UNET))

"""Seeded LyCORIS (LoHa, LoKr) and broken LoRA files for the tiny SD1.5 UNet of ``tiny_checkpoints``.

Module names are kohya's (``lora_unet_<diffusers path with _>``), as LyCORIS writes them; the weight
changes are about as large as the weights (~N(0, 1/fan_in)), so an applied module visibly changes
an image and a skipped one does not.
"""
from __future__ import annotations

import math

import torch

from .tiny_checkpoints import SD15_UNET
from .tiny_loras import lora_target_modules

LINEAR_TARGETS = ("attn1.to_q", "attn2.to_k", "attn2.to_v")
CONV_TARGETS = ("resnets.0.conv1",)
KRON_W1 = 4  # LoKr's small factor: (4, 4); every channel count of the tiny UNet divides by it


def _name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _randn(gen, *shape, std=1.0):
    return torch.randn(shape, generator=gen) * std


def loha_state_dict(rank: int = 4, seed: int = 0) -> dict:
    """LoHa on attention projections and resnet convs (the conv's w1_b / w2_b flattened, as LyCORIS does)."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    for path, shape in lora_target_modules(SD15_UNET, LINEAR_TARGETS + CONV_TARGETS).items():
        n, fan_in = _name(path), math.prod(shape[1:])
        for i in (1, 2):  # each product ~N(0, 1); w1_a scales their Hadamard product to ~N(0, 1/fan_in)
            sd[f"{n}.hada_w{i}_a"] = _randn(gen, shape[0], rank, std=fan_in ** -0.5 if i == 1 else 1.0)
            sd[f"{n}.hada_w{i}_b"] = _randn(gen, rank, fan_in, std=1 / math.sqrt(rank))
        sd[f"{n}.alpha"] = torch.tensor(float(rank))
    return sd


def _lokr_conv_w2(gen, n: str, shape, rank: int, tucker: bool) -> dict:
    out_c, in_c, fan_in = shape[0] // KRON_W1, shape[1] // KRON_W1, math.prod(shape[1:])
    if not tucker:
        return {f"{n}.lokr_w2": _randn(gen, out_c, in_c, *shape[2:], std=fan_in ** -0.5)}
    return {f"{n}.lokr_t2": _randn(gen, rank, rank, *shape[2:], std=1 / 3),
            f"{n}.lokr_w2_a": _randn(gen, rank, out_c, std=1 / math.sqrt(rank)),
            f"{n}.lokr_w2_b": _randn(gen, rank, in_c, std=(fan_in ** -0.5) / math.sqrt(rank)),
            f"{n}.alpha": torch.tensor(float(rank))}


def lokr_state_dict(rank: int = 4, seed: int = 1, tucker: bool = False) -> dict:
    """LoKr: kron((4, 4), w2) on attention projections (w2 as w2_a @ w2_b) and resnet convs
    (w2 in full, or Tucker-decomposed as lokr_t2 + lokr_w2_a + lokr_w2_b when ``tucker``)."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    for path, shape in lora_target_modules(SD15_UNET, LINEAR_TARGETS + CONV_TARGETS).items():
        n, fan_in = _name(path), math.prod(shape[1:])
        sd[f"{n}.lokr_w1"] = _randn(gen, KRON_W1, KRON_W1)
        if len(shape) == 4:
            sd.update(_lokr_conv_w2(gen, n, shape, rank, tucker))
        else:
            sd[f"{n}.lokr_w2_a"] = _randn(gen, shape[0] // KRON_W1, rank)
            sd[f"{n}.lokr_w2_b"] = _randn(gen, rank, shape[1] // KRON_W1, std=(fan_in ** -0.5) / math.sqrt(rank))
            sd[f"{n}.alpha"] = torch.tensor(float(rank))
    return sd


def tucker_as_full_w2(sd: dict) -> dict:
    """The same LoKr with each Tucker w2 written out in full (einsum made contiguous) and its
    alpha / rank scale folded in: what ComfyUI would apply if its kron accepted the Tucker form."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".lokr_t2")]:
        n = key[: -len(".lokr_t2")]
        t2, w2_a, w2_b = out.pop(key), out.pop(f"{n}.lokr_w2_a"), out.pop(f"{n}.lokr_w2_b")
        scale = float(out.pop(f"{n}.alpha")) / w2_b.shape[0]
        out[f"{n}.lokr_w2"] = scale * torch.einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a).contiguous()
    return out


def rank_mismatch_state_dict(seed: int = 2) -> dict:
    """kohya LoRA whose lora_up has rank 8 and lora_down rank 4 on every attention module: each fits the
    weight by (out, in), so it used to be reported as applied while ComfyUI skipped every module."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    for path, shape in lora_target_modules(SD15_UNET).items():
        n = _name(path)
        sd[f"{n}.lora_down.weight"] = _randn(gen, 4, shape[1], std=shape[1] ** -0.5)
        sd[f"{n}.lora_up.weight"] = _randn(gen, shape[0], 8)
        sd[f"{n}.alpha"] = torch.tensor(4.0)
    return sd

"""Reward models for human-feedback learning behind one interface and a registry.

A reward model is any callable `reward(images, prompts) -> tensor[B]` (higher is better), images
BCHW in [-1, 1] (VAE output) unless the model says `input_range = (0, 1)`; it must be
differentiable w.r.t. the images. Build one with `build_reward(spec, **options)` where spec is a
registered name ("tiny", "attributes", "laion_aesthetic", "imagereward", "hpsv2") or "module:function".
Heavy packages are imported lazily; missing packages or weights raise `RewardUnavailable`
naming the package or the hub repo/file.
"""
from __future__ import annotations

import difflib
import importlib
import os
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardUnavailable(RuntimeError):
    """A reward model's package or weights are missing."""


@runtime_checkable
class RewardModel(Protocol):
    input_range: tuple[float, float]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def to_unit_range(images: torch.Tensor, input_range=(-1.0, 1.0)) -> torch.Tensor:
    lo, hi = input_range
    return ((images - lo) / (hi - lo)).clamp(0, 1)


def clip_preprocess(images01: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Differentiable CLIP preprocessing: bicubic resize of the short side + centre crop + normalise.
    In float32: images decoded under bf16 autocast are bf16, and torch has no antialiased bicubic resize
    for bf16 on the CPU (NotImplementedError 'compute_index_ranges_weights')."""
    h, w = images01.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(images01.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bicubic", align_corners=False, antialias=scale < 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --- tiny local reward (tests, default tiny run) ------------------------------------------------

class TinyReward(nn.Module):
    """A small conv scorer with fixed seeded weights, or weights from a local safetensors file.

    Real and differentiable, so the feedback stage has something to climb without downloads.
    """

    input_range = (-1.0, 1.0)

    def __init__(self, weights: str | None = None, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.5
        if weights is not None:
            self.load_state_dict(_load_safetensors(weights, "tiny reward weights"))
        self.requires_grad_(False)
        self.eval()

    def __call__(self, images, prompts=None):
        return super().__call__(images, prompts)

    def forward(self, images, prompts=None):
        x = to_unit_range(images, self.input_range) * 2 - 1
        feats = F.silu(self.conv(x.to(self.conv.weight.dtype))).mean(dim=(2, 3))
        return self.fc(feats).squeeze(-1)


# --- LAION aesthetic predictor (CLIP ViT-L/14 image embedding -> MLP) ---------------------------

class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor MLP; state-dict keys layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeds):
        return self.layers(embeds)


class LaionAesthetic(nn.Module):
    input_range = (-1.0, 1.0)

    def __init__(self, clip_vision: nn.Module, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip_vision, mlp
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, prompts=None):
        size = self.clip.config.image_size
        pixels = clip_preprocess(to_unit_range(images, self.input_range), size)
        embeds = self.clip(pixel_values=pixels.to(next(self.clip.parameters()).dtype)).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)  # the predictor was fit on unit embeddings
        return self.mlp(embeds.to(self.mlp.layers[0].weight.dtype)).squeeze(-1)

    @classmethod
    def from_pretrained(cls, clip: str = "openai/clip-vit-large-patch14", mlp_weights: str | None = None,
                        mlp_repo: str = "camenduru/improved-aesthetic-predictor",
                        mlp_file: str = "sac+logos+ava1-l14-linearMSE.pth"):
        """`clip`: local dir or hub id; `mlp_weights`: local .safetensors/.pth, else fetched from the hub."""
        from transformers import CLIPVisionModelWithProjection

        try:
            vision = CLIPVisionModelWithProjection.from_pretrained(clip)
        except OSError as e:
            raise RewardUnavailable(f"laion_aesthetic: cannot load CLIP vision model {clip!r} "
                                    f"(local dir or hub repo; offline?): {e}") from e
        path = mlp_weights or hub_file(mlp_repo, mlp_file, "laion_aesthetic MLP")
        mlp = AestheticMLP(vision.config.projection_dim)
        mlp.load_state_dict(load_aesthetic_state_dict(path))
        return cls(vision, mlp)


def load_aesthetic_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        return _load_safetensors(path, "aesthetic MLP weights")
    if not os.path.isfile(path):
        raise RewardUnavailable(f"aesthetic MLP weights not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)  # official .pth; never unpickle code


# --- optional packages ----------------------------------------------------------------------

def _require(module: str, pip_name: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RewardUnavailable(f"reward {what!r} needs the package '{pip_name}' (pip install {pip_name}) "
                                f"and its weights; import {module!r} failed: {e}") from e


class ImageRewardModel(nn.Module):
    """ImageReward (THUDM) via the `image-reward` package; weights "ImageReward-v1.0" (hub THUDM/ImageReward)."""

    input_range = (-1.0, 1.0)

    def __init__(self, name: str = "ImageReward-v1.0", device: str = "cpu"):
        super().__init__()
        rm = _require("ImageReward", "image-reward", "imagereward")
        try:
            self.model = rm.load(name, device=device)
        except Exception as e:  # the package downloads THUDM/ImageReward/ImageReward.pt on first use
            raise RewardUnavailable(f"imagereward: cannot load weights {name!r} (hub THUDM/ImageReward, "
                                    f"file ImageReward.pt; offline?): {e}") from e
        self.model.requires_grad_(False)

    def forward(self, images, prompts):
        pixels = clip_preprocess(to_unit_range(images, self.input_range), 224)
        text = self.model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                                         return_tensors="pt").to(pixels.device)
        return self.model.score_gard(text.input_ids, text.attention_mask, pixels).reshape(-1)


class HPSv2Model(nn.Module):
    """HPSv2 via the `hpsv2` package (open_clip ViT-H/14 + HPS_v2_compressed.pt from xswu/HPSv2)."""

    input_range = (-1.0, 1.0)

    def __init__(self, weights: str | None = None):
        super().__init__()
        open_clip = _require("open_clip", "open_clip_torch", "hpsv2")
        _require("hpsv2", "hpsv2", "hpsv2")
        path = weights or hub_file("xswu/HPSv2", "HPS_v2_compressed.pt", "hpsv2")
        model, _, _ = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt.get("state_dict", ckpt))
        self.model, self.tokenizer = model.requires_grad_(False).eval(), open_clip.get_tokenizer("ViT-H-14")

    def forward(self, images, prompts):
        pixels = clip_preprocess(to_unit_range(images, self.input_range), 224)
        img = F.normalize(self.model.encode_image(pixels), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(pixels.device)), dim=-1)
        return (img * txt).sum(-1)


# --- weights, registry ----------------------------------------------------------------------

def hub_file(repo_id: str, filename: str, what: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(repo_id, filename)
    except Exception as e:
        raise RewardUnavailable(f"{what}: cannot fetch weights '{filename}' from hub repo '{repo_id}' "
                                f"(offline or not cached? pass a local path instead): {e}") from e


def _load_safetensors(path: str, what: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise RewardUnavailable(f"{what} not found: {path}")
    return load_file(path)


def attribute_reward(seed: int = 1, weights: str | None = None) -> RewardModel:
    """The generated task's attribute classifier (training/models/attributes.py): mean log p(the caption's
    colour and shape | image); trained from `seed` in a few seconds, or loaded from a local `weights` file.
    Seed 1 by default: the run's quality figures use the classifier of seed 0, so the metric is not the
    function the feedback stage climbs."""
    from training.models.attributes import AttributeReward

    if weights and not os.path.isfile(weights):
        raise RewardUnavailable(f"attribute classifier weights not found: {weights}")
    return AttributeReward(seed=seed, weights=weights)


REWARDS: dict[str, Callable[..., RewardModel]] = {
    "tiny": TinyReward,
    "attributes": attribute_reward,
    "laion_aesthetic": LaionAesthetic.from_pretrained,
    "imagereward": ImageRewardModel,
    "hpsv2": HPSv2Model,
}


def build_reward(spec: str | Callable, **options) -> RewardModel:
    """Registered name, "module:function" import path, or a callable taken as the reward itself."""
    if callable(spec):
        return spec
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import {attr!r} from module {module!r}: {e}") from e
        return obj(**options) if isinstance(obj, type) else obj
    if spec not in REWARDS:
        near = difflib.get_close_matches(spec, REWARDS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown reward {spec!r}{hint} (known: {sorted(REWARDS)}, or 'module:function')")
    return REWARDS[spec](**options)

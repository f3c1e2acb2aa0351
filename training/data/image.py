"""Pixels: aspect-ratio buckets, resize + crop, [-1, 1] tensors, SDXL micro-conditioning."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image


def make_buckets(resolution: int, step: int | None = None, max_ratio: float = 4.0) -> list:
    """(height, width) buckets of area <= resolution**2 (close to it), sides multiples of `step`
    (64, or 8 below 256 px), aspect ratio at most `max_ratio`. Sorted by aspect h/w."""
    step = step or (64 if resolution >= 256 else 8)
    if resolution % step:
        raise ValueError(f"data.resolution = {resolution}: expected a multiple of {step}")
    area = resolution * resolution
    buckets = set()
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + 1, step):
        h = (area // w) // step * step
        if h >= step and max(h / w, w / h) <= max_ratio:
            buckets.add((h, w))
            buckets.add((w, h))
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(size_hw, buckets) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (in log ratio)."""
    h, w = size_hw
    target = math.log(h / w)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def resize_crop(img: Image.Image, target_hw, random_crop: bool = False, rng: random.Random | None = None):
    """Scale so the image covers target_hw, then crop. Returns (image, (top, left)): the crop
    offset in the resized image, SDXL's crop_top_left conditioning."""
    th, tw = target_hw
    w, h = img.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if random_crop:
        rng = rng or random.Random()
        top, left = rng.randint(0, nh - th), rng.randint(0, nw - tw)
    else:
        top, left = (nh - th) // 2, (nw - tw) // 2
    return img.crop((left, top, left + tw, top + th)), (top, left), (nh, nw)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def preprocess(img: Image.Image, target_hw, random_crop=False, flip=False, rng=None) -> dict:
    """One image -> the sample fields shared by pixel and cached datasets."""
    original = (img.size[1], img.size[0])
    img, (top, left), (_, resized_w) = resize_crop(img, target_hw, random_crop, rng)
    if flip:    # the crop is mirrored too: left is measured from the flipped image's left edge
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = resized_w - target_hw[1] - left
    return {"pixel_values": to_tensor(img),
            "original_size": torch.tensor(original, dtype=torch.long),
            "crop_top_left": torch.tensor((top, left), dtype=torch.long),
            "target_size": torch.tensor(tuple(target_hw), dtype=torch.long)}

"""Scribble preprocessing in pure torch (no ComfyUI import), so it is testable anywhere.

Scribble ControlNets (lllyasviel/sd-controlnet-scribble, control_v11p_sd15_scribble) were trained
on white lines on a black background. Users draw the opposite (black pen on white canvas), and the
official Hyper-SD scribble demo inverts the canvas first. Images follow ComfyUI's IMAGE layout:
[B, H, W, C] float in 0..1.
"""
from __future__ import annotations

import math

import torch

POLARITIES = ("auto", "dark_lines_on_light", "light_lines_on_dark")
SOURCES = ("drawing", "photo")


def to_gray(image: torch.Tensor) -> torch.Tensor:
    """[B,H,W,C] -> [B,H,W] luminance (Rec. 601); one channel passes through, alpha is ignored."""
    if image.ndim != 4:
        raise ValueError(f"scribble: expected IMAGE [B,H,W,C], got shape {tuple(image.shape)}")
    channels = image.shape[-1]
    if channels == 1:
        return image[..., 0]
    if channels < 3:
        raise ValueError(f"scribble: expected 1, 3 or 4 channels, got {channels}")
    weights = image.new_tensor([0.299, 0.587, 0.114])
    return (image[..., :3] * weights).sum(-1)


def border_mean(gray: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Mean brightness of each image's outer frame, [B]. The canvas edge is background."""
    w = max(1, min(width, gray.shape[1] // 2, gray.shape[2] // 2))
    frame = torch.cat(
        [gray[:, :w].flatten(1), gray[:, -w:].flatten(1), gray[:, :, :w].flatten(1), gray[:, :, -w:].flatten(1)],
        dim=1,
    )
    return frame.mean(1)


def lines_are_dark(gray: torch.Tensor) -> torch.Tensor:
    """Per image bool [B]: True when the background is light (so the strokes are dark).

    Decided by the border brightness; when the border is ambiguous (mean within 0.1 of 0.5)
    the majority of all pixels decides, since strokes cover less area than the background.
    """
    border = border_mean(gray)
    majority = (gray > 0.5).float().mean(dim=(1, 2))
    ambiguous = (border - 0.5).abs() < 0.1
    return torch.where(ambiguous, majority > 0.5, border > 0.5)


def gaussian_blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,H,W] with reflect padding (radius 3 sigma)."""
    if sigma <= 0:
        return gray
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=gray.dtype, device=gray.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = gray.unsqueeze(1)  # [B,1,H,W]
    pad_h = min(radius, out.shape[2] - 1)
    pad_w = min(radius, out.shape[3] - 1)
    # reflect padding needs pad < size; fall back to replicate for tiny images
    mode_h = "reflect" if pad_h == radius else "replicate"
    mode_w = "reflect" if pad_w == radius else "replicate"
    out = torch.nn.functional.pad(out, (radius, radius, 0, 0), mode=mode_w)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1))
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode=mode_h)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def dog_sketch(gray: torch.Tensor, sigma: float = 1.0, k: float = 1.6) -> torch.Tensor:
    """Difference-of-Gaussians line strength for a photo, [B,H,W] in 0..1 per image.

    A pixel darker than its surroundings (an outline or crease) gives blur(k*sigma) > blur(sigma);
    that positive part is the sketch stroke. Normalised per image so the threshold is scale-free.
    """
    fine = gaussian_blur(gray, sigma)
    coarse = gaussian_blur(gray, sigma * k)
    strength = (coarse - fine).clamp_min(0)
    peak = strength.flatten(1).amax(1).clamp_min(1e-8)
    return strength / peak.view(-1, 1, 1)


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Thicken [B,H,W] lines by `pixels` in every direction (square max filter)."""
    if pixels <= 0:
        return mask
    size = 2 * pixels + 1
    return torch.nn.functional.max_pool2d(mask.unsqueeze(1), size, stride=1, padding=pixels).squeeze(1)


def scribble_lines(
    image: torch.Tensor,
    source: str = "drawing",
    polarity: str = "auto",
    threshold: float = 0.5,
    dog_sigma: float = 1.0,
    thickness: int = 0,
) -> torch.Tensor:
    """White-on-black binary scribble map [B,H,W,3] (float 0/1) at the input's resolution.

    source "drawing": strokes are found by polarity (auto per image, or given) and thresholded.
    source "photo": a difference-of-Gaussians sketch is thresholded (threshold relative to the
    strongest edge of each image); polarity is ignored.
    """
    if source not in SOURCES:
        raise ValueError(f"scribble: source must be one of {SOURCES}, got {source!r}")
    if polarity not in POLARITIES:
        raise ValueError(f"scribble: polarity must be one of {POLARITIES}, got {polarity!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"scribble: threshold must be in [0, 1], got {threshold}")
    gray = to_gray(image.float())
    if source == "photo":
        strength = dog_sketch(gray, dog_sigma)
        lines = (strength > threshold).float() if threshold < 1.0 else torch.zeros_like(strength)
    else:
        if polarity == "auto":
            dark = lines_are_dark(gray)
        else:
            dark = torch.full((gray.shape[0],), polarity == "dark_lines_on_light", device=gray.device)
        strokes = torch.where(dark.view(-1, 1, 1), 1.0 - gray, gray)
        lines = (strokes > threshold).float()
    lines = dilate(lines, thickness)
    return lines.unsqueeze(-1).expand(-1, -1, -1, 3).to(image.dtype).contiguous()

"""Ground-truth text-to-image task for the quality benchmark: one coloured shape in a quadrant.

Every image comes with its attribute labels (colour, shape, position), so text alignment can be
scored exactly by a classifier trained on the ground truth (the CLIP-score analogue), and the
captions are encoded by a fixed "text encoder" (one token embedding per word + a position
embedding) that is tiny but conditions the UNet through cross-attention like CLIP does.
"""
from __future__ import annotations

import numpy as np
import torch

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS}
SIZE = 16
EMBED_DIM = 32


def render(color: int, shape: int, position: int, jitter: tuple[int, int], size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    q = size // 2
    cy = (position // 2) * q + q // 2 + jitter[0]
    cx = (position % 2) * q + q // 2 + jitter[1]
    if SHAPES[shape] == "square":
        mask = (np.abs(xx + 0.5 - cx) <= 3) & (np.abs(yy + 0.5 - cy) <= 3)
    else:
        mask = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= 3.4**2
    img = np.full((size, size, 3), 128, np.uint8)
    img[mask] = list(COLORS.values())[color]
    return img


def sample_labels(n: int, seed: int) -> torch.Tensor:
    """(n, 3) long tensor of (colour, shape, position) indices."""
    rng = np.random.default_rng(seed)
    cols = [rng.integers(len(v), size=n) for v in ATTRIBUTES.values()]
    return torch.from_numpy(np.stack(cols, 1)).long()


def balanced_labels(n: int) -> torch.Tensor:
    """(n, 3) labels cycling through the (colour, shape, position) combinations, each caption equally often and
    at least twice (n = 96: each of the 32 captions 3 times; with different noise, which diversity reads)."""
    combos = torch.cartesian_prod(*(torch.arange(len(v)) for v in ATTRIBUTES.values()))
    return combos[torch.arange(n) % min(len(combos), max(1, n // 2))]


def make_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Images in [-1, 1], (n, 3, SIZE, SIZE), for the given labels; +-1 px jitter from `seed`."""
    rng = np.random.default_rng(seed + 10_000)
    jit = rng.integers(-1, 2, size=(len(labels), 2))
    imgs = [render(*map(int, lab), tuple(j)) for lab, j in zip(labels, jit)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def caption(label) -> str:
    c, s, p = (int(v) for v in label)
    return f"a {ATTRIBUTES['color'][c]} {SHAPES[s]} at the {POSITIONS[p]}"


CAPTIONS = {caption((c, s, p)): (c, s, p) for c in range(len(COLORS)) for s in range(len(SHAPES))
            for p in range(len(POSITIONS))}


def parse_caption(text: str) -> tuple[int, int, int] | None:
    """Inverse of `caption`: the (colour, shape, position) labels; None for the empty prompt."""
    if not text:
        return None
    if text not in CAPTIONS:
        raise ValueError(f"not a shapes caption: {text!r} (expected e.g. {caption((0, 1, 2))!r} or '')")
    return CAPTIONS[text]


class TextEncoder:
    """Fixed random token table: caption -> (3 tokens, EMBED_DIM); the empty prompt is all zeros."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tables = [torch.randn(len(v), EMBED_DIM, generator=g) for v in ATTRIBUTES.values()]
        self.pos = torch.randn(3, EMBED_DIM, generator=g) * 0.5

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        toks = [t[labels[:, i]] for i, t in enumerate(self.tables)]
        return torch.stack(toks, 1) + self.pos

    def empty(self, n: int) -> torch.Tensor:
        return torch.zeros(n, 3, EMBED_DIM)

    def captions(self, texts: list[str]) -> torch.Tensor:
        """Caption strings -> embeddings; the empty prompt "" is the all-zero unconditional branch."""
        out = self.empty(len(texts))
        parsed = [parse_caption(t) for t in texts]
        rows = [i for i, lab in enumerate(parsed) if lab is not None]
        if rows:
            out[rows] = self(torch.tensor([parsed[i] for i in rows]))
        return out

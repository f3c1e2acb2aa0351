"""Multi-process helpers that keep a run's numbers independent of the process count.

Every random draw that depends on the batch is made once for the GLOBAL batch from (seed, step,
salt) and each process takes its own slice, so 1, 2 or 8 processes (and a resumed run) see the same
numbers per sample. Networks a stage owns (discriminator, fake score, the full 1-step UNet) are not
DDP-wrapped: their gradients are averaged by hand.
"""
from __future__ import annotations

import torch


def global_randn(accelerator, seed: int, step: int, like: torch.Tensor, salt: int) -> torch.Tensor:
    """Noise shaped like `like` (this process's slice of the batch), cut from ONE draw for the global
    batch seeded by (seed, step, salt)."""
    n, r, b = accelerator.num_processes, accelerator.process_index, like.shape[0]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + salt)
    full = torch.randn((b * n, *like.shape[1:]), generator=g)
    return full[r * b:(r + 1) * b].to(like.device, like.dtype)


def all_reduce_grads(accelerator, params) -> None:
    """Average the gradients of parameters outside DDP over processes (no-op on one process)."""
    if accelerator.num_processes > 1:
        for q in params:
            if q.grad is not None:
                q.grad = accelerator.reduce(q.grad, "mean")

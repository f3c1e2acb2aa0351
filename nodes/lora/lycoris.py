"""LyCORIS modules ComfyUI 0.3.64 would skip, rewritten to equivalent ones it applies.

A Tucker-decomposed LoKr module (``lokr_t2`` + ``lokr_w2_a`` + ``lokr_w2_b``: LyCORIS ``use_tucker``
on conv layers) is combined by ComfyUI as kron(w1, einsum(t2, w2_b, w2_a)). einsum returns a
permuted, non-contiguous tensor that ``torch.kron`` refuses ("view size is not compatible with input
tensor's size and stride"), so ComfyUI logs an ERROR and leaves the weight unchanged. Here w2 is
computed once, contiguous, and stored as a full ``lokr_w2`` with ComfyUI's alpha / rank scale
folded in, so ComfyUI applies the change the file describes.
"""
from __future__ import annotations

import torch

from .matching import group_modules

_TUCKER_W2 = ("lokr_t2", "lokr_w2_a", "lokr_w2_b")


def _lokr_scale(roles: dict, state_dict: dict, rank_role: str | None) -> float:
    """ComfyUI's LoKr scale: alpha / rank of the last low-rank factor it built, 1 without either."""
    if "alpha" not in roles or rank_role is None:
        return 1.0
    return float(state_dict[roles["alpha"]].item()) / state_dict[roles[rank_role]].shape[0]


def materialize_lokr_tucker(state_dict: dict, modules: dict | None = None) -> tuple[dict, int]:
    """(state dict with every Tucker LoKr w2 precomputed as ``lokr_w2``, number of modules rewritten).

    ``modules``: ``group_modules(state_dict)[0]`` when the caller has it already (it may name modules the
    state dict no longer holds: only modules with every Tucker tensor present are rewritten)."""
    modules = modules if modules is not None else group_modules(state_dict)[0]
    tucker = {m: roles for m, roles in modules.items()
              if "lokr_w2" not in roles and all(r in roles and roles[r] in state_dict for r in _TUCKER_W2)}
    if not tucker:
        return state_dict, 0  # the usual case: no copy of the state dict
    out, rewritten = dict(state_dict), 0
    for module, roles in tucker.items():
        t2, w2_a, w2_b = (state_dict[roles[r]].float() for r in _TUCKER_W2)
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a).contiguous()
        # With w2 given in full, ComfyUI scales by w1's rank (when w1 is low-rank) instead of w2's.
        w1_rank = "lokr_w1_b" if "lokr_w1" not in roles and "lokr_w1_b" in roles else None
        old_scale, new_scale = _lokr_scale(roles, state_dict, "lokr_w2_b"), _lokr_scale(roles, state_dict, w1_rank)
        w2 = w2 * (old_scale / new_scale) if new_scale else w2  # alpha 0: no change either way
        for role in _TUCKER_W2:
            del out[roles[role]]
        out[f"{module}.lokr_w2"] = w2
        rewritten += 1
    return out, rewritten

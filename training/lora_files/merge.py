"""Merge kohya LoRAs into one, exactly or with an SVD re-rank.

Exact merge concatenates ranks: down = cat([s1*down1, s2*down2]), up = cat([up1, up2], dim=1)
with s_i = w_i * alpha_i / r_i folded in and alpha = total rank, so the merged delta is the
weighted sum of deltas (up to float rounding). The CLI is `python -m training.merge`.
"""
from __future__ import annotations

import json

import torch

from training.lora_files.kohya import LoraModule, load_kohya, save_kohya


def merge_exact(loras: list[dict[str, LoraModule]], weights: list[float] | None = None) -> dict[str, LoraModule]:
    """Rank-concatenate; a module present in only some inputs takes just those parts."""
    weights = [1.0] * len(loras) if weights is None else list(weights)
    if len(weights) != len(loras):
        raise ValueError(f"--weights has {len(weights)} values for {len(loras)} LoRA files")
    merged = {}
    for name in sorted(set().union(*loras)):
        parts = [(w, lora[name]) for w, lora in zip(weights, loras) if name in lora]
        kernel = {p.down.shape[1:] for _, p in parts}
        outs = {p.up.shape[0] for _, p in parts}
        if len(kernel) > 1 or len(outs) > 1:
            raise ValueError(f"module {name}: incompatible shapes across files (down {kernel}, out {outs})")
        down = torch.cat([(w * p.alpha / p.rank) * p.down.double() for w, p in parts], dim=0)
        up = torch.cat([p.up.double() for _, p in parts], dim=1)
        merged[name] = LoraModule(down, up, float(down.shape[0]))
    return merged


def svd_rerank(modules: dict[str, LoraModule], rank: int) -> tuple[dict[str, LoraModule], dict[str, float], float]:
    """Best rank-`rank` approximation of each delta (Eckart-Young) -> (modules, per-module rel. error, overall).

    Relative Frobenius error per module: ||dW - dW_r|| / ||dW||; overall: sqrt(sum err^2 / sum ||dW||^2).
    """
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    out, errors, err_sq, norm_sq = {}, {}, 0.0, 0.0
    for name, m in modules.items():
        delta = m.delta()
        flat = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        up = (u[:, :r] * root).reshape(delta.shape[0], r, *([1, 1] if m.up.ndim == 4 else []))
        down = (root[:, None] * vh[:r]).reshape(r, *delta.shape[1:])
        new = LoraModule(down, up, float(r))
        e = (flat - new.delta().reshape_as(flat)).norm().item()
        n = flat.norm().item()
        errors[name] = e / n if n > 0 else 0.0
        err_sq, norm_sq = err_sq + e * e, norm_sq + n * n
        out[name] = new
    overall = (err_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0
    return out, errors, overall


def merge_files(paths: list[str], out: str, weights=None, rank: int | None = None) -> dict:
    """Merge kohya files into `out`; returns a report (ranks, SVD errors when re-ranked)."""
    merged = merge_exact([load_kohya(p) for p in paths], weights)
    report = {"inputs": paths, "weights": weights or [1.0] * len(paths), "modules": len(merged),
              "max_rank": max(m.rank for m in merged.values())}
    if rank is not None:
        merged, errors, overall = svd_rerank(merged, rank)
        report.update(rank=rank, svd_overall_rel_error=overall,
                      svd_max_module_rel_error=max(errors.values()), svd_module_rel_errors=errors)
    save_kohya(out, merged, {"hypersd_merge": json.dumps({k: v for k, v in report.items()
                                                          if k != "svd_module_rel_errors"})})
    return report

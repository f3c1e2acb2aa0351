"""Merge stage LoRAs (kohya format) into one unified LoRA, exactly or with an SVD re-rank.

A kohya module is (down, up, alpha) with delta W = (alpha / rank) * up @ down, where a linear LoRA
has down [r, in], up [out, r] and a conv LoRA has down [r, in, kh, kw], up [out, r, 1, 1].
Exact merge concatenates ranks: down = cat([s1*down1, s2*down2]), up = cat([up1, up2], dim=1)
with s_i = w_i * alpha_i / r_i folded in and alpha = total rank, so the merged delta is the
weighted sum of deltas (up to float rounding).

CLI: python -m training.merge A.safetensors B.safetensors --out X.safetensors [--weights 1,1] [--rank R]
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """delta W in float64, shaped like the base weight ([out, in] or [out, in, kh, kw])."""
        down, up = self.down.double(), self.up.double()
        flat = up.reshape(up.shape[0], self.rank) @ down.reshape(self.rank, -1)
        return (self.alpha / self.rank) * flat.reshape(up.shape[0], *down.shape[1:])


def load_kohya(path: str) -> dict[str, LoraModule]:
    """Read a kohya LoRA file -> {module key without suffix: LoraModule}; alpha defaults to rank."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    sd = load_file(path)
    modules = {}
    for key in sd:
        if key.endswith(DOWN):
            name = key[: -len(DOWN)]
            if name + UP not in sd:
                raise ValueError(f"{path}: {key} has no matching {name + UP}")
            down, up = sd[key], sd[name + UP]
            alpha = float(sd[name + ALPHA]) if name + ALPHA in sd else float(down.shape[0])
            modules[name] = LoraModule(down, up, alpha)
    if not modules:
        raise ValueError(f"{path}: no kohya LoRA keys ('*{DOWN}') found")
    return modules


def kohya_state_dict(modules: dict[str, LoraModule], dtype=torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for name, m in modules.items():
        sd[name + DOWN] = m.down.to(dtype).contiguous()
        sd[name + UP] = m.up.to(dtype).contiguous()
        sd[name + ALPHA] = torch.tensor(float(m.alpha), dtype=dtype)
    return sd


def save_kohya(path: str, modules: dict[str, LoraModule], metadata: dict | None = None, dtype=torch.float32):
    """Atomic write (training.export.save_file_atomic) of a kohya LoRA with the true alpha per module."""
    from .export import save_file_atomic

    save_file_atomic(kohya_state_dict(modules, dtype), path, metadata)


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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m training.merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("loras", nargs="+", help="kohya LoRA .safetensors files to merge")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--weights", default=None, help="comma-separated weight per input, e.g. 1,0.5")
    ap.add_argument("--rank", type=int, default=None, help="SVD re-rank every module to this rank")
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    report = merge_files(args.loras, args.out, weights, args.rank)
    errors = report.pop("svd_module_rel_errors", None)
    if errors:
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        report["svd_worst_modules"] = {k: round(v, 6) for k, v in worst}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()


# --- bridges to live models (used by the stages; training/export.py may offer the same) ---------

def kohya_name(module_path: str) -> str:
    return PREFIX + module_path.replace(".", "_")


def peft_to_kohya(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraModule]:
    """Read a PEFT LoRA adapter off a model as kohya modules (true alpha per module)."""
    modules = {}
    for path, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is None or adapter_name not in lora_a:
            continue
        down = lora_a[adapter_name].weight.detach().float().cpu()
        up = mod.lora_B[adapter_name].weight.detach().float().cpu()
        alpha = float(mod.lora_alpha[adapter_name]) if hasattr(mod, "lora_alpha") else float(down.shape[0])
        if getattr(mod, "use_rslora", {}).get(adapter_name, False):
            alpha = alpha * down.shape[0] ** 0.5  # rsLoRA scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        modules[kohya_name(path)] = LoraModule(down, up, alpha)
    if not modules:
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r}")
    return modules


@torch.no_grad()
def fold_kohya_into(model: torch.nn.Module, modules: dict[str, LoraModule], scale: float = 1.0, source="LoRA"):
    """W += scale * delta for every module (exact); used to start a stage from a previous stage's LoRA.

    Works on plain and PEFT-wrapped models (a PEFT layer's base_layer receives the delta).
    """
    by_name = {}
    for path, mod in model.named_modules():
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            by_name.setdefault(kohya_name(path.replace(".base_layer", "")), base)
    missing = [n for n in modules if n not in by_name]
    if missing:
        raise ValueError(f"{source}: {len(missing)} modules do not exist in the model, e.g. {missing[:3]}")
    for name, m in modules.items():
        weight = by_name[name].weight
        delta = m.delta()
        if delta.shape != weight.shape:
            raise ValueError(f"{source}: {name} delta {tuple(delta.shape)} != weight {tuple(weight.shape)}")
        weight.add_((scale * delta).to(weight.dtype))


DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2"]


def add_stage_lora(unet, adapter_name: str, rank: int = 4, alpha: float | None = None, targets=None):
    """Add a fresh PEFT LoRA adapter (B = 0, so delta = 0) and make only it trainable."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=list(targets or DEFAULT_TARGETS), init_lora_weights=True)
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=adapter_name)
    unet.set_adapter(adapter_name)
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def validate_stage_plan(stages, init_lora: str = "") -> None:
    """Check the config's `stages` list before any training starts; ValueError names the config key.

    Stage types form groups, each trained as its own LoRA on top of the earlier ones:
    tscd / adversarial -> feedback -> score_distill. A plan that starts after TSCD needs the TSCD
    LoRA underneath (`model.init_lora`); score distillation is 1-step (segments: 1).
    """
    import difflib

    from .stages import GROUP_OF, GROUP_ORDER

    last = -1
    for i, s in enumerate(stages):
        if s.type not in GROUP_OF:
            near = difflib.get_close_matches(s.type, list(GROUP_OF), n=1)
            raise ValueError(f"config key 'stages[{i}].type': unknown stage type {s.type!r}"
                             + (f"; did you mean {near[0]!r}?" if near else f"; known: {sorted(GROUP_OF)}"))
        rank = GROUP_ORDER.index(GROUP_OF[s.type])
        if rank < last:
            raise ValueError(f"config key 'stages[{i}].type': {s.type!r} after {stages[i - 1].type!r} is out of "
                             "order; the order is tscd/adversarial -> feedback -> score_distill")
        last = rank
        if s.type == "score_distill" and s.segments != 1:
            raise ValueError(f"config key 'stages[{i}].segments': score_distill trains 1-step generation; "
                             f"set segments: 1 (got {s.segments})")
    if stages and GROUP_OF.get(stages[0].type) != "tscd" and not init_lora:
        raise ValueError(f"config key 'stages[0].type': {stages[0].type!r} runs on top of a TSCD LoRA: put "
                         "tscd stages before it or set model.init_lora to a previous run's LoRA .safetensors")

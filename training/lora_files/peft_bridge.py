"""Between live peft adapters on a UNet and kohya modules: read an adapter off the model, fold
modules into base weights. (Loading a kohya file AS an adapter is models.adapters.add_kohya_adapter.)"""
from __future__ import annotations

import torch

from training.lora_files.kohya import LoraModule, kohya_name


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


def weight_layers(model: torch.nn.Module) -> dict:
    """{kohya key: the Linear / Conv2d holding the base weight} (a peft layer's base_layer)."""
    by_name = {}
    for path, mod in model.named_modules():
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            by_name.setdefault(kohya_name(path.replace(".base_layer", "")), base)
    return by_name


@torch.no_grad()
def fold_kohya_into(model: torch.nn.Module, modules: dict[str, LoraModule], scale: float = 1.0, source="LoRA"):
    """W += scale * delta for every module (exact); works on plain and peft-wrapped models."""
    by_name = weight_layers(model)
    missing = [n for n in modules if n not in by_name]
    if missing:
        raise ValueError(f"{source}: {len(missing)} modules do not exist in the model, e.g. {missing[:3]}")
    for name, m in modules.items():
        weight = by_name[name].weight
        delta = m.delta()
        if delta.shape != weight.shape:
            raise ValueError(f"{source}: {name} delta {tuple(delta.shape)} != weight {tuple(weight.shape)}")
        weight.add_((scale * delta).to(weight.dtype))

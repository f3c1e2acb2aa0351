"""LoRA on the UNet via peft (diffusers' add_adapter), teacher = same UNet with adapters disabled."""
from __future__ import annotations

import contextlib

import torch


def add_lora(unet, rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    unet.requires_grad_(False)
    names = {n for n, _ in unet.named_modules()}
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ValueError(f"config key 'lora.targets': none of {targets} matches a UNet module")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                init_lora_weights="gaussian"))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def adapters_disabled(unet):
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class EMA:
    """EMA of the LoRA parameters; `swapped()` puts the EMA values in place for a no-grad call."""

    def __init__(self, params, decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        if self.decay > 0:
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        if self.decay == 0:
            yield
            return
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self):
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state):
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"shadow.{i}"])

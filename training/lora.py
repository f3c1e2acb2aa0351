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


# --- several LoRA adapters on one UNet (one per stage group, Hyper-SD style) ---------------------

def add_named_lora(unet, name: str, rank: int, alpha: float, targets, init="gaussian"):
    """Add another peft adapter `name`; returns its parameters (fp32). B starts at 0 (delta 0)."""
    import warnings

    from peft import LoraConfig

    with warnings.catch_warnings():  # "multiple adapters in the model": intended here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                    init_lora_weights=init), adapter_name=name)
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
    return params


def _tuner_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


class AdapterStack:
    """Which adapters are active (summed into the forward) and which of them train.

    peft's set_adapter / enable_adapters mark every active adapter trainable; a frozen earlier
    stage LoRA must stay frozen, so requires_grad is re-applied after every switch.
    """

    def __init__(self, unet):
        self.unet, self.active, self.trainable = unet, [], []

    def _apply(self):
        for layer in _tuner_layers(self.unet):
            layer.set_adapter(self.active)
        for n, p in self.unet.named_parameters():
            if "lora_" in n:
                p.requires_grad_(any(f".{a}." in n for a in self.trainable))

    def use(self, active, trainable):
        self.active, self.trainable = list(active), list(trainable)
        self._apply()

    @contextlib.contextmanager
    def disabled(self):
        """The frozen base model (all adapters off): the teacher."""
        layers = _tuner_layers(self.unet)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            self._apply()

    @contextlib.contextmanager
    def only(self, active, trainable=()):
        """Temporarily switch to other adapters (e.g. the fake-score LoRA on the shared base)."""
        saved = self.active, self.trainable
        self.use(active, trainable)
        try:
            yield
        finally:
            self.use(*saved)


def add_kohya_adapter(unet, name: str, modules: dict, source: str):
    """Load kohya LoRA modules as a (frozen) peft adapter, exactly.

    Ranks may differ per module: every module is zero-padded to the largest rank and its
    alpha / rank scale is folded into `down`, so one LoraConfig (alpha = rank) reproduces each delta.
    """
    from .merge import kohya_name

    paths = {}
    for p, m in unet.named_modules():  # a layer already wrapped by peft keeps its weight in .base_layer
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in p:
            p = p.replace(".base_layer", "")
            paths[kohya_name(p)] = p
    missing = [k for k in modules if k not in paths]
    if missing:
        raise ValueError(f"{source}: {len(missing)} LoRA modules do not exist in this UNet, e.g. {missing[:3]}")
    rank = max(m.rank for m in modules.values())
    add_named_lora(unet, name, rank, float(rank), [paths[k] for k in modules], init=True)
    layers = dict(unet.named_modules())
    with torch.no_grad():
        for key, m in modules.items():
            layer = layers[paths[key]]
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            if a.shape[1:] != m.down.shape[1:] or b.shape[0] != m.up.shape[0]:
                raise ValueError(f"{source}: {key} shapes down {tuple(m.down.shape)} / up {tuple(m.up.shape)} "
                                 f"do not fit the UNet layer {paths[key]}")
            a.zero_()
            b.zero_()
            a[: m.rank] = (m.alpha / m.rank) * m.down.to(a.dtype)
            b[:, : m.rank] = m.up.to(b.dtype).reshape(b.shape[0], m.rank, *b.shape[2:])
    return rank

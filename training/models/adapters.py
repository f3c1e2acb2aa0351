"""LoRA adapters on the one shared UNet (peft, through diffusers' add_adapter).

Each stage group trains its own adapter on top of the earlier, frozen ones; the teacher is the same
UNet with every adapter off (`AdapterStack.disabled`), so no second copy of the base is held.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

# The UNet layers a LoRA adapts by default (config key lora.targets).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def check_targets(unet, targets) -> None:
    """Some UNet module is named like a target (peft's rule: the whole name or its last dotted parts)."""
    from training.errors import ConfigError

    names = {n for n, _ in unet.named_modules()}
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ConfigError(f"config key 'lora.targets': none of {list(targets)} matches a UNet module")


def add_adapter(unet, name: str, rank: int, alpha: float, targets=UNET_LORA_TARGETS, init="gaussian",
                trainable: bool = False) -> list:
    """Add peft LoRA adapter `name` (B starts at 0, so its delta is 0); returns its parameters in fp32.

    trainable=True freezes everything else and makes this adapter the active, trainable one (a stage
    used on its own); training.run leaves that to `AdapterStack`."""
    from peft import LoraConfig

    if not name.isidentifier() or hasattr(torch.nn.Module, name):
        raise ValueError(f"LoRA adapter name {name!r}: expected an identifier that is not an nn.Module "
                         "attribute (peft stores adapters in ModuleDicts: 'eval' or 'train' would shadow methods)")
    check_targets(unet, targets)
    if trainable:
        unet.requires_grad_(False)
    with warnings.catch_warnings():  # "multiple adapters in the model": intended here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                    init_lora_weights=init), adapter_name=name)
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
    if trainable:
        unet.set_adapter(name)
        for p in params:
            p.requires_grad_(True)
    return params


def add_kohya_adapter(unet, name: str, modules: dict, source: str) -> int:
    """Load kohya LoRA modules as a (frozen) peft adapter, exactly; returns its rank.

    Ranks may differ per module: every module is zero-padded to the largest rank and its
    alpha / rank scale is folded into `down`, so one LoraConfig (alpha = rank) reproduces each delta.
    """
    from training.lora_files.kohya import kohya_name

    paths = {}
    for p, m in unet.named_modules():  # a layer already wrapped by peft keeps its weight in .base_layer
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in p:
            p = p.replace(".base_layer", "")
            paths[kohya_name(p)] = p
    missing = [k for k in modules if k not in paths]
    if missing:
        raise ValueError(f"{source}: {len(missing)} LoRA modules do not exist in this UNet, e.g. {missing[:3]}")
    rank = max(m.rank for m in modules.values())
    add_adapter(unet, name, rank, float(rank), [paths[k] for k in modules], init=True)
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


class EMA:
    """EMA of a LoRA's parameters; `swapped()` puts the EMA values in place for a no-grad call."""

    def __init__(self, params, decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        if self.decay > 0:
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def restart(self):
        """Shadow = the live weights (a new TSCD stage's target starts from where the student is)."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach())

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

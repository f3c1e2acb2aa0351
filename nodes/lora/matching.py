"""Which LoRA modules a model will take: the name in ComfyUI's key map, the module's own tensors
combinable, and the weight change they make the shape of the model's weight.

ComfyUI's loader (comfy/lora.py, comfy/weight_adapter/) takes any tensors under a known name and only
combines them when the model is patched; if that fails it logs ``mat1 and mat2 shapes cannot be
multiplied`` and leaves the weight as it was, so a LoRA whose down and up ranks disagree was applied
as a silent no-op. Every module's shapes are therefore checked here the way ComfyUI combines them:
LoRA (up @ down, LoCon ``lora_mid``), LoHa ((w1_a @ w1_b) * (w2_a @ w2_b), Tucker ``hada_t``), LoKr
(kron(w1, w2)), full (``diff``, ``diff_b``) and norm (``w_norm``, ``b_norm``) modules.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .keys import split_key

KIND_ROLES = {
    "LoRA": frozenset({"up", "down", "mid"}),
    "LoHa": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "LoKr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "full": frozenset({"diff", "diff_b"}),
    "norm": frozenset({"w_norm", "b_norm"}),
}
# ComfyUI reshapes these kinds' weight change to the weight's shape; full and norm must match exactly.
RESHAPED_KINDS = ("LoRA", "LoHa", "LoKr")
ROLE_NAMES = {"up": "lora_up", "down": "lora_down", "mid": "lora_mid"}  # as the roles read in messages


class ModuleDefect(ValueError):
    """A module's own tensors cannot be combined; ``role`` names the offending tensor."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role


@dataclass
class MatchReport:
    matched: list  # module names found in the model's key map with compatible shapes
    unmatched: list  # module names the model has no weight for
    shape_mismatch: list  # (module, the LoRA's weight change shape, the model weight's shape)
    kinds: dict = field(default_factory=dict)  # matched module -> "LoRA", "LoHa", "LoKr", "full" or "norm"
    defects: list = field(default_factory=list)  # (key of the offending tensor, what is wrong with its module)
    unknown_keys: list = field(default_factory=list)  # tensors of no module kind ComfyUI applies

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched) + len(self.shape_mismatch)

    def kind_counts(self) -> dict:
        return dict(Counter(self.kinds.values()))


def _name(role: str) -> str:
    return ROLE_NAMES.get(role, role)


def _need(shapes: dict, *roles: str) -> None:
    missing = [r for r in roles if r not in shapes]
    if missing:
        present = next(iter(shapes))
        raise ModuleDefect(present, f"has {_name(present)} but no {', '.join(_name(r) for r in missing)}")


def _lora_change(s: dict) -> dict:
    _need(s, "up", "down")
    up, down, mid = s["up"], s["down"], s.get("mid")
    if len(down) not in (2, 4) or len(up) != len(down):
        raise ModuleDefect("up", f"lora_up {up} and lora_down {down} must both be 2-D (linear) or 4-D (conv)")
    rank = down[0]
    if math.prod(up[1:]) != rank:
        raise ModuleDefect("up", f"lora_down has rank {rank} but lora_up has rank {math.prod(up[1:])} "
                                 f"(lora_down {down}, lora_up {up}); up @ down cannot be multiplied")
    if mid is None:
        return {"weight": (up[0], *down[1:])}
    if len(mid) != 4 or mid[:2] != (rank, rank) or math.prod(down[2:]) != 1:
        raise ModuleDefect("mid", f"lora_mid {mid} does not fit lora_down {down} (expected ({rank}, {rank}, kh, kw) "
                                  "after a 1x1 lora_down)")
    return {"weight": (up[0], down[1], *mid[2:])}


def _product(s: dict, a_role: str, b_role: str, t_role: str | None) -> tuple:
    """Shape of a @ b, or of the Tucker product einsum('ijkl,jr,ip->prkl', t, b, a) when t is given."""
    _need(s, a_role, b_role)
    a, b, t = s[a_role], s[b_role], s.get(t_role) if t_role else None
    if len(a) != 2 or len(b) != 2:
        raise ModuleDefect(a_role, f"{a_role} {a} and {b_role} {b} must be 2-D")
    if t is None:
        if a[1] != b[0]:
            raise ModuleDefect(b_role, f"{a_role} has rank {a[1]} but {b_role} has rank {b[0]} ({a_role} {a}, "
                                       f"{b_role} {b}); they cannot be multiplied")
        return a[0], b[1]
    if len(t) != 4 or t[0] != a[0] or t[1] != b[0]:
        raise ModuleDefect(t_role, f"{t_role} {t} does not fit {a_role} {a} and {b_role} {b}")
    return a[1], b[1], t[2], t[3]


def _loha_change(s: dict) -> dict:
    if ("hada_t1" in s) != ("hada_t2" in s):
        raise ModuleDefect("hada_t1" if "hada_t1" in s else "hada_t2", "has one of hada_t1 / hada_t2 but not both")
    m1 = _product(s, "hada_w1_a", "hada_w1_b", "hada_t1")
    m2 = _product(s, "hada_w2_a", "hada_w2_b", "hada_t2")
    if m1 != m2:
        raise ModuleDefect("hada_w2_a", f"the two Hadamard factors have different shapes: {m1} vs {m2}")
    return {"weight": m1}


def _kron_factor(s: dict, n: str) -> tuple:
    if f"lokr_w{n}" in s:
        return s[f"lokr_w{n}"]
    if f"lokr_w{n}_a" not in s and f"lokr_w{n}_b" not in s:
        raise ModuleDefect(next(iter(s)), f"has no lokr_w{n} (nor lokr_w{n}_a + lokr_w{n}_b)")
    return _product(s, f"lokr_w{n}_a", f"lokr_w{n}_b", "lokr_t2" if n == "2" else None)


def _lokr_change(s: dict) -> dict:
    w1, w2 = _kron_factor(s, "1"), _kron_factor(s, "2")
    if len(w1) != 2:
        raise ModuleDefect("lokr_w1", f"lokr_w1 must be 2-D, got {w1}")
    if len(w2) == 4:
        w1 = (*w1, 1, 1)  # ComfyUI unsqueezes w1 for a conv w2
    n = max(len(w1), len(w2))
    w1, w2 = (1,) * (n - len(w1)) + tuple(w1), (1,) * (n - len(w2)) + tuple(w2)
    return {"weight": tuple(x * y for x, y in zip(w1, w2))}


def _diff_change(s: dict, weight_role: str, bias_role: str) -> dict:
    out = {"weight": s.get(weight_role), "bias": s.get(bias_role)}
    return {k: v for k, v in out.items() if v is not None}


CHANGE_OF = {
    "LoRA": _lora_change, "LoHa": _loha_change, "LoKr": _lokr_change,
    "full": lambda s: _diff_change(s, "diff", "diff_b"), "norm": lambda s: _diff_change(s, "w_norm", "b_norm"),
}


def module_kind(roles) -> str:
    kinds = [kind for kind, kind_roles in KIND_ROLES.items() if kind_roles & set(roles)]
    if len(kinds) > 1:
        raise ModuleDefect(next(iter(roles)), f"mixes {kinds[0]} and {kinds[1]} tensors in one module")
    if not kinds:
        role = next(iter(roles))
        raise ModuleDefect(role, f"has only {', '.join(sorted(_name(r) for r in roles))} and no weights")
    return kinds[0]


def module_change(shapes: dict) -> tuple[str, dict]:
    """(kind, {"weight" / "bias": shape of the change}) of one module's tensor shapes, or ModuleDefect."""
    alpha = shapes.get("alpha")
    if alpha is not None and math.prod(alpha) != 1:
        raise ModuleDefect("alpha", f"alpha must be one number, got a tensor of shape {alpha}")
    kind = module_kind([r for r in shapes if r not in ("alpha", "dora_scale")] or list(shapes))
    return kind, CHANGE_OF[kind]({r: s for r, s in shapes.items() if r not in ("alpha", "dora_scale")})


def group_modules(state_dict: dict) -> tuple[dict, list]:
    """({module: {role: key}}, keys of no known role)."""
    modules, unknown = {}, []
    for key in state_dict:
        split = split_key(key)
        if split is None:
            unknown.append(key)
        else:
            modules.setdefault(split[0], {})[split[1]] = key
    return modules, unknown


class ModelWeightShapes:
    """Weight shapes of torch modules by state-dict key, looked up through each module's own ``_modules`` /
    ``_parameters`` / ``_buffers`` dicts, so matching reads only the weights a LoRA names. Building the
    UNet's and text encoders' state dicts instead cost 3-6 ms a load at SD1.5 size (this: 0.7 ms);
    getattr through nn.Module, which raises and formats an AttributeError per wrong root, cost as much as
    the walk (010a5a1, reverted). A key the module tree does not reach (a model with a custom state dict)
    falls back to the full state dicts, built once."""

    def __init__(self, *roots):
        self.roots, self._all = roots, None

    def get(self, key: str, default=None):
        for root in self.roots:
            tensor = _tensor_at(root, key)
            if tensor is not None:
                return tuple(tensor.shape)
        if self._all is None:
            self._all = {k: tuple(v.shape) for root in self.roots for k, v in root.state_dict().items()}
        return self._all.get(key, default)


def _tensor_at(module, key: str):
    *path, name = key.split(".")
    for part in path:
        module = getattr(module, "_modules", {}).get(part)
        if module is None:
            return None
    found = getattr(module, "_parameters", {}).get(name)
    return found if found is not None else getattr(module, "_buffers", {}).get(name)


def _model_shape(target, part: str, weight_shapes) -> tuple | None:
    """Shape the change lands on: the weight (or its bias), narrowed where ComfyUI maps a slice."""
    key, narrow = (target if isinstance(target, tuple) else (target, None))
    if part == "bias":
        key = key[: -len(".weight")] + ".bias" if key.endswith(".weight") else key
    shape = weight_shapes.get(key)
    if shape is None or narrow is None or part == "bias":
        return None if shape is None else tuple(shape)
    dim, _, size = narrow
    return tuple(size if i == dim else n for i, n in enumerate(shape))


def _fits(kind: str, change: tuple, shape: tuple) -> bool:
    if kind in RESHAPED_KINDS:  # ComfyUI reshapes the change to the weight's shape
        return change[0] == shape[0] and math.prod(change) == math.prod(shape)
    return tuple(change) == tuple(shape)


def match_modules(state_dict: dict, key_map: dict, weight_shapes, grouped: tuple | None = None) -> MatchReport:
    """Which LoRA modules ComfyUI will apply: combinable tensors, name in ``key_map``, change fits the weight.

    ``key_map`` maps LoRA module names to model state-dict keys (ComfyUI's model_lora_keys_*), some to
    ``(key, (dim, start, size))`` slices; ``weight_shapes`` maps model keys to shapes (a dict or
    ``ModelWeightShapes``: anything with ``get``); ``grouped``: ``group_modules(state_dict)`` when the
    caller has it already.
    """
    modules, unknown = grouped if grouped is not None else group_modules(state_dict)
    report = MatchReport([], [], [], unknown_keys=unknown)
    for name, roles in sorted(modules.items()):
        try:
            kind, change = module_change({role: tuple(state_dict[key].shape) for role, key in roles.items()})
        except ModuleDefect as e:
            report.defects.append((roles.get(e.role, next(iter(roles.values()))), str(e)))
            continue
        target = key_map.get(name)
        if target is None:
            report.unmatched.append(name)
            continue
        bad = [(change[p], shape) for p in change
               if (shape := _model_shape(target, p, weight_shapes)) is not None and not _fits(kind, change[p], shape)]
        if bad:
            report.shape_mismatch.append((name, *bad[0]))
            continue
        report.matched.append(name)
        report.kinds[name] = kind
    return report

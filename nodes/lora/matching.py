"""Which LoRA modules a model will take: names in ComfyUI's key map, shapes equal to the weights'."""
from __future__ import annotations

from dataclasses import dataclass

from .keys import split_key


@dataclass
class MatchReport:
    matched: list  # module names found in the model's key map with compatible shapes
    unmatched: list  # module names the model has no weight for
    shape_mismatch: list  # (module, lora (out, in), model (out, in))

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched) + len(self.shape_mismatch)


def match_modules(state_dict: dict, key_map: dict, weight_shapes: dict) -> MatchReport:
    """Which LoRA modules ComfyUI will apply: name in ``key_map`` and up@down shape == weight shape.

    ``key_map`` maps LoRA module names to model state-dict keys (ComfyUI's model_lora_keys_*),
    ``weight_shapes`` maps model keys to shapes.
    """
    modules: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        split = split_key(key)
        if split is None or split[1] == "alpha":
            continue
        modules.setdefault(split[0], {})[split[1]] = tensor
    report = MatchReport([], [], [])
    for name, parts in sorted(modules.items()):
        target = key_map.get(name)
        if target is None:
            report.unmatched.append(name)
            continue
        if isinstance(target, tuple):  # ComfyUI maps some keys to (key, (dim, start, size)) slices
            report.matched.append(name)
            continue
        shape = weight_shapes.get(target)
        up, down = parts.get("up"), parts.get("down")
        if shape is not None and up is not None and down is not None and len(shape) >= 2:
            lora_shape = (up.shape[0], down.shape[1])
            if lora_shape != tuple(shape[:2]):
                report.shape_mismatch.append((name, lora_shape, tuple(shape[:2])))
                continue
        report.matched.append(name)
    return report

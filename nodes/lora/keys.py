"""LoRA key formats: which format a key is in, and renaming SD1.5/SDXL keys to kohya names.

ComfyUI 0.3.64 loads kohya keys (``lora_unet_<path>.lora_up/lora_down/alpha``) fully but silently
drops PEFT / diffusers attention keys (``unet.<path>.to_q.lora_A``), so every SD1.5/SDXL format is
rewritten here to kohya names; SD3/FLUX (``transformer.*``, ``double_blocks.*``) keys are left as
they are because ComfyUI's own key map covers them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
              "time_embedding.", "add_embedding.")
# LyCORIS roles (key suffix without the dot), as ComfyUI's comfy/weight_adapter (loha.py, lokr.py)
# and comfy/lora.py (full "diff", norms) read them.
LYCORIS_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                 "diff", "diff_b", "w_norm", "b_norm")
# (suffix, role) in the order they are tried; role is "down", "up", "mid", "alpha", "dora_scale" or a LyCORIS role.
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # old diffusers: to_q_lora.down
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"),
) + tuple(("." + role, role) for role in LYCORIS_ROLES)
_KOHYA_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight"}
_OLD_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_key(key: str) -> tuple[str, str, bool] | None:
    """(module path, role, old_diffusers) or None when the key is no LoRA tensor we know."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, suffix.startswith("_lora")
    return None


def _target(path: str, old_diffusers: bool) -> tuple[str, str] | None:
    """(kohya prefix, dotted module path) for an SD1.5/SDXL path, None for anything else."""
    for prefix, kohya in (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_")):
        if path.startswith(prefix):
            return kohya, _fix_text_encoder(path[len(prefix):], old_diffusers)
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    if path.startswith("text_model."):
        return "lora_te1_", _fix_text_encoder(path, old_diffusers)
    if path.startswith("unet."):
        path = path[len("unet."):]
    if path.startswith(UNET_ROOTS):
        return "lora_unet_", _fix_unet(path, old_diffusers)
    return None


def _fix_unet(path: str, old: bool) -> str:
    path = path.replace(".processor.", ".")
    if old and path.endswith(".to_out"):
        path += ".0"
    return path


def _fix_text_encoder(path: str, old: bool) -> str:
    path = path.replace(".processor.", ".")
    head, _, last = path.rpartition(".")
    if old and last in _OLD_TE_NAMES:
        return f"{head}.{_OLD_TE_NAMES[last]}"
    if last == "to_out":  # old format written with .lora.up on to_out
        return f"{head}.out_proj"
    return path


@dataclass
class Conversion:
    state_dict: dict
    formats: dict = field(default_factory=dict)  # format name -> number of tensors
    unknown: list = field(default_factory=list)  # keys passed through untouched
    origin: dict = field(default_factory=dict)  # new key -> the key as the file wrote it (for error messages)


def key_format(key: str) -> str:
    if key.startswith(KOHYA_PREFIXES):
        return "kohya"
    split = split_key(key)
    if split is None:
        return "unknown"
    path, role, old = split
    if role in LYCORIS_ROLES:
        return "lycoris"
    if old or ".processor." in path:
        return "diffusers-old"
    if key.startswith("base_model.model."):
        return "peft"
    if ".lora_A." in key or ".lora_B." in key:
        return "peft"
    return "diffusers"


def to_kohya(state_dict: dict) -> Conversion:
    """Rename SD1.5/SDXL LoRA keys of any known format to kohya names ComfyUI maps completely."""
    out, conv = {}, Conversion({})
    for key, tensor in state_dict.items():
        fmt = key_format(key)
        conv.formats[fmt] = conv.formats.get(fmt, 0) + 1
        new_key = key
        if fmt not in ("kohya", "unknown"):
            path, role, old = split_key(key)
            target = _target(path, old)
            if target is not None:
                prefix, module = target
                new_key = prefix + module.replace(".", "_") + _KOHYA_SUFFIX.get(role, "." + role)
        if fmt == "unknown" or new_key == key and fmt != "kohya":
            conv.unknown.append(key)
        if new_key in out:
            raise ValueError(f"lora: two keys map to {new_key!r} (duplicate LoRA entries for one module)")
        out[new_key] = tensor
        conv.origin[new_key] = key
    conv.state_dict = out
    return conv


def module_of(key: str) -> str | None:
    split = split_key(key)
    return None if split is None else split[0]

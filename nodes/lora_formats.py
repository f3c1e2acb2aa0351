"""LoRA file handling without ComfyUI: safe paths, safetensors checks, key-format conversion.

ComfyUI 0.3.64 loads kohya keys (``lora_unet_<path>.lora_up/lora_down/alpha``) fully but silently
drops PEFT / diffusers attention keys (``unet.<path>.to_q.lora_A``), so every SD1.5/SDXL format is
rewritten here to kohya names; SD3/FLUX (``transformer.*``, ``double_blocks.*``) keys are left as
they are because ComfyUI's own key map covers them.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

# -- paths ------------------------------------------------------------------------------------


def safe_relative_name(name: str, input_name: str = "lora_name") -> str:
    """Reject absolute paths, drive letters and ``..`` so a widget value cannot leave the folder."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{input_name}: expected a file name inside the loras folder, got {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or os.path.isabs(name):
        raise ValueError(f"{input_name}: {name!r} is an absolute path; expected a name relative to the loras folder")
    if any(part == ".." for part in norm.split("/")):
        raise ValueError(f"{input_name}: {name!r} contains '..'; expected a name inside the loras folder")
    return norm


def resolve_inside(folder: str, name: str, input_name: str = "lora_name") -> str:
    """``folder/name`` after :func:`safe_relative_name`, checked (symlinks resolved) to stay inside."""
    rel = safe_relative_name(name, input_name)
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"{input_name}: {name!r} resolves outside the loras folder {root}")
    return path


# -- safetensors ------------------------------------------------------------------------------

_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_MAX_HEADER = 100 * 1024 * 1024


def check_safetensors(path: str, input_name: str = "lora_name") -> dict:
    """Validate the safetensors header without loading tensors; return the parsed header.

    Pickle-based files (.ckpt/.pt/.bin) are refused, never unpickled.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{input_name}: file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if any(head.startswith(m) for m in _PICKLE_MAGICS) or not path.lower().endswith(".safetensors"):
            raise ValueError(
                f"{input_name}: {os.path.basename(path)} is not a .safetensors file; only safetensors LoRAs "
                "are loaded (pickle files such as .ckpt/.pt/.bin are never opened, for safety)"
            )
        if len(head) < 8:
            raise ValueError(f"{input_name}: {path} is empty or truncated ({size} bytes); expected a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 1 or header_len > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{input_name}: {path} has a corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{input_name}: {path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{input_name}: {path} has a corrupt safetensors header")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2 or offsets[1] > data_len or offsets[0] > offsets[1]:
            raise ValueError(
                f"{input_name}: {path} is truncated or corrupt: tensor {key!r} lies outside the file's data"
            )
    return header


def load_safetensors(path: str, input_name: str = "lora_name") -> dict:
    check_safetensors(path, input_name)
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{input_name}: could not read {path} as safetensors: {e}") from e


# -- key conversion ---------------------------------------------------------------------------

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
              "time_embedding.", "add_embedding.")
# (suffix, role) in the order they are tried; role is "down", "up" or "alpha".
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # old diffusers: to_q_lora.down
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_KOHYA_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
_OLD_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _split_suffix(key: str) -> tuple[str, str, bool] | None:
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


def key_format(key: str) -> str:
    if key.startswith(KOHYA_PREFIXES):
        return "kohya"
    split = _split_suffix(key)
    if split is None:
        return "unknown"
    path, role, old = split
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
            path, role, old = _split_suffix(key)
            target = _target(path, old)
            if target is not None:
                prefix, module = target
                new_key = prefix + module.replace(".", "_") + _KOHYA_SUFFIX[role]
        if fmt == "unknown" or new_key == key and fmt != "kohya":
            conv.unknown.append(key)
        if new_key in out:
            raise ValueError(f"lora: two keys map to {new_key!r} (duplicate LoRA entries for one module)")
        out[new_key] = tensor
    conv.state_dict = out
    return conv


def module_of(key: str) -> str | None:
    split = _split_suffix(key)
    return None if split is None else split[0]


# -- families ---------------------------------------------------------------------------------

_MODEL_FAMILIES = {
    "SD15": "SD15", "SD15_instructpix2pix": "SD15",
    "SD20": "SD2", "SD21UnclipL": "SD2", "SD21UnclipH": "SD2",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL", "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "KOALA_700M": "SDXL",
    "KOALA_1B": "SDXL", "SDXL_instructpix2pix": "SDXL",
    "SD3": "SD3", "Flux": "FLUX", "FluxSchnell": "FLUX", "FluxInpaint": "FLUX",
}


def model_family(model_config_class_name: str) -> str:
    return _MODEL_FAMILIES.get(model_config_class_name, model_config_class_name)


def lora_family(state_dict: dict) -> str | None:
    """Best guess of the base family a LoRA was trained for, from key names and cross-attn widths."""
    keys = list(state_dict)
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "FLUX"
    if any("joint_blocks" in k or "context_block" in k or ".add_q_proj" in k for k in keys):
        return "SD3"
    for k, t in state_dict.items():
        split = _split_suffix(k)
        if split and split[1] == "down" and split[0].replace(".", "_").endswith("attn2_to_k") and t.ndim >= 2:
            return {768: "SD15", 1024: "SD2", 2048: "SDXL"}.get(t.shape[1])
    if any(k.startswith("lora_te2_") or k.startswith("text_encoder_2.") for k in keys):
        return "SDXL"
    return None


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
        split = _split_suffix(key)
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

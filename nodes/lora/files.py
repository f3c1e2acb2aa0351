"""Opening a LoRA file safely: names that stay inside the loras folder, safetensors checked first.

A widget value can never leave the folder (absolute paths, drive letters, ``..`` and symlinks out
are refused); the safetensors header and every tensor's offsets are checked before any tensor is
read, and pickle files are never opened.
"""
from __future__ import annotations

import json
import os
import re
import struct


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


def read_lora_file(path: str, input_name: str = "lora_name") -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, its header checked and parsed once (parsing the JSON
    header of a full-size SDXL LoRA, 3,162 tensors, takes a few ms: the loader used to do it twice)."""
    header = check_safetensors(path, input_name)
    return _load_checked(path, input_name), header.get("__metadata__") or {}


def load_safetensors(path: str, input_name: str = "lora_name") -> dict:
    return read_lora_file(path, input_name)[0]


def _load_checked(path: str, input_name: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{input_name}: could not read {path} as safetensors: {e}") from e

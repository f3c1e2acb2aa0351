"""Workflow tooling without ComfyUI: node schemas, UI -> API conversion, API validation.

Schemas are ComfyUI ``/object_info`` listings: core ComfyUI 0.3.64 (``shared/comfyui/
object_info-0.3.64.json`` beside the repo, override with HYPERSD_OBJECT_INFO) plus this pack's
nodes (``workflows/schemas/pack_object_info.json``, regenerated inside ComfyUI by
``python -m workflows.pack_schema`` with COMFYUI_PATH set).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# in a subfolder: any *.json directly in workflows/ would be listed as a template by ComfyUI
PACK_SCHEMA = REPO / "workflows" / "schemas" / "pack_object_info.json"
UI_DIR = REPO / "example_workflows"
API_DIR = REPO / "workflows" / "api"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name", "lora_name", "vae_name", "control_net_name", "clip_name",
                     "clip_name1", "clip_name2", "clip_name3", "model_name"}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def core_schema_path() -> Path:
    override = os.environ.get("HYPERSD_OBJECT_INFO")
    return Path(override) if override else REPO.parent / "shared" / "comfyui" / "object_info-0.3.64.json"


def load_schemas(core_path: Path | None = None) -> dict:
    core_path = core_path or core_schema_path()
    if not core_path.is_file():
        raise FileNotFoundError(f"core object_info not found at {core_path} (set HYPERSD_OBJECT_INFO)")
    schemas = json.loads(core_path.read_text())
    schemas.update(json.loads(PACK_SCHEMA.read_text()))
    return schemas


def input_kind(spec: list) -> str:
    """'COMBO' for choice lists (old list form or V3 "COMBO"), else the type name."""
    head = spec[0]
    return "COMBO" if isinstance(head, list) else head


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_choices(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else input_options(spec).get("options", [])


def ordered_inputs(schema: dict):
    """(name, spec, required) in the order the front end builds widgets and slots."""
    inputs = schema["input"]
    order = schema.get("input_order") or {k: list(v) for k, v in inputs.items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, inputs[section][name], section == "required"


def is_widget(spec: list) -> bool:
    return input_kind(spec) in WIDGET_TYPES


def extra_widget_values(spec: list) -> int:
    """Front-end widgets stored after an input's value in widgets_values but not sent to /prompt."""
    opts = input_options(spec)
    return int(bool(opts.get("control_after_generate"))) + int(bool(opts.get("image_upload")))


def ui_to_api(ui: dict, schemas: dict) -> dict:
    """Convert a UI-format workflow (version 0.4) to the API format POST /prompt takes."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        schema = schemas.get(node["type"])
        if schema is None:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']!r}")
        connected = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                connected[slot["name"]] = [str(origin), origin_slot]
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec, _ in ordered_inputs(schema):
            if is_widget(spec):
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                inputs[name] = values.pop(0)
                del values[: extra_widget_values(spec)]
            if name in connected:
                inputs[name] = connected[name]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title") or schema.get("display_name") or node["type"]}}
    return api


def _check_value(where: str, name: str, spec: list, value, errors: list) -> None:
    kind, opts = input_kind(spec), input_options(spec)
    if kind == "COMBO":
        choices = combo_choices(spec)
        if name in MODEL_FILE_INPUTS and value not in choices:
            # the core listing was made with empty model folders: only fixed entries
            # (e.g. VAELoader's "pixel_space") are listed, so check the file name instead
            choices = []
        if choices:
            if value not in choices:
                errors.append(f"{where}: {name}={value!r} not in {choices[:8]}{'...' if len(choices) > 8 else ''}")
        elif not (isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)):
            errors.append(f"{where}: {name}={value!r} is not a model file name ({', '.join(MODEL_EXTENSIONS)})")
        return
    if kind == "BOOLEAN":
        ok = isinstance(value, bool)
    elif kind == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "FLOAT":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "STRING":
        ok = isinstance(value, str)
    else:
        errors.append(f"{where}: {name} is a {kind} input and must be a link, got {value!r}")
        return
    if not ok:
        errors.append(f"{where}: {name}={value!r} is not a {kind}")
    elif kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            errors.append(f"{where}: {name}={value} outside [{lo}, {hi}]")


def _types_match(out_type, in_spec: list) -> bool:
    kind = input_kind(in_spec)
    if isinstance(out_type, list):  # a V3 Combo output lists its choices
        return kind == "COMBO"
    if "*" in (out_type, kind):
        return True
    if kind == "COMBO":
        return out_type == "COMBO" or isinstance(out_type, list)
    return set(out_type.split(",")) & set(kind.split(",")) != set()


def validate_api(api: dict, schemas: dict) -> list[str]:
    """Every problem POST /prompt validation would report (and model-name sanity); [] when valid."""
    errors = []
    if not any(schemas.get(n.get("class_type"), {}).get("output_node") for n in api.values()):
        errors.append("workflow has no output node (e.g. SaveImage)")
    for node_id, node in api.items():
        cls = node.get("class_type")
        where = f"node {node_id} ({cls})"
        schema = schemas.get(cls)
        if schema is None:
            errors.append(f"{where}: unknown node type")
            continue
        known = {}
        for name, spec, required in ordered_inputs(schema):
            known[name] = spec
            if name not in node["inputs"]:
                if required:
                    errors.append(f"{where}: missing required input {name!r}")
                continue
            value = node["inputs"][name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                origin = api.get(value[0])
                if origin is None:
                    errors.append(f"{where}: {name} links to missing node {value[0]}")
                    continue
                outputs = schemas.get(origin["class_type"], {}).get("output", [])
                if not 0 <= value[1] < len(outputs):
                    errors.append(f"{where}: {name} links to output {value[1]} of {origin['class_type']} (has {len(outputs)})")
                elif not _types_match(outputs[value[1]], spec):
                    errors.append(f"{where}: {name} expects {input_kind(spec)}, linked {outputs[value[1]]}")
            else:
                _check_value(where, name, spec, value, errors)
        for name in node["inputs"]:
            if name not in known:
                errors.append(f"{where}: unexpected input {name!r}")
    return errors


def dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_or_check(path: Path, text: str, check: bool) -> int:
    """Write `text` to `path` (atomically), or with `check` only say whether it is already there: exit code."""
    if check:
        same = path.is_file() and path.read_text() == text
        print("up to date" if same else f"stale: {path}")
        return 0 if same else 1
    write_atomic(path, text)
    print(f"wrote {path}")
    return 0

"""Atomic accelerate checkpoints: save_state into a temp folder, then rename to step_XXXXXX."""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(out_dir):
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir):
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root)
             if (m := STEP_DIR.match(n)) and os.path.isfile(os.path.join(root, n, "trainer_state.json"))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, out_dir, step, keep, extra=None, data_state=None):
    """data_state: a streaming data source's position (a small JSON dict, every process's streams), kept in
    trainer_state.json so --resume continues where the data stopped."""
    root = checkpoint_dir(out_dir)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp-step_{step:06d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra:
            save_extra(tmp, extra)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **({"data": data_state} if data_state is not None else {})}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume, out_dir):
    """'latest' -> newest complete checkpoint in out_dir (None if there is none); else a path."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no trainer_state.json)")
    return resume


def load_checkpoint(accelerator, path):
    accelerator.load_state(path)
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["step"]


def load_data_state(path):
    """The streaming data source's position saved by save_checkpoint (None: the run had no streaming source)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f).get("data")


# --- stage state outside the LoRA optimizer (discriminator, fake-score optimizer): safetensors only ---

EXTRA = "stage_state.safetensors"


def _flatten(name, obj, tensors, meta):
    state = obj.state_dict()
    if isinstance(obj, torch.optim.Optimizer):
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"{name}.state.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    meta[f"{name}.scalar.{idx}.{key}"] = json.dumps(value)
        meta[f"{name}.param_groups"] = json.dumps(state["param_groups"])
    else:
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()


def save_extra(folder, objects: dict):
    """Modules and optimizers a stage owns -> one safetensors file in the checkpoint folder."""
    from training.files import save_file_atomic

    tensors, meta = {}, {}
    for name, obj in objects.items():
        _flatten(name, obj, tensors, meta)
    save_file_atomic(tensors, os.path.join(folder, EXTRA), meta)


def load_extra(folder, objects: dict):
    from safetensors import safe_open

    path = os.path.join(folder, EXTRA)
    if not objects:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {folder}: {EXTRA} (discriminator / fake-score state) is missing")
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    for name, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            state = {}
            for key, value in tensors.items():
                if key.startswith(name + ".state."):
                    idx, field = key[len(name) + 7:].split(".", 1)
                    state.setdefault(int(idx), {})[field] = value
            for key, value in meta.items():
                if key.startswith(name + ".scalar."):
                    idx, field = key[len(name) + 8:].split(".", 1)
                    state.setdefault(int(idx), {})[field] = json.loads(value)
            obj.load_state_dict({"state": state, "param_groups": json.loads(meta[name + ".param_groups"])})
        else:
            obj.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})

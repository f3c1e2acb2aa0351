"""Atomic accelerate checkpoints: save_state into a temp folder, then rename to step_XXXXXX."""
from __future__ import annotations

import json
import os
import re
import shutil

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


def save_checkpoint(accelerator, out_dir, step, keep):
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
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
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

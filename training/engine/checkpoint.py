"""The trainer's own checkpoints: safetensors and JSON only, so `--resume` never loads anything that could
unpickle code. Written into `.tmp-step_XXXXXX` and renamed to `step_XXXXXX` when whole:

    trainer_state.json         format + version, step, stage, data position, lr schedule, grad scaler, the
                               per-stage losses and logged values so far, the list of the other files
    adapters.safetensors       every LoRA parameter on the UNet (each stage group's, the fake score's, init)
    optimizer.safetensors      the AdamW's state tensors; param groups and non-tensor state as JSON metadata
    ema.safetensors            the EMA of the TSCD LoRA (the consistency target)
    stage_state.safetensors    networks and optimizers a stage owns (discriminator, fake score, full UNet)
    rng_<process>.safetensors  torch CPU / CUDA generator states; python and numpy states as JSON metadata

The frozen base model is not saved: it is loaded again from model.base. A folder holding anything else
(an accelerate checkpoint of an older version: *.pkl, *.bin) is refused before anything is loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from training.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
FORMAT, VERSION = "hyper-sd-checkpoint", 1
STATE, EXTRA = "trainer_state.json", "stage_state.safetensors"
MAIN_FILES = ("adapters.safetensors", "optimizer.safetensors", "ema.safetensors", EXTRA)


def checkpoint_dir(out_dir):
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir):
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root)
             if (m := STEP_DIR.match(n)) and os.path.isfile(os.path.join(root, n, STATE))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume, out_dir):
    """'latest' -> newest complete checkpoint in out_dir (None if there is none); else the path as given."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    return resume


# --- saving -------------------------------------------------------------------------------------------

class LoraWeights:
    """The UNet's LoRA parameters (every adapter) as one state dict: what a checkpoint needs of the UNet."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self):
        return {n: p.detach() for n, p in self.unet.named_parameters() if "lora_" in n}

    def load_state_dict(self, state):
        with torch.no_grad():
            for n, p in self.unet.named_parameters():
                if "lora_" in n:
                    p.copy_(state[n])


def save_checkpoint(run, data_state=None):
    """Every process writes its RNG states, the main process the rest; the folder appears whole or not at all.
    data_state: a streamed data source's position (JSON), restored by the source on resume."""
    from training.files import TEMP_PREFIX, writing

    acc, step = run.accelerator, run.step
    root = checkpoint_dir(run.out_dir)
    final, tmp = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f"{TEMP_PREFIX}step_{step:06d}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp):
            os.makedirs(tmp)
    acc.wait_for_everyone()
    save_objects(os.path.join(tmp, f"rng_{acc.process_index}.safetensors"), {}, rng_meta())
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_main_files(run, tmp, data_state)
        shutil.rmtree(final, ignore_errors=True)
        with writing(final):
            os.replace(tmp, final)
        for old in list_checkpoints(run.out_dir)[:-run.cfg.output.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def write_main_files(run, folder, data_state):
    from itertools import accumulate

    from training.files import save_json_atomic

    t, acc = run.train, run.accelerator
    save_objects(os.path.join(folder, "adapters.safetensors"), {"unet": LoraWeights(t.unet)})
    save_objects(os.path.join(folder, "optimizer.safetensors"), {"opt": t.opt})
    save_objects(os.path.join(folder, "ema.safetensors"), {"ema": t.ema})
    save_objects(os.path.join(folder, EXTRA), t.persistent)
    ga, sampler = run.cfg.optim.grad_accum, run.data.sampler
    stage = next(i for i, end in enumerate(accumulate(s.steps for s in run.cfg.stages)) if run.step <= end)
    state = {"format": FORMAT, "version": VERSION, "step": run.step, "stage": stage,
             "total_steps": run.cfg.total_steps, "micro_batch": run.step * ga,
             "batches_per_epoch": len(sampler) if sampler is not None else None,
             "lr_scheduler": t.lr_sched.state_dict(),
             "grad_scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
             "history": {"losses": run.losses, "logs": run.logs},
             "files": sorted([*MAIN_FILES, *(f"rng_{i}.safetensors" for i in range(acc.num_processes))])}
    if data_state is not None:
        state["data"] = data_state
    save_json_atomic(state, os.path.join(folder, STATE))  # last: its presence marks a whole folder


def rng_meta() -> dict:
    """This process's generator states as JSON strings (torch's byte states as lists of ints)."""
    import numpy as np

    np_state = np.random.get_state()
    meta = {"python": random.getstate(), "torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        meta["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return {f"rng.{k}": json.dumps(v) for k, v in meta.items()}


def set_rng(meta: dict) -> None:
    import numpy as np

    state = {k[4:]: json.loads(v) for k, v in meta.items() if k.startswith("rng.")}
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_objects(path, objects: dict, meta: dict | None = None) -> None:
    """Modules, optimizers (anything with state_dict) -> one safetensors file: tensors by name, everything
    else (param groups, scalar state) as JSON in the metadata."""
    from training.files import save_file_atomic

    tensors, meta = {}, dict(meta or {})
    for name, obj in objects.items():
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
    save_file_atomic(tensors, path, meta)


# --- checking (before anything loads) -----------------------------------------------------------------

OLD_FORMAT = ("this checkpoint was written by an older version of the trainer (accelerate's pickled state"
              "{files}); it cannot be loaded safely, because loading it would unpickle code. Start the run again "
              "without --resume (with --overwrite to replace the folder)")


def check_checkpoint(path) -> dict:
    """A checkpoint folder as the trainer writes it -> its trainer_state.json; anything else is one
    CheckpointError naming the folder and the file. Reads JSON and safetensors headers only."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: not a checkpoint folder")
    names = set(os.listdir(path))
    if STATE not in names:
        raise CheckpointError(f"--resume {path}: not a complete checkpoint folder (no {STATE})")
    state = _read_state(path)
    if "format" not in state:
        pickles = sorted(n for n in names if n.endswith((".pkl", ".bin", ".pt", ".pth")))
        raise CheckpointError(f"--resume {path}: " + OLD_FORMAT.format(files=": " + ", ".join(pickles) if pickles else ""))
    if state.get("format") != FORMAT or not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise CheckpointError(f"--resume {path}: {STATE} is not a checkpoint of this trainer (format "
                              f"{state.get('format')!r} version {state.get('version')!r}; expected {FORMAT!r} <= {VERSION})")
    files = state.get("files")
    if not isinstance(files, list) or not isinstance(state.get("step"), int) or state["step"] < 1:
        raise CheckpointError(f"--resume {path}: {STATE} lacks its step or file list")
    expected = set(files) | {STATE}
    if names - expected:
        raise CheckpointError(f"--resume {path}: unexpected file(s) {sorted(names - expected)}: a checkpoint holds "
                              "only the trainer's own safetensors and JSON files, and a folder with anything else "
                              "(a pickle could run code) is not loaded")
    if expected - names:
        raise CheckpointError(f"--resume {path}: missing file(s) {sorted(expected - names)}")
    for name in files:
        _check_safetensors(os.path.join(path, name), path)
    return state


def _read_state(path) -> dict:
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--resume {path}: {STATE} is not JSON ({e}); the folder was changed after the "
                              "trainer wrote it, or is not a checkpoint of this trainer") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume {path}: {STATE} is not a JSON object")
    return state


def _check_safetensors(file, path):
    from safetensors import SafetensorError, safe_open

    if not file.endswith(".safetensors"):
        raise CheckpointError(f"--resume {path}: {STATE} lists {os.path.basename(file)}, not a .safetensors file")
    try:
        with safe_open(file, "pt") as f:
            f.metadata()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"--resume {path}: {os.path.basename(file)} is not a readable safetensors file "
                              f"({e}); it is not loaded") from None


# --- loading ------------------------------------------------------------------------------------------

def load_checkpoint(run, path) -> int:
    """Restore the adapters, optimizer, EMA, lr schedule, grad scaler, RNG and per-stage history; -> step."""
    state = check_checkpoint(path)
    t, acc, cfg = run.train, run.accelerator, run.cfg
    if state["step"] > cfg.total_steps:
        raise CheckpointError(f"--resume {path}: the checkpoint is at step {state['step']}, past the end of this "
                              f"config's stages ({cfg.total_steps} steps)")
    sampler = run.data.sampler
    if sampler is not None and state.get("batches_per_epoch") not in (None, len(sampler)):
        raise CheckpointError(f"--resume {path}: the checkpoint was taken with {state['batches_per_epoch']} batches "
                              f"per epoch, the data now gives {len(sampler)}: resume needs the same data.source "
                              "and optim.batch_size")
    load_objects(os.path.join(path, "adapters.safetensors"), {"unet": LoraWeights(t.unet)}, path)
    load_objects(os.path.join(path, "optimizer.safetensors"), {"opt": t.opt}, path)
    load_objects(os.path.join(path, "ema.safetensors"), {"ema": t.ema}, path)
    load_objects(os.path.join(path, EXTRA), t.persistent, path)
    t.lr_sched.load_state_dict(state["lr_scheduler"])
    if state.get("grad_scaler") is not None and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(state["grad_scaler"])
    rng = os.path.join(path, f"rng_{acc.process_index}.safetensors")
    if os.path.isfile(rng):  # another process count: the others keep their seeded state
        set_rng(_read(rng)[1])
    history = state.get("history") or {}
    run.losses = {int(k): v for k, v in (history.get("losses") or {}).items()}
    run.logs = {int(k): v for k, v in (history.get("logs") or {}).items()}
    return state["step"]


def load_data_state(path):
    """The streamed data source's position saved with the checkpoint (None: the run had no streamed source)."""
    return check_checkpoint(path).get("data")


def load_extra(folder, objects: dict):
    """A stage's own networks / optimizers from the checkpoint's stage_state.safetensors."""
    if objects:
        load_objects(os.path.join(folder, EXTRA), objects, folder)


def _read(file):
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def load_objects(file, objects: dict, path) -> None:
    """The inverse of save_objects; a tensor set or shape that does not fit this run is a CheckpointError."""
    tensors, meta = _read(file)
    for name, obj in objects.items():
        try:
            if isinstance(obj, torch.optim.Optimizer):
                obj.load_state_dict(_optimizer_state(name, tensors, meta))
                continue
            want = obj.state_dict()
            got = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            bad = sorted(k for k in want if k not in got or got[k].shape != want[k].shape)
            if bad or set(got) - set(want):
                raise ValueError(f"{len(bad)} missing or reshaped, {len(set(got) - set(want))} unknown tensors, "
                                 f"e.g. {(bad or sorted(set(got) - set(want)))[:2]}")
            obj.load_state_dict(got)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"--resume {path}: {os.path.basename(file)} does not fit this run's {name!r} "
                                  f"({e}); resume needs the config the checkpoint was written with (lora.*, "
                                  "stages)") from None


def _optimizer_state(name, tensors, meta) -> dict:
    state = {}
    for key, value in tensors.items():
        if key.startswith(name + ".state."):
            idx, field = key[len(name) + 7:].split(".", 1)
            state.setdefault(int(idx), {})[field] = value
    for key, value in meta.items():
        if key.startswith(name + ".scalar."):
            idx, field = key[len(name) + 8:].split(".", 1)
            state.setdefault(int(idx), {})[field] = json.loads(value)
    return {"state": state, "param_groups": json.loads(meta[name + ".param_groups"])}

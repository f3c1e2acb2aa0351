"""The output folder: checked before anything is loaded or deleted, replaced only when the trainer made it.

A folder the trainer creates holds a marker file (MARKER). `--overwrite` replaces only such a folder;
the working directory, its parents, the home folder and `/` are never an output folder. A run that fails
with a user error removes the folder it had just created (unless it already holds a checkpoint), so the
corrected rerun is not refused; a resumed run first removes the temp files a killed run left behind."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

from training.errors import USER_ERRORS
from training.files import TEMP_PREFIX, writing

MARKER = ".hyper-sd-run"
TEMP_FOLDERS = ("", "stages", os.path.join("stages", "snapshots"), "checkpoints")  # where the trainer writes temps


def check_output_dir(out_dir: str, resume, overwrite: bool) -> None:
    """Raise FileExistsError / FileNotFoundError / CheckpointError naming output.dir or --resume; touches nothing."""
    from training.engine.checkpoint import check_checkpoint, resolve_resume

    what = _forbidden(out_dir)
    if what:
        raise FileExistsError(f"config key 'output.dir': {out_dir!r} is {what}; the trainer writes (and with "
                              "--overwrite replaces) its output folder, so choose a folder of its own, e.g. "
                              "outputs/my-run")
    if resume:
        path = resolve_resume(resume, out_dir)
        if path is None:
            raise FileNotFoundError(f"--resume latest: {out_dir}/checkpoints holds no complete checkpoint; "
                                    "run without --resume (add --overwrite to replace the folder)")
        check_checkpoint(path)  # JSON and safetensors headers only: nothing that could unpickle code
        return
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass --overwrite "
                              "to replace it or --resume latest to continue")
    if not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise FileExistsError(f"config key 'output.dir': {out_dir} was not created by training.run (no {MARKER} "
                              "file), so --overwrite will not delete it; choose another output.dir")


def _forbidden(out_dir: str):
    """What the folder is if it may never be an output folder: /, the home folder, the working directory
    or one of its parents; else None."""
    path = os.path.realpath(out_dir)
    cwd, home = os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~"))
    if path == os.sep:
        return "/"
    if path == home:
        return "the home folder"
    if cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep):
        return "the working directory or one of its parents"
    return None


def prepare_output(out_dir: str, resume, overwrite: bool, accelerator) -> str:
    """After every check passed: replace a previous run's folder (--overwrite), create it, mark it; when
    resuming, remove a killed run's temp files. Returns what this run did to the folder: "made" (created
    it), "filled" (it was empty) or "resumed"."""
    started = "resumed" if resume else ("filled" if os.path.isdir(out_dir) and not os.listdir(out_dir) else "made")
    if accelerator.is_main_process:
        check_output_dir(out_dir, resume, overwrite)
        with writing(out_dir):
            if not resume and overwrite and os.path.isfile(os.path.join(out_dir, MARKER)):
                shutil.rmtree(out_dir)
                started = "made"
            os.makedirs(out_dir, exist_ok=True)
            remove_stale_temp(out_dir)
            marker = os.path.join(out_dir, MARKER)
            if not os.path.isfile(marker):
                with open(marker, "w") as f:
                    json.dump({"created_by": "python -m training.run"}, f)
    accelerator.wait_for_everyone()
    return started


def remove_stale_temp(out_dir: str) -> list:
    """Temp files and folders (the trainer's TEMP_PREFIX) left in the folders it writes by a killed run."""
    removed = []
    for sub in TEMP_FOLDERS:
        folder = os.path.join(out_dir, sub)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        for name in (n for n in names if n.startswith(TEMP_PREFIX)):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(path)
    return removed


def finished_message(cfg, resume):
    """--resume on a run whose outputs were written from its last checkpoint: the line to print (nothing
    to do), else None. A run killed after its last checkpoint but before metrics.json is not finished."""
    from training.engine.checkpoint import check_checkpoint, resolve_resume

    out_dir, total = cfg.output.dir, cfg.total_steps
    path = resolve_resume(resume, out_dir)
    if path is None or _forbidden(out_dir) or check_checkpoint(path)["step"] != total:
        return None
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            done = json.load(f).get("steps") == total
    except (OSError, ValueError, AttributeError):
        return None
    if not done:
        return None
    remove_stale_temp(out_dir)
    return (f"{out_dir}: the run already finished at step {total} (metrics.json, {cfg.output.name}.safetensors); "
            "nothing to do. To train again, run without --resume and with --overwrite.")


# files and folders a run writes into its output folder; a failed fresh run removes the folder only if it
# holds nothing else
RUN_FILES = (MARKER, "config.json", "tiny_teacher.safetensors", "log.jsonl", "tensorboard", "checkpoints", "stages",
             "teacher", "samples.png", "metrics.json")


@contextmanager
def removed_on_user_error(run):
    """A user error after the output folder was started: remove what this fresh run wrote (and the folder it
    created) so the corrected rerun is accepted; a folder with a checkpoint is kept, and the message says how
    to continue from it."""
    try:
        yield
    except USER_ERRORS as e:
        note = discard_output(run) if run.accelerator.is_main_process else ""
        if note and len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (f"{e.args[0]} ({note})",)
        raise


def discard_output(run) -> str:
    from training.engine.checkpoint import list_checkpoints

    out, started, name = run.out_dir, run.output_started, run.cfg.output.name
    if started == "resumed" or not os.path.isdir(out):
        return ""
    found = list_checkpoints(out)
    if found:
        return (f"{out} keeps checkpoints up to {os.path.basename(found[-1])}: --resume latest continues from "
                "there, --overwrite starts afresh")
    names = os.listdir(out)
    ours = set(RUN_FILES) | {name + ".safetensors", name + "_1step_unet"}
    if any(n not in ours and not n.startswith(TEMP_PREFIX) for n in names):
        return ""
    for n in names:
        path = os.path.join(out, n)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    if started == "made":
        os.rmdir(out)
    return f"{out}, which this run had just {'created' if started == 'made' else 'filled'}, was removed again"

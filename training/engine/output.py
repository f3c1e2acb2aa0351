"""The output folder: checked before anything is loaded or deleted, replaced only when the trainer made it.

A folder the trainer creates holds a marker file (MARKER). `--overwrite` replaces only such a folder;
the working directory, its parents, the home folder and `/` are never an output folder."""
from __future__ import annotations

import json
import os
import shutil

MARKER = ".hyper-sd-run"


def check_output_dir(out_dir: str, resume, overwrite: bool) -> None:
    """Raise FileExistsError / FileNotFoundError naming output.dir or --resume; touches nothing."""
    what = _forbidden(out_dir)
    if what:
        raise FileExistsError(f"config key 'output.dir': {out_dir!r} is {what}; the trainer writes (and with "
                              "--overwrite replaces) its output folder, so choose a folder of its own, e.g. "
                              "outputs/my-run")
    if resume and resume != "latest" and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no trainer_state.json)")
    if resume == "latest" and not _has_checkpoint(out_dir):
        raise FileNotFoundError(f"--resume latest: {out_dir}/checkpoints holds no complete checkpoint; "
                                "run without --resume (add --overwrite to replace the folder)")
    if resume or not os.path.isdir(out_dir) or not os.listdir(out_dir):
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


def _has_checkpoint(out_dir) -> bool:
    from training.engine.checkpoint import list_checkpoints

    return bool(list_checkpoints(out_dir))


def prepare_output(out_dir: str, resume, overwrite: bool, accelerator) -> None:
    """After every check passed: replace a previous run's folder (--overwrite), create it, mark it."""
    if accelerator.is_main_process:
        check_output_dir(out_dir, resume, overwrite)
        if not resume and overwrite and os.path.isfile(os.path.join(out_dir, MARKER)):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        marker = os.path.join(out_dir, MARKER)
        if not os.path.isfile(marker):
            with open(marker, "w") as f:
                json.dump({"created_by": "python -m training.run"}, f)
    accelerator.wait_for_everyone()

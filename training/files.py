"""Atomic writes: every file the trainer produces appears whole or not at all (temp file in the
target folder, then os.replace). The only writers of safetensors, PNG and JSON outputs."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

from training.errors import WriteError

TEMP_PREFIX = ".tmp-"  # every temp file or folder the trainer writes; a later start removes leftovers (killed runs)


@contextmanager
def writing(path: str):
    """An OSError (disk full, no permission) or a safetensors write error -> one WriteError naming `path`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise WriteError(f"cannot write {path}: {why}") from None


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: the permissions open() would give a new file (mkstemp / mkdtemp make
    0600 / 0700, which would leave outputs unreadable to another user, e.g. a ComfyUI service account)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def _temp_path(path: str, suffix: str):
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with writing(path):
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
            os.close(fd)
            yield tmp
            os.chmod(tmp, umask_mode(0o666))  # after writing: a writer may have re-created the file
            os.replace(tmp, path)
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def atomic_path(path: str, suffix: str = ""):
    """Context manager: a temp path beside `path` to write; it replaces `path` when the block ends without
    an error and is removed otherwise."""
    return _temp_path(path, suffix)


def save_file_atomic(state: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors with string metadata."""
    from safetensors.torch import save_file

    with _temp_path(path, ".safetensors") as tmp:
        meta = {k: str(v) for k, v in metadata.items()} if metadata else None
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta)


def save_png_atomic(array, path: str) -> None:
    from PIL import Image

    with _temp_path(path, ".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_text_atomic(text: str, path: str) -> None:
    with _temp_path(path, ".txt") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def save_json_atomic(obj, path: str) -> None:
    with _temp_path(path, ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)


@contextmanager
def atomic_folder(folder: str):
    """Yield a temp folder beside `folder`; on success it replaces `folder` (a folder the run itself wrote
    earlier), on failure it is removed."""
    import shutil

    folder = os.path.abspath(folder)
    tmp = None
    try:
        with writing(folder):
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=os.path.dirname(folder))
            yield tmp
            os.chmod(tmp, umask_mode(0o777))
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    finally:
        if tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp)

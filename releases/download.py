"""Where an official release file lives on the hub, and fetching it into the loras folder."""
from __future__ import annotations

import os

from .catalog import HUB_REPO, RELEASES


def release_url(filename: str) -> str:
    return f"https://huggingface.co/{HUB_REPO}/resolve/main/{filename}"


def missing_file_hint(filename: str, target_dir: str) -> str:
    return f"download {release_url(filename)} and put it at {os.path.join(target_dir, filename)}"


def _paths_under(folder: str) -> set:
    return {os.path.join(root, n) for root, dirs, files in os.walk(folder) for n in dirs + files}


def _remove_new(paths: set) -> None:
    """Remove the files and (empty) folders in ``paths``, children before parents."""
    for path in sorted(paths, key=len, reverse=True):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.remove(path)
        except OSError:
            pass  # a folder someone else filled meanwhile stays


def download_release(filename: str, target_dir: str) -> str:
    """Fetch an official release file into ``target_dir`` (the loras folder); return its path.

    huggingface_hub is imported lazily (ComfyUI start-up must not pay for it); with ``local_dir`` it
    downloads into ``target_dir/.cache/huggingface/`` (a ``.lock``, an ``.incomplete`` file, metadata)
    and renames the finished file into place. Whatever that bookkeeping added is removed again,
    after a failure and after a success, so the loras folder gets the file or nothing.
    Any failure (offline mode, no network, missing file) becomes one error saying what to put where.
    """
    hint = missing_file_hint(filename, target_dir)
    if filename not in {r.filename for r in RELEASES}:
        raise ValueError(f"release: {filename!r} is not an official Hyper-SD release file")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f"release: {filename} is missing and huggingface_hub is not installed; {hint}") from None
    created_dir = not os.path.isdir(target_dir)
    os.makedirs(target_dir, exist_ok=True)
    cache = os.path.join(target_dir, ".cache")
    before = _paths_under(cache) | ({cache} if os.path.isdir(cache) else set())
    try:
        return hf_hub_download(repo_id=HUB_REPO, filename=filename, local_dir=target_dir)
    except Exception as e:  # offline mode, no network, 404, auth: all end in the same advice
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise ValueError(f"release: could not download {filename} from {HUB_REPO} ({reason}); {hint}") from e
    finally:
        new = (_paths_under(cache) | ({cache} if os.path.isdir(cache) else set())) - before
        _remove_new(new | ({target_dir} if created_dir else set()))

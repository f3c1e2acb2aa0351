"""The official Hyper-SD releases: what each file is, how it is meant to be used, how to fetch it.

No ComfyUI import and only the standard library at import time (huggingface_hub is imported when
a file is downloaded), so the loader node (``nodes/``), the workflow builder (``workflows/``) and
the tests all read the same table.
"""
from .catalog import (HUB_REPO, NO_RELEASE, ONE_STEP_UNET_COMFY, ONE_STEP_UNET_DIFFUSERS, RELEASE_NAMES,
                      RELEASES, Release, get_release, release_for_file)
from .download import download_release, missing_file_hint, release_url

__all__ = ["HUB_REPO", "NO_RELEASE", "ONE_STEP_UNET_COMFY", "ONE_STEP_UNET_DIFFUSERS", "RELEASE_NAMES", "RELEASES",
           "Release", "download_release", "get_release", "missing_file_hint", "release_for_file", "release_url"]

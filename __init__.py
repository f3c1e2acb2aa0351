"""Hyper-SD toolkit for ComfyUI.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node schema).
Outside ComfyUI (tests, ``python -m training.run``) importing the package must not need
ComfyUI, so the node modules (``nodes.extension`` and what it lists) are only imported when
the entry point is called.
"""


async def comfy_entrypoint():
    from .nodes.extension import HyperSDExtension

    return HyperSDExtension()

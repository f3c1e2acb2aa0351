"""The pack's ComfyExtension (V3): the node list and the KSampler ``tcd`` entries.

Imports ComfyUI; imported only by the root ``__init__.py``'s ``comfy_entrypoint``.
"""
from comfy_api.latest import ComfyExtension

from . import lora_loader, one_step, scribble, tcd

NODE_MODULES = (lora_loader, tcd, one_step, scribble)


class HyperSDExtension(ComfyExtension):
    async def on_load(self) -> None:
        tcd.register_ksampler_entries()

    async def get_node_list(self):
        # ComfyUI 0.3.64 never calls on_load, so the KSampler entries ("tcd" sampler and
        # scheduler) are registered here too; registration is idempotent.
        tcd.register_ksampler_entries()
        return [node for module in NODE_MODULES for node in module.NODES]

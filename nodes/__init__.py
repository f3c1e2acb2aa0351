"""ComfyUI glue (V3 schema). Imported only by the root ``__init__.py`` inside ComfyUI.

Heavy libraries (diffusers, peft, accelerate, transformers) must never be imported here
at module level: ComfyUI start-up time is measured and budgeted at 0.2 s.
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

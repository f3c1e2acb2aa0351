"""ComfyUI glue (V3 schema): the pack's nodes and the ComfyUI-free helpers they use.

Importing this package imports nothing of ComfyUI, so the pure modules (``nodes.lora``,
``nodes.scribble_math``) are plain imports for tests and tools. The node modules
(``lora_loader``, ``tcd``, ``one_step``, ``scribble``) and ``extension`` (the ComfyExtension
listing them) import ComfyUI; the root ``__init__.py`` imports ``nodes.extension`` only when
ComfyUI calls ``comfy_entrypoint``.

Heavy libraries (diffusers, peft, accelerate, transformers) must never be imported here
at module level: ComfyUI start-up time is measured and budgeted at 0.2 s.
"""

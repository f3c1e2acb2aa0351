"""LoRA file handling for the loader node, without ComfyUI (plain imports for tests).

- ``files``: safe names inside the loras folder, safetensors header checks, loading;
- ``keys``: key-format detection and renaming of SD1.5/SDXL keys to kohya names;
- ``families``: the model family of a ComfyUI model config and of a LoRA;
- ``matching``: which LoRA modules fit the model (key map + weight shapes);
- ``presets``: recommended settings for files that are no official release (fast-LoRA families, trained files).
"""

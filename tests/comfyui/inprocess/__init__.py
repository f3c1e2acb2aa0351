"""In-process checks of the Hyper-SD nodes inside real ComfyUI, run by ``tests/comfyui/nodes_inprocess.py``
under ComfyUI's python (never imported by pytest).

Importing these modules has no side effects: ComfyUI is put on ``sys.path`` and its argument
parsing switched on only by ``comfy_env.bootstrap``, which the entry script calls first; every
ComfyUI import is inside a function. Each check writes into the ``Run`` it is given.

- ``comfy_env``: bootstrap, the ``Run`` (results, captured log lines, loras folder), the pack
  loaded through ComfyUI's custom-node loader, the tiny SD1.5-shaped UNet;
- ``sampling``: TCD and 1-step sampling vs VP-space references from the reference doc's formulas;
- ``unet_lora``: UNet LoRAs in every format, weight by weight; release files;
- ``te_lora``: text-encoder LoRAs on real ComfyUI CLIPs (SD1.5 CLIP-L, SDXL CLIP-L + CLIP-G);
- ``errors``: every bad input's error message.
"""

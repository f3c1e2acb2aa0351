"""ComfyUI set-up for the in-process checks: bootstrap, the Run, the pack, the tiny SD1.5 UNet."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

HEAVY = {"diffusers", "peft", "accelerate", "transformers", "huggingface_hub"}
TINY_SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                 channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                 num_head_channels=-1, num_heads=8, context_dim=768, use_linear_in_transformer=False,
                 use_spatial_transformer=True, legacy=False, adm_in_channels=None)


def bootstrap(comfy_path: str) -> None:
    """Make ComfyUI importable the way ``main.py --cpu`` runs it (comfy.cli_args reads sys.argv)."""
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


class LogCount(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@dataclass
class Run:
    """What every check shares: the report being written, ComfyUI's log lines, the loras folder."""
    loras: str
    results: dict = field(default_factory=dict)
    log: LogCount = field(default_factory=LogCount)

    @staticmethod
    def nodes() -> dict:
        """ComfyUI's NODE_CLASS_MAPPINGS (core nodes and, once loaded, the pack's)."""
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def clear_log(self) -> None:
        self.log.messages.clear()

    def count_log(self, *needles: str) -> int:
        return sum(any(n in m for n in needles) for m in self.log.messages)

    def capture(self, errors: dict, label: str, fn) -> None:
        """errors[label] = None when ``fn()`` succeeds, else 'Type: message'."""
        try:
            fn()
            errors[label] = None
        except Exception as e:  # noqa: BLE001
            errors[label] = f"{type(e).__name__}: {e}"

    def add_errors(self, errors: dict) -> None:
        self.results.setdefault("errors", {}).update(errors)


@contextmanager
def captured_logs(run: Run):
    """Root logger at INFO into ``run.log`` for the duration; restored afterwards."""
    root = logging.getLogger()
    level = root.level
    root.addHandler(run.log)
    root.setLevel(logging.INFO)
    try:
        yield run
    finally:
        root.removeHandler(run.log)
        root.setLevel(level)


def load_pack(run: Run, tmp: str, repo: str) -> None:
    """Link the repo into a custom_nodes folder and load it with ComfyUI's own custom-node loader."""
    import comfy.samplers as cs
    import folder_paths
    import nodes

    custom = os.path.join(tmp, "custom_nodes")
    os.makedirs(custom)
    link = os.path.join(custom, "comfyui_hyper_sd")
    os.symlink(repo, link)
    os.makedirs(run.loras)
    folder_paths.add_model_folder_path("loras", run.loras, is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(sys.modules)
    t0 = time.perf_counter()
    ok = asyncio.run(nodes.load_custom_node(link, set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes"))
    r = run.results
    r["import_ok"] = ok
    r["import_seconds"] = time.perf_counter() - t0
    r["heavy_modules_imported_by_pack"] = sorted({m.split(".")[0] for m in set(sys.modules) - before} & HEAVY)
    r["nodes"] = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("HyperSD"))
    r["tcd_in_lists"] = ["tcd" in cs.KSampler.SAMPLERS, "tcd" in cs.KSampler.SCHEDULERS,
                         "tcd" in cs.SAMPLER_NAMES, "tcd" in cs.SCHEDULER_NAMES]


def tiny_sd15_state_dict(seed=0):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    m = UNetModel(**TINY_SD15, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return {k: (torch.randn_like(v) * 0.05 if v.is_floating_point() else v) for k, v in m.state_dict().items()}


def load_model(sd):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd))

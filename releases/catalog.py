"""The official Hyper-SD releases (hub repo ByteDance/Hyper-SD) and how each is meant to be used.

Pure data + lookups (standard library only): the loader node's outputs and the shipped workflows'
settings both come from ``RELEASES``.
"""
from __future__ import annotations

from dataclasses import dataclass

HUB_REPO = "ByteDance/Hyper-SD"


@dataclass(frozen=True)
class Release:
    filename: str  # exact file name on the hub
    family: str  # "SD15", "SDXL", "SD3", "FLUX"
    steps: int
    cfg: float  # KSampler cfg
    sampler: str  # ComfyUI sampler_name
    scheduler: str  # ComfyUI scheduler
    eta: float  # TCD eta (only used with the tcd sampler; 0 = deterministic, DDIM-like)
    strength: float = 1.0  # recommended LoRA scale
    guidance: float | None = None  # FLUX distilled guidance (FluxGuidance node), not KSampler cfg
    note: str = ""

    @property
    def name(self) -> str:
        return self.filename[: -len(".safetensors")]


def _step_loras(family: str) -> list[Release]:
    out = []
    for steps in (1, 2, 4, 8):
        suffix = "1step" if steps == 1 else f"{steps}steps"
        if steps == 1:
            out.append(Release(f"Hyper-{family}-1step-lora.safetensors", family, 1, 1.0, "tcd", "tcd", 1.0,
                               note="unified LoRA: TCD sampler, 1-8 steps; eta 1.0 at 1 step, lower eta "
                                    "(e.g. 0.3) gives more detail at more steps"))
        else:
            out.append(Release(f"Hyper-{family}-{suffix}-lora.safetensors", family, steps, 1.0, "euler",
                               "sgm_uniform", 0.0, note="DDIM trailing (euler + sgm_uniform), cfg 1"))
    for steps in (8, 12):
        out.append(Release(f"Hyper-{family}-{steps}steps-CFG-lora.safetensors", family, steps, 5.0, "euler",
                           "sgm_uniform", 0.0, note="cfg 5-8, negative prompt works; cfg 1 gives bad images"))
    return out


RELEASES: tuple[Release, ...] = tuple(
    _step_loras("SD15")
    + _step_loras("SDXL")
    + [Release(f"Hyper-SD3-{s}steps-CFG-lora.safetensors", "SD3", s, cfg, "euler", "simple", 0.0, 0.125,
               note="flow matching (SD3 default sampling), LoRA scale 0.125")
       for s, cfg in ((4, 3.0), (8, 5.0), (16, 7.0))]
    + [Release(f"Hyper-FLUX.1-dev-{s}steps-lora.safetensors", "FLUX", s, 1.0, "euler", "simple", 0.0, 0.125,
               guidance=3.5, note="FLUX default sampling, FluxGuidance 3.5, KSampler cfg 1, LoRA scale 0.125")
       for s in (8, 16)]
)

# Not a LoRA: a full checkpoint for CheckpointLoaderSimple, used with HyperSDOneStepScheduler.
ONE_STEP_UNET_COMFY = "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors"
ONE_STEP_UNET_DIFFUSERS = "Hyper-SDXL-1step-Unet.safetensors"

NO_RELEASE = "none (use lora_name)"
RELEASE_NAMES: list[str] = [r.name for r in RELEASES]
_BY_NAME = {r.name: r for r in RELEASES}
_BY_FILE = {r.filename.lower(): r for r in RELEASES}


def get_release(name: str) -> Release:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"release: unknown Hyper-SD release {name!r}; expected one of {RELEASE_NAMES}") from None


def release_for_file(path: str) -> Release | None:
    """The release a local file is a copy of, judged by its base name (case-insensitive)."""
    base = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
    return _BY_FILE.get(base)

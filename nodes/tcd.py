"""TCD sampler + scheduler nodes, and the ``tcd`` entries for KSampler / KSamplerSelect.

The math lives in ``schedulers.tcd`` (pure torch, checked against diffusers' TCDScheduler); this
module only feeds it the model's own sigma table and ComfyUI's seeded noise, progress and preview.
"""
from __future__ import annotations

import logging
import math
import os
import sys

import torch
from comfy_api.latest import io

from ..schedulers import tcd as tcd_math
from .sampling_kind import discrete_sigma_table

log = logging.getLogger("HyperSD")

ETA_TOOLTIP = (
    "TCD eta (= diffusers' eta = the TCD paper's gamma), 0..1. 0 is deterministic; higher re-noises more "
    "at each step. Lower eta keeps more detail at several steps (0.3 is a good default); keep 1.0 at 1 step "
    "(Hyper-SD unified LoRA)."
)


def _table_of_denoiser(model) -> torch.Tensor:
    # KSamplerX0Inpaint -> CFGGuider wrapper -> BaseModel, as ComfyUI's own samplers reach it.
    return discrete_sigma_table(model.inner_model.inner_model.model_sampling,
                                "TCD sampler (KSampler 'tcd' / HyperSDTCDSampler)")


def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=0.3):
    """ComfyUI k-diffusion entry point (``comfy.k_diffusion.sampling.sample_tcd``)."""
    import comfy.k_diffusion.sampling as kds

    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = kds.default_noise_sampler(x, seed=extra_args.get("seed"))
    table = _table_of_denoiser(model)
    try:
        return tcd_math.sample_tcd(model, x, sigmas, extra_args, callback, disable, noise_sampler,
                                   eta=float(eta), sigma_table=table)
    except FloatingPointError as e:
        raise ValueError(f"TCD sampler: {e}") from e


def tcd_scheduler_sigmas(model_sampling, steps: int, denoise: float = 1.0, who: str = "scheduler tcd"):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{who}: steps must be an integer >= 1, got {steps!r}")
    if not 0.0 < float(denoise) <= 1.0:
        raise ValueError(f"{who}: denoise must be in (0, 1], got {denoise!r} (0 would sample nothing)")
    table = discrete_sigma_table(model_sampling, who)
    try:
        sigmas = tcd_math.tcd_sigmas(steps, float(denoise), sigma_table=table)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from e
    return sigmas.to(torch.float32)


# Callers that hand a scheduler int(steps / denoise) steps when denoise < 1 and keep the last `steps`
# sigmas: (file, function) -> the name shown to the user.
_DENOISE_CALLERS = {("samplers.py", "set_steps"): "KSampler", ("nodes_custom_sampler.py", "get_sigmas"): "BasicScheduler"}


def _steps_entered(max_depth: int = 8) -> tuple[str, int, float] | None:
    """(node, steps, denoise) as the user entered them, when KSampler or BasicScheduler called us.

    ComfyUI passes a scheduler only int(steps / denoise) (80 for 4 steps at denoise 0.05), a number
    the user never typed; the caller's frame is the one place that still has both inputs.
    """
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        code = frame.f_code
        node = _DENOISE_CALLERS.get((os.path.basename(code.co_filename), code.co_name))
        steps, denoise = frame.f_locals.get("steps"), frame.f_locals.get("denoise")
        if node is not None and isinstance(steps, int) and isinstance(denoise, (int, float)):
            return node, steps, float(denoise)
        frame = frame.f_back
    return None


def _ksampler_tcd_scheduler(model_sampling, steps):
    entered = _steps_entered()
    who = f"{entered[0] if entered else 'KSampler'} scheduler 'tcd'"
    discrete_sigma_table(model_sampling, who)  # a flow / EDM model fails here, whatever the steps
    if steps > tcd_math.TCD_GRID_STEPS and entered is not None and entered[2] < 0.9999:
        node, user_steps, denoise = entered
        raise ValueError(
            f"{node} scheduler 'tcd': steps {user_steps} at denoise {denoise:g} make {node} ask the scheduler for "
            f"int({user_steps} / {denoise:g}) = {steps} steps and keep the last {user_steps}, but TCD picks its "
            f"timesteps from a {tcd_math.TCD_GRID_STEPS}-step grid. Raise denoise to at least "
            f"{math.ceil(100 * user_steps / tcd_math.TCD_GRID_STEPS) / 100:g} (steps / {tcd_math.TCD_GRID_STEPS}) "
            "or lower steps; for "
            "img2img the HyperSDTCDScheduler's denoise works like diffusers' strength")
    return tcd_scheduler_sigmas(model_sampling, int(steps), 1.0, who=who)


def register_ksampler_entries() -> None:
    """Add ``tcd`` to the sampler and scheduler lists KSampler / KSamplerSelect / BasicScheduler show.

    Idempotent. The lists are mutated in place because the core nodes hold references to them and
    read them each time /object_info or prompt validation asks.
    """
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers as cs

    if getattr(kds, "sample_tcd", None) not in (None, sample_tcd):
        log.warning("HyperSD: comfy.k_diffusion.sampling.sample_tcd already exists; keeping the existing one")
    else:
        kds.sample_tcd = sample_tcd
    for names in (cs.KSAMPLER_NAMES, cs.SAMPLER_NAMES, cs.KSampler.SAMPLERS):
        if "tcd" not in names:
            names.append("tcd")
    if "tcd" not in cs.SCHEDULER_HANDLERS:
        cs.SCHEDULER_HANDLERS["tcd"] = cs.SchedulerHandler(_ksampler_tcd_scheduler)
    for names in (cs.SCHEDULER_NAMES, cs.KSampler.SCHEDULERS):
        if "tcd" not in names:
            names.append("tcd")


class HyperSDTCDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperSDTCDSampler",
            display_name="Hyper-SD TCD Sampler",
            category="sampling/custom_sampling/samplers",
            description="Trajectory Consistency Distillation sampler, identical to diffusers' TCDScheduler "
                        "when used with the Hyper-SD TCD Scheduler's sigmas.",
            inputs=[io.Float.Input("eta", default=0.3, min=0.0, max=1.0, step=0.01, tooltip=ETA_TOOLTIP)],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta) -> io.NodeOutput:
        import comfy.samplers

        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"HyperSDTCDSampler eta: expected a value in [0, 1], got {eta}")
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_tcd, extra_options={"eta": float(eta)}))


class HyperSDTCDScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperSDTCDScheduler",
            display_name="Hyper-SD TCD Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="diffusers' TCD timesteps (picked from a 50-step trailing grid: 4 steps -> "
                        "999, 759, 499, 259) as sigmas from the model's own table, plus a final 0.",
            inputs=[
                io.Model.Input("model", tooltip="The (LoRA-patched) model; its sigma table is used."),
                io.Int.Input("steps", default=4, min=1, max=50,
                             tooltip="Number of TCD steps (1-8 for Hyper-SD; at most 50, the TCD grid)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="diffusers' strength: 1.0 for text-to-image, lower for img2img. "
                                       "Must be > 0 and leave at least `steps` of the 50 grid points."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, denoise) -> io.NodeOutput:
        ms = model.get_model_object("model_sampling")
        return io.NodeOutput(tcd_scheduler_sigmas(ms, steps, denoise, who="HyperSDTCDScheduler"))


NODES = [HyperSDTCDSampler, HyperSDTCDScheduler]

# ComfyUI 0.3.64 never calls ComfyExtension.on_load, so register when ComfyUI imports the pack
# (before any /object_info or prompt validation reads the lists). Idempotent.
register_ksampler_entries()

"""Scheduler + sampler for Hyper-SDXL-1step-Unet: diffusers ``LCMScheduler(timesteps=[800])``.

ComfyUI's KSAMPLER scales the start noise by sigma unless sigma is the model's maximum, but
diffusers' text-to-image starts from unit-variance noise whatever the timestep, so for an empty
latent the sampler here scales noise by sqrt(1 + sigma^2) (the UNet then sees exactly ``randn``).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..schedulers import one_step as one_step_math
from .sampling_kind import discrete_sigma_table


def sample_one_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
    table = discrete_sigma_table(model.inner_model.inner_model.model_sampling, "HyperSDOneStepSampler")
    try:
        return one_step_math.sample_one_step(model, x, sigmas, extra_args, callback, disable, sigma_table=table)
    except FloatingPointError as e:
        raise ValueError(f"HyperSDOneStepSampler: {e}") from e
    except ValueError as e:
        raise ValueError(f"HyperSDOneStepSampler sigmas: {e} (use HyperSDOneStepScheduler)") from e


def make_one_step_sampler(unit_variance_noise: bool = True):
    import comfy.samplers

    class OneStepSampler(comfy.samplers.KSAMPLER):
        """KSAMPLER whose start noise is unit-variance in the UNet's input for an empty latent."""

        def __init__(self):
            super().__init__(sample_one_step)
            self._empty_latent = False

        def max_denoise(self, model_wrap, sigmas):
            return self._empty_latent or super().max_denoise(model_wrap, sigmas)

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            self._empty_latent = unit_variance_noise and (latent_image is None or not bool(torch.any(latent_image)))
            try:
                return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                      disable_pbar)
            finally:
                self._empty_latent = False

    return OneStepSampler()


class HyperSDOneStepScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperSDOneStepScheduler",
            display_name="Hyper-SD 1-Step Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="Sigmas [sigma(timestep), 0] for Hyper-SDXL-1step-Unet (trained at timestep 800: "
                        "[5.111, 0]). Use with the Hyper-SD 1-Step Sampler.",
            inputs=[
                io.Model.Input("model", tooltip="Hyper-SDXL-1step-Unet (CheckpointLoaderSimple or UNETLoader)."),
                io.Int.Input("timestep", default=800, min=1, max=999,
                             tooltip="Discrete timestep of the single step; Hyper-SDXL-1step-Unet uses 800."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, timestep) -> io.NodeOutput:
        table = discrete_sigma_table(model.get_model_object("model_sampling"), "HyperSDOneStepScheduler")
        if not isinstance(timestep, int) or not 1 <= timestep <= len(table) - 1:
            raise ValueError(f"HyperSDOneStepScheduler timestep: expected an integer in [1, {len(table) - 1}], "
                             f"got {timestep!r}")
        return io.NodeOutput(one_step_math.one_step_sigmas(timestep, table).to(torch.float32))


class HyperSDOneStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperSDOneStepSampler",
            display_name="Hyper-SD 1-Step Sampler",
            category="sampling/custom_sampling/samplers",
            description="One LCM boundary step to x0, as diffusers LCMScheduler(timesteps=[800]).",
            inputs=[
                io.Boolean.Input("unit_variance_noise", default=True,
                                 tooltip="For an empty latent start from unit-variance noise like diffusers "
                                         "(ComfyUI would scale it by sigma). Ignored for img2img latents."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, unit_variance_noise=True) -> io.NodeOutput:
        return io.NodeOutput(make_one_step_sampler(bool(unit_variance_noise)))


NODES = [HyperSDOneStepScheduler, HyperSDOneStepSampler]

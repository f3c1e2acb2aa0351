"""Which ComfyUI model samplings the TCD and 1-step math applies to: discrete VP timesteps only.

ComfyUI builds a model's ``model_sampling`` as ``class ModelSampling(<schedule>, <prediction>)``
(``comfy/model_base.py: model_sampling``; the ModelSampling* nodes build the same pair), so the
kind is read from the class names in its MRO, the way ComfyUI's own samplers test
``isinstance(model_sampling, CONST)``. Names rather than imports keep this module ComfyUI-free.
A flow (SD3, FLUX) or EDM model also has a ``sigmas`` buffer and a ``timestep`` method, so a duck-type
check would let TCD run on it and silently produce a wrong image.
"""
from __future__ import annotations

import torch

# Schedule classes (comfy/model_sampling.py, comfy_extras/nodes_model_advanced.py) -> None when the
# sigmas are the discrete VP table TCD's timesteps index, else what they are instead.
SCHEDULES = {
    "ModelSamplingDiscrete": None,
    "ModelSamplingDiscreteFlow": "flow matching (SD3, AuraFlow, ...)",
    "ModelSamplingFlux": "flow matching (FLUX)",
    "ModelSamplingCosmosRFlow": "rectified flow (Cosmos)",
    "ModelSamplingContinuousV": "continuous-time v-prediction",
    "ModelSamplingContinuousEDM": "continuous EDM sigmas",
    "ModelSamplingDiscreteEDM": "EDM sigmas",
    "ModelSamplingDiscreteDistilled": "LCM's 50-step distilled table (ModelSamplingDiscrete 'lcm')",
    "StableCascadeSampling": "Stable Cascade's cosine schedule",
}
# Prediction classes -> None when ComfyUI's denoiser output is an x0 TCD can use, else what it is.
PREDICTIONS = {
    "EPS": None,
    "V_PREDICTION": None,
    "X0": None,
    "CONST": "flow matching (CONST) prediction",
    "EDM": "EDM prediction",
    "LCM": "LCM boundary-condition output",
    "IMG_TO_IMG": "image-to-image (unscaled input) prediction",
    "COSMOS_RFLOW": "rectified-flow prediction",
}
SUPPORTED = "a discrete-timestep eps or v-prediction model (SD1.5, SD2, SDXL: ComfyUI's ModelSamplingDiscrete)"


def _first_known(classes: list[str], table: dict) -> str | None:
    return next((name for name in classes if name in table), None)


def unsupported_reason(model_sampling) -> str | None:
    """None when TCD / the 1-step step can sample this model, else what the model is instead."""
    classes = [c.__name__ for c in type(model_sampling).__mro__]
    schedule, prediction = _first_known(classes, SCHEDULES), _first_known(classes, PREDICTIONS)
    if schedule is None or prediction is None:
        return f"an unknown sampling ({' + '.join(classes[:3])})"
    if SCHEDULES[schedule] or PREDICTIONS[prediction]:
        return f"{SCHEDULES[schedule] or PREDICTIONS[prediction]} [{schedule} + {prediction}]"
    sigmas = getattr(model_sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        return f"{schedule} without a sigma table"
    # A subclass may keep the class names but re-map timesteps (as LCM's distilled table does):
    # TCD indexes the table by timestep, so sigma -> timestep must be the table index.
    probe = torch.tensor([0, len(sigmas) // 2, len(sigmas) - 1])
    got = model_sampling.timestep(sigmas[probe].to(torch.float32)).to("cpu").reshape(-1)
    if not torch.equal(got.round().long(), probe):
        return f"{type(model_sampling).__name__}, whose timesteps are not its sigma table's indices"
    return None


def discrete_sigma_table(model_sampling, who: str) -> torch.Tensor:
    """The model's discrete VP sigma table (float64), or one ValueError naming ``who`` and the model kind."""
    reason = unsupported_reason(model_sampling)
    if reason is not None:
        raise ValueError(f"{who}: needs {SUPPORTED}; this model samples as {reason}, which the Hyper-SD TCD / "
                         "1-step math does not apply to. Use the sampler the model was made for "
                         "(e.g. euler + simple for SD3/FLUX)")
    return model_sampling.sigmas.detach().to("cpu", torch.float64)

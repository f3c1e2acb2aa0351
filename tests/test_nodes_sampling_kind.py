"""Which model samplings the TCD / 1-step nodes accept (nodes/sampling_kind.py, no ComfyUI).

The classes below carry the names and the schedule behaviour of ComfyUI 0.3.64's own
(comfy/model_sampling.py, comfy_extras/nodes_model_advanced.py) and are combined the way ComfyUI
does, ``class ModelSampling(<schedule>, <prediction>)``; tests/comfyui/test_nodes_reliability.py runs
the same check on the real classes through ComfyUI's ModelSampling* nodes.
"""
import pytest
import torch

from nodes import sampling_kind


def _vp_sigmas(n=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return (((1 - abar) / abar) ** 0.5).float()


class ModelSamplingDiscrete(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sigmas", _vp_sigmas())

    def timestep(self, sigma):
        return (sigma.log()[None] - self.sigmas.log()[:, None]).abs().argmin(dim=0).view(sigma.shape)


class ModelSamplingDiscreteDistilled(ModelSamplingDiscrete):  # LCM: 50 sigmas, timesteps 19, 39, ...
    def __init__(self):
        super().__init__()
        self.sigmas = self.sigmas[19::20].clone()

    def timestep(self, sigma):
        return super().timestep(sigma) * 20 + 19


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sigmas", torch.arange(1, 1001) / 1000)

    def timestep(self, sigma):
        return sigma * 1000


class ModelSamplingFlux(ModelSamplingDiscreteFlow):
    pass


class ModelSamplingContinuousEDM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(0.002, 120.0, 1000).log().exp())

    def timestep(self, sigma):
        return 0.25 * sigma.log()


class EPS:
    pass


class V_PREDICTION(EPS):
    pass


class EDM(V_PREDICTION):
    pass


class CONST:
    pass


class X0(EPS):
    pass


class IMG_TO_IMG(X0):
    pass


class LCM(EPS):
    pass


def _sampling(schedule, prediction):
    class ModelSampling(schedule, prediction):
        pass

    return ModelSampling()


@pytest.mark.parametrize("prediction", [EPS, V_PREDICTION, X0])
def test_discrete_vp_models_are_accepted(prediction):
    ms = _sampling(ModelSamplingDiscrete, prediction)
    assert sampling_kind.unsupported_reason(ms) is None
    table = sampling_kind.discrete_sigma_table(ms, "HyperSDTCDScheduler")
    assert table.dtype == torch.float64 and len(table) == 1000 and abs(float(table[999]) - 14.6146) < 1e-3


@pytest.mark.parametrize("schedule,prediction,expected", [
    (ModelSamplingDiscreteFlow, CONST, "flow matching (SD3, AuraFlow, ...) [ModelSamplingDiscreteFlow + CONST]"),
    (ModelSamplingFlux, CONST, "flow matching (FLUX) [ModelSamplingFlux + CONST]"),
    (ModelSamplingContinuousEDM, EDM, "continuous EDM sigmas [ModelSamplingContinuousEDM + EDM]"),
    (ModelSamplingContinuousEDM, V_PREDICTION, "continuous EDM sigmas [ModelSamplingContinuousEDM + V_PREDICTION]"),
    (ModelSamplingDiscreteDistilled, LCM, "LCM's 50-step distilled table"),
    (ModelSamplingDiscrete, IMG_TO_IMG, "image-to-image (unscaled input) prediction [ModelSamplingDiscrete + IMG_TO_IMG]"),
    (ModelSamplingDiscrete, CONST, "flow matching (CONST) prediction [ModelSamplingDiscrete + CONST]"),
])
def test_flow_edm_and_lcm_models_are_refused_naming_node_and_kind(schedule, prediction, expected):
    ms = _sampling(schedule, prediction)
    with pytest.raises(ValueError) as err:
        sampling_kind.discrete_sigma_table(ms, "HyperSDTCDScheduler")
    msg = str(err.value)
    assert msg.startswith("HyperSDTCDScheduler: needs a discrete-timestep eps or v-prediction model (SD1.5, SD2, SDXL")
    assert expected in msg, msg


def test_a_discrete_subclass_with_other_timesteps_is_refused():
    """Class names alone would pass it; TCD indexes the table by timestep, so the mapping is probed."""
    class ShiftedDiscrete(ModelSamplingDiscrete):
        def timestep(self, sigma):
            return super().timestep(sigma) + 1

    reason = sampling_kind.unsupported_reason(_sampling(ShiftedDiscrete, EPS))
    assert reason == "ModelSampling, whose timesteps are not its sigma table's indices"


def test_unknown_sampling_classes_are_refused():
    class SomeoneElsesSampling(torch.nn.Module):
        sigmas = _vp_sigmas()

    assert sampling_kind.unsupported_reason(_sampling(SomeoneElsesSampling, EPS)).startswith("an unknown sampling")

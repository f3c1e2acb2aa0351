"""Our sigma-space samplers against diffusers' own schedulers driving the same tiny UNet.

Noise convention that makes TCD exact: diffusers starts text-to-image from unit noise ``n`` (the
VP latent at t = 999), which is ``x = n * sqrt(1 + sigma_max^2)`` in sigma space (ComfyUI's
"max denoise" scaling); img2img starts from ``add_noise`` = ``sqrt(abar) x0 + sqrt(1-abar) n``,
which is ``x0 + sigma * n`` in sigma space (ComfyUI's scaling when denoise < 1). Per-step noise
``z`` is drawn from identically seeded generators in the same order; diffusers' re-noising
``sqrt(abar_prev/abar_s) x_s + sqrt(1 - abar_prev/abar_s) z`` is algebraically identical to our
``x_s + sqrt(sigma_prev^2 - sigma_s^2) z`` after the VP->VE change of scale.

Tolerances (relative L2): float64 TCD runs agree to 1e-10 (only rounding differs); the LCM
reference to 1e-8 (diffusers evaluates c_out in float32); float32 runs to 1e-4.
"""
import pytest
import torch

from schedulers import (
    DiscreteDenoiser,
    one_step_sigmas,
    sigmas_from_alphas_cumprod,
    scaled_linear_alphas_cumprod,
    sample_one_step,
    sample_tcd,
    tcd_sigmas,
    tcd_timesteps,
    unit_variance_noise,
)

diffusers = pytest.importorskip("diffusers")

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_unet(seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    # diffusers zero-initialises nothing here, but scale weights up so outputs depend on the input
    # strongly enough that a wrong scaling would show.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.to(dtype).eval()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def diffusers_tcd(unet, cond, noise, steps, eta, denoise, prediction_type, init_latent, seed):
    sched = diffusers.TCDScheduler(**BETAS, prediction_type=prediction_type)
    if noise.dtype == torch.float64:
        # diffusers stores abar in float32 and takes its square roots in float32 (~1e-7 error);
        # hold the same values in float64 so the reference runs at the precision under test.
        sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps, strength=denoise)
    timesteps = sched.timesteps
    latents = noise if init_latent is None else sched.add_noise(init_latent, noise, timesteps[:1])
    gen = torch.Generator().manual_seed(seed)
    for t in timesteps:
        out = unet(latents, t, encoder_hidden_states=cond).sample
        latents = sched.step(out, t, latents, eta=eta, generator=gen).prev_sample
    return latents


def diffusers_sigma_table():
    """diffusers keeps abar in float32; use its exact table so only the algorithm is compared."""
    return sigmas_from_alphas_cumprod(diffusers.TCDScheduler(**BETAS).alphas_cumprod.double())


def our_tcd(unet, cond, noise, steps, eta, denoise, prediction_type, init_latent, seed):
    table = diffusers_sigma_table()
    sigmas = tcd_sigmas(steps, denoise, table).to(noise.dtype)
    if init_latent is None:
        x = noise * (1 + sigmas[0] ** 2).sqrt()
    else:
        x = init_latent + sigmas[0] * noise
    gen = torch.Generator().manual_seed(seed)
    noise_sampler = lambda s, s_next: torch.randn(noise.shape, generator=gen, dtype=noise.dtype)  # noqa: E731
    model = DiscreteDenoiser(lambda xi, t, **c: unet(xi, t, **c).sample, prediction_type, table)
    return sample_tcd(
        model,
        x,
        sigmas,
        extra_args={"encoder_hidden_states": cond},
        noise_sampler=noise_sampler,
        eta=eta,
        disable=True,
        sigma_table=table,
    )


CASES = [(steps, eta, 1.0) for steps in (1, 2, 4, 8, 50) for eta in (0.0, 0.3, 1.0)] + [
    (steps, eta, 0.5) for steps in (1, 2, 4) for eta in (0.0, 0.3, 1.0)
]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def setup(request):
    # Fresh random inputs per prediction type; float64 is the reference precision.
    return request.param, tiny_unet(1 if request.param == "epsilon" else 2, torch.float64)


@pytest.mark.parametrize("steps,eta,denoise", CASES)
def test_tcd_matches_diffusers_float64(setup, steps, eta, denoise):
    prediction_type, unet = setup
    g = torch.Generator().manual_seed(steps * 100 + int(eta * 10))
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    init = None if denoise == 1.0 else torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    args = (unet, cond, noise, steps, eta, denoise, prediction_type, init, 1234)
    with torch.no_grad():
        ref = diffusers_tcd(*args)
        ours = our_tcd(*args)
    assert torch.isfinite(ref).all()
    assert rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("steps,eta", [(1, 1.0), (4, 0.3), (8, 0.0)])
def test_tcd_matches_diffusers_float32(steps, eta):
    unet = tiny_unet(3, torch.float32)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 5, 32, generator=g)
    args = (unet, cond, noise, steps, eta, 1.0, "epsilon", None, 99)
    with torch.no_grad():
        assert rel_err(our_tcd(*args), diffusers_tcd(*args)) < 1e-4


def test_tcd_final_step_lands_on_t0_like_diffusers():
    # Identity-in-x0 model: the output differs from x0 by diffusers' t=0 residual noise only.
    x0 = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    sigmas = tcd_sigmas(1).double()
    x = x0 + sigmas[0] * eps
    out = sample_tcd(lambda xi, s: x0, x, sigmas, disable=True, eta=1.0)
    abar0 = 1 - 0.00085
    assert torch.allclose(out, abar0**0.5 * x0 + (1 - abar0) ** 0.5 * eps, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep", [800, 999, 500])
def test_one_step_matches_diffusers_lcm(prediction_type, timestep):
    unet = tiny_unet(4, torch.float64)
    g = torch.Generator().manual_seed(timestep)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    sched = diffusers.LCMScheduler(**BETAS, prediction_type=prediction_type)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(timesteps=[timestep])
    with torch.no_grad():
        t = sched.timesteps[0]
        ref = sched.step(unet(noise, t, encoder_hidden_states=cond).sample, t, noise).prev_sample
        table = diffusers_sigma_table()
        sigmas = one_step_sigmas(timestep, table).double()
        model = DiscreteDenoiser(lambda xi, ti, **c: unet(xi, ti, **c).sample, prediction_type, table)
        x = unit_variance_noise(noise, sigmas[0])
        ours = sample_one_step(
            model, x, sigmas, extra_args={"encoder_hidden_states": cond}, disable=True, sigma_table=table
        )
    # diffusers computes c_out from a long tensor in float32: c_out(800) = 1 - 2e-9 rounds to 1.0.
    assert rel_err(ours, ref) < 1e-8


def test_default_table_equals_diffusers_to_float32_rounding():
    # Our abar is float64; diffusers' float32 abar limits agreement to ~1e-6 relative, which
    # 1 - abar amplifies near t = 0 for sigma.
    ours = scaled_linear_alphas_cumprod()
    ref = diffusers.TCDScheduler(**BETAS).alphas_cumprod.double()
    assert float(((ours - ref) / ref).abs().max()) < 2e-6
    ours_sigma, ref_sigma = sigmas_from_alphas_cumprod(ours), diffusers_sigma_table()
    assert float(((ours_sigma - ref_sigma) / ref_sigma).abs().max()) < 2e-5


def test_default_table_default_run_float32_within_1e4():
    # With our own float64 table (what the nodes use) float32 runs stay within 1e-4 of diffusers.
    unet = tiny_unet(5, torch.float32)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 5, 32, generator=g)
    sigmas = tcd_sigmas(4).float()
    gen = torch.Generator().manual_seed(5)
    model = DiscreteDenoiser(lambda xi, t, **c: unet(xi, t, **c).sample)
    with torch.no_grad():
        ours = sample_tcd(
            model,
            noise * (1 + sigmas[0] ** 2).sqrt(),
            sigmas,
            extra_args={"encoder_hidden_states": cond},
            noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=gen),
            eta=0.3,
            disable=True,
        )
        ref = diffusers_tcd(unet, cond, noise, 4, 0.3, 1.0, "epsilon", None, 5)
    assert rel_err(ours, ref) < 1e-4


def test_reference_timesteps_and_sigmas():
    assert tcd_timesteps(4) == [999, 759, 499, 259]
    assert tcd_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    s = one_step_sigmas(800)
    assert abs(float(s[0]) - 5.1110) < 1e-4 and float(s[1]) == 0.0
    assert abs(float(tcd_sigmas(1)[0]) - 14.6146) < 1e-4


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: tcd_timesteps(0), "steps must be an integer >= 1"),
        (lambda: tcd_timesteps(4, 0.0), "denoise must be in"),
        (lambda: tcd_timesteps(60), "exceeds the 50-step"),
        (lambda: tcd_timesteps(20, 0.2), "raise denoise"),
        (lambda: one_step_sigmas(0), "timestep must be an integer in"),
        (lambda: one_step_sigmas(1000), "timestep must be an integer in"),
        (lambda: sample_tcd(lambda x, s: x, torch.zeros(1), tcd_sigmas(1), eta=1.5), "eta must be in"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nan_model_output_is_reported():
    with pytest.raises(FloatingPointError, match="NaN/inf at step 0"):
        sample_tcd(lambda x, s: x * float("nan"), torch.ones(1, 4, 2, 2), tcd_sigmas(2), disable=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "both_infs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_non_finite_element_is_reported_at_its_step(bad, dtype):
    """One bad element among large finite values, appearing only at step 1 (of 4)."""
    calls = []

    def model(x, sigma):
        calls.append(1)
        out = torch.full_like(x, 3e4 if dtype == torch.float16 else 1e5)  # big, finite: must not trip the check
        if len(calls) == 2:
            if bad == "both_infs":
                out[0, 0, 0, 0], out[0, 1, 1, 1] = float("inf"), float("-inf")
            else:
                out[0, 2, 3, 1] = bad
        return out

    x = torch.randn(2, 4, 8, 8).to(dtype)
    with pytest.raises(FloatingPointError, match="NaN/inf at step 1"):
        sample_tcd(model, x, tcd_sigmas(4).to(dtype), disable=True)
    assert len(calls) == 2

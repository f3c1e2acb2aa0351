"""TCD (SamplerCustom and plain KSampler) and the 1-step sampler vs references written here in VP
space from the reference doc's formulas (not through schedulers/)."""
import math

import torch


def abar_table():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def unet_eps(model, x_vp, t, context):
    dm = model.model.diffusion_model
    with torch.no_grad():
        return dm(x_vp.float(), torch.tensor([float(t)]), context=context.float()).double()


TCD_T = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259]}


def reference_tcd(model, noise, context, steps, eta, seed):
    abar = abar_table()
    gen = torch.Generator().manual_seed(seed)
    x = noise.double()  # t = 999 = sigma_max: ComfyUI starts from unit-variance noise too
    ts = TCD_T[steps]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else 0
        eps = unet_eps(model, x, t, context)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        s = math.floor((1 - eta) * t_prev)
        x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps
        if i + 1 < len(ts):
            z = torch.randn(noise.shape, generator=gen, dtype=torch.float32).double()
            ratio = abar[t_prev] / abar[s]
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * z
    return x


def reference_one_step(model, noise, context, t=800):
    abar = abar_table()
    x = noise.double()  # diffusers: unit-variance UNet input
    eps = unet_eps(model, x, t, context)
    x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    scaled = t * 10.0
    c_skip = 0.25 / (scaled ** 2 + 0.25)
    c_out = scaled / math.sqrt(scaled ** 2 + 0.25)
    return c_out * x0 + c_skip * x


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def sampling_checks(run, model):
    M = run.nodes()
    seed = 1234
    torch.manual_seed(7)
    context = torch.randn(1, 77, 768)
    positive = [[context, {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    noise = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(seed))
    scale = 0.18215  # SD1.5 latent format: ComfyUI returns latents / scale_factor
    out = {}
    for steps in (1, 4):
        eta = 1.0 if steps == 1 else 0.3
        sampler = M["HyperSDTCDSampler"].execute(eta=eta).result[0]
        sigmas = M["HyperSDTCDScheduler"].execute(model=model, steps=steps, denoise=1.0).result[0]
        got = M["SamplerCustom"]().sample(model, True, seed, 1.0, positive, positive, sampler, sigmas, latent)[0]["samples"]
        ref = reference_tcd(model, noise, context, steps, eta, seed) / scale
        out[f"samplercustom_tcd_{steps}step_rel_err"] = rel_err(got, ref)
        out[f"tcd_{steps}step_sigmas"] = [round(float(s), 4) for s in sigmas]
    got = M["KSampler"]().sample(model, seed, 4, 1.0, "tcd", "tcd", positive, positive, latent)[0]["samples"]
    out["ksampler_tcd_4step_rel_err"] = rel_err(got, reference_tcd(model, noise, context, 4, 0.3, seed) / scale)
    got = M["KSampler"]().sample(model, seed, 1, 1.0, "tcd", "tcd", positive, positive, latent)[0]["samples"]
    out["ksampler_tcd_1step_rel_err"] = rel_err(got, reference_tcd(model, noise, context, 1, 0.3, seed) / scale)
    sigmas = M["HyperSDOneStepScheduler"].execute(model=model, timestep=800).result[0]
    out["one_step_sigmas"] = [round(float(s), 4) for s in sigmas]
    sampler = M["HyperSDOneStepSampler"].execute(unit_variance_noise=True).result[0]
    got = M["SamplerCustom"]().sample(model, True, seed, 1.0, positive, positive, sampler, sigmas, latent)[0]["samples"]
    out["one_step_rel_err"] = rel_err(got, reference_one_step(model, noise, context) / scale)
    # ComfyUI's own scaling (sigma * noise) would differ: make sure the check can fail.
    out["one_step_vs_sigma_scaled_noise_rel_err"] = rel_err(
        got, reference_one_step(model, noise * float(sigmas[0]) / math.sqrt(1 + float(sigmas[0]) ** 2), context) / scale)
    run.results.update(out)

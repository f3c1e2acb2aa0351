"""Score-distillation stage (DMD-style) for one-step generation.

Generator: the student maps unit noise at timestep `t_gen` (999 for the unified LoRA, 800 for the
dedicated 1-step UNet) to x0 in one call. Distribution matching: noise x0 to a random t, the frozen
teacher with CFG gives the real x0 estimate, the fake-score network (a teacher copy with its own
LoRA, trained by plain denoising on the student's detached outputs) gives the fake one; the
generator gradient is (fake - real) normalised by mean|x0 - real| (DMD). An MSE regulariser ties
x0 to a reference on the same noise (teacher multi-step or the TSCD LoRA output). Two time-scale:
the fake score updates every step, the generator every `gen_every` steps.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from training.feedback import _abar, cat_kwargs, eps_to_x0, trailing_grid, unet_kwargs
from training.export import save_file_atomic
from training.merge import add_stage_lora

MODES = {"lora": 999, "full": 800}


def student_x0(student, noise, cond, t_gen: int, alphas_cumprod):
    """One-step output: the UNet sees unit-variance noise at t_gen (diffusers LCM/TCD convention)."""
    tt = torch.full((noise.shape[0],), t_gen, device=noise.device, dtype=torch.long)
    return eps_to_x0(noise, student(noise, tt, **unet_kwargs(cond)).sample, _abar(alphas_cumprod, tt, noise))


def cfg_eps(unet, x, t, cond, uncond, guidance: float):
    if uncond is None or guidance == 1.0:
        return unet(x, t, **unet_kwargs(cond)).sample
    both = unet(torch.cat([x, x]), torch.cat([t, t]), **cat_kwargs(unet_kwargs(uncond), unet_kwargs(cond))).sample
    eps_u, eps_c = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def random_t(n, generator, t_min=20, t_max=980, device="cpu"):
    return torch.randint(t_min, t_max + 1, (n,), generator=generator).to(device)


def dm_loss(x0, teacher, fake, cond, uncond, guidance, t, noise, alphas_cumprod):
    """DMD distribution-matching surrogate: its gradient w.r.t. x0 is the normalised (fake - real)."""
    abar = _abar(alphas_cumprod, t, x0)
    with torch.no_grad():
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        real = eps_to_x0(x_t, cfg_eps(teacher, x_t, t, cond, uncond, guidance), abar)
        fake_x0 = eps_to_x0(x_t, fake(x_t, t, **unet_kwargs(cond)).sample, abar)
        norm = (x0 - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-5)
        grad = (fake_x0 - real) / norm
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach(), reduction="sum") / x0.shape[0], grad


def fake_score_loss(fake, x0, cond, t, noise, alphas_cumprod):
    """Denoising (eps) loss of the fake-score network on the student's detached outputs."""
    abar = _abar(alphas_cumprod, t, x0)
    x_t = abar.sqrt() * x0.detach() + (1 - abar).sqrt() * noise
    return F.mse_loss(fake(x_t, t, **unet_kwargs(cond)).sample, noise)


@torch.no_grad()
def teacher_multistep_x0(teacher, noise, cond, uncond, guidance, alphas_cumprod, steps=8, t_start=999):
    """Regression reference: teacher DDIM with CFG from the same unit noise (t_start -> x0)."""
    grid = [t for t in trailing_grid(steps) if t <= t_start] or [t_start]
    x = noise
    for i, t in enumerate(grid):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = cfg_eps(teacher, x, tt, cond, uncond, guidance)
        x0 = eps_to_x0(x, eps, _abar(alphas_cumprod, tt, x))
        if i + 1 < len(grid):
            a_next = _abar(alphas_cumprod, torch.full_like(tt, grid[i + 1]), x)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0


class DMDStage:
    """Holds student, frozen teacher, fake score and both optimisers; `step(batch)` trains once.

    mode "lora": the student gets a fresh "dmd" LoRA and t_gen = 999 (unified LoRA);
    mode "full": every student UNet parameter trains, t_gen = 800 (export with `save_full_unet`).
    batch = dict(cond, uncond (or None), noise, reference (MSE target x0 or None)).
    """

    def __init__(self, student, teacher, alphas_cumprod, cfg: dict):
        self.mode = cfg.get("mode", "lora")
        if self.mode not in MODES:
            raise ValueError(f"dmd.mode must be one of {sorted(MODES)}, got {self.mode!r}")
        self.t_gen = int(cfg.get("timestep", MODES[self.mode]))
        self.cfg, self.abar = cfg, alphas_cumprod
        self.student, self.teacher = student, teacher.requires_grad_(False)
        rank = int(cfg.get("rank", 4))
        if self.mode == "lora":
            gen_params = add_stage_lora(student, "dmd", rank)
        else:
            gen_params = list(student.parameters())
            student.requires_grad_(True)
        self.fake = copy.deepcopy(teacher)
        fake_params = add_stage_lora(self.fake, "fake", int(cfg.get("fake_rank", rank)))
        self.gen_opt = torch.optim.AdamW(gen_params, lr=float(cfg.get("lr", 1e-4)), weight_decay=0.0)
        self.fake_opt = torch.optim.AdamW(fake_params, lr=float(cfg.get("fake_lr", cfg.get("lr", 1e-4))),
                                          weight_decay=0.0)
        self.gen_every = int(cfg.get("gen_every", 5))
        self.generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        self.steps = 0

    def generator_loss(self, batch, t=None, dm_noise=None):
        x0 = student_x0(self.student, batch["noise"], batch["cond"], self.t_gen, self.abar)
        n = x0.shape[0]
        t = random_t(n, self.generator, device=x0.device) if t is None else t
        dm_noise = torch.randn(x0.shape, generator=self.generator).to(x0) if dm_noise is None else dm_noise
        dm, _ = dm_loss(x0, self.teacher, self.fake, batch["cond"], batch.get("uncond"),
                        float(self.cfg.get("guidance", 7.5)), t, dm_noise, self.abar)
        reg = F.mse_loss(x0, batch["reference"]) if batch.get("reference") is not None else x0.new_zeros(())
        return dm + float(self.cfg.get("reg_weight", 0.25)) * reg, dm.detach(), reg.detach(), x0

    def step(self, batch) -> dict:
        stats = {}
        if self.steps % self.gen_every == 0:
            loss, dm, reg, x0 = self.generator_loss(batch)
            self.gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.gen_opt.step()
            stats.update(dmd_loss=dm.item(), dmd_reg=reg.item())
        else:
            with torch.no_grad():
                x0 = student_x0(self.student, batch["noise"], batch["cond"], self.t_gen, self.abar)
        t = random_t(x0.shape[0], self.generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        fl = fake_score_loss(self.fake, x0, batch["cond"], t, noise, self.abar)
        self.fake_opt.zero_grad(set_to_none=True)
        fl.backward()
        self.fake_opt.step()
        self.steps += 1
        return {**stats, "fake_loss": fl.item()}


def save_full_unet(unet, path: str, dtype=torch.float16):
    """Diffusers-layout UNet state dict (ComfyUI's UNETLoader converts it) written atomically."""
    sd = {k: v.detach().to(dtype).cpu() for k, v in unet.state_dict().items() if "lora_" not in k}
    save_file_atomic(sd, path, {"format": "pt", "hypersd_stage": "dmd-full", "timestep": "800"})


# --- training.run plug-in (see docs/stages.md) ------------------------------------------------------
# mode "lora": DMD on the student's own "dmd" LoRA at t = 999 (merged into the unified LoRA);
# mode "full": a separate trainable copy of the UNet (base + the earlier stages' LoRAs folded in) at
# t = 800, exported as a diffusers-layout UNet (`export_full_unet`).

PARAMS = {"lr": 0.0, "mode": "lora", "timestep": 0, "guidance": 7.5, "gen_every": 1, "reg_weight": 0.25,
          "reg_steps": 4, "fake_lr": 1e-3, "fake_rank": 0, "t_min": 20, "t_max": 980}


def generator_timestep(p: dict) -> int:
    """params.timestep, or the mode's default (999 for the LoRA, 800 for the full 1-step UNet)."""
    return int(p["timestep"]) or MODES[p["mode"]]


def is_full(stage) -> bool:
    return stage.type == "score_distill" and (stage.params or {}).get("mode", "lora") == "full"


def check_params(p: dict, stage, key: str):
    if p["mode"] not in MODES:
        raise ValueError(f"config key '{key}.mode': must be one of {sorted(MODES)} ('lora': the unified LoRA at "
                         f"t = 999; 'full': the whole 1-step UNet at t = 800), got {p['mode']!r}")
    if not 0 <= int(p["timestep"]) < 1000 or not 0 <= int(p["t_min"]) < int(p["t_max"]) < 1000:
        raise ValueError(f"config key '{key}.timestep' / '{key}.t_min' / '{key}.t_max': need 0 < timestep < 1000 "
                         f"(0 = the mode's default) and 0 <= t_min < t_max < 1000")
    if int(p["gen_every"]) < 1 or int(p["reg_steps"]) < 1 or float(p["guidance"]) < 1:
        raise ValueError(f"config key '{key}': need gen_every >= 1, reg_steps >= 1, guidance >= 1")


def build_persistent(unet, stages, cfg) -> dict:
    """The fake-score network is a "fake" adapter on the shared frozen base (no UNet copy)."""
    from training.lora import add_named_lora
    from training.stages import stage_params

    p = stage_params(stages[0], PARAMS)
    rank = int(p["fake_rank"]) or cfg.lora.rank
    params = add_named_lora(unet, "fake", rank, float(rank), cfg.lora.targets)
    return {"fake_opt": torch.optim.AdamW(params, lr=float(p["fake_lr"]), weight_decay=0.0)}


def _randn(ctx, like, salt):
    from training.stages import global_randn

    return global_randn(ctx, like, salt)


FULL_KEYS = ("full_unet", "full_opt")


def folded_unet_copy(unet, adapters):
    """A plain diffusers UNet (no peft layers) = base weights of `unet` + the named adapters folded in."""
    from diffusers import UNet2DConditionModel

    from training.merge import fold_kohya_into, peft_to_kohya

    full = UNet2DConditionModel.from_config(unet.config)
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    full.load_state_dict(state)  # strict: every weight of the base is there
    full.to(next(unet.parameters()).device)  # fp32 master weights (AdamW), whatever the base dtype
    for name in adapters:
        fold_kohya_into(full, peft_to_kohya(unet, name), source=f"adapter {name!r}")
    return full


def ensure_full_unet(ctx, stage):
    """mode full: the student is ctx.persistent["full_unet"] with its own AdamW ("full_opt"), built when the
    stage starts (base + the active earlier adapters folded in) or restored from the resume checkpoint."""
    from training import checkpoint as ckpt
    from training.stages import stage_params

    if "full_unet" in ctx.persistent:
        return ctx.persistent["full_unet"]
    p = stage_params(stage, PARAMS)
    full = folded_unet_copy(ctx.unet, [a for a in ctx.adapters.active if a != "fake"])
    full.requires_grad_(True).train()
    if ctx.cfg.optim.gradient_checkpointing:
        full.enable_gradient_checkpointing()
    o = ctx.cfg.optim
    opt = torch.optim.AdamW(full.parameters(), lr=float(p["lr"]) or o.lr, betas=tuple(o.betas),
                            weight_decay=o.weight_decay)
    if ctx.step > ctx.stage_start:  # resumed inside the stage: the checkpoint holds the trained copy
        if not ctx.resume_dir:
            raise RuntimeError("score_distill mode full: the stage is under way but there is no resume checkpoint")
        ckpt.load_extra(ctx.resume_dir, {"full_unet": full, "full_opt": opt})
    ctx.persistent.update(full_unet=full, full_opt=opt)  # saved in every later checkpoint (stage_state)
    return full


def setup(ctx, stage):
    if is_full(stage):
        ctx.student = ensure_full_unet(ctx, stage)


def full_unet_metadata(family, prediction_type, timestep, base=""):
    return {"format": "pt", "hypersd.kind": "1step_unet", "hypersd.base_family": family,
            "hypersd.prediction_type": prediction_type, "hypersd.timestep": str(timestep),
            "hypersd.recommended_scheduler": "HyperSDOneStepScheduler",
            "hypersd.recommended_sampler": "HyperSDOneStepSampler", "hypersd.recommended_steps": "1",
            "hypersd.recommended_cfg": "1.0", "hypersd.base": base}


def export_full_unet(unet, folder: str, metadata: dict, dtype=None):
    """<folder>/config.json + <folder>/diffusion_pytorch_model.safetensors (diffusers layout: loads with
    UNet2DConditionModel.from_pretrained(folder); the .safetensors alone loads in ComfyUI's UNETLoader for
    real SD1.5 / SDXL shapes). Written into a temp folder that is renamed into place (atomic)."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        sd = {k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in unet.state_dict().items()}
        save_file(sd, os.path.join(tmp, "diffusion_pytorch_model.safetensors"),
                  metadata={k: str(v) for k, v in metadata.items()})
        unet.save_config(tmp)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return os.path.join(folder, "diffusion_pytorch_model.safetensors")


def stage_loss(ctx, batch, stage):
    from training.adversarial import _all_reduce_grads
    from training.stages import EpsModel, stage_params

    p = stage_params(stage, PARAMS)
    pt, abar, guidance = ctx.prediction_type, ctx.abar, float(p["guidance"])
    t_gen = generator_timestep(p)
    noise, cond, uncond = batch["noise"], batch["cond"], batch["uncond"]
    gen_step = (ctx.step - ctx.stage_start) % int(p["gen_every"]) == 0

    def rand_t(col):  # from the batch's uniforms: resume-exact, the same for any process count
        return (int(p["t_min"]) + batch["u"][:, col] * (int(p["t_max"]) - int(p["t_min"]))).long()

    with torch.set_grad_enabled(gen_step):
        x0 = student_x0(EpsModel(ctx.student, abar, pt), noise, cond, t_gen, abar)
    # fake score: plain denoising on the student's (detached) outputs, every step
    fake_opt = ctx.persistent["fake_opt"]
    with ctx.adapters.only(["fake"], ["fake"]):
        fl = fake_score_loss(EpsModel(ctx.unet, abar, pt), x0, cond, rand_t(6), _randn(ctx, x0, 11), abar)
        fake_opt.zero_grad(set_to_none=True)
        fl.backward()
        _all_reduce_grads(ctx.accelerator, [q for g in fake_opt.param_groups for q in g["params"]])
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)
    logs = {"fake_loss": float(fl.detach())}
    if not gen_step:
        return None, logs  # two time-scale update: the generator waits
    teacher = EpsModel(ctx.unet, abar, pt, ctx.teacher)
    fake = EpsModel(ctx.unet, abar, pt, lambda: ctx.adapters.only(["fake"]))
    dm, _ = dm_loss(x0, teacher, fake, cond, uncond, guidance, rand_t(5), _randn(ctx, x0, 13), abar)
    reg = x0.new_zeros(())
    if float(p["reg_weight"]) > 0:
        ref = teacher_multistep_x0(teacher, noise, cond, uncond, guidance, abar, int(p["reg_steps"]), t_gen)
        reg = F.mse_loss(x0.float(), ref.float())
    loss = dm + float(p["reg_weight"]) * reg
    return loss, {**logs, "dmd_loss": float(dm.detach()), "dmd_reg": float(reg.detach())}

"""The stage plug-ins as training.run calls them (shared UNet, one adapter per group, AdapterStack):
each lowers its own loss on a fixed batch, and only its own adapter receives gradients."""
import pytest
import torch

# The loss each stage is judged by: adversarial -> its TSCD part (the adversarial term is a game with
# a discriminator that trains too, not a monotone objective); feedback -> ReLU(alpha - reward);
# score_distill -> the fake-score denoising loss and the regression to the teacher's multi-step
# output (the DMD surrogate's value is |normalised (fake - real)|^2, which moves with the fake score).
OWN = {"adversarial": ["tscd_loss"], "feedback": ["feedback_loss"], "score_distill": ["fake_loss", "dmd_reg"]}
LR = {"adversarial": 3e-3, "feedback": 1e-3, "score_distill": 3e-4}
STEPS = {"adversarial": 6, "feedback": 6, "score_distill": 6}
PARAMS = {"adversarial": {}, "feedback": {"reward": "tiny", "alpha": 2.0},
          "score_distill": {"guidance": 3.0, "reg_steps": 2, "reg_weight": 1.0, "gen_every": 1}}


@pytest.fixture(scope="module")
def harness():
    from accelerate import Accelerator

    from training.config import StageConfig, load_config
    from training.diffusion import DDIMGrid
    from training.models.adapters import AdapterStack, add_adapter
    from training.models.base import build_tiny
    from training.models.text import encode_prompts
    from training.stages import ADAPTER_OF, get_stage
    from training.stages.base import StageContext

    cfg = load_config(None, ["lora.rank=4", "lora.alpha=4"])
    base = build_tiny()  # the shipped tiny teacher
    unet = base.unet.requires_grad_(False)
    torch.manual_seed(0)
    params = {g: add_adapter(unet, ADAPTER_OF[g], 4, 4.0, cfg.lora.targets)
              for g in ("tscd", "feedback", "score_distill")}
    stages = {t: StageConfig(type=t, segments=1, steps=STEPS[t], params=PARAMS[t]) for t in STEPS}
    persistent = {}
    for t in ("adversarial", "score_distill"):
        persistent.update(get_stage(t).build_persistent(unet, [stages[t]], cfg))
    stack = AdapterStack(unet)
    acc = Accelerator(cpu=True)

    def encode(prompts):
        return encode_prompts(base, prompts, "cpu")

    ctx = StageContext(acc, unet, unet, base.vae, base.abar, DDIMGrid(base.abar, cfg.tscd.num_ddim_timesteps),
                       "epsilon", cfg, teacher=stack.disabled, target=torch.no_grad, adapters=stack,
                       persistent=persistent)
    g = torch.Generator().manual_seed(3)
    prompts = ["a red circle", "a blue square"]
    u = torch.rand(2, 8, generator=g, dtype=torch.float64)
    u[:, 0] = 0.0  # j = 1: the TSCD target is the teacher's own solver step (fixed, not self-referential)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "noise": torch.randn(2, 4, 8, 8, generator=g),
             "u": u, "step_u": u[0], "cond": encode(prompts), "uncond": encode(["", ""]), "captions": prompts}
    return ctx, stages, params, batch


@pytest.mark.parametrize("stype, group, active", [
    ("adversarial", "tscd", ["default"]),
    ("feedback", "feedback", ["default", "feedback"]),
    ("score_distill", "score_distill", ["default", "feedback", "dmd"]),
])
def test_stage_lowers_its_own_loss_on_a_fixed_batch(harness, stype, group, active):
    from training.stages import ADAPTER_OF, get_stage

    ctx, stages, params, batch = harness
    stage, module = stages[stype], get_stage(stype)
    ctx.adapters.use(active, [ADAPTER_OF[group]])
    ctx.state, ctx.step, ctx.stage_start, ctx.stage_index = {}, 0, 0, 0
    assert module.setup(ctx, stage) is None  # a LoRA stage trains its group's adapter
    opt = torch.optim.Adam(params[group], lr=LR[stype])
    for p in ctx.unet.parameters():  # the module-scoped UNet may hold an earlier test's gradients
        p.grad = None
    losses, own, rewards = [], [], []
    for _ in range(stage.steps):
        loss, logs = module.loss(ctx, batch, stage)
        own.append({k: logs[k] for k in OWN[stype]})
        rewards.append(logs.get("reward"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        others = [n for n, p in ctx.unet.named_parameters() if p.grad is not None and "lora_" in n
                  and f".{ADAPTER_OF[group]}." not in n]
        assert not others, f"{stype}: gradients reached other adapters, e.g. {others[:2]}"
        opt.step()
        losses.append(loss.item())
    print(f"{stype}: total {losses[0]:.4g} -> {losses[-1]:.4g}; " +
          ", ".join(f"{k} {own[0][k]:.4g} -> {own[-1][k]:.4g}" for k in OWN[stype]))
    for k in OWN[stype]:
        assert own[-1][k] < own[0][k], (k, own)
    if stype == "feedback":
        assert rewards[-1] > rewards[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eps_model_gives_epsilon_for_both_prediction_types(prediction_type):
    """feedback / score_distill run eps-based samplers; EpsModel converts a v-prediction UNet's output."""
    from types import SimpleNamespace

    from training.models.base import scheduler_abar
    from training.stages.base import EpsModel

    abar = scheduler_abar()
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 500, 999])
    a = abar[t].view(-1, 1, 1, 1).float()
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    def unet(x_in, t_in, **kw):
        return SimpleNamespace(sample=out)

    got = EpsModel(unet, abar, prediction_type)(x, t).sample
    assert (got - eps).abs().max().item() < 1e-4


def test_full_unet_score_distill_lowers_its_own_loss_and_leaves_the_teacher_alone(harness):
    """score_distill mode full: the student is a separate UNet copy (base + the active LoRAs folded in) with
    its own AdamW over every UNet parameter, at t = 800; the shared base (teacher) is not touched."""
    from training.config import StageConfig
    from training.stages import get_stage
    from training.stages.score_distill import generator_timestep

    ctx, stages, params, batch = harness
    module = get_stage("score_distill")
    stage = StageConfig(type="score_distill", segments=1, steps=6,
                        params={**PARAMS["score_distill"], "mode": "full", "lr": 1e-4})
    assert generator_timestep(module.resolved(stage)) == 800
    ctx.adapters.use(["default", "feedback"], [])
    ctx.state, ctx.step, ctx.stage_start, ctx.stage_index = {}, 0, 0, 0
    ctx.persistent.pop("full_unet", None), ctx.persistent.pop("full_opt", None)
    for p in ctx.unet.parameters():
        p.grad = None
    base_before = {k: v.clone() for k, v in ctx.unet.state_dict().items()}
    own = module.setup(ctx, stage)
    full, opt = ctx.persistent["full_unet"], ctx.persistent["full_opt"]
    ctx.student = own.model  # as the engine does
    assert own.model is full and own.optimizer is opt and not any(".lora_" in n for n, _ in full.named_parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_full
    x, t = batch["noise"], torch.tensor([800, 800])
    with torch.no_grad():  # the copy starts as base + default + feedback LoRAs (folded exactly)
        err = (full(x, t, **batch["cond"]).sample - ctx.unet(x, t, **batch["cond"]).sample).abs().max().item()
    assert err < 1e-5, err
    own = []
    for step in range(stage.steps):
        ctx.step = step
        loss, logs = module.loss(ctx, batch, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for n, p in ctx.unet.named_parameters() if "lora_" not in n)
        opt.step()
        own.append(logs)
    print("full UNet: " + ", ".join(f"{k} {own[0][k]:.4g} -> {own[-1][k]:.4g}" for k in ("fake_loss", "dmd_reg")))
    # the regression to the teacher is the generator's own objective; the fake-score loss is drawn with new
    # noise every step (stage_randn), so single values of it are not comparable
    assert own[-1]["dmd_reg"] < 0.7 * own[0]["dmd_reg"], own
    after = ctx.unet.state_dict()
    changed = [k for k in base_before if "lora_" not in k and not torch.equal(base_before[k], after[k])]
    assert not changed, f"the teacher's base weights changed: {changed[:3]}"
    ctx.persistent.pop("full_unet"), ctx.persistent.pop("full_opt")
    ctx.student = ctx.unet  # the shared UNet again, for the next test


def test_score_distill_two_time_scale_update(harness):
    """gen_every 3: the fake score trains every step, the generator (a loss for the engine) every 3rd."""
    from training.config import StageConfig
    from training.stages import get_stage

    ctx, stages, params, batch = harness
    module = get_stage("score_distill")
    stage = StageConfig(type="score_distill", segments=1, steps=4, params={**PARAMS["score_distill"], "gen_every": 3})
    ctx.adapters.use(["default", "feedback", "dmd"], ["dmd"])
    ctx.state, ctx.stage_start, ctx.stage_index = {}, 0, 0
    got = []
    for step in range(4):
        ctx.step = step
        loss, logs = module.loss(ctx, batch, stage)
        got.append((loss is not None, "dmd_loss" in logs, "fake_loss" in logs))
    assert got == [(True, True, True), (False, False, True), (False, False, True), (True, True, True)]


def fresh_shape_batches(ctx, n_batches, size=8, seed=0):
    """Batches of the default task's real shape images (tiny VAE latents, their captions encoded), each
    with fresh noise and uniforms."""
    from training.models.attributes import render_set
    from training.models.base import build_tiny
    from training.models.text import encode_prompts

    base = build_tiny()
    pixels, captions = render_set(n_batches * size, seed)
    with torch.no_grad():
        latents = ctx.vae.encode(pixels).latent_dist.mean * ctx.vae.config.scaling_factor
        cond = encode_prompts(base, captions, "cpu")
        uncond = encode_prompts(base, [""] * size, "cpu")
    g = torch.Generator().manual_seed(seed)
    for i in range(n_batches):
        sl = slice(i * size, (i + 1) * size)
        u = torch.rand(size, 8, generator=g, dtype=torch.float64)
        yield {"latents": latents[sl], "noise": torch.randn(latents[sl].shape, generator=g), "u": u,
               "step_u": u[0], "captions": captions[sl], "cond": {k: v[sl] for k, v in cond.items()},
               "uncond": uncond}


def test_adversarial_discriminator_learns_below_chance_on_fresh_batches(harness):
    """With the default pair (`fake_from: sampler`: the student's prediction from where a k-step sampler
    calls it, against `real: data`) the discriminator's hinge loss, measured on each fresh batch before
    its update, falls well below its chance value 2.0 within 24 steps. With PCM's pair (`fake_from:
    tscd`, `real: target`) the fake is nearly the target and it stays nearer chance (docs/stages.md)."""
    from training.config import StageConfig
    from training.stages import get_stage

    ctx, stages, params, _ = harness
    module = get_stage("adversarial")
    ctx.adapters.use(["default"], ["default"])
    ctx.state, ctx.stage_start, ctx.stage_index, ctx.student = {}, 0, 0, ctx.unet
    disc, saved_opt = ctx.persistent["disc"], ctx.persistent["disc_opt"]
    start = {k: v.clone() for k, v in disc.state_dict().items()}
    means = {}
    try:
        for pair in ({}, {"fake_from": "tscd", "real": "target"}):
            disc.load_state_dict(start)
            ctx.persistent["disc_opt"] = torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.0, 0.99))
            stage, d = StageConfig(type="adversarial", segments=1, steps=24, params=pair), []
            for step, batch in enumerate(fresh_shape_batches(ctx, 24)):
                ctx.step = step
                d.append(module.loss(ctx, batch, stage)[1]["adv_d"])  # the student is not stepped
            means[pair.get("fake_from", "sampler")] = sum(d[-8:]) / 8
            print("adversarial D hinge loss", pair or "default", " ".join(f"{v:.2f}" for v in d))
    finally:
        disc.load_state_dict(start)
        ctx.persistent["disc_opt"] = saved_opt
    assert means["sampler"] < 1.5 and means["tscd"] > means["sampler"] + 0.2, means


def test_adversarial_real_side_is_the_target_or_the_data(harness, monkeypatch):
    """`real: target` (PCM): D's real input is the consistency target diffused from the boundary like the
    fake; `real: data`: the clean latents diffused straight to the same t. The fake side is the same."""
    from training.config import StageConfig
    from training.diffusion import ddim_point
    from training.stages import adversarial, get_stage
    from training.stages.base import stage_randn

    ctx, stages, params, batch = harness
    ctx.adapters.use(["default"], ["default"])
    ctx.state, ctx.stage_start, ctx.stage_index, ctx.student, ctx.step = {}, 0, 0, ctx.unet, 0
    seen = {}
    monkeypatch.setattr(adversarial, "discriminator_step",
                        lambda ctx, disc, opt, real, fake, t_d, cond, kind: seen.update(real=real, fake=fake, t=t_d)
                        or torch.tensor(2.0))
    module = get_stage("adversarial")
    for real in ("target", "data"):
        module.loss(ctx, batch, StageConfig(type="adversarial", segments=1, steps=1,
                                             params={"real": real, "fake_from": "tscd"}))
        seen[real] = dict(seen)
    assert torch.equal(seen["target"]["fake"], seen["data"]["fake"]) and torch.equal(seen["target"]["t"], seen["data"]["t"])
    noise = stage_randn(ctx, batch["latents"], 5)
    expected = ddim_point(batch["latents"], noise, ctx.abar[seen["data"]["t"]].float().view(-1, 1, 1, 1))
    torch.testing.assert_close(seen["data"]["real"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["target"]["real"], expected)
    with pytest.raises(ValueError, match="real"):
        module.check_params({**module.params, "real": "teacher"}, StageConfig(type="adversarial", segments=1),
                            "stages[0].params")


def test_adversarial_fake_from_sampler_starts_at_the_segment_top(harness, monkeypatch):
    """`fake_from: sampler`: D's fake is the student's boundary prediction from the top of the TSCD point's
    segment (the timestep a k-step TCD sampler calls the student at: 999 for one segment, 999 / 499 for
    two), not from the TSCD point; `real: target` with it is a config error."""
    from training.config import StageConfig
    from training.stages import adversarial, get_stage

    ctx, stages, params, batch = harness
    ctx.adapters.use(["default"], ["default"])
    ctx.state, ctx.stage_start, ctx.stage_index, ctx.step = {}, 0, 0, 0
    calls, unet = [], ctx.unet

    class Spy:
        def __call__(self, x, t, **kw):
            calls.append(t.clone())
            return unet(x, t, **kw)

    ctx.student = Spy()
    monkeypatch.setattr(adversarial, "discriminator_step", lambda *a: torch.tensor(2.0))
    module = get_stage("adversarial")
    p = {"real": "data", "fake_from": "sampler", "adv_weights": {"2": 0.1, "1": 0.2}}
    try:
        for segments, tops in ((1, {999}), (2, {499, 999})):
            for u0 in (0.1, 0.3, 0.6, 0.9):
                calls.clear()
                batch["u"][:, 0] = u0
                module.loss(ctx, batch, StageConfig(type="adversarial", segments=segments, steps=1, params=p))
                j = ctx.grid.timestep((torch.full((2,), u0) * 50).long() + 1)
                assert torch.equal(calls[0], j)  # the TSCD point
                top = 999 if segments == 1 or j[0] > 499 else 499
                assert set(calls[1].tolist()) == {top} and top in tops, (segments, u0, calls)
    finally:
        batch["u"][:, 0] = 0.0
        ctx.student = unet
    with pytest.raises(ValueError, match="fake_from: sampler"):
        module.check_params({**module.params, "fake_from": "sampler", "real": "target"},
                            StageConfig(type="adversarial", segments=1), "stages[0].params")


def test_feedback_defaults_train_the_one_step_start_and_hold_the_student():
    """The feedback defaults measured on the quality benchmark (docs/stages.md): the stop step can be the
    grid's first step (t = 999, where a 1-step sample starts: late_fraction 0.5 never trained it and broke
    1-step sampling), and the regulariser is on with the hinge scaled down against it."""
    from training.stages import get_stage
    from training.stages.feedback import late_stop

    p = get_stage("feedback").params
    stops = {late_stop(p["steps"], p["late_fraction"], u / 100) for u in range(100)}
    assert stops == set(range(p["steps"])) and 0 in stops
    assert {late_stop(4, 0.5, u / 100) for u in range(100)} == {2, 3}
    assert p["reg_weight"] > 0 and p["grad_scale"] / p["reg_weight"] <= 0.1 and p["anchor_start"]


def test_feedback_regulariser_holds_the_student_near_the_previous_stage(harness):
    """reg_weight ties the feedback LoRA's x0 to the earlier stages' x0 at the same x_t: after the same
    steps on the same reward, the drift from the previous stage is smaller with it than without."""
    from training.config import StageConfig
    from training.stages import get_stage

    ctx, stages, params, batch = harness
    module = get_stage("feedback")
    ctx.student = ctx.unet
    start = [p.detach().clone() for p in params["feedback"]]
    fresh = {id(p): torch.zeros_like(p) if ".lora_B." in n else p.detach().clone()  # B = 0: a new stage
             for n, p in ctx.unet.named_parameters() if ".feedback." in n}
    drift = {}
    for reg_weight in (0.0, 50.0):
        with torch.no_grad():
            for p in params["feedback"]:
                p.copy_(fresh[id(p)])
        stage = StageConfig(type="feedback", segments=1, steps=6,
                            params={**PARAMS["feedback"], "reg_weight": reg_weight or 1e-9, "alpha": 10.0})
        ctx.adapters.use(["default", "feedback"], ["feedback"])
        ctx.state, ctx.step, ctx.stage_start, ctx.stage_index = {}, 0, 0, 0
        module.setup(ctx, stage)
        opt = torch.optim.Adam(params["feedback"], lr=3e-3)
        logs = []
        for _ in range(stage.steps):
            loss, log = module.loss(ctx, batch, stage)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            logs.append(log)
        assert logs[0]["feedback_reg"] == 0.0  # B = 0: the stage starts exactly at the previous one
        stage_probe = StageConfig(type="feedback", segments=1, steps=1, params={**stage.params, "reg_weight": 1.0})
        drift[reg_weight] = module.loss(ctx, batch, stage_probe)[1]["feedback_reg"]
    print("feedback drift from the previous stage (MSE of x0):", drift)
    assert drift[50.0] < 0.5 * drift[0.0], drift
    with torch.no_grad():
        for p, s in zip(params["feedback"], start):
            p.copy_(s)


def test_feedback_start_anchor_holds_the_one_step_sample(harness):
    """anchor_start: when the reward trains a late stop step, the 1-step x0 (t = 999) is also tied to the
    earlier stages'; after the same steps its drift there is smaller than without the anchor."""
    from training.config import StageConfig
    from training.stages import get_stage
    from training.stages.base import EpsModel
    from training.stages.feedback import start_anchor

    ctx, stages, params, batch = harness
    module = get_stage("feedback")
    ctx.student = ctx.unet
    start = [p.detach().clone() for p in params["feedback"]]
    fresh = {id(p): torch.zeros_like(p) if ".lora_B." in n else p.detach().clone()
             for n, p in ctx.unet.named_parameters() if ".feedback." in n}
    drift = {}
    for anchor in (False, True):
        with torch.no_grad():
            for p in params["feedback"]:
                p.copy_(fresh[id(p)])
        # late_fraction 0.25 of a 4-step grid: the stop step is always t = 249, never the 1-step start
        stage = StageConfig(type="feedback", segments=1, steps=6, params={
            **PARAMS["feedback"], "alpha": 10.0, "grad_scale": 1.0, "reg_weight": 1.0, "late_fraction": 0.25,
            "anchor_start": anchor})
        ctx.adapters.use(["default", "feedback"], ["feedback"])
        ctx.state, ctx.step, ctx.stage_start, ctx.stage_index = {}, 0, 0, 0
        module.setup(ctx, stage)
        opt = torch.optim.Adam(params["feedback"], lr=3e-3)
        for _ in range(stage.steps):
            loss, log = module.loss(ctx, batch, stage)
            assert log["stop_t"] == 249
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            drift[anchor] = float(start_anchor(ctx, EpsModel(ctx.student, ctx.abar, ctx.prediction_type), batch))
    print("1-step drift from the previous stage (MSE of x0 at t = 999):", drift)
    assert drift[True] < 0.5 * drift[False], drift
    with torch.no_grad():
        for p, s in zip(params["feedback"], start):
            p.copy_(s)

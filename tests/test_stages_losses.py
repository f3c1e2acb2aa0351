"""Each stage lowers its own loss on a fixed batch (fixed noise, fixed timesteps) with tiny models."""
import pytest
import torch

from schedulers.vp import scaled_linear_alphas_cumprod
from training import adversarial as adv
from training.feedback import refl_loss
from training.merge import add_stage_lora
from training.rewards import TinyReward
from training.score_distill import DMDStage, dm_loss, fake_score_loss, student_x0, teacher_multistep_x0
from training.tiny import tiny_unet, tiny_vae

ABAR = scaled_linear_alphas_cumprod().float()


def fixed(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def adam_steps(params, loss_fn, n, lr):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(n):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_adversarial_discriminator_and_generator_losses_fall():
    teacher = tiny_unet(sample_size=8)
    disc = adv.Discriminator(teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {n.split(".")[0] for n, _ in disc.named_parameters()} == {"heads"}
    cond, t = fixed(1, 2, 5, 32), torch.tensor([300, 600])
    real, fake = adv.noise_to(fixed(2, 2, 4, 8, 8) * 0.5, t, fixed(3, 2, 4, 8, 8), ABAR), fixed(4, 2, 4, 8, 8)
    fake = fake.requires_grad_(True)
    d_loss = lambda: adv.discriminator_loss(disc(real, t, cond), disc(fake.detach(), t, cond))  # noqa: E731
    before = d_loss().item()
    adam_steps(disc.parameters(), d_loss, 6, 3e-3)
    after = d_loss().item()
    print(f"discriminator hinge loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.1
    # the generator loss reaches the input through the frozen teacher, and a step on it lowers it
    g_loss = lambda: adv.generator_adv_loss(disc(fake, t, cond), "non_saturating")  # noqa: E731
    before = g_loss().item()
    adam_steps([fake], g_loss, 4, 2e-2)
    after = g_loss().item()
    print(f"generator adversarial loss {before:.4f} -> {after:.4f}")
    assert after < before


def test_adv_weight_schedule_and_errors():
    cfg = {"enabled": True, "weights": {"8": 0.0, "4": 0.1, "2": 0.2, "1": 0.5}}
    assert [adv.adv_weight_for_segments(k, cfg) for k in (8, 4, 2, 1)] == [0.0, 0.1, 0.2, 0.5]
    assert adv.adv_weight_for_segments(1, {"enabled": False, "weights": {1: 3.0}}) == 0.0
    with pytest.raises(ValueError, match="no entry for 3 segments"):
        adv.adv_weight_for_segments(3, cfg)
    with pytest.raises(ValueError, match="hinge"):
        adv.generator_adv_loss(torch.zeros(2), "wasserstein")


def test_feedback_refl_loss_falls_and_reward_rises():
    unet, vae, reward = tiny_unet(sample_size=8), tiny_vae(), TinyReward()
    params = add_stage_lora(unet, "feedback", rank=4)
    cond, noise = fixed(1, 2, 5, 32), fixed(2, 2, 4, 8, 8)
    run = lambda: refl_loss(unet, vae, reward, ["a", "b"], cond, noise, ABAR, stop=2, steps=4,  # noqa: E731
                            alpha=10.0, return_reward=True)
    (before, r0) = run()
    adam_steps(params, lambda: run()[0], 8, 3e-3)
    (after, r1) = run()
    print(f"feedback ReLU(alpha - reward) {before.item():.4f} -> {after.item():.4f}; "
          f"reward {r0.mean():.4f} -> {r1.mean():.4f}")
    assert after.item() < before.item() and r1.mean() > r0.mean()
    assert all(p.grad is None for n, p in unet.named_parameters() if "feedback" not in n)


def test_dmd_fake_score_and_generator_losses_fall():
    teacher = tiny_unet(sample_size=8)
    stage = DMDStage(tiny_unet(sample_size=8), teacher, ABAR,
                     {"mode": "lora", "rank": 4, "lr": 2e-3, "fake_lr": 2e-3, "guidance": 3.0, "reg_weight": 1.0})
    assert stage.t_gen == 999
    cond, uncond, noise = fixed(1, 2, 5, 32), torch.zeros(2, 5, 32), fixed(2, 2, 4, 8, 8)
    ref = teacher_multistep_x0(teacher, noise, cond, uncond, 3.0, ABAR, steps=4)
    t, n2 = torch.tensor([250, 700]), fixed(3, 2, 4, 8, 8)
    # fake score: denoising loss on the student's (fixed) outputs
    with torch.no_grad():
        x0 = student_x0(stage.student, noise, cond, 999, ABAR)
    f_loss = lambda: fake_score_loss(stage.fake, x0, cond, t, n2, ABAR)  # noqa: E731
    before = f_loss().item()
    adam_steps([p for p in stage.fake.parameters() if p.requires_grad], f_loss, 10, 2e-3)
    after = f_loss().item()
    print(f"dmd fake-score loss {before:.5f} -> {after:.5f}")
    assert after < before
    # generator: DM gradient + MSE regulariser on the same noise
    batch = {"cond": cond, "uncond": uncond, "noise": noise, "reference": ref}
    g = lambda: stage.generator_loss(batch, t=t, dm_noise=n2)  # noqa: E731
    loss0, dm0, reg0, x0_before = g()
    _, grad = dm_loss(x0_before, teacher, stage.fake, cond, uncond, 3.0, t, n2, ABAR)
    adam_steps([p for p in stage.student.parameters() if p.requires_grad], lambda: g()[0], 5, 1e-3)
    loss1, dm1, reg1, x0_after = g()
    move = (x0_after - x0_before).detach().flatten()
    cos = torch.nn.functional.cosine_similarity(move, -grad.flatten(), dim=0).item()
    print(f"dmd generator: reg {reg0:.4f} -> {reg1:.4f}, total {loss0.item():.4f} -> {loss1.item():.4f}, "
          f"cos(step, -dm_grad) {cos:.3f}")
    assert reg1 < reg0 and loss1.item() < loss0.item() and cos > 0


def test_dmd_two_time_scale_and_full_mode(tmp_path):
    teacher = tiny_unet(sample_size=8)
    stage = DMDStage(tiny_unet(sample_size=8), teacher, ABAR, {"mode": "full", "gen_every": 3, "lr": 1e-5})
    assert stage.t_gen == 800
    batch = {"cond": fixed(1, 1, 5, 32), "uncond": None, "noise": fixed(2, 1, 4, 8, 8), "reference": None}
    logs = [stage.step(batch) for _ in range(4)]
    assert ["dmd_loss" in s for s in logs] == [True, False, False, True]
    from training.score_distill import save_full_unet
    from safetensors.torch import load_file
    path = tmp_path / "unet.safetensors"
    save_full_unet(stage.student, str(path))
    sd = load_file(str(path))
    fresh = tiny_unet(sample_size=8)
    fresh.load_state_dict({k: v.float() for k, v in sd.items()})  # strict: a loadable diffusers UNet
    with pytest.raises(ValueError, match="dmd.mode"):
        DMDStage(tiny_unet(sample_size=8), teacher, ABAR, {"mode": "partial"})

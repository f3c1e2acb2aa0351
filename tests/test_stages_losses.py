"""Each stage lowers its own loss on a fixed batch (fixed noise, fixed timesteps) with tiny models."""
import pytest
import torch

from schedulers.vp import scaled_linear_alphas_cumprod
from training.diffusion import abar_at, ddim_point
from training.models.adapters import add_adapter
from training.models.rewards import TinyReward
from training.stages import adversarial as adv
from training.stages.feedback import refl_loss
from training.stages.score_distill import dm_loss, fake_score_loss, student_x0, teacher_multistep_x0
from training.models.tiny import tiny_unet, tiny_vae

ABAR = scaled_linear_alphas_cumprod().float()
# the stand-alone stage tests' LoRA layout (kaiming A, zero B)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def stage_lora(unet, name, rank=4):
    return add_adapter(unet, name, rank, float(rank), TARGETS, init=True, trainable=True)


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
    x0 = fixed(2, 2, 4, 8, 8) * 0.5
    real, fake = ddim_point(x0, fixed(3, 2, 4, 8, 8), abar_at(ABAR, t, x0)), fixed(4, 2, 4, 8, 8)
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
    params = stage_lora(unet, "feedback")
    cond, noise = fixed(1, 2, 5, 32), fixed(2, 2, 4, 8, 8)
    run = lambda: refl_loss(unet, vae, reward, ["a", "b"], cond, noise, ABAR, stop=2, steps=4,  # noqa: E731
                            alpha=10.0)
    (before, r0) = run()
    adam_steps(params, lambda: run()[0], 8, 3e-3)
    (after, r1) = run()
    print(f"feedback ReLU(alpha - reward) {before.item():.4f} -> {after.item():.4f}; "
          f"reward {r0.mean():.4f} -> {r1.mean():.4f}")
    assert after.item() < before.item() and r1.mean() > r0.mean()
    assert all(p.grad is None for n, p in unet.named_parameters() if "feedback" not in n)


def test_dmd_fake_score_and_generator_losses_fall():
    """The DMD pieces the score_distill stage is made of, on tiny UNets: the fake score learns to denoise
    the student's outputs, and a generator step follows -grad of the distribution-matching surrogate."""
    import copy

    teacher = tiny_unet(sample_size=8).requires_grad_(False)
    student = copy.deepcopy(teacher)
    gen_params = stage_lora(student, "dmd")
    fake = copy.deepcopy(teacher)
    fake_params = stage_lora(fake, "fake")
    cond, uncond, noise = fixed(1, 2, 5, 32), torch.zeros(2, 5, 32), fixed(2, 2, 4, 8, 8)
    ref = teacher_multistep_x0(teacher, noise, cond, uncond, 3.0, ABAR, steps=4)
    t, n2 = torch.tensor([250, 700]), fixed(3, 2, 4, 8, 8)
    with torch.no_grad():
        x0 = student_x0(student, noise, cond, 999, ABAR)
    f_loss = lambda: fake_score_loss(fake, x0, cond, t, n2, ABAR)  # noqa: E731
    before = f_loss().item()
    adam_steps(fake_params, f_loss, 10, 2e-3)
    after = f_loss().item()
    print(f"dmd fake-score loss {before:.5f} -> {after:.5f}")
    assert after < before

    def g():
        x = student_x0(student, noise, cond, 999, ABAR)
        dm, _ = dm_loss(x, teacher, fake, cond, uncond, 3.0, t, n2, ABAR)
        reg = torch.nn.functional.mse_loss(x, ref)
        return dm + reg, reg.detach(), x
    loss0, reg0, x0_before = g()
    _, grad = dm_loss(x0_before, teacher, fake, cond, uncond, 3.0, t, n2, ABAR)
    adam_steps(gen_params, lambda: g()[0], 5, 1e-3)
    loss1, reg1, x0_after = g()
    move = (x0_after - x0_before).detach().flatten()
    cos = torch.nn.functional.cosine_similarity(move, -grad.flatten(), dim=0).item()
    print(f"dmd generator: reg {reg0:.4f} -> {reg1:.4f}, total {loss0.item():.4f} -> {loss1.item():.4f}, "
          f"cos(step, -dm_grad) {cos:.3f}")
    assert reg1 < reg0 and loss1.item() < loss0.item() and cos > 0


def test_full_unet_export_is_a_loadable_diffusers_unet(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from training.lora_files.export import export_full_unet, full_unet_metadata

    unet = tiny_unet(sample_size=8)
    folder = tmp_path / "unet"
    path = export_full_unet(unet, str(folder), full_unet_metadata("sd15", "epsilon", 800), dtype=torch.float16)
    fresh = UNet2DConditionModel.from_pretrained(str(folder))
    sd = fresh.state_dict()
    assert all(torch.equal(sd[k].half(), v.half()) for k, v in unet.state_dict().items())
    with safe_open(path, "pt") as f:
        assert f.metadata()["hypersd.timestep"] == "800"


def test_dmd_loss_is_mean_reduced_as_in_dmd2():
    """loss = 0.5 * mean(grad^2) and d loss / d x0 = grad / numel: the step size does not grow with the
    latent's size (a sum over C*H*W, as before, made it 1024x larger at 4x16x16)."""
    teacher = tiny_unet(sample_size=8).requires_grad_(False)
    cond, noise, t = fixed(1, 2, 5, 32), fixed(2, 2, 4, 8, 8), torch.tensor([300, 600])
    x0 = (fixed(3, 2, 4, 8, 8) * 0.5).requires_grad_(True)
    loss, grad = dm_loss(x0, teacher, teacher, cond, torch.zeros(2, 5, 32), 3.0, t, noise, ABAR)
    assert abs(loss.item() - 0.5 * grad.pow(2).mean().item()) < 1e-6
    loss.backward()
    assert torch.allclose(x0.grad, grad / grad.numel(), atol=1e-9)

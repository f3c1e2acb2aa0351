"""TSCD math: grid and segment boundaries, x0/eps conversions, zero loss when student == teacher,
SDXL-style conditioning (added_cond_kwargs) and v-prediction through the loss."""
import contextlib

import pytest
import torch

from training.models import tiny
from schedulers import tcd_timesteps
from training.config import load_config
from training.models.base import scheduler_abar
from training.diffusion import DDIMGrid, ddim_point, to_x0_eps
from training.stages.base import StageContext
from training.stages.tscd import tscd_loss


def test_grid_and_boundaries():
    abar = scheduler_abar()
    g = DDIMGrid(abar, 50)
    assert g.timesteps[-1] == 999 and g.timesteps[0] == 19 and len(g.abar) == 51
    assert g.abar[0] == 1 and torch.all(g.abar[1:] < g.abar[:-1])
    j = torch.arange(1, 51)
    assert torch.equal(g.boundary(j, 1), torch.zeros(50, dtype=torch.long))
    assert torch.equal(g.boundary(j, 50), j - 1)
    for k in (1, 2, 4, 8):
        b = g.boundary(j, k)
        assert torch.all(b < j)
        # the boundaries are exactly the timesteps the TCD sampler visits at k steps (and x0)
        visited = {0} | {int(t) for t in g.timesteps[b[b > 0] - 1]}
        assert visited == {0, *tcd_timesteps(k)[1:]}, (k, sorted(visited))
    # a TCD step from t lands on the boundary the student was trained to map t to
    t4 = tcd_timesteps(4)
    for t, t_next in zip(t4, t4[1:] + [-1]):
        jj = torch.tensor([(t + 1) // 20])
        got = g.boundary(jj, 4)
        assert (int(g.timesteps[got - 1]) if got > 0 else -1) == t_next
    with pytest.raises(ValueError, match="does not divide"):
        DDIMGrid(abar, 48).boundary(j[:48], 4)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_x0_eps_round_trip(pt):
    torch.manual_seed(0)
    a = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64)
    x0, eps = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    x = ddim_point(x0, eps, a)
    sa, s1 = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
    out = eps if pt == "epsilon" else sa * eps - s1 * x0
    rx0, reps = to_x0_eps(out, x, a, pt)
    assert torch.allclose(rx0, x0, atol=1e-10) and torch.allclose(reps, eps, atol=1e-10)


def _ctx(unet, cfg, pt="epsilon"):
    abar = scheduler_abar()
    return StageContext(accelerator=None, student=unet, unet=unet, vae=None, abar=abar,
                        grid=DDIMGrid(abar, cfg.tscd.num_ddim_timesteps), prediction_type=pt, cfg=cfg,
                        teacher=contextlib.nullcontext, target=contextlib.nullcontext)


def _batch(cond, uncond, n=2):
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(n, 4, 16, 16, generator=g), "noise": torch.randn(n, 4, 16, 16, generator=g),
            "u": torch.rand(n, 8, generator=g, dtype=torch.float64), "cond": cond, "uncond": uncond}


def test_loss_zero_when_student_is_teacher_one_segment_per_step():
    # k = N: boundary = j - 1, so the target is the teacher's DDIM step; with w = 1 (no CFG) and
    # student == teacher the loss must vanish; with w > 1 it must not.
    cfg = load_config(None, ["tscd.w_min=1", "tscd.w_max=1", "tscd.loss=l2"])
    unet = tiny.tiny_unet().eval()
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(1, 77, 32, generator=g)}
    stage = cfg.stages[0]
    stage.segments = 48
    loss, _ = tscd_loss(_ctx(unet, cfg), _batch(cond, uncond), stage.segments)
    assert loss.item() < 1e-10
    cfg.tscd.w_min = cfg.tscd.w_max = 6.0
    loss, _ = tscd_loss(_ctx(unet, cfg), _batch(cond, uncond), stage.segments)
    assert loss.item() > 1e-8


def test_sdxl_conditioning_and_v_prediction_backprop():
    from diffusers import UNet2DConditionModel

    from training.models.adapters import add_adapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    params = add_adapter(unet, "default", 4, 4.0, ["to_q", "to_v", "conv1"], trainable=True)
    cfg = load_config(None, ["tscd.w_min=2", "tscd.w_max=5"])
    g = torch.Generator().manual_seed(2)
    def kw(n):
        return {"encoder_hidden_states": torch.randn(n, 77, 64, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(n, 32, generator=g),
                                      "time_ids": torch.tensor([[1024., 1024, 0, 0, 1024, 1024]]).expand(n, 6)}}
    loss, _ = tscd_loss(_ctx(unet, cfg, "v_prediction"), _batch(kw(2), kw(1)), cfg.stages[0].segments)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

"""Reward registry: tiny local reward, aesthetic MLP layout, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from training.models.rewards import AestheticMLP, RewardModel, RewardUnavailable, TinyReward, build_reward


def test_tiny_reward_is_a_differentiable_reward_model_and_loads_from_file(tmp_path):
    r = build_reward("tiny")
    assert isinstance(r, RewardModel)
    img = torch.rand(2, 3, 16, 16, requires_grad=True) * 2 - 1
    score = r(img, ["a", "b"])
    assert score.shape == (2,)
    score.sum().backward()
    path = tmp_path / "tiny.safetensors"
    save_file(TinyReward(seed=5).state_dict(), str(path))
    assert torch.allclose(TinyReward(str(path))(img.detach()), TinyReward(seed=5)(img.detach()))
    assert not torch.allclose(TinyReward(seed=0)(img.detach()), TinyReward(seed=5)(img.detach()))


def test_aesthetic_mlp_state_dict_layout():
    keys = set(AestheticMLP(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'laion_aesthetic'"):
        build_reward("laion_aesthetc")
    with pytest.raises(RewardUnavailable, match="missing.safetensors"):
        TinyReward(str(tmp_path / "missing.safetensors"))
    with pytest.raises(RewardUnavailable, match="image-reward"):
        build_reward("imagereward")
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("no_such_module_xyz:score")
    assert build_reward("training.models.rewards:TinyReward")(torch.zeros(1, 3, 8, 8)).shape == (1,)


def test_clip_preprocess_takes_bf16_images_on_cpu():
    """The feedback stage decodes under bf16 autocast (the shipped configs' mixed precision), so CLIP
    rewards get bf16 images; the antialiased resize has no bf16 CPU kernel (this crashed the full-size
    benchmark's feedback step). The result matches the float32 path and stays differentiable."""
    from training.models.rewards import clip_preprocess

    images = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    bf16 = images.to(torch.bfloat16).requires_grad_(True)
    out = clip_preprocess(bf16, 224)
    assert out.shape == (1, 3, 224, 224) and torch.isfinite(out).all()
    assert torch.allclose(out, clip_preprocess(bf16.detach().float(), 224), atol=1e-6)
    out.sum().backward()
    assert bf16.grad is not None and bf16.grad.dtype == torch.bfloat16

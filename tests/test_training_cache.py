"""`data.cache_dir` in `python -m training.run`: cached latents + text embeddings give the same LoRA as
encoding every step, a second run only reads the cache, and bad preprocessing is a config error."""
import json

import pytest
import torch

from tests.test_training_run import max_diff, run

DROP = "data.caption_dropout=0.3"  # dropped captions must still use the unconditional embedding


def _cache_line(stderr):
    return next(line for line in stderr.splitlines() if line.startswith("data cache "))


def test_cached_run_matches_uncached_and_second_run_reuses(tmp_path):
    cache = tmp_path / "cache"
    run(tmp_path / "plain", "--set", DROP)
    p = run(tmp_path / "first", "--set", DROP, "--set", f"data.cache_dir={cache}")
    assert "0 reused, 64 encoded" in _cache_line(p.stderr)
    index = json.loads((cache / "index.json").read_text())["entries"]
    assert len(index) == 64 and all(set(e["tensors"]) >= {"latents", "prompt_embeds"} for e in index.values())
    shards = {f.name: f.stat().st_mtime_ns for f in cache.glob("shard-*.safetensors")}
    assert shards
    m = json.loads((tmp_path / "first" / "metrics.json").read_text())["data_cache"]
    assert (m["encoded"], m["reused"]) == (64, 0)
    # same seed: the same LoRA as encoding with the VAE / text encoder every step (measured: 0.0)
    assert max_diff(tmp_path / "plain" / "hyper_sd_lora.safetensors",
                    tmp_path / "first" / "hyper_sd_lora.safetensors") < 1e-6

    p = run(tmp_path / "second", "--set", DROP, "--set", f"data.cache_dir={cache}")
    assert "64 reused, 0 encoded" in _cache_line(p.stderr)
    m = json.loads((tmp_path / "second" / "metrics.json").read_text())["data_cache"]
    assert (m["encoded"], m["reused"]) == (0, 64)
    assert {f.name: f.stat().st_mtime_ns for f in cache.glob("shard-*.safetensors")} == shards  # not rewritten
    assert max_diff(tmp_path / "first" / "hyper_sd_lora.safetensors",
                    tmp_path / "second" / "hyper_sd_lora.safetensors") < 1e-6


@pytest.mark.parametrize("extra, key", [('{"random_flip": true}', "data.extra.random_flip"),
                                        ('{"center_crop": false}', "data.extra.center_crop")])
def test_cache_needs_deterministic_preprocessing(tmp_path, extra, key):
    p = run(tmp_path / "out", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"data.extra={extra}",
            check=False)
    assert p.returncode == 2 and "data.cache_dir" in p.stderr and key in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


def test_cached_text_sdxl_matches_encode_prompts():
    """SDXL: cached prompt_embeds + pooled_prompt_embeds rebuild the same UNet kwargs (time_ids from the
    sample's sizes); dropped captions get encode("")."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from training.models import tiny
    from training.models.base import Base
    from training.models.text import encode_prompts, text_embeddings
    from training.data.run_cache import CachedText

    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=16, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
        pad_token_id=513)).eval()
    tok = tiny.tiny_tokenizer()
    base = Base(None, None, [tiny.tiny_text_encoder().eval(), te2], [tok, tok], "sdxl", "epsilon", torch.ones(1000))
    captions = ["a red circle", "a blue square", "a green triangle"]
    hw = (torch.tensor([[64, 48], [32, 32], [40, 64]]), torch.tensor([[0, 8], [0, 0], [4, 0]]),
          torch.tensor([[32, 32]] * 3))
    emb = text_embeddings(base, captions, "cpu")
    assert set(emb) == {"prompt_embeds", "pooled_prompt_embeds"}
    keep = [True, False, True]
    cond, uncond = CachedText(base, "cpu").cond_uncond(emb, keep, hw)
    ref_cond = encode_prompts(base, ["a red circle", "", "a green triangle"], "cpu", *hw)
    ref_uncond = encode_prompts(base, [""] * 3, "cpu", *hw)
    for got, want in ((cond, ref_cond), (uncond, ref_uncond)):
        assert (got["encoder_hidden_states"] - want["encoder_hidden_states"]).abs().max() < 1e-5
        for k in ("text_embeds", "time_ids"):
            assert (got["added_cond_kwargs"][k] - want["added_cond_kwargs"][k]).abs().max() < 1e-5

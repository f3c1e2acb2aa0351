"""Latent / text-embedding cache: round trip, reuse, invalidation, atomic shards."""
import os

import pytest
import torch
from PIL import Image

from training.data import DataError, build_cache, build_dataset, make_dataloader


class CountingEncoders:
    """Deterministic stand-ins for a VAE and a text encoder, counting what they encode."""

    def __init__(self):
        self.images = self.texts = 0

    def encode_images(self, px):
        self.images += px.shape[0]
        return torch.nn.functional.avg_pool2d(px, 8)[:, :3] * 0.5  # (B, 3, H/8, W/8)

    def encode_texts(self, captions):
        self.texts += len(captions)
        emb = torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 97)] for c in captions])
        return {"prompt_embeds": emb[:, None, :].repeat(1, 3, 1), "pooled_prompt_embeds": emb}


def _folder(tmp_path, n=5):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        Image.new("RGB", (32 + 16 * (i % 2), 32), (i * 40, 100, 0)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"image number {i}")
    return d


def _build(d, **kw):
    return build_dataset({"source": "folder", "path": str(d), "resolution": 32, **kw})


def test_cache_round_trip_matches_direct_encoding(tmp_path):
    d = _folder(tmp_path)
    ds = _build(d, bucketing=True)
    enc = CountingEncoders()
    cached = build_cache(ds, tmp_path / "cache", enc.encode_images, enc.encode_texts,
                         encoder_id="toy", batch_size=2, shard_size=2)
    assert enc.images == enc.texts == 5 and cached.stats["num_cached_encoded"] == 5
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2  # [0,2]; [4]+[1,3]
    for i in range(len(ds)):
        s, c = ds[i], cached[i]
        assert "pixel_values" not in c and c["caption"] == s["caption"]
        ref = enc.encode_images(s["pixel_values"][None])[0]
        assert torch.equal(c["latents"], ref)
        assert torch.equal(c["pooled_prompt_embeds"], enc.encode_texts([s["caption"]])["pooled_prompt_embeds"][0])
        for k in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(c[k], s[k])
    batch = next(iter(make_dataloader(cached, global_batch_size=2, seed=0)))
    assert batch["latents"].shape[0] == 2 and batch["prompt_embeds"].shape == (2, 3, 2)


def test_cache_reuse_and_invalidation(tmp_path):
    d = _folder(tmp_path)
    cache = tmp_path / "cache"
    enc = CountingEncoders()
    build_cache(_build(d), cache, enc.encode_images, enc.encode_texts, encoder_id="toy")
    assert enc.images == 5
    again = build_cache(_build(d), cache, enc.encode_images, enc.encode_texts, encoder_id="toy")
    assert enc.images == 5 and again.stats["num_cached_reused"] == 5          # nothing re-encoded
    # touch one image (new mtime) and edit one caption -> exactly those two re-encode
    st = os.stat(d / "0.png")
    os.utime(d / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (d / "3.txt").write_text("a new caption")
    c = build_cache(_build(d), cache, enc.encode_images, enc.encode_texts, encoder_id="toy")
    assert enc.images == 7 and c.stats["num_cached_encoded"] == 2
    assert c[3]["caption"] == "a new caption"
    # other preprocessing settings or another encoder -> everything re-encodes
    build_cache(_build(d, resolution=16), cache, enc.encode_images, enc.encode_texts, encoder_id="toy")
    assert enc.images == 12
    build_cache(_build(d, resolution=16), cache, enc.encode_images, enc.encode_texts, encoder_id="toy2")
    assert enc.images == 17
    # only shards of the current settings remain, and no temp files
    assert not list(cache.glob("*.tmp"))
    live = build_cache(_build(d, resolution=16), cache, enc.encode_images, enc.encode_texts, encoder_id="toy2")
    assert enc.images == 17
    shards = {e["shard"] for e in live.entries.values()}
    assert {f.name for f in cache.glob("shard-*.safetensors")} == shards


def test_cache_rejects_random_augmentation(tmp_path):
    d = _folder(tmp_path)
    enc = CountingEncoders()
    with pytest.raises(DataError, match="random_flip"):
        build_cache(_build(d, random_flip=True), tmp_path / "c", enc.encode_images, enc.encode_texts)


def test_generated_dataset_caches(tmp_path):
    ds = build_dataset({"num_images": 4, "resolution": 16})
    enc = CountingEncoders()
    c = build_cache(ds, tmp_path / "c", enc.encode_images, enc.encode_texts)
    assert c[2]["latents"].shape == (3, 2, 2)
    build_cache(build_dataset({"num_images": 4, "resolution": 16}), tmp_path / "c", enc.encode_images, enc.encode_texts)
    assert enc.images == 4

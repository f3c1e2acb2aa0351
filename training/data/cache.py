"""Precomputed VAE latents + text embeddings in safetensors shards.

Each sample's key hashes its pixels' identity (file path + mtime + size, or generator params),
its caption, the preprocessing settings and `encoder_id`; change any of them and the entry is
re-encoded. `index.json` maps key -> shard + tensor names; shards and index are written atomically
(temp file + os.replace); shards no longer referenced are deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.errors import DataError

INDEX = "index.json"
SAMPLE_FIELDS = ("original_size", "crop_top_left", "target_size")


def sample_key(source_id: str, caption: str, settings: dict, encoder_id: str) -> str:
    blob = json.dumps([source_id, caption, settings, encoder_id], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_index(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / INDEX).read_text())["entries"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return {}


def build_cache(dataset, cache_dir, encode_images, encode_texts, encoder_id: str = "",
                batch_size: int = 8, shard_size: int = 256) -> "CachedDataset":
    """Encode what is not cached yet and return a CachedDataset over `dataset`'s samples.

    encode_images(pixels float (B, 3, H, W) in [-1, 1]) -> latents (B, ...);
    encode_texts(list[str]) -> tensor (B, ...) or dict name -> tensor (B, ...).
    Pass an `encoder_id` naming the VAE / text encoder so swapping them invalidates the cache.
    """
    if dataset.random_flip or not dataset.center_crop:
        raise DataError("data.cache_dir needs deterministic preprocessing: set data.center_crop = "
                        "true and data.random_flip = false (cached latents can't be re-augmented)")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = dataset.preprocessing_settings()
    keys = [sample_key(r.source_id, r.caption, settings, encoder_id) for r in dataset.records]
    old = _read_index(cache_dir)
    entries = {k: old[k] for k in keys if k in old and (cache_dir / old[k]["shard"]).is_file()}
    todo = [i for i, k in enumerate(keys) if k not in entries]
    # Encode in same-bucket batches (equal shapes), write a shard once >= shard_size samples are pending.
    by_bucket: dict[int, list[int]] = {}
    for i in todo:
        by_bucket.setdefault(dataset.bucket_ids[i], []).append(i)
    pending: dict[str, torch.Tensor] = {}
    pending_keys: list[tuple[str, list[str]]] = []
    for idx in by_bucket.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            _encode_chunk(dataset, chunk, keys, encode_images, encode_texts, pending, pending_keys)
            if len(pending_keys) >= shard_size:
                _flush(cache_dir, pending, pending_keys, entries)
    _flush(cache_dir, pending, pending_keys, entries)
    new_index = {k: entries[k] for k in keys}
    _atomic_write(cache_dir / INDEX, lambda p: Path(p).write_text(
        json.dumps({"version": 1, "entries": new_index})))
    live = {e["shard"] for e in new_index.values()}
    for f in cache_dir.glob("shard-*.safetensors"):
        if f.name not in live:
            f.unlink()
    return CachedDataset(cache_dir, keys, dataset, stats={
        **dataset.stats, "num_cached_reused": len(keys) - len(todo), "num_cached_encoded": len(todo)})


def _encode_chunk(dataset, chunk, keys, encode_images, encode_texts, pending, pending_keys):
    samples = [dataset[i] for i in chunk]
    with torch.no_grad():
        latents = encode_images(torch.stack([s["pixel_values"] for s in samples]))
        texts = encode_texts([s["caption"] for s in samples])
    if isinstance(texts, torch.Tensor):
        texts = {"prompt_embeds": texts}
    for j, (i, s) in enumerate(zip(chunk, samples)):
        k = keys[i]
        tensors = {"latents": latents[j], **{n: t[j] for n, t in texts.items()},
                   **{f: s[f] for f in SAMPLE_FIELDS}}
        for name, t in tensors.items():
            pending[f"{k}/{name}"] = t.detach().cpu().contiguous().clone()
        pending_keys.append((k, list(tensors)))


def _flush(cache_dir: Path, pending: dict, pending_keys: list, entries: dict) -> None:
    if not pending_keys:
        return
    name = "shard-" + hashlib.sha256("".join(k for k, _ in pending_keys).encode()).hexdigest()[:16]
    name += ".safetensors"
    _atomic_write(cache_dir / name, lambda p: save_file(pending, p))
    for k, names in pending_keys:
        entries[k] = {"shard": name, "tensors": names}
    pending.clear()
    pending_keys.clear()


class CachedDataset(torch.utils.data.Dataset):
    """Serves cached latents / text embeddings with the same sample keys as the pixel dataset
    ("latents" instead of "pixel_values"). Same bucket_ids, so the same sampler works."""

    def __init__(self, cache_dir, keys, dataset, stats=None):
        self.cache_dir, self.keys = Path(cache_dir), keys
        self.entries = _read_index(self.cache_dir)
        self.captions = [r.caption for r in dataset.records]
        self.bucket_ids, self.buckets = list(dataset.bucket_ids), list(dataset.buckets)
        self.stats = dict(stats or {})
        self._handles = {}

    def __len__(self) -> int:
        return len(self.keys)

    def _shard(self, name):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return self._handles[name]

    def __getstate__(self):     # DataLoader workers reopen shards themselves
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, i: int) -> dict:
        k = self.keys[i]
        entry = self.entries[k]
        shard = self._shard(entry["shard"])
        sample = {n: shard.get_tensor(f"{k}/{n}") for n in entry["tensors"]}
        sample.update(caption=self.captions[i], index=i, bucket=self.bucket_ids[i])
        return sample

"""Training data: sources (sources.py), preprocessing and buckets (image.py), the sampler (sampler.py),
the latent/text cache (cache.py) and its use by a run (run_cache.py); streamed webdataset shards
(shards.py, webdataset.py, latent_shards.py; `source: webdataset`, see docs/data.md).

Interface (all importable from `training.data`):

    cfg = DatasetOptions.from_dict(config["data"])      # unknown/invalid keys -> DataError naming data.<key>
    ds = build_dataset(cfg)                             # ImageCaptionDataset
    ds.stats                                            # {"num_found", "num_ok", "num_unreadable",
                                                        #  "unreadable_files", "num_missing_captions", "num_buckets"}
    loader = make_dataloader(ds, global_batch_size=8, seed=0,
                             num_processes=acc.num_processes, process_index=acc.process_index)
    set_epoch(loader, epoch)                            # before iterating each epoch
    for batch in loader: ...                            # see `collate`; do NOT accelerator.prepare(loader)

    # optional latent/text cache (deterministic preprocessing only: no random crop/flip)
    ds = build_cache(ds, cache_dir, encode_images, encode_texts, encoder_id="sd15-vae+clip")

A sample (ds[i]) is a dict:
    "pixel_values"  float32 (3, H, W) in [-1, 1]      (pixel datasets)
    "latents"       tensor from encode_images          (cached datasets, instead of pixel_values)
    "<text keys>"   tensors from encode_texts          (cached datasets; "prompt_embeds" if a tensor)
    "caption"       str
    "original_size" long (2,) = (height, width) of the source image   (SDXL micro-conditioning)
    "crop_top_left" long (2,) = (top, left) of the crop in the resized image
    "target_size"   long (2,) = (height, width) of the bucket
    "index"         int, "bucket" int
`collate` stacks tensors and ints into batch tensors and keeps "caption" as a list of str.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Optional

import torch

from training.errors import DataError
from training.data.cache import CachedDataset, build_cache
from training.data.image import make_buckets, nearest_bucket, preprocess
from training.data.sampler import BucketBatchSampler
from training.data.sources import (Record, folder_records, generated_records,
                                   jsonl_records, scan_records)

__all__ = ["DatasetOptions", "DataError", "ImageCaptionDataset", "CachedDataset", "BucketBatchSampler",
           "build_dataset", "build_cache", "make_dataloader", "set_epoch", "collate",
           "make_buckets", "Record"]


TRAINER_KEYS = ("caption_dropout", "cache_dir")   # used by the trainer, not here
SOURCES = ("generated", "folder", "jsonl", "webdataset")


@dataclass
class DatasetOptions:
    source: str = "generated"        # "generated" | "folder" | "jsonl" | "webdataset"
    path: Optional[str] = None       # folder (folder), manifest file (jsonl), tar shards (webdataset: str or list)
    recursive: bool = False          # folder: also look in sub-folders
    missing_caption: str = "error"   # folder: "error" or "empty"
    resolution: int = 64             # square side; with bucketing, buckets have area ~ resolution**2
    bucketing: bool = False          # aspect-ratio buckets (SDXL); else every image -> resolution^2
    bucket_step: Optional[int] = None  # bucket side multiple; default 64, or 8 below 256 px
    center_crop: bool = True         # False: random crop
    random_flip: bool = False        # horizontal flip with p = 0.5
    num_images: int = 64             # generated: how many
    image_size: Optional[int] = None  # generated: pixels per side (default: resolution)
    seed: int = 0                    # generated content, crops and flips
    shuffle_buffer: int = 256        # webdataset: samples per shuffled block, per stream
    streams: int = 0                 # webdataset: shard streams per global micro-batch (0: automatic)
    num_workers: int = 0             # webdataset: DataLoader worker processes per training process
    path_key: str = "data.path"      # config key named in path errors

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "DatasetOptions":
        """From a dict of these fields or of the trainer config's data section (config.DataConfig):
        `source` may be a folder or a .jsonl path, `num_generated` means num_images, `extra` is merged
        in, trainer-only keys are ignored."""
        d = dict(d or {})
        d.update(d.pop("extra", None) or {})
        cache_dir = d.get("cache_dir")
        for k in TRAINER_KEYS:
            d.pop(k, None)
        if "num_generated" in d:
            d["num_images"] = d.pop("num_generated")
        src = d.get("source", "generated")
        if isinstance(src, str) and src not in SOURCES and src:
            d.update(source=_source_kind(src), path=src, path_key="data.source")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"unknown config key(s) {', '.join('data.' + k for k in unknown)}; "
                            f"expected some of {', '.join(sorted(names))}")
        cfg = cls(**d)
        if cfg.source not in SOURCES:
            raise DataError(f"data.source = {cfg.source!r}: expected 'generated', 'folder', 'jsonl' or 'webdataset'")
        if not isinstance(cfg.resolution, int) or cfg.resolution < 8:
            raise DataError(f"data.resolution = {cfg.resolution!r}: expected an int >= 8")
        if cfg.source == "webdataset":
            _check_webdataset(cfg, cache_dir)
        return cfg


def _source_kind(src: str) -> str:
    """data.source given as a path: a .jsonl manifest, tar shards (.tar / .tgz, braces, pipe:) or a folder."""
    low = src.lower()
    if low.startswith("pipe:") or low.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    return "jsonl" if low.endswith(".jsonl") else "folder"


def _check_webdataset(cfg: DatasetOptions, cache_dir) -> None:
    """Config-time checks of a webdataset source (the shards themselves are checked when the run starts)."""
    from training.data.shards import expand_braces

    paths = [cfg.path] if isinstance(cfg.path, str) else cfg.path
    if not paths or not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise DataError(f"{cfg.path_key} = {cfg.path!r}: expected tar shards (a path, a brace list like "
                        "'shards-{000000..000099}.tar', a 'pipe:COMMAND', or a list of those)")
    for p in paths:
        try:
            expand_braces(p)
        except ValueError as e:
            raise DataError(f"{cfg.path_key}: {e}") from None
    for key, low in (("shuffle_buffer", 1), ("streams", 0), ("num_workers", 0)):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"data.{key} = {value!r}: expected an int >= {low}")
    if cfg.bucketing:
        raise DataError("data.bucketing: not available with webdataset shards (a streamed batch cannot be "
                        "gathered from one bucket); every image is resized and cropped to data.resolution")
    if cache_dir:
        raise DataError("data.cache_dir: not used with webdataset shards; precompute latent shards instead "
                        "(python -m training.data.latent_shards, docs/data.md) and train on those")
    if cfg.missing_caption not in ("error", "empty"):
        raise DataError(f"data.missing_caption = {cfg.missing_caption!r}: expected 'error' or 'empty'")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Records -> preprocessed samples. Random crop/flip draw from (seed, epoch, index)."""

    def __init__(self, records: list[Record], resolution: int, bucketing: bool = False,
                 bucket_step: Optional[int] = None, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, stats: Optional[dict] = None):
        self.records = records
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch = seed, 0
        self.buckets = make_buckets(resolution, bucket_step) if bucketing else [(resolution, resolution)]
        self.bucket_ids = [nearest_bucket(r.size, self.buckets) for r in records]
        self.stats = dict(stats or {}, num_buckets=len(set(self.bucket_ids)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def preprocessing_settings(self) -> dict:
        return {"resolution": self.resolution, "buckets": self.buckets,
                "center_crop": self.center_crop, "random_flip": self.random_flip}

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        flip = self.random_flip and rng.random() < 0.5
        sample = preprocess(rec.load(), self.buckets[self.bucket_ids[i]],
                            random_crop=not self.center_crop, flip=flip, rng=rng)
        sample.update(caption=rec.caption, index=i, bucket=self.bucket_ids[i])
        return sample


def build_dataset(cfg) -> ImageCaptionDataset:
    """DatasetOptions, dict or any dataclass (the config's "data" section) -> dataset; warns about
    unreadable files."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, DatasetOptions):  # the config's data section
        cfg = dataclasses.asdict(cfg)
    cfg = cfg if isinstance(cfg, DatasetOptions) else DatasetOptions.from_dict(cfg)
    missing = 0
    if cfg.source == "webdataset":
        raise DataError(f"{cfg.path_key}: webdataset shards are streamed, not indexed: read them with "
                        "training.data.webdataset.WebDatasetSource (python -m training.run does)")
    if cfg.source == "generated":
        records = generated_records(cfg.num_images, cfg.image_size or cfg.resolution, cfg.seed)
    elif cfg.source == "folder":
        records, missing = folder_records(cfg.path, cfg.recursive, cfg.missing_caption, cfg.path_key)
    else:
        records = jsonl_records(cfg.path, cfg.path_key)
    records, scan = scan_records(records)
    stats = dict(scan.as_dict(), num_missing_captions=missing)
    return ImageCaptionDataset(records, cfg.resolution, cfg.bucketing, cfg.bucket_step,
                               cfg.center_crop, cfg.random_flip, cfg.seed, stats)


def is_streaming(data_cfg) -> bool:
    """Does the config's data section (or a DatasetOptions / dict) name webdataset shards?"""
    if dataclasses.is_dataclass(data_cfg) and not isinstance(data_cfg, DatasetOptions):
        data_cfg = dataclasses.asdict(data_cfg)
    opts = data_cfg if isinstance(data_cfg, DatasetOptions) else DatasetOptions.from_dict(data_cfg)
    return opts.source == "webdataset"


def collate(samples: list[dict]) -> dict:
    """Stack tensors (and ints) along a new batch dim; "caption" stays a list of str."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def make_dataloader(dataset, global_batch_size: int, seed: int = 0, num_processes: int = 1,
                    process_index: int = 0, shuffle: bool = True, num_workers: int = 0):
    """Same-bucket batches of global_batch_size // num_processes for this process."""
    sampler = BucketBatchSampler(dataset.bucket_ids, global_batch_size, seed=seed, shuffle=shuffle,
                                 num_processes=num_processes, process_index=process_index)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers)


def set_epoch(loader, epoch: int) -> None:
    """Reseed batch order and augmentation for `epoch` (call before iterating)."""
    loader.batch_sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)

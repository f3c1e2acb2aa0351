"""`python -m training.data.latent_shards --config CFG --out DIR`: image shards -> precomputed-latent shards.

The config's data section names webdataset image shards (data.path) and the preprocessing (data.resolution,
center crop, no flip); its model section names the base whose VAE and text encoder(s) encode them. Input
shard i (in the expanded data.path order) becomes DIR/latents-{i:06d}.tar: per sample KEY.txt (the caption)
and KEY.latent.safetensors with `latents` (the VAE's latent_dist.mean * scaling_factor, as a run encodes
them), `prompt_embeds` (+ `pooled_prompt_embeds` for SDXL) and the SDXL micro-conditioning (`original_size`,
`crop_top_left`, `target_size`); its metadata holds the encoder fingerprint (data.run_cache.encoder_id)
and the resolution, which a run checks against its own model. Bad samples are reported and left out, as
in training. DIR/latent_shards.json lists the shards and the counts.

Each shard is written to a temp file and renamed, so a killed precompute leaves whole shards only; run it
again and it skips shards already written with the same encoder and resolution (and refuses a file that
was written with others). Under torchrun / accelerate launch each process writes shards[rank::world].
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tarfile

import torch

from training.data.webdataset import COUNT_OF, LATENT_FORMAT, latent_metadata
from training.errors import ConfigError, DataError

NAME = "latents-{:06d}.tar"


def sample_members(key: str, tensors: dict, caption: str, meta: dict) -> list:
    """(member name, bytes) of one latent sample."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    return [(f"{key}.latent.safetensors", blob), (f"{key}.txt", caption.encode("utf-8"))]


def add_member(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644     # fixed fields: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def encode_batch(tar, pending: list, encode_images, encode_texts, meta: dict) -> None:
    """pending [(key, sample)] -> latent samples in `tar` (one VAE and one text-encoder call)."""
    if not pending:
        return
    latents = encode_images(torch.stack([s["pixel_values"] for _, s in pending]))
    texts = encode_texts([s["caption"] for _, s in pending])
    for j, (key, s) in enumerate(pending):
        tensors = {"latents": latents[j], **{k: v[j] for k, v in texts.items()},
                   **{f: s[f] for f in ("original_size", "crop_top_left", "target_size")}}
        for name, data in sample_members(key, tensors, s["caption"], meta):
            add_member(tar, name, data)
    pending.clear()


def write_shard(url: str, path: str, decoder, encoders, meta: dict, batch_size: int) -> dict:
    """One image shard -> one latent shard (atomic). Returns its counts; bad samples are reported."""
    from training.data.shards import Shard, ShardReadError
    from training.files import atomic_path

    counts = {"num_found": 0, "num_ok": 0, "num_unreadable": 0, "num_missing_captions": 0, "num_damaged_shards": 0}
    shard = Shard(url)
    try:
        with atomic_path(path, ".tar") as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            pending = []
            try:
                for key, members, _ in shard.samples():
                    counts["num_found"] += 1
                    sample, problem = decoder((0, url, key, members))
                    if problem:
                        counts[COUNT_OF[problem[0]]] += 1
                        print(f"warning: {url}:{key} {'left out' if sample is None else 'used'}: {problem[1]}",
                              file=sys.stderr)
                    if sample is not None:
                        counts["num_ok"] += 1
                        pending.append((key, sample))
                    if len(pending) == batch_size:
                        encode_batch(tar, pending, *encoders, meta)
            except ShardReadError as e:
                counts["num_damaged_shards"] += 1
                print(f"warning: {e}; the samples before it are kept", file=sys.stderr)
            encode_batch(tar, pending, *encoders, meta)
    finally:
        shard.close()
    return counts


def existing_shard_matches(path: str, meta: dict) -> bool:
    """A shard already at `path`: True if written with this encoder and resolution; DataError otherwise."""
    from training.data.shards import Shard

    shard = Shard(path)
    try:
        first = next((m for _, m, _ in shard.samples()), None)
    finally:
        shard.close()
    if first is None:
        return True                         # every sample of its input was bad
    found = latent_metadata(first.get("latent.safetensors", b""), path)
    if (found.get("encoder_id"), found.get("resolution")) != (meta["encoder_id"], meta["resolution"]):
        raise DataError(f"--out: {path} exists and was encoded with encoder {found.get('encoder_id')} at "
                        f"{found.get('resolution')} px, not {meta['encoder_id']} at {meta['resolution']} px: "
                        "choose another --out folder (nothing there is deleted)")
    return True


def check_source(cfg):
    """The config's data section as the precompute needs it -> (options, shard URLs)."""
    from training.data import DatasetOptions
    from training.data.shards import expand_urls
    from training.data.webdataset import peek

    opts = DatasetOptions.from_dict(dataclasses.asdict(cfg.data))
    if opts.source != "webdataset":
        raise ConfigError(f"config key 'data.source': {opts.source!r}; latent shards are made from webdataset "
                          "image shards (data.source: webdataset, data.extra.path: the shards)")
    if opts.random_flip or not opts.center_crop:
        raise ConfigError("config keys 'data.extra.center_crop' / 'data.extra.random_flip': latent shards need "
                          "deterministic preprocessing (center_crop true, random_flip false)")
    urls = expand_urls(opts.path, opts.path_key)
    if peek(urls, opts.path_key)[0] == "latents":
        raise ConfigError(f"config key '{opts.path_key}': these are latent shards already")
    return opts, urls


def precompute(cfg, out_dir: str, batch_size: int = 16) -> dict:
    """Write this process's latent shards and (main process) latent_shards.json; returns the summary."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from training.data.run_cache import encoder_id, image_encoder, text_encoder
    from training.data.webdataset import Decoder
    from training.files import save_json_atomic
    from training.models.base import load_base

    opts, urls = check_source(cfg)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir}: exists and is not a folder")
    acc = Accelerator()
    base = load_base(cfg.model)
    for m in [base.unet, base.vae, *base.text_encoders]:
        m.requires_grad_(False).to(acc.device).eval()
    meta = {"format": LATENT_FORMAT, "encoder_id": encoder_id(base), "resolution": str(opts.resolution),
            "family": base.family}
    decoder = Decoder("images", opts.resolution, True, False, opts.seed, opts.missing_caption)
    encoders = (image_encoder(base, acc.device), text_encoder(base, acc.device))
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for i in range(acc.process_index, len(urls), acc.num_processes):
        path = os.path.join(out_dir, NAME.format(i))
        if os.path.isfile(path) and existing_shard_matches(path, meta):
            continue
        counts[i] = write_shard(urls[i], path, decoder, encoders, meta, batch_size)
    merged = {i: c for part in gather_object([counts]) for i, c in part.items()}
    summary = {**meta, "shards": [NAME.format(i) for i in range(len(urls))], "source": urls,
               "path": os.path.join(out_dir, "latents-{%06d..%06d}.tar" % (0, len(urls) - 1)),
               "written": {NAME.format(i): c for i, c in sorted(merged.items())}}
    if acc.is_main_process:
        save_json_atomic(summary, os.path.join(out_dir, "latent_shards.json"))
    acc.wait_for_everyone()
    return summary


def main(argv=None):
    from training.config import load_config
    from training.errors import USER_ERRORS

    p = argparse.ArgumentParser(prog="python -m training.data.latent_shards", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML or JSON training config (its data and model sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="folder for latents-NNNNNN.tar and latent_shards.json")
    p.add_argument("--batch-size", type=int, default=16, help="samples per VAE / text-encoder call")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size}: expected >= 1")
        summary = precompute(load_config(args.config, args.set), args.out, args.batch_size)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"latent shards: {len(summary['shards'])} in {args.out}; train on them with "
          f"data.source: webdataset, data.extra.path: '{summary['path']}'")


if __name__ == "__main__":
    main()

"""A streamed webdataset source in a run (training/data/webdataset.py): built for this process, its
position gathered from every process into the checkpoint and restored on --resume, and precomputed-latent
shards checked against the run's own VAE and text encoder(s) before step 0."""
from __future__ import annotations

import dataclasses

import torch

from training.errors import DataError


def build_stream(cfg, micro_batch: int, accelerator):
    """The config's data section (source: webdataset) -> this process's WebDatasetSource."""
    from training.data import DatasetOptions
    from training.data.webdataset import WebDatasetSource

    opts = DatasetOptions.from_dict(dataclasses.asdict(cfg.data))
    return WebDatasetSource(opts, micro_batch, cfg.seed, accelerator.num_processes, accelerator.process_index)


def gather_position(accelerator, source) -> dict:
    """Every process's stream positions as one JSON-able dict (call on every process: it is a collective)."""
    from accelerate.utils import gather_object

    from training.data.webdataset import merge_states

    source.global_state = merge_states(gather_object([source.state_dict()]))
    return source.global_state


def restore_position(source, state, resume_dir) -> None:
    if state is None:
        raise DataError(f"--resume {resume_dir}: the checkpoint holds no webdataset position (it was written by a "
                        "run that read another data.source)")
    source.load_state_dict(state)


def latent_shard_text(run):
    """Latent shards: refuse ones encoded by another model or at another resolution; then the CachedText the
    engine conditions cached embeddings with (latents in the VAE's own memory layout)."""
    from training.data.run_cache import CachedText, encoder_id, vae_latent_format

    src, cfg = run.data.stream, run.cfg
    info, eid = src.latent_info, encoder_id(run.base)
    if info.get("encoder_id") != eid:
        raise DataError(f"{src.path_key}: the latent shards were encoded with {info.get('encoder_id')}, but this "
                        f"run's model ({cfg.model.base}) is {eid}: precompute them again with this model "
                        "(python -m training.data.latent_shards)")
    if str(info.get("resolution")) != str(cfg.data.resolution):
        raise DataError(f"data.resolution = {cfg.data.resolution}: the latent shards in {src.path_key} were "
                        f"encoded at {info.get('resolution')} px")
    text = CachedText(run.base, run.device)
    r = cfg.data.resolution
    text.latent_format = vae_latent_format(run.base.vae, torch.zeros(3, r, r), run.device)
    return text

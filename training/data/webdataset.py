"""Streaming webdataset source: tar shards read in order, never indexed, resumable without re-reading.

The global micro-batch of B samples is made of S *streams* (data.streams; S divides B): stream j gives
B / S consecutive samples of its own sequence to every micro-batch, and the batch is stream 0's samples,
then stream 1's, ... Stream j's sequence: in epoch e it reads the shards `perm_e[j::S]`, perm_e a
permutation of all shards seeded by (seed, e), and shuffles them in blocks: it reads data.shuffle_buffer
samples, gives them out in a permutation seeded by (seed, j, where the block starts), reads the next block.
Process p of n owns the contiguous streams [p S/n, (p+1) S/n), which are exactly its slice of the global
batch, and splits them over its DataLoader workers. So the batches depend on (shards, S, buffer, seed)
only: 1 or n processes and any number of workers see the same samples at every step.

A stream's position is (epoch, shard index, sample index in the shard) where its current block starts plus
how many of the block's samples were given out; `state_dict` holds it with the bad-sample counts. On
resume a stream re-reads the one block it was in (at most data.shuffle_buffer samples, no earlier shard).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass

import torch

from training.data.shards import Shard, ShardReadError, expand_urls
from training.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LATENT_MEMBER = "latent.safetensors"        # precomputed-latent shards (training/data/latent_shards.py)
LATENT_FORMAT = "hyper-sd-latent-sample-v1"
COUNTS = ("num_found", "num_ok", "num_unreadable", "num_missing_captions", "num_damaged_shards")
COUNT_OF = {"unreadable": "num_unreadable", "missing_caption": "num_missing_captions", "damaged": "num_damaged_shards"}
MAX_BAD_RUN = 10_000                        # bad samples in a row before the stream gives up
MAX_NAMES = 20                              # bad-sample names kept per stream (the counts are complete)


@dataclass(frozen=True)
class StreamPlan:
    urls: tuple
    streams: int
    seed: int
    buffer: int


def epoch_shards(plan: StreamPlan, stream: int, epoch: int) -> list:
    order = random.Random(f"webdataset:{plan.seed}:{epoch}").sample(plan.urls, len(plan.urls))
    return order[stream::plan.streams]


def raw_samples(plan: StreamPlan, stream: int, pos):
    """Stream `stream`'s samples from pos = (epoch, shard, sample) on, forever: ((epoch, url, key, members),
    the position after it). A damaged shard gives one item with key None and members {"reason": ...} (it
    is reported when given out, like a bad sample) and the stream goes on with the next shard."""
    epoch, first, skip = pos
    empty = 0                               # shards in a row without a sample
    while True:
        shards = epoch_shards(plan, stream, epoch)
        for i in range(first, len(shards)):
            after_shard = (epoch, i + 1, 0) if i + 1 < len(shards) else (epoch + 1, 0, 0)
            index, shard, empty = (skip if i == first else 0), None, empty + 1
            try:
                shard = Shard(shards[i])
                for key, members, last in shard.samples(index):
                    index, empty = index + 1, 0
                    yield (epoch, shards[i], key, members), (after_shard if last else (epoch, i, index))
            except ShardReadError as e:
                yield (epoch, shards[i], None, {"reason": str(e)}), after_shard
            finally:
                if shard is not None:
                    shard.close()
            if empty > 50 * len(plan.urls):
                raise DataError(f"stream {stream} read {empty} shards in a row without a sample: the shards of "
                                "data.path hold no samples")
        epoch, first, skip = epoch + 1, 0, 0


def block_shuffled(plan: StreamPlan, stream: int, state: dict):
    """Block shuffle of raw_samples: yields (raw sample, the stream's position after it)."""
    pos, given = tuple(state["at"]), state["given"]
    raw = raw_samples(plan, stream, pos)
    try:
        while True:
            start, block = pos, []
            for _ in range(plan.buffer):
                item, pos = next(raw)
                block.append(item)
            order = random.Random(f"webdataset-block:{plan.seed}:{stream}:{start}").sample(
                range(len(block)), len(block))
            for t in range(given, len(block)):
                last = t + 1 == len(block)
                yield block[order[t]], {"at": list(pos if last else start), "given": 0 if last else t + 1}
            given = 0
    finally:
        raw.close()


def caption_of(members: dict):
    """(caption or None, problem or None): `txt` (UTF-8), else `json`'s "caption"."""
    if "txt" in members:
        try:
            return members["txt"].decode("utf-8").strip(), None
        except UnicodeDecodeError:
            return None, "caption .txt is not UTF-8"
    if "json" in members:
        try:
            caption = json.loads(members["json"].decode("utf-8")).get("caption")
        except (UnicodeDecodeError, ValueError, AttributeError):
            return None, "caption .json is not a UTF-8 JSON object"
        if isinstance(caption, str):
            return caption.strip(), None
    return None, None


class Decoder:
    """Raw sample -> (training sample or None, (problem kind, reason) or None). Kinds: "unreadable" (left
    out), "missing_caption" (left out, or trained with "" when data.missing_caption is "empty"), "damaged"
    (the rest of a shard)."""

    def __init__(self, kind: str, resolution: int, center_crop=True, random_flip=False, seed=0,
                 missing_caption="error"):
        self.kind, self.resolution, self.seed = kind, resolution, seed
        self.center_crop, self.random_flip, self.missing_caption = center_crop, random_flip, missing_caption

    def __call__(self, raw):
        epoch, url, key, members = raw
        if key is None:
            return None, ("damaged", members["reason"])
        caption, bad_text = caption_of(members)
        if bad_text:
            return None, ("unreadable", bad_text)
        try:
            sample = self.latents(members) if self.kind == "latents" else self.pixels(raw)
        except Exception as e:              # PIL / safetensors raise many types for corrupt data
            return None, ("unreadable", f"{type(e).__name__}: {e}")
        if caption is None:
            if self.missing_caption != "empty":
                return None, ("missing_caption", "no .txt or .json caption")
            return dict(sample, caption=""), ("missing_caption", "no .txt or .json caption; trained with ''")
        return dict(sample, caption=caption), None

    def pixels(self, raw) -> dict:
        from PIL import Image, ImageOps

        from training.data.image import preprocess

        epoch, url, key, members = raw
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise ValueError(f"no image member (.{', .'.join(IMAGE_EXTENSIONS)})")
        with Image.open(io.BytesIO(members[ext])) as img:
            img.load()                      # full decode: catches truncated files
            img = ImageOps.exif_transpose(img).convert("RGB")
        rng = random.Random(f"{self.seed}:{epoch}:{url}:{key}")
        flip = self.random_flip and rng.random() < 0.5
        size = (self.resolution, self.resolution)
        return preprocess(img, size, random_crop=not self.center_crop, flip=flip, rng=rng)

    @staticmethod
    def latents(members) -> dict:
        from safetensors.torch import load

        if LATENT_MEMBER not in members:
            raise ValueError(f"no .{LATENT_MEMBER} member")
        return load(members[LATENT_MEMBER])


class StreamReader:
    """One stream in a DataLoader worker: `take(n)` -> {"samples", "state", "reports"}. Bad samples are
    counted as they are given out, so the counts saved with a position are exact after a resume."""

    def __init__(self, plan, stream, state, decode):
        self.stream, self.decode = stream, decode
        self.counts = {k: state.get("counts", {}).get(k, 0) for k in COUNTS}
        self.names, self.reports = list(state.get("bad", [])), []
        self.state = {"at": state["at"], "given": state["given"]}
        self.samples = block_shuffled(plan, stream, state)

    def take(self, n: int) -> dict:
        out, bad_run = [], 0
        while len(out) < n:
            raw, self.state = next(self.samples)
            _, url, key, _ = raw
            self.counts["num_found"] += key is not None
            sample, problem = self.decode(raw)
            if problem:
                self.counts[COUNT_OF[problem[0]]] += 1
                self._note(f"{url}:{key}" if key is not None else url, problem[1], left_out=sample is None)
            if sample is None:
                bad_run += 1
                if bad_run > MAX_BAD_RUN:
                    raise DataError(f"webdataset stream {self.stream}: {bad_run} bad samples in a row in data.path "
                                    f"(last: {self.names[-1] if self.names else url})")
                continue
            self.counts["num_ok"] += 1
            out.append(sample)
        reports, self.reports = self.reports, []
        return {"samples": out, "reports": reports,
                "state": {**self.state, "counts": dict(self.counts), "bad": list(self.names)}}

    def _note(self, name, reason, left_out):
        if len(self.names) < MAX_NAMES:
            self.names.append(f"{name} ({reason})")
        self.reports.append((name, reason, left_out))

    def close(self):
        self.samples.close()


class StreamSet(torch.utils.data.IterableDataset):
    """A process's streams; each DataLoader worker reads streams[worker::workers] and yields, per
    micro-batch, {stream: chunk} (or {"error": message} once, for the main process to raise)."""

    def __init__(self, plan, streams, states, decode, per_stream):
        self.plan, self.streams, self.states = plan, streams, states
        self.decode, self.per_stream = decode, per_stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.streams[info.id::info.num_workers] if info is not None else self.streams
        readers = {j: StreamReader(self.plan, j, self.states[j], self.decode) for j in mine}
        try:
            while True:
                yield {j: r.take(self.per_stream) for j, r in readers.items()}
        except DataError as e:
            yield {"error": str(e)}
        finally:
            for r in readers.values():
                r.close()


def _as_is(item):
    return item


def start_state() -> dict:
    return {"at": [0, 0, 0], "given": 0, "counts": {k: 0 for k in COUNTS}, "bad": []}


def resolve_streams(requested: int, micro_batch: int, shards: int, processes: int) -> int:
    """data.streams (0 = the largest divisor of the global micro-batch that is at most the shard count)."""
    divisors = [d for d in range(1, micro_batch + 1) if micro_batch % d == 0]
    s = requested or max(d for d in divisors if d <= shards)
    if micro_batch % s == 0 and s % processes == 0 and s <= shards:
        return s
    fits = [d for d in divisors if d % processes == 0 and d <= shards]
    hint = f"; e.g. data.streams = {max(fits)}" if fits else f"; give at least {processes} shards"
    raise DataError(f"data.streams = {s}{' (automatic)' if not requested else ''}: the streams must divide "
                    f"the global micro-batch ({micro_batch} = optim.batch_size / optim.grad_accum), be a "
                    f"multiple of the process count ({processes}) and at most the number of shards "
                    f"({shards}){hint}")


def latent_metadata(data: bytes, name: str) -> dict:
    """The metadata of a .latent.safetensors member (read from the header; no tensor is loaded)."""
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        meta = {}
    if meta.get("format") != LATENT_FORMAT:
        raise DataError(f"{name}: not a latent sample written by python -m training.data.latent_shards "
                        f"(metadata format {meta.get('format')!r}, expected {LATENT_FORMAT!r})")
    return meta


def peek(urls, key: str):
    """(kind, latent metadata) from the first sample found: "latents" if it has a .latent.safetensors member."""
    for url in urls[:3]:
        shard = Shard(url)
        try:
            for _, members, _ in shard.samples():
                if LATENT_MEMBER in members:
                    return "latents", latent_metadata(members[LATENT_MEMBER], f"{url}: {LATENT_MEMBER}")
                return "images", {}
        except ShardReadError:
            continue
        finally:
            shard.close()
    raise DataError(f"{key}: no sample in the first shard(s) {', '.join(urls[:3])}")


class WebDatasetSource:
    """This process's slice of every global micro-batch, in order. `batch(m)` is called for m, m+1, ..."""

    def __init__(self, opts, micro_batch: int, seed: int, num_processes: int = 1, process_index: int = 0):
        self.path_key = opts.path_key
        urls = expand_urls(opts.path, opts.path_key)
        s = resolve_streams(opts.streams, micro_batch, len(urls), num_processes)
        self.plan = StreamPlan(tuple(urls), s, seed, opts.shuffle_buffer)
        self.micro_batch, self.per_stream = micro_batch, micro_batch // s
        self.mine = list(range(process_index * s // num_processes, (process_index + 1) * s // num_processes))
        self.kind, self.latent_info = peek(urls, opts.path_key)
        self.decode = Decoder(self.kind, opts.resolution, opts.center_crop, opts.random_flip, opts.seed,
                              opts.missing_caption)
        self.workers = min(opts.num_workers, len(self.mine))
        self.states = {j: start_state() for j in self.mine}
        self.global_state, self.shown, self._it, self.next_m = None, 0, None, None

    def plan_record(self) -> dict:
        """What the saved positions mean; a resume with any of it changed is refused."""
        digest = hashlib.sha256("\n".join(self.plan.urls).encode()).hexdigest()[:16]
        return {"shards": len(self.plan.urls), "shards_sha256": digest, "streams": self.plan.streams,
                "shuffle_buffer": self.plan.buffer, "seed": self.plan.seed, "micro_batch": self.micro_batch}

    def state_dict(self) -> dict:
        """This process's streams (merge the processes' with merge_states)."""
        return {"plan": self.plan_record(), "streams": {str(j): st for j, st in self.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["plan"], self.plan_record()
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            raise DataError("--resume: the webdataset positions in the checkpoint were saved with " + ", ".join(
                f"{k} = {saved.get(k)}" for k in changed) + " but this run has " + ", ".join(
                f"{k} = {now[k]}" for k in changed) + " (data.path, data.streams, data.shuffle_buffer, seed, "
                "optim.batch_size / optim.grad_accum must stay as they were)")
        self.states = {j: state["streams"][str(j)] for j in self.mine}
        self.global_state = state

    def _start(self, m: int) -> None:
        streams = StreamSet(self.plan, self.mine, self.states, self.decode, self.per_stream)
        if self.workers == 0:
            self._it = iter(streams)
        else:
            self._it = iter(torch.utils.data.DataLoader(streams, batch_size=None, num_workers=self.workers,
                                                        collate_fn=_as_is))
        self.next_m = m

    def batch(self, m: int) -> list:
        """Micro-batch m's samples for this process: its streams' chunks in stream order."""
        if self._it is None:
            self._start(m)
        if m != self.next_m:
            raise RuntimeError(f"webdataset: micro-batch {m} asked for, {self.next_m} is next (a stream is read in order)")
        chunks = {}
        for _ in range(max(1, self.workers)):       # one item per worker, round robin
            item = next(self._it)
            if "error" in item:
                raise DataError(item["error"])
            chunks.update(item)
        for j in self.mine:
            self.states[j] = chunks[j]["state"]
            self._warn(chunks[j]["reports"])
        self.next_m += 1
        return [s for j in self.mine for s in chunks[j]["samples"]]

    def _warn(self, reports) -> None:
        for name, reason, left_out in reports:
            self.shown += 1
            if self.shown <= MAX_NAMES or self.shown % 1000 == 0:
                more = " (later ones: counted in metrics.json, every 1000th shown)" if self.shown == MAX_NAMES else ""
                warnings.warn(f"webdataset: {name} {'left out' if left_out else 'used'}: {reason}{more}",
                              stacklevel=2)

    @property
    def stats(self) -> dict:
        """Bad-sample counts over every stream (the last gathered state), as the folder source reports them."""
        streams = (self.global_state or self.state_dict())["streams"].values()
        out = {k: sum(st["counts"][k] for st in streams) for k in COUNTS}
        out["unreadable_files"] = [n for st in streams for n in st["bad"]][:100]
        return out

    def close(self) -> None:
        """Stop the DataLoader workers (or the in-process streams) and close their shards."""
        if hasattr(self._it, "close"):
            self._it.close()
        self._it = None                     # a DataLoader iterator shuts its workers down when dropped


def merge_states(states: list) -> dict:
    """Every process's state_dict -> one (all streams)."""
    merged = {"plan": states[0]["plan"], "streams": {}}
    for st in states:
        merged["streams"].update(st["streams"])
    return merged

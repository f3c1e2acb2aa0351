"""Streamed webdataset shards (training/data/webdataset.py): brace lists, pipe: URLs, the split over processes
and workers, deterministic resume that skips consumed shards, bad-sample reports, precomputed-latent shards,
config errors, and `python -m training.run` on shards: SIGKILL + resume, 2 processes vs 1, latent shards."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from tests.test_training_run import REPO, cmd, env, kill_at_step_2, max_diff
from training.data import DatasetOptions
from training.data.shards import expand_braces
from training.data.webdataset import WebDatasetSource, epoch_shards
from training.errors import ConfigError, DataError

SHARDS, PER_SHARD = 4, 6


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(record):
    buf = io.BytesIO()
    record.load().save(buf, "PNG")
    return buf.getvalue()


def make_shards(folder, shards=SHARDS, per=PER_SHARD):
    """img2dataset's layout: NNNNNNNNN.png + NNNNNNNNN.txt per sample, the shapes task's images and captions."""
    from training.data.sources import generated_records

    records = generated_records(shards * per, 32, seed=0)
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        write_tar(os.path.join(folder, f"shard-{s:06d}.tar"),
                  [(f"{i:09d}.{ext}", data) for i in range(s * per, (s + 1) * per)
                   for ext, data in (("png", png_bytes(records[i])), ("txt", records[i].caption.encode()))])
    return os.path.join(str(folder), "shard-{000000..%06d}.tar" % (shards - 1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def source(path, micro_batch=4, processes=1, index=0, **extra):
    opts = DatasetOptions.from_dict({"source": "webdataset", "path": path, "resolution": 32, **extra})
    return WebDatasetSource(opts, micro_batch, seed=3, num_processes=processes, process_index=index)


def take(src, start, count):
    out = [src.batch(m) for m in range(start, start + count)]
    return out


def same(a, b):
    """Two lists of batches hold the same samples in the same order (captions and pixels)."""
    assert [[s["caption"] for s in x] for x in a] == [[s["caption"] for s in x] for x in b]
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s["pixel_values"], t["pixel_values"])


def test_brace_expansion():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert expand_braces("s3/{a,b{1..2}}.tar") == ["s3/a.tar", "s3/b1.tar", "s3/b2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("a-{000..002.tar", "a}.tar", "a-{x}.tar"):
        with pytest.raises(ValueError):
            expand_braces(bad)


def test_member_names_to_sample_keys():
    from training.data.shards import split_name

    assert split_name("000000123.jpg") == ("000000123", "jpg")
    assert split_name("./part/000000123.latent.safetensors") == ("./part/000000123", "latent.safetensors")
    assert split_name("000000123.TXT") == ("000000123", "txt")
    for junk in ("README", "dir/.DS_Store", "._000000123.jpg", "dir/._x.png"):
        assert split_name(junk) == (None, None), junk


def test_pipe_urls_read_what_local_paths_read(shards):
    folder = os.path.dirname(shards)
    piped = f"pipe:cat {folder}/shard-{{000000..{SHARDS - 1:06d}}}.tar"
    local, pipe = source(shards, shuffle_buffer=3), source(piped, shuffle_buffer=3)
    assert pipe.plan.urls[0] == f"pipe:cat {folder}/shard-000000.tar"
    same(take(local, 0, 8), take(pipe, 0, 8))      # past one epoch: 4 streams x 6 samples


def test_every_sample_once_per_epoch_in_a_new_order(shards):
    src = source(shards, micro_batch=1, shuffle_buffer=8)   # blocks cross shards, not the epoch's end
    assert src.plan.streams == 1
    batches = take(src, 0, 2 * SHARDS * PER_SHARD)
    pixels = [b[0]["pixel_values"] for b in batches]
    n = SHARDS * PER_SHARD
    first, second = pixels[:n], pixels[n:]
    assert len({p.numpy().tobytes() for p in first}) == n            # each sample once per epoch
    assert {p.numpy().tobytes() for p in first} == {p.numpy().tobytes() for p in second}
    assert [p.numpy().tobytes() for p in first] != [p.numpy().tobytes() for p in second]
    assert epoch_shards(src.plan, 0, 0) != epoch_shards(src.plan, 0, 1)    # shard order per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_processes_and_workers_reassemble_the_one_process_batches(shards, workers):
    one = take(source(shards, micro_batch=4, shuffle_buffer=3), 0, 9)
    parts = [take(source(shards, micro_batch=4, processes=2, index=p, shuffle_buffer=3, num_workers=workers), 0, 9)
             for p in range(2)]
    assert all(len(b) == 2 for b in parts[0])
    same(one, [a + b for a, b in zip(*parts)])


def test_resume_continues_exactly_and_skips_consumed_shards(tmp_path, shards):
    """4 shards x 6, 2 streams (2 shards each per epoch), blocks of 3: after 7 micro-batches of 2 each stream
    is in its 3rd block, inside its 2nd shard; a resumed source opens only that shard, then goes on."""
    folder, log = os.path.dirname(shards), tmp_path / "opened.log"
    urls = [f"pipe:echo {s} >> {log} && cat {folder}/shard-{s:06d}.tar" for s in range(SHARDS)]
    ref = source(urls, micro_batch=2, streams=2, shuffle_buffer=3)
    expected = take(ref, 0, 20)
    first = source(urls, micro_batch=2, streams=2, shuffle_buffer=3)
    take(first, 0, 7)
    state = json.loads(json.dumps(first.state_dict()))        # what the checkpoint stores
    first.close()
    assert [st["at"][1:] for st in state["streams"].values()] == [[1, 0], [1, 0]] and \
        [st["given"] for st in state["streams"].values()] == [1, 1]
    log.unlink()
    resumed = source(urls, micro_batch=2, streams=2, shuffle_buffer=3)
    log.write_text("")                                      # the shard peeked at construction is not counted
    resumed.load_state_dict(state)
    got = take(resumed, 7, 1)
    opened = {urls[int(n)] for n in log.read_text().split()}
    assert opened == {epoch_shards(resumed.plan, j, 0)[1] for j in range(2)}   # never their 1st shards
    same(expected[7:], got + take(resumed, 8, 12))
    changed = source(urls, micro_batch=2, streams=2, shuffle_buffer=4)
    with pytest.raises(DataError, match="shuffle_buffer = 3"):
        changed.load_state_dict(state)


def test_positions_resume_on_another_process_count(shards):
    """Positions are per stream: a 1-process checkpoint resumes on 2 processes (same streams) exactly."""
    expected = take(source(shards, micro_batch=4, streams=4, shuffle_buffer=3), 0, 9)
    first = source(shards, micro_batch=4, streams=4, shuffle_buffer=3)
    take(first, 0, 5)
    state = json.loads(json.dumps(first.state_dict()))
    parts = []
    for p in range(2):
        src = source(shards, micro_batch=4, processes=2, index=p, streams=4, shuffle_buffer=3)
        src.load_state_dict(state)
        parts.append(take(src, 5, 4))
    same(expected[5:], [a + b for a, b in zip(*parts)])


def _bad_shard(path):
    from training.data.sources import generated_records

    good = [png_bytes(r) for r in generated_records(3, 32)]
    write_tar(path, [("a.png", good[0]), ("a.txt", b"fine"),
                     ("b.png", b"not a png at all"), ("b.txt", b"corrupt image"),
                     ("c.png", good[1]),                                           # no caption
                     ("d.png", good[2]), ("d.txt", b"\xff\xfe caption"),          # not UTF-8
                     ("e.txt", b"no image"),
                     ("f.jpg", good[0]), ("f.json", json.dumps({"caption": "from json"}).encode())])


def _cut_shard(shards, path):
    """The first shard cut inside its 5th sample's image: 4 whole samples, then a damaged tar."""
    first = shards.replace("{000000..000003}", "000000")
    with tarfile.open(first) as tar:
        fifth = tar.getmembers()[8]
    path.write_bytes(open(first, "rb").read()[:fifth.offset_data + 100])


def test_bad_samples_are_reported_and_counted(tmp_path, shards):
    _bad_shard(tmp_path / "bad.tar")
    _cut_shard(shards, tmp_path / "cut.tar")
    whole = (tmp_path / "bad.tar").read_bytes()
    with pytest.warns(UserWarning) as caught:
        src = source([str(tmp_path / "bad.tar"), str(tmp_path / "cut.tar")], micro_batch=1, shuffle_buffer=1)
        # 6 good samples in an epoch (a, f, 4 of cut.tar); the 7th is the next epoch's first good one
        captions = [b[0]["caption"] for b in take(src, 0, 7)]
    assert (tmp_path / "bad.tar").read_bytes() == whole
    stats = src.stats
    assert {"fine", "from json"} <= set(captions)
    assert stats["num_unreadable"] == 3 and stats["num_missing_captions"] == 1 and stats["num_damaged_shards"] == 1
    bad = "\n".join(stats["unreadable_files"])
    for name in ("bad.tar:b ", "bad.tar:c ", "bad.tar:d (caption .txt is not UTF-8)", "bad.tar:e (", "cut.tar"):
        assert name in bad, (name, bad)
    assert any("bad.tar:c left out: no .txt or .json caption" in str(w.message) for w in caught)
    empty = source([str(tmp_path / "bad.tar")], micro_batch=1, shuffle_buffer=1, missing_caption="empty")
    assert "" in [b[0]["caption"] for b in take(empty, 0, 3)]


@pytest.mark.parametrize("extra, message", [
    ({"shuffle_buffer": 0}, "data.shuffle_buffer"),
    ({"num_workers": -1}, "data.num_workers"),
    ({"bucketing": True}, "data.bucketing"),
    ({"path": "a-{0..2.tar"}, "data.path"),
    ({"path": ""}, "data.path"),
    ({"shufle_buffer": 4}, "data.shufle_buffer"),
])
def test_config_errors_name_the_key(extra, message):
    from training.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.source=webdataset", "data.extra=" + json.dumps({"path": "x-{0..3}.tar", **extra})])
    with pytest.raises(ConfigError, match="data.cache_dir"):
        load_config(None, ["data.source=x-{0..3}.tar", "data.cache_dir=c"])


def test_missing_shards_and_bad_stream_counts_are_data_errors(tmp_path, shards):
    with pytest.raises(DataError, match=r"data.path: 1 of 5 shard\(s\) not found"):
        source([shards, str(tmp_path / "nope.tar")])
    with pytest.raises(DataError, match=r"data.streams = 3: .*global micro-batch \(4"):
        source(shards, streams=3)
    with pytest.raises(DataError, match=r"data.streams = 1 \(automatic\).*process count \(2\)"):
        source(shards.replace("{000000..000003}", "000000"), micro_batch=4, processes=2)
    p = subprocess.run([sys.executable, "-m", "training.run", "--quiet", "--set", f"output.dir={tmp_path / 'o'}",
                        "--set", f"data.source={tmp_path}/missing-{{0..3}}.tar"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "data.source" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "o").exists()


# --- precomputed-latent shards ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def latents(tmp_path_factory, shards):
    from training.config import load_config
    from training.data.latent_shards import precompute

    out = tmp_path_factory.mktemp("latents")
    cfg = load_config(None, ["data.source=webdataset", "data.extra=" + json.dumps({"path": shards})])
    return out, precompute(cfg, str(out), batch_size=4), cfg


def test_latent_shards_hold_what_the_run_would_encode(latents, shards):
    from training.data.latent_shards import precompute
    from training.data.run_cache import encoder_id, image_encoder, text_encoder
    from training.models.base import load_base

    out, summary, cfg = latents
    assert summary["shards"] == [f"latents-{i:06d}.tar" for i in range(SHARDS)]
    assert all(c["num_ok"] == PER_SHARD for c in summary["written"].values())
    names = tarfile.open(out / "latents-000000.tar").getnames()
    assert names[:2] == ["000000000.latent.safetensors", "000000000.txt"] and len(names) == 2 * PER_SHARD
    base = load_base(cfg.model)
    assert summary["encoder_id"] == encoder_id(base)
    pix = take(source(shards, micro_batch=1, streams=1, shuffle_buffer=2), 0, 3)
    lat = take(source(summary["path"], micro_batch=1, streams=1, shuffle_buffer=2), 0, 3)
    # encoded as a batch (the precompute's batches of 4 give the same bits; a batch of 1 differs by ~1e-6)
    encoded = image_encoder(base, "cpu")(torch.stack([p["pixel_values"] for (p,) in pix]))
    for (p,), (q,), e in zip(pix, lat, encoded):
        assert q["caption"] == p["caption"] and "pixel_values" not in q
        assert torch.equal(q["latents"], e)
        assert torch.equal(q["prompt_embeds"], text_encoder(base, "cpu")([p["caption"]])["prompt_embeds"][0])
        assert torch.equal(q["original_size"], p["original_size"])
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("latents-*.tar")}
    assert precompute(cfg, str(out))["written"] == {}                       # all there: nothing rewritten
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("latents-*.tar")} == stamps
    cfg.data.resolution = 64
    with pytest.raises(DataError, match="exists and was encoded with"):
        precompute(cfg, str(out))
    cfg.data.resolution = 32


# --- python -m training.run on shards ------------------------------------------------------------------


def data_set(path, workers):
    return ["--set", "data.source=webdataset",
            "--set", "data.extra=" + json.dumps({"path": path, "shuffle_buffer": 3, "num_workers": workers})]


def train(out, path, workers=1, *extra, processes=1):
    launcher = (sys.executable, "-m")
    if processes == 2:
        launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    p = subprocess.run(cmd(out, *data_set(path, workers), *extra, launcher=launcher), cwd=REPO,
                       env=env(**({"ACCELERATE_USE_CPU": "1"} if processes == 2 else {})), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("wds") / "run"
    train(out, shards)
    return out


def test_run_on_shards_records_the_position_and_counts(reference):
    state = json.loads((reference / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    streams = state["data"]["streams"]
    assert state["step"] == 4 and sorted(streams) == ["0", "1", "2", "3"]
    assert all(st["at"] == [0, 0, 3] and st["given"] == 1 for st in streams.values())  # 4 samples, blocks of 3
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["data_stream"]["num_ok"] == 16 and metrics["data_stream"]["num_unreadable"] == 0


def test_sigkill_then_resume_gives_the_same_lora(reference, shards, tmp_path):
    out = tmp_path / "killed"
    kill_at_step_2(cmd(out, *data_set(shards, 1)), out)
    train(out, shards, 0, "--resume", "latest")       # no workers this time: the samples do not depend on them
    diff = max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors"))
    print(f"webdataset resume max abs diff {diff:.3e}")
    assert diff == 0.0


def test_two_processes_match_one(reference, shards, tmp_path):
    """2 gloo processes x 2 streams == 1 process x 4 streams: the same samples per step; the LoRA differs only
    by float summation order in the gradient all-reduce (the tolerance of tests/test_training_run.py)."""
    out = tmp_path / "ddp"
    train(out, shards, 1, processes=2)
    diff = max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors"))
    print(f"webdataset 2-process max abs diff {diff:.3e}")
    assert diff < 1e-4


def test_latent_shards_train_like_image_shards(reference, latents, tmp_path):
    out_dir, summary, _ = latents
    out = tmp_path / "latent-run"
    train(out, summary["path"])
    diff = max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors"))
    print(f"latent shards vs image shards max abs diff {diff:.3e}")
    assert diff == 0.0

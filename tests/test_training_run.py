"""End-to-end `python -m training.run` on tiny models: outputs, resume after SIGKILL, 2 processes, bad input."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["optim.batch_size=4",
        'stages=[{"segments": 8, "steps": 2}, {"segments": 2, "steps": 1}, {"segments": 1, "steps": 1}]',
        "output.sample_steps=[1,2]", 'output.sample_prompts=["a red circle"]', "output.checkpoint_every=1",
        "output.keep_checkpoints=10", "optim.warmup_steps=1"]


def cmd(out, *extra, launcher=(sys.executable, "-m")):
    args = [*launcher, "training.run", "--quiet", "--set", f"output.dir={out}"]
    for s in TINY:
        args += ["--set", s]
    return args + list(extra)


def env(**kw):
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **kw)
    return e


def run(out, *extra, check=True, **kw):
    p = subprocess.run(cmd(out, *extra, **kw), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def stage_stats(out):
    return json.loads((out / "metrics.json").read_text())["stages"]


def max_diff(a, b):
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(out)
    return out


def test_outputs(reference):
    lora = load_file(str(reference / "hyper_sd_lora.safetensors"))
    assert any(k.endswith("lora_down.weight") for k in lora)
    assert all(k.startswith("lora_unet_") for k in lora)
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["steps"] == 4 and [s["segments"] for s in metrics["stages"]] == [8, 2, 1]
    assert all(s["last_loss"] == s["last_loss"] for s in metrics["stages"])  # no NaN
    log = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "k=1" in log[-1]["stage"]
    from PIL import Image
    img = Image.open(reference / "samples.png")
    assert img.size == (3 * 128, 30 + 14 + 128)  # labels + 1 prompt x (teacher, 1, 2 steps), 128 px cells
    # the LoRA moved away from its zero-B init
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_up" in k) > 0


def test_existing_output_not_overwritten(reference):
    p = run(reference, check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr


def kill_at_step_2(args, out):
    """Start `python -m training.run args`, SIGKILL it once its step-2 checkpoint is written (before the end)."""
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / "step_000002" / "trainer_state.json"
    deadline = time.time() + 400
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "run never reached step 2"
    assert not (out / "hyper_sd_lora.safetensors").exists(), "run finished before the kill"


def test_resume_after_sigkill_matches_uninterrupted(reference, tmp_path):
    out = tmp_path / "killed"
    kill_at_step_2(cmd(out), out)
    run(out, "--resume", "latest")
    diff = max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors"))
    print(f"resume max abs diff {diff:.3e}")
    assert diff == 0.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "k=1" in log[-1]["stage"]  # no step twice
    assert stage_stats(out) == stage_stats(reference)  # the steps before the kill are in metrics.json too


def test_two_processes_match_one(reference, tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    p = subprocess.run(cmd(out, launcher=launcher), cwd=REPO, env=env(ACCELERATE_USE_CPU="1"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    diff = max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors"))
    print(f"2-process max abs diff {diff:.3e}")
    assert diff < 1e-4


@pytest.mark.parametrize("override, message", [
    ("data.source=/nonexistent/images", "data.source"),
    ("model.base=/nonexistent/model", "model.base"),
    ("model.base=/nonexistent/model.safetensors", "model.base"),
    ("model.base=no-such-org/no-such-model", "no-such-org/no-such-model"),
    ("optim.grad_accum=3", "optim.batch_size"),
])
def test_bad_input_clear_error(tmp_path, override, message):
    p = run(tmp_path / "bad", "--set", override, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr and "Traceback" not in p.stderr


def test_empty_folder_and_missing_captions(tmp_path):
    from PIL import Image
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run(tmp_path / "o1", "--set", f"data.source={empty}", check=False)
    assert p.returncode == 2 and "data.source" in p.stderr
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(imgs / "a.png")
    p = run(tmp_path / "o2", "--set", f"data.source={imgs}", check=False)
    assert p.returncode == 2 and "caption" in p.stderr.lower()


def test_teacher_pipeline_and_lora_reproduce_samples_png_in_plain_diffusers(reference):
    """<output.dir>/teacher/ is a diffusers pipeline: from_pretrained + load_lora_weights + TCDScheduler, with
    the grid's noise, draws the LoRA columns of samples.png (1 and 2 steps at the recommended eta)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline, TCDScheduler
    from PIL import Image

    from training.diffusion import recommended_eta

    pipe = StableDiffusionPipeline.from_pretrained(str(reference / "teacher"))
    pipe.load_lora_weights(str(reference / "hyper_sd_lora.safetensors"))
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    grid = np.asarray(Image.open(reference / "samples.png").convert("RGB"))
    side = 32 // pipe.vae_scale_factor
    noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(0))  # the grid's (seed 0)
    for column, steps in ((1, 1), (2, 2)):
        out = pipe(["a red circle"], num_inference_steps=steps, guidance_scale=1.0, eta=recommended_eta(steps),
                   latents=noise.clone(), generator=torch.Generator().manual_seed(1), height=32, width=32,
                   output_type="np").images[0]
        cell = grid[30 + 14:30 + 14 + 128, column * 128:(column + 1) * 128][::4, ::4]  # 128 px cells of 32 px
        diff = np.abs(np.round(out * 255).astype(int) - cell.astype(int)).max()
        print(f"{steps} step(s): max |diffusers - samples.png| = {diff} / 255")
        assert diff <= 2, (steps, diff)


def test_overwrite_refuses_folders_the_trainer_did_not_make(tmp_path):
    """--overwrite replaces only a folder with the trainer's marker; an unrelated folder is left whole."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    p = run(other, "--overwrite", check=False)
    assert p.returncode == 2 and "was not created by training.run" in p.stderr and "Traceback" not in p.stderr
    assert (other / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", [".", "..", "~"])
def test_working_directory_its_parents_and_home_are_never_output(where):
    p = subprocess.run([sys.executable, "-m", "training.run", "--quiet", "--overwrite", "--set",
                        f"output.dir={os.path.expanduser(where)}"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert p.returncode == 2 and "output.dir" in p.stderr and "Traceback" not in p.stderr
    assert os.path.isdir(os.path.join(REPO, ".git")) or os.path.isfile(os.path.join(REPO, "README.md"))


def test_bad_input_with_overwrite_keeps_the_finished_run(reference, tmp_path):
    """A typo in the data path with --overwrite: the error comes before the old run is touched."""
    import shutil

    done = tmp_path / "done"
    shutil.copytree(reference, done)
    p = run(done, "--overwrite", "--set", "data.source=/no/such/folder", check=False)
    assert p.returncode == 2 and "data.source" in p.stderr and "Traceback" not in p.stderr
    assert (done / "hyper_sd_lora.safetensors").is_file() and (done / "metrics.json").is_file()


def test_a_diverged_run_stops_with_the_stage_and_step_and_writes_no_lora(tmp_path):
    out = tmp_path / "diverged"
    p = run(out, "--set", "optim.lr=1e30", "--set", "optim.max_grad_norm=0", check=False)
    import re

    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert re.search(r"stage \d/3 \(tscd, k=\d\), step \d+: the loss is (nan|inf)", p.stderr) and "optim.lr" in p.stderr
    assert not (out / "hyper_sd_lora.safetensors").exists() and not (out / "stages").exists()


def test_resume_latest_without_a_checkpoint_is_an_error(tmp_path):
    p = run(tmp_path / "fresh", "--resume", "latest", check=False)
    assert p.returncode == 2 and "no complete checkpoint" in p.stderr


# --- issue 13: resume, checkpoints without pickles, failed runs, full disk --------------------------------

OUTPUTS = ("metrics.json", "samples.png", "hyper_sd_lora.safetensors", "stages", "teacher")


def killed_copy(reference, out, keep_checkpoints_upto):
    """The reference run as a kill would have left it: no outputs, checkpoints up to a step, temp leftovers."""
    import shutil

    shutil.copytree(reference, out)
    for name in OUTPUTS:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > keep_checkpoints_upto:
            shutil.rmtree(ckpt)
    return out


def test_resume_after_the_last_checkpoint_writes_what_an_uninterrupted_run_wrote(reference, tmp_path):
    """Killed while writing the outputs (after the last checkpoint): the resumed run exports the same LoRA,
    samples.png and stage statistics, and removes the 0-byte temp files the kill left."""
    out = killed_copy(reference, tmp_path / "late", 4)
    (out / "stages").mkdir()
    leftovers = [out / ".tmp-abc123.safetensors", out / "stages" / ".tmp-def456.safetensors",
                 out / ".tmp-ghi789.png", out / "checkpoints" / ".tmp-step_000005"]
    for path in leftovers[:3]:
        path.write_bytes(b"")
    leftovers[3].mkdir()
    (out / "notes.tmp").write_text("the user's")  # not the trainer's prefix: kept
    run(out, "--resume", "latest")
    assert max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors")) == 0.0
    assert (out / "samples.png").read_bytes() == (reference / "samples.png").read_bytes()
    assert stage_stats(out) == stage_stats(reference)
    assert all(s["logged_steps"] == s["steps"] for s in stage_stats(out))
    assert not any(p.exists() for p in leftovers) and (out / "notes.tmp").exists()


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(reference, tmp_path):
    """log.jsonl held steps 3 and 4 (and a line cut by the kill) beyond the checkpoint at step 2: they are
    dropped on resume, then logged once by the resumed run."""
    out = killed_copy(reference, tmp_path / "early", 2)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "ti')
    run(out, "--resume", "latest")
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors")) == 0.0
    assert stage_stats(out) == stage_stats(reference)


def test_resume_latest_on_a_finished_run_changes_nothing(reference, tmp_path):
    import shutil

    out = tmp_path / "done"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    p = run(out, "--resume", "latest")
    assert "already finished at step 4" in p.stdout and "nothing to do" in p.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_the_checkpoint_holds_only_safetensors_and_json(reference):
    ckpt = reference / "checkpoints" / "step_000004"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["adapters.safetensors", "ema.safetensors", "optimizer.safetensors", "rng_0.safetensors",
                     "stage_state.safetensors", "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "hyper-sd-checkpoint" and state["step"] == 4 and state["stage"] == 2
    # nothing in the engine can unpickle: no torch.load, pickle or accelerate load_state
    engine = "".join(p.read_text() for p in (pathlib.Path(REPO) / "training" / "engine").glob("*.py"))
    assert not re.search(r"torch\.load\s*\(|^\s*(import|from) (pickle|dill|joblib)\b|\.load_state\s*\(", engine, re.M)


class Planted:
    """A pickle whose loading runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    import pickle

    path.write_bytes(pickle.dumps(Planted(marker)))


def checkpoint_copy(reference, tmp_path, step=2):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out, out / "checkpoints" / f"step_{step:06d}"


@pytest.mark.parametrize("victim", ["trainer_state.json", "adapters.safetensors", "optimizer.safetensors",
                                    "ema.safetensors", "stage_state.safetensors", "rng_0.safetensors",
                                    "random_states_0.pkl", "optimizer.bin", "model.pt"])
def test_a_planted_pickle_is_refused_and_never_run(reference, tmp_path, victim):
    """Each file of a checkpoint replaced by a malicious pickle, or one added beside them: resume refuses the
    folder naming the file, and the pickle's code never runs."""
    from training.engine.checkpoint import check_checkpoint
    from training.errors import CheckpointError

    _, ckpt = checkpoint_copy(reference, tmp_path)
    marker = tmp_path / "PWNED"
    plant(ckpt / victim, marker)
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(str(ckpt))
    assert victim in str(e.value) and str(ckpt) in str(e.value)
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_of_pickles_before_anything_loads(reference, tmp_path):
    """Every file a pickle, plus extra *.pkl / *.bin / *.pt: exit 2, one line, the marker never written."""
    out, ckpt = checkpoint_copy(reference, tmp_path)
    marker = tmp_path / "PWNED"
    for f in [*ckpt.iterdir(), ckpt / "custom_checkpoint_0.pkl", ckpt / "scheduler.bin", ckpt / "extra.pt"]:
        plant(f, marker)
    p = run(out, "--resume", str(ckpt), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and str(ckpt) in p.stderr, p.stderr[-2000:]
    assert "trainer_state.json is not JSON" in p.stderr
    assert not marker.exists()


def test_an_accelerate_checkpoint_of_an_older_version_is_refused(tmp_path):
    out = tmp_path / "old"
    ckpt = out / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 2}')
    (ckpt / "model.safetensors").write_bytes(b"")
    marker = tmp_path / "PWNED"
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        plant(ckpt / name, marker)
    p = run(out, "--resume", "latest", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "older version" in p.stderr and "cannot be loaded safely" in p.stderr and "random_states_0.pkl" in p.stderr
    assert not marker.exists()


def test_a_failed_fresh_run_removes_the_folder_it_created(tmp_path):
    """An error found after the output folder was made (an init LoRA whose modules are not in the UNet): the
    folder is gone, so the corrected rerun is not refused."""
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "other_model.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}, str(lora))
    out = tmp_path / "fails"
    p = run(out, "--set", f"model.init_lora={lora}", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "'model.init_lora'" in p.stderr and str(lora) in p.stderr and "do not exist in this UNet" in p.stderr
    assert "was removed again" in p.stderr and not out.exists()


def test_a_full_disk_names_the_path(tmp_path):
    """ENOSPC while writing the first checkpoint (simulated): one line naming the file, exit 2, and the folder
    this run had created removed."""
    out = tmp_path / "full"
    code = ("import errno, sys, safetensors.torch\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "safetensors.torch.save_file = full\n"
            "from training.run import main\n"
            "main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", code, *cmd(out)[3:]], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert re.search(r"error: cannot write \S*checkpoints/\.tmp-step_000001/\S+\.safetensors: No space left on "
                     r"device", p.stderr), p.stderr
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("lora.targets=no_such_layer", "'lora.targets': none of ['no_such_layer']"),
    ("data.num_generated=2", "'optim.batch_size': no full batch"),
])
def test_more_bad_input_is_one_line_and_no_folder(tmp_path, override, message):
    p = run(tmp_path / "bad", "--set", override, check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_a_yaml_tag_in_the_config_file_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"optim: !!python/object/apply:os.system ['touch {tmp_path}/PWNED']\n")
    p = run(tmp_path / "o", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and f"config file {cfg}: line 1" in p.stderr
    assert not (tmp_path / "PWNED").exists()


def test_metrics_report_the_data_counts_docs_data_md_promises(reference, tmp_path):
    from PIL import Image

    from training.data import build_dataset
    from training.engine.finish import data_stats

    keys = ["num_found", "num_ok", "num_unreadable", "unreadable_files", "num_missing_captions", "num_buckets"]
    assert all(f"`{k}`" in (pathlib.Path(REPO) / "docs" / "data.md").read_text() for k in keys)
    data = json.loads((reference / "metrics.json").read_text())["data"]
    assert sorted(data) == sorted(keys) and data["num_ok"] == 64 and data["num_unreadable"] == 0
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 90, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a red circle")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("a red circle")
    with pytest.warns(UserWarning, match="unreadable"):
        stats = data_stats(build_dataset({"source": "folder", "path": str(tmp_path), "resolution": 16}))
    assert stats["num_unreadable"] == 1 and stats["unreadable_files"] == [str(tmp_path / "bad.png")]


def test_atomic_writers_name_the_path_on_a_full_disk_and_leave_no_temp(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from training.errors import WriteError
    from training.files import atomic_folder, save_file_atomic, save_json_atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(WriteError, match=r"cannot write .*lora\.safetensors: No space left on device"):
        save_file_atomic({"a": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(WriteError, match=r"cannot write .*metrics\.json: No space left"):
        save_json_atomic({}, str(tmp_path / "metrics.json"))
    with pytest.raises(WriteError, match=r"cannot write .*teacher: No space left"):
        with atomic_folder(str(tmp_path / "teacher")):
            full()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("started, before, kept", [
    ("made", ["config.json", "log.jsonl", ".tmp-x.json"], None),          # removed, folder too
    ("filled", ["config.json", "tiny_teacher.safetensors"], []),        # the user's empty folder stays, empty
    ("made", ["config.json", "mine.txt"], ["config.json", "mine.txt"]),  # someone else's file: left whole
    ("resumed", ["config.json", "log.jsonl"], ["config.json", "log.jsonl"]),
    ("made", ["config.json", "checkpoints/step_000001/trainer_state.json"], ["checkpoints", "config.json"]),
])
def test_a_failed_run_removes_only_what_it_started(tmp_path, started, before, kept):
    from types import SimpleNamespace

    from training.config import load_config
    from training.engine.output import MARKER, removed_on_user_error
    from training.errors import DataError

    out = tmp_path / "out"
    out.mkdir()
    for name in [MARKER, *before]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    run_ = SimpleNamespace(out_dir=str(out), output_started=started, cfg=load_config(),
                           accelerator=SimpleNamespace(is_main_process=True))
    with pytest.raises(DataError) as e:
        with removed_on_user_error(run_):
            raise DataError("data.source: bad")
    if kept is None:
        assert not out.exists() and "was removed again" in str(e.value)
    else:
        expected = sorted(kept + ([MARKER] if kept else []))
        assert sorted(os.listdir(out)) == expected and str(e.value).startswith("data.source: bad")
        assert ("--resume latest continues" in str(e.value)) == ("checkpoints" in kept)


def test_the_summary_goes_to_the_current_stdout(monkeypatch):
    """print_summary writes to sys.stdout as it is when called: a default bound at import wrote to a stream
    a test runner had since closed ('I/O operation on closed file' when an earlier test imported it)."""
    import io
    import sys
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.engine.report import print_summary

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_summary(SimpleNamespace(cfg=TrainConfig(), out_dir="/runs/x"), {"steps": 2, "train_seconds": 1.0, "merge": {"rank": 8}})
    assert "Done: 2 steps in 1 s. Outputs in /runs/x/" in out.getvalue() and "How to use it:" in out.getvalue()

"""End-to-end `python -m training.run` on tiny models: outputs, resume after SIGKILL, 2 processes, bad input."""
import json
import os
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


def test_resume_after_sigkill_matches_uninterrupted(reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / "step_000002" / "trainer_state.json"
    deadline = time.time() + 400
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "run never reached step 2"
    assert not (out / "hyper_sd_lora.safetensors").exists(), "run finished before the kill"
    run(out, "--resume", "latest")
    diff = max_diff(str(out / "hyper_sd_lora.safetensors"), str(reference / "hyper_sd_lora.safetensors"))
    print(f"resume max abs diff {diff:.3e}")
    assert diff < 1e-6
    log = [json.loads(line)["stage"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "k=1" in log[-1]


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

"""score_distill `mode: full` in one `python -m training.run`: the whole 1-step UNet (a separate copy of
base + the earlier stages' LoRAs) trained at t = 800, exported as a diffusers UNet folder; diffusers
loading reproduces the trained student; the teacher's weights are untouched; resume inside the stage
equals the uninterrupted run; the sample grid has the 1-step column."""
import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_stages_run import PLAN, assert_two_process_parity, run

FULL_PLAN = copy.deepcopy(PLAN)
FULL_PLAN[3]["params"].update(mode="full", lr=1e-4)
UNET = "hyper_sd_lora_1step_unet"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run(out, plan=FULL_PLAN)
    return out


def _student_from_checkpoint(out, step):
    """The trained student as the run held it: the full-UNet copy saved in the checkpoint's stage state."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(out / UNET)))
    state = load_file(str(out / "checkpoints" / f"step_{step:06d}" / "stage_state.safetensors"))
    unet.load_state_dict({k[len("full_unet."):]: v for k, v in state.items() if k.startswith("full_unet.")})
    return unet.eval()


def test_full_run_writes_a_diffusers_unet_with_metadata(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["full_unet"]["timestep"] == 800
    assert [s["type"] for s in metrics["stages"]] == ["tscd", "adversarial", "feedback", "score_distill"]
    assert "dmd_reg" in metrics["stages"][3]["logs_end"] and metrics["stages"][3]["logged_steps"] == 2
    # the LoRA groups are merged as before, without a "dmd" adapter
    assert metrics["merge"]["merged_from"] == ["default", "feedback"]
    assert sorted(p.name for p in (full_run / "stages").iterdir()) == ["1_tscd.safetensors", "2_feedback.safetensors"]
    folder = full_run / UNET
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["hypersd.timestep"] == "800" and meta["hypersd.base_family"] == "sd15"
    assert meta["hypersd.recommended_sampler"] == "HyperSDOneStepSampler"
    assert meta["hypersd.recommended_scheduler"] == "HyperSDOneStepScheduler"
    assert "conv_in.weight" in keys and not any("lora" in k for k in keys)
    # samples.png: the teacher column, the TCD column(s) + one 1-step column at t = 800, 128 px cells
    from PIL import Image

    img = Image.open(full_run / "samples.png")
    assert img.size == (3 * 128, 30 + 14 + 128), img.size


def test_diffusers_loads_the_exported_unet_and_reproduces_the_student(full_run):
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(str(full_run / UNET)).eval()
    student = _student_from_checkpoint(full_run, 6)
    g = torch.Generator().manual_seed(0)
    x, ehs, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([800, 800])
    with torch.no_grad():
        a, b = loaded(x, t, ehs).sample, student(x, t, ehs).sample
    err = (a - b).abs().max().item()
    print(f"exported 1-step UNet in diffusers vs trained student: max abs err {err:.2e}")
    assert err < 1e-6


def test_teacher_weights_unchanged_and_the_student_moved(full_run):
    from training.lora_files.kohya import load_kohya
    from training.lora_files.peft_bridge import fold_kohya_into
    from training.models import tiny

    teacher = load_file(str(full_run / "tiny_teacher.safetensors"))
    teacher = {k[5:]: v for k, v in teacher.items() if k.startswith("unet.")}
    # the shared base UNet's own weights at the end of the run (the exported teacher pipeline; checkpoints hold
    # only what trains: the LoRAs and the full UNet copy)
    base = load_file(str(full_run / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(base) == set(teacher)
    worst = max((base[k] - teacher[k]).abs().max().item() for k in teacher)
    assert worst == 0.0, worst
    # the exported UNet is not just base + folded LoRAs: the full stage trained every weight
    start = tiny.tiny_unet()
    start.load_state_dict(teacher)
    for p in sorted((full_run / "stages").iterdir()):
        fold_kohya_into(start, load_kohya(str(p)))
    final = load_file(str(full_run / UNET / "diffusion_pytorch_model.safetensors"))
    moved = {k: (final[k] - v).abs().max().item() for k, v in start.state_dict().items()}
    n_moved = sum(d > 0 for d in moved.values())
    print(f"full stage moved {n_moved}/{len(moved)} tensors, max change {max(moved.values()):.2e}")
    assert n_moved > 0.9 * len(moved)


@pytest.mark.parametrize("resume_step", [4, 5])
def test_resume_inside_the_full_stage_equals_uninterrupted(full_run, tmp_path, resume_step):
    """Step 4: the stage's first step (the copy is folded from the restored LoRAs); step 5: inside the
    stage (the copy and its AdamW state come from stage_state.safetensors)."""
    out = tmp_path / "resumed"
    shutil.copytree(full_run, out)
    for p in (out / "checkpoints").iterdir():
        if int(p.name.split("_")[1]) > resume_step:
            shutil.rmtree(p)
    shutil.rmtree(out / "stages")
    shutil.rmtree(out / UNET)
    (out / "metrics.json").unlink()
    with safe_open(str(out / "checkpoints" / f"step_{resume_step:06d}" / "stage_state.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("full_unet.") for k in keys) == (resume_step == 5)
    assert any(k.startswith("full_opt.state.") for k in keys) == (resume_step == 5)
    run(out, plan=FULL_PLAN, extra=["--resume", "latest"])
    a = load_file(str(out / UNET / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(full_run / UNET / "diffusion_pytorch_model.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    print(f"full UNet, resume from step {resume_step}: max abs diff {diff:.2e}")
    assert diff < 1e-6


def test_two_processes_match_one_with_the_full_unet_stage(full_run, tmp_path):
    """The full-UNet copy is not DDP-wrapped: its gradients are averaged by hand (all-reduce)."""
    out = tmp_path / "ddp"
    run(out, plan=FULL_PLAN, processes=2)
    stats = assert_two_process_parity(full_run, out, ["stages/1_tscd.safetensors", "stages/2_feedback.safetensors",
                                                      f"{UNET}/diffusion_pytorch_model.safetensors"])
    assert stats[f"{UNET}/diffusion_pytorch_model.safetensors"][0] < 1e-4  # lr 1e-4 for the full UNet


def test_full_mode_plan_limits_are_config_errors(tmp_path):
    lora = tmp_path / "init.safetensors"  # a kohya file (model.init_lora is checked from its header)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(lora))
    p = run(tmp_path / "alone", f"model.init_lora={lora}", plan=[FULL_PLAN[3]], check=False)
    assert p.returncode == 2 and "stages[0].params.mode" in p.stderr and "earlier tscd" in p.stderr, p.stderr[-2000:]
    p = run(tmp_path / "fp16", "optim.mixed_precision=fp16", plan=FULL_PLAN, check=False)
    assert p.returncode == 2 and "stages[3].params.mode" in p.stderr and "fp16" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "fp16" / "checkpoints").exists()

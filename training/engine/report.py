"""The end of a run, for a person: quality figures on the generated task (the tiny default) and a summary
of where each file is and how to use the LoRA in ComfyUI and in diffusers."""
from __future__ import annotations

import os
import sys

from training.diffusion import recommended_eta

SEEDS = range(8)  # 8 task captions x 8 noise seeds = 64 samples per row


def quality(run) -> dict | None:
    """Attribute accuracy of the teacher (output.teacher_steps DDIM steps with CFG) and of the LoRA at each
    of output.sample_steps (its recommended eta), and the RMS pixel distance of each LoRA row to the
    teacher's samples from the same noise. Only for the generated shapes task (model.base tiny)."""
    if run.cfg.model.base != "tiny" or not run.cfg.output.teacher_steps:
        return None
    from training.evaluate import sample_accuracy
    from training.models.attributes import train_attribute_classifier

    out, unet, base = run.cfg.output, run.train.unet, run.base
    clf = train_attribute_classifier(0)
    kw = dict(seeds=SEEDS, unet=unet, classifier=clf, device=run.device, return_images=True)
    with run.train.stack.disabled():
        teacher = sample_accuracy(base, steps=out.teacher_steps, guidance=out.teacher_guidance, **kw)
    rows = {"teacher": _row(teacher, None, out.teacher_steps, 0.0, out.teacher_guidance)}
    for steps in out.sample_steps:
        eta = recommended_eta(steps) if out.sample_eta < 0 else out.sample_eta
        lora = sample_accuracy(base, steps=steps, guidance=1.0, eta=eta, **kw)
        rows[f"lora_{steps}"] = _row(lora, teacher["images"], steps, eta, 1.0)
    return {"samples_per_row": len(teacher["images"]), "classifier": "training.models.attributes (seed 0)",
            "rows": rows}


def _row(scores, teacher_images, steps, eta, guidance):
    row = {"steps": steps, "eta": eta, "guidance": guidance,
           **{k: float(v) for k, v in scores.items() if k in ("colour", "shape", "mean")}}
    if teacher_images is not None:
        row["dist_to_teacher"] = float((scores["images"] - teacher_images).pow(2).mean().sqrt())
    return row


def print_summary(run, metrics: dict, stream=None) -> None:
    """The end-of-run summary on `stream` (default: sys.stdout as it is now, not as it was at import: a
    test runner or a notebook may have swapped it since)."""
    out, d = run.cfg.output, run.out_dir
    lines = [f"\nDone: {metrics['steps']} steps in {metrics['train_seconds']:.0f} s. Outputs in {d}/",
             f"  {out.name}.safetensors  the unified LoRA (kohya format, rank {metrics['merge']['rank']}): "
             "ComfyUI, diffusers, A1111",
             "  stages/                 each stage group's own LoRA",
             "  samples.png             the teacher beside the LoRA at " + "/".join(map(str, out.sample_steps))
             + " steps, same noise"]
    if metrics.get("teacher_pipeline"):
        lines.append("  teacher/                the teacher as a diffusers pipeline folder")
    if metrics.get("full_unet"):
        lines.append(f"  {os.path.basename(metrics['full_unet']['folder'])}/  the 1-step UNet (diffusers layout)")
    lines.append("  metrics.json, log.jsonl, checkpoints/")
    lines += _quality_lines(metrics.get("quality"))
    lines += _usage_lines(run, metrics)
    print("\n".join(lines), file=stream or sys.stdout, flush=True)


def _quality_lines(q):
    if not q:
        return []
    lines = [f"Quality on the shapes task ({q['samples_per_row']} samples a row; accuracy = the attribute "
             "classifier agrees with the caption; dist = RMS pixel distance to the teacher, same noise):"]
    for name, r in q["rows"].items():
        what = (f"teacher {r['steps']} steps (cfg {r['guidance']:g})" if name == "teacher"
                else f"LoRA {r['steps']} step{'s' if r['steps'] > 1 else ''} (eta {r['eta']:g})")
        dist = f"  dist {r['dist_to_teacher']:.3f}" if "dist_to_teacher" in r else ""
        lines.append(f"  {what:<28} accuracy {r['mean']:.3f} (colour {r['colour']:.3f}, shape {r['shape']:.3f}){dist}")
    return lines


def _usage_lines(run, metrics):
    lora = os.path.join(run.out_dir, run.cfg.output.name + ".safetensors")
    base = os.path.join(run.out_dir, "teacher") if metrics.get("teacher_pipeline") else run.cfg.model.base
    return ["How to use it:",
            f"  ComfyUI: copy {lora} into ComfyUI/models/loras/, load it with the Hyper-SD LoRA Loader (it reads "
            "the recommended settings from the file) and sample with TCD at 1-8 steps, cfg 1.0, eta 1.0 at 1 step "
            "and 0.3 above.",
            f"  diffusers: pipe = StableDiffusionPipeline.from_pretrained({base!r}); "
            f"pipe.load_lora_weights({lora!r}); pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config); "
            "pipe(prompt, num_inference_steps=4, guidance_scale=1.0, eta=0.3)"]

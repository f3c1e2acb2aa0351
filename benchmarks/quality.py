"""Distillation-quality benchmark on a task with known ground truth (``python -m benchmarks.quality``).

A tiny pixel-space teacher (diffusers UNet2DConditionModel, eps prediction, SD's scaled-linear
schedule) is trained from scratch on 16x16 coloured shapes with captions naming colour, shape and
position. Sampling goes through the product's ``DiscreteDenoiser`` + ``sample_tcd`` (eta = 0 is DDIM).
Metrics per row, on the same prompts and initial noise:

* ``align``: accuracy of an attribute classifier (trained on ground truth) on colour / shape /
  position vs the caption (CLIP-score analogue; mean of the three);
* ``fd``: Frechet distance between classifier features of generated and real images (FID analogue);
* ``dist25``: RMS pixel distance to the teacher's 25-step output from the same noise.

Rows: the teacher at 25 and 1/2/4/8 DDIM steps, then students, each one run of the product's training
engine (``training.engine.run_training``, stage code from training/stages/, see benchmarks/stages.py):
single-segment CD (one ``tscd`` stage with 1 segment, LCM-style) and TSCD 8-4-2-1 with the same
budget; on top of the TSCD LoRA (``model.init_lora``), with one equal extra budget each: more k=1 TSCD
steps (control), the ``feedback`` stage (ReFL; reward = a second attribute classifier's log-probability
of the caption) and the ``score_distill`` stage (DMD) at two settings.

Heavy parts (teacher, classifiers, the engine's run folders with their LoRA files) are cached under
``--cache`` (default ``~/.cache/hypersd-bench``) keyed by the config each depends on, so a rerun only
evaluates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks import evaluate, shapes, stages
from benchmarks.models import ARCH, Classifier, Task, heldout_accuracy, make_unet, train_classifier, train_teacher
from benchmarks.report import RESULTS, log, machine_info, write_results

# Later stages (feedback, score distillation) and the control row all get the same extra budget on top
# of the TSCD student: stage_steps optimiser steps x distill_batch, on a fresh rank-stage_rank LoRA.
STAGES = dict(stage_rank=8, feedback_lr=5e-4, feedback_late_fraction=1.0, dmd_lr=5e-4, dmd_gen_every=2,
              dmd_reg_weight=0.25, dmd_ref_steps=4)
# warmup_steps: the engine's lr warmup (optim.warmup_steps; 10 is the product's default); 0 in --quick so
# its 1-step stages train at all.
FULL = dict(teacher_steps=400, teacher_batch=32, teacher_lr=2e-3, clf_steps=1500, clf_lr=3e-3, distill_steps=160,
            distill_batch=16, distill_lr=1e-3, warmup_steps=10, student_rank=16, guidance=3.0, n_eval=128,
            n_train=20000, n_heldout=2000, etas=(0.0, 0.5, 1.0), stage_steps=40, **STAGES)
QUICK = dict(teacher_steps=6, teacher_batch=4, teacher_lr=1e-3, clf_steps=10, clf_lr=3e-3, distill_steps=4,
             distill_batch=2, distill_lr=1e-3, warmup_steps=0, student_rank=16, guidance=3.0, n_eval=8,
             n_train=64, n_heldout=32, etas=(1.0,), stage_steps=2, steps=(1, 4), **STAGES)
# Which config keys the teacher and classifiers depend on (the engine runs are keyed by their whole config).
TEACHER_KEYS = ("teacher_steps", "teacher_batch", "teacher_lr", "n_train")
CLF_KEYS = ("clf_steps", "clf_lr", "n_train")
STEPS = (1, 2, 4, 8)


# --- cache ----------------------------------------------------------------------------------------

TRAIN_SECONDS: dict[str, float] = {}


def cached_model(path: Path, build, make):
    """Load `path` if cached, else build, save and record the training time (seconds, in the .json beside it)."""
    from training.files import save_file_atomic, save_json_atomic

    meta = path.with_suffix(".json")
    if path.exists():
        model = make()
        model.load_state_dict(load_file(path))
        model.eval()
        if meta.exists():
            TRAIN_SECONDS[path.stem] = json.loads(meta.read_text())["train_s"]
        log(f"loaded {path}")
        return model
    t0 = time.time()
    model = build()
    save_file_atomic(model.state_dict(), str(path))
    TRAIN_SECONDS[path.stem] = round(time.time() - t0, 1)
    save_json_atomic({"train_s": TRAIN_SECONDS[path.stem], "load_average_end": os.getloadavg()}, str(meta))
    log(f"trained {path.name} in {time.time() - t0:.0f} s")
    return model


def cfg_hash(cfg, keys=None) -> str:
    sub = cfg if keys is None else {k: cfg[k] for k in keys}
    return hashlib.sha1(json.dumps(sub, sort_keys=True, default=list).encode()).hexdigest()[:10]


# --- the students: one engine run each --------------------------------------------------------------

def row_plans(cfg, reward_weights: Path) -> dict:
    """Row name -> engine run: id, seed, stage plan, LoRA rank, lr; "on": the run whose TSCD LoRA it
    starts from (model.init_lora). Same budget for CD and TSCD; same extra budget for the later rows."""
    n, e, g = cfg["distill_steps"], cfg["stage_steps"], cfg["guidance"]
    tscd = [{"type": "tscd", "segments": k, "steps": n // 4} for k in (8, 4, 2)]
    tscd.append({"type": "tscd", "segments": 1, "steps": n - 3 * (n // 4)})
    feedback = {"type": "feedback", "segments": 1, "steps": e, "params": {
        "lr": cfg["feedback_lr"], "reward": stages.REWARD, "reward_weights": str(reward_weights), "alpha": 0.0,
        "steps": 4, "late_fraction": cfg["feedback_late_fraction"]}}

    def dmd(lr, every):
        return {"type": "score_distill", "segments": 1, "steps": e, "params": {
            "lr": lr, "fake_lr": lr, "guidance": g, "gen_every": every, "reg_weight": cfg["dmd_reg_weight"],
            "reg_steps": cfg["dmd_ref_steps"]}}

    student = dict(rank=cfg["student_rank"], lr=cfg["distill_lr"])
    later = dict(rank=cfg["stage_rank"], lr=cfg["distill_lr"], on="tscd")
    return {
        "CD k=1 (LCM-style)": dict(id="cd", seed=10, stages=[{"type": "tscd", "segments": 1, "steps": n}], **student),
        "TSCD 8-4-2-1": dict(id="tscd", seed=11, stages=tscd, **student),
        f"TSCD + {e} more k=1 steps (control)": dict(
            id="control", seed=20, stages=[{"type": "tscd", "segments": 1, "steps": e}], **later),
        "TSCD + feedback (ReFL)": dict(id="feedback", seed=21, stages=[feedback], **later),
        "TSCD + score distillation (DMD)": dict(
            id="dmd", seed=22, stages=[dmd(cfg["dmd_lr"], cfg["dmd_gen_every"])], **later),
        # a second DMD point (the old stage module's defaults), not a tuned one
        "TSCD + DMD (lr 1e-4, generator every 5th step)": dict(id="dmd_slow", seed=22, stages=[dmd(1e-4, 5)],
                                                               **later),
    }


def train_students(cfg, cache: Path, task, teacher, reward_weights: Path) -> dict:
    """Every student row through the training engine (cached run folders); -> row name -> unified LoRA file."""
    dataset = stages.ShapesDataset(task.labels, task.images)
    folders, loras = {}, {}
    for name, plan in row_plans(cfg, reward_weights).items():
        init = str(folders[plan["on"]] / "stages" / "1_tscd.safetensors") if "on" in plan else ""
        ecfg = stages.engine_config(plan["stages"], seed=plan["seed"], rank=plan["rank"], lr=plan["lr"],
                                    batch=cfg["distill_batch"], warmup=cfg["warmup_steps"], guidance=cfg["guidance"],
                                    init_lora=init)
        folder, metrics = stages.train_run(ecfg, plan["id"], cache / "runs",
                                           lambda: stages.pixel_base(teacher, make_unet, task.text), dataset, log)
        folders[plan["id"]] = folder
        loras[name] = folder / f"{ecfg.output.name}.safetensors"
        TRAIN_SECONDS[plan["id"]] = round(metrics["train_seconds"], 1)
    return loras


# --- evaluation -------------------------------------------------------------------------------------

def evaluate_rows(cfg, task, clf, teacher, loras: dict):
    """Every row on the same prompts and noise: the teacher (DDIM, CFG) then each student's LoRA (CFG 1)."""
    labels = shapes.sample_labels(cfg["n_eval"], seed=99)
    cond, uncond = task.text(labels), task.text.empty(len(labels))
    noise = torch.randn(len(labels), 3, shapes.SIZE, shapes.SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        real_feats = clf(shapes.make_images(labels, seed=99))[0]
    rows, samples = [], {}

    def add(name, model, steps, eta, guidance, reference):
        t0 = time.time()
        imgs = evaluate.generate(evaluate.denoiser(model, guidance), noise, cond, uncond, steps, eta, seed=123)
        row = {"model": name, "steps": steps, "eta": eta, "cfg": guidance,
               **evaluate.score(clf, imgs, labels, real_feats, reference), "sample_s": time.time() - t0}
        rows.append(row)
        samples[(name, steps, eta)] = imgs[:8]
        log(f"{name:22s} steps={steps} eta={eta} align={row['align']:.3f} fd={row['fd']:.2f} "
            f"dist25={row['dist25'] if row['dist25'] is None else round(row['dist25'], 4)}")
        return imgs

    w, steps_list = cfg["guidance"], cfg.get("steps", STEPS)
    ref = add("teacher (DDIM)", teacher, 25, 0.0, w, None)
    rows[-1]["dist25"] = 0.0
    for s in steps_list:
        add("teacher (DDIM)", teacher, s, 0.0, w, ref)
    for name, path in loras.items():
        model = evaluate.lora_student(teacher, make_unet, path)
        cd = name.startswith("CD")
        for eta in (1.0,) if cd else cfg["etas"]:  # CD: the LCM multistep sampler (= TCD with eta 1)
            for s in steps_list:
                add(f"{name} + {'LCM' if cd else 'TCD'}", model, s, eta, 1.0, ref)
    with torch.no_grad():
        real_check = evaluate.score(clf, shapes.make_images(labels, seed=99), labels, real_feats, None)
    return rows, samples, real_check


def train_classifiers(cfg, task, cache: Path):
    """Evaluation classifier: the teacher's training images. Reward classifier (feedback stage only): a
    disjoint split (other labels, other jitter) and another init/batch seed, so the metric is not the
    function the feedback stage climbs. -> (clf, reward weights file, held-out accuracies)."""
    ck = cfg_hash(cfg, CLF_KEYS)
    clf = cached_model(cache / f"classifier-{ck}.safetensors",
                       lambda: train_classifier(task.labels, task.images, cfg, seed=0), Classifier)
    r_labels = shapes.sample_labels(cfg["n_train"], seed=3)
    reward_path = cache / f"reward_classifier-{ck}.safetensors"
    reward_clf = cached_model(reward_path,
                              lambda: train_classifier(r_labels, shapes.make_images(r_labels, seed=3), cfg, seed=1),
                              Classifier)
    h_labels = shapes.sample_labels(cfg["n_heldout"], seed=5)
    h_images = shapes.make_images(h_labels, seed=5)
    clf_acc = {"eval_classifier": heldout_accuracy(clf, h_labels, h_images),
               "reward_classifier": heldout_accuracy(reward_clf, h_labels, h_images), "n_heldout": cfg["n_heldout"],
               "heldout_split": "labels + jitter seed 5 (training: seed 1 eval clf, seed 3 reward clf)"}
    log(f"held-out accuracy: {clf_acc}")
    return clf, reward_path, clf_acc


def run(cfg, cache: Path, out_dir: Path, quick: bool):
    t_start = time.time()
    task = Task(cfg)
    tag = "quick" if quick else "full"
    load_start = os.getloadavg()
    # Key the cache by the config so a changed budget never reuses stale models: the directory by the
    # teacher's config (+ architecture version), each file by the keys it depends on.
    cache = cache / f"{tag}-{cfg_hash(cfg, TEACHER_KEYS)}-{ARCH}"
    clf, reward_path, clf_acc = train_classifiers(cfg, task, cache)
    teacher = cached_model(cache / "teacher.safetensors", lambda: train_teacher(task, cfg), make_unet)
    loras = train_students(cfg, cache, task, teacher, reward_path)
    t_train = time.time() - t_start
    rows, samples, real_check = evaluate_rows(cfg, task, clf, teacher, loras)
    result = {
        "benchmark": "quality", "mode": tag, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "machine": machine_info(), "train_or_load_s": round(t_train, 1), "total_s": round(time.time() - t_start, 1),
        "classifier_on_real_eval_images": real_check, "classifier_heldout_accuracy": clf_acc,
        "train_seconds": dict(TRAIN_SECONDS), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "rows": rows, "loras": {k: str(v) for k, v in loras.items()},
        "notes": "pixel-space 16x16 shapes; every student is a run of the product's training engine "
                 "(training.engine.run_training, benchmarks/stages.py) evaluated from the unified LoRA file it wrote; "
                 f"students sampled at cfg 1 (guidance distilled), teacher at cfg {cfg['guidance']}; eta=1 TCD is "
                 "the LCM multistep sampler; dist25 = RMS to the teacher's 25-step DDIM output from the same noise "
                 "(stochastic rows also draw their own re-noise).",
    }
    write_results(result, samples, out_dir, tag)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, smoke test (< 2 min)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("HYPERSD_BENCH_CACHE", "~/.cache/hypersd-bench")).expanduser())
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("HYPERSD_BENCH_THREADS", "0")) or None,
                    help="torch threads (default: all cores; 1 is faster on a machine shared with other jobs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(QUICK if args.quick else FULL, args.cache, args.out, args.quick)


if __name__ == "__main__":
    main()

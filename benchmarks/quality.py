"""Distillation-quality benchmark on a task with known ground truth (``python -m benchmarks.quality``).

A tiny pixel-space teacher (diffusers UNet2DConditionModel, eps prediction, SD's scaled-linear
schedule) is trained from scratch on 16x16 coloured shapes with captions naming colour, shape and
position. Sampling goes through the product's ``DiscreteDenoiser`` + ``sample_tcd`` (eta = 0 is DDIM).
Metrics per row, on the same prompts and initial noise:

* ``align``: accuracy of an attribute classifier (trained on ground truth) on colour / shape /
  position vs the caption (CLIP-score analogue; mean of the three);
* ``fd``: Frechet distance between classifier features of generated and real images (FID analogue);
* ``dist25``: RMS pixel distance to the teacher's 25-step output from the same noise.

* ``diversity``: mean pairwise RMS distance between samples of one prompt from different noise.

Rows (benchmarks/plans.py): the teacher at 25 steps and at 1/2/4/8, then the students, each trained by
the product's training engine (``training.engine.run_training``, stage code from training/stages/, see
benchmarks/stages.py) once per seed of one seed set: CD at TSCD's whole budget and at its last-stage
budget, TSCD 8-4-2-1 (final LoRA, and its k = 8 / 4 / 2 LoRAs at their own step counts), and on top of
TSCD with one equal extra budget each: a control (more TSCD), the adversarial term, feedback, DMD, and
all three (the unified LoRA). Every model is sampled on the same grid (eta 0 / 0.3 / 1 at 1 / 2 / 4 / 8
steps); benchmarks/claims.py tests the paper's claims seed for seed.

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

from benchmarks import claims, evaluate, plans, shapes, stages
from benchmarks.models import ARCH, Classifier, Task, heldout_accuracy, make_unet, train_classifier, train_teacher
from benchmarks.quality_report import write_quality_results
from benchmarks.report import RESULTS, default_cache, log, machine_info, output_tag
from training.diffusion import recommended_eta

# distill_steps N: CD's budget and TSCD's (N / 4 per k); stage_steps E: each later stage's extra budget (the
# unified row gets 3 E). warmup_steps: the engine's lr warmup (10 is the product's default); 0 in --quick so its
# 1-step stages train at all. feedback_alpha / dmd_gen_every / stage_lr: the later stages' settings
# (benchmarks/plans.py; the rest are the product's defaults). n_eval prompts x noises, the same for every row;
# the eval prompts repeat (32 captions), which is what the diversity metric reads. seeds 3-5: the later stages'
# defaults (adversarial pair and weights, feedback's late_fraction / grad_scale) were tuned on seeds 0-2 of
# this task (docs/stages.md), so the claims are measured on seeds that took no part in the tuning.
FULL = dict(teacher_steps=400, teacher_batch=32, teacher_lr=2e-3, clf_steps=1500, clf_lr=3e-3, distill_steps=96,
            distill_batch=16, distill_lr=1e-3, warmup_steps=10, student_rank=16, stage_rank=8, stage_steps=24,
            stage_lr=5e-4, feedback_alpha=-0.05, dmd_gen_every=2, guidance=3.0, n_eval=64, n_train=20000,
            n_heldout=2000, etas=(0.0, 0.3, 1.0), seeds=(3, 4, 5))
# --quick: the same rows and claims at toy budgets (a smoke test of the whole benchmark, not a measurement)
QUICK = dict(FULL, teacher_steps=6, teacher_batch=4, teacher_lr=1e-3, clf_steps=10, distill_steps=4,
             distill_batch=2, warmup_steps=0, stage_steps=2, n_eval=16, n_train=64, n_heldout=32, seeds=(0, 1),
             steps=(1, 2))
# Which config keys the teacher and classifiers depend on (the engine runs are keyed by their whole config).
TEACHER_KEYS = ("teacher_steps", "teacher_batch", "teacher_lr", "n_train")
CLF_KEYS = ("clf_steps", "clf_lr", "n_train")
STEPS = (1, 2, 4, 8)


# --- cache ----------------------------------------------------------------------------------------

TRAIN_SECONDS: dict[str, float] = {}
STAGE_LOGS: dict[str, list] = {}  # run -> each stage's last logged values (adv_d, reward, dmd_loss ...)


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

def train_students(cfg, cache: Path, task, teacher, reward_weights: Path) -> dict:
    """Every row (benchmarks/plans.py) for every seed through the training engine (cached run folders);
    -> {(row id, seed): run folder}."""
    dataset = stages.ShapesDataset(task.labels, task.images)
    folders = {}
    for seed in cfg["seeds"]:
        for row, plan in plans.row_runs(cfg, str(reward_weights)).items():
            if row not in cfg.get("rows", plans.ROWS):
                continue
            init = str(folders[("tscd", seed)] / "stages" / "1_tscd.safetensors") if row in plans.ON_TSCD else ""
            ecfg = stages.engine_config(plan["stages"], seed=seed, rank=plan["rank"], lr=plan["lr"],
                                        batch=cfg["distill_batch"], warmup=cfg["warmup_steps"],
                                        guidance=cfg["guidance"], init_lora=init, snapshots=plan["snapshots"])
            folder, metrics = stages.train_run(ecfg, f"{row}-s{seed}", cache / "runs",
                                               lambda: stages.pixel_base(teacher, make_unet, task.text), dataset, log)
            folders[(row, seed)] = folder
            TRAIN_SECONDS[f"{row}-s{seed}"] = round(metrics["train_seconds"], 1)
            STAGE_LOGS[f"{row}-s{seed}"] = [{"type": st["type"], "segments": st["segments"], **st["logs_end"]}
                                            for st in metrics["stages"]]
    return folders


def student_models(cfg, folders: dict) -> list:
    """(label, row id, seed, LoRA file, step counts to evaluate at) for every trained model."""
    out = []
    for (row, seed), folder in folders.items():
        out.append((plans.ROWS[row], row, seed, folder / "hyper_sd_lora.safetensors", cfg.get("steps", STEPS)))
        if row == "tscd":
            for k, name in ((k, n) for k, n in plans.SNAPSHOTS.items() if k in cfg.get("steps", STEPS)):
                out.append((plans.snapshot_label(k), f"tscd_k{k}", seed,
                            folder / "stages" / "snapshots" / f"{name}.safetensors", (k,)))
    return out


# --- evaluation -------------------------------------------------------------------------------------

def sample_columns(n: int, k: int = 8) -> torch.Tensor:
    """k evaluation prompts spread over the balanced set (the first k would all be red: see balanced_labels)."""
    return torch.arange(k) * 5 % n


class Evaluation:
    """The fixed evaluation set (prompts, initial noise, re-noise seed) and the teacher's 25-step reference;
    `add` samples one (model, steps, eta) and scores it."""

    def __init__(self, cfg, task, clf, teacher):
        self.cfg, self.clf = cfg, clf
        self.labels = shapes.balanced_labels(cfg["n_eval"])
        self.cond, self.uncond = task.text(self.labels), task.text.empty(len(self.labels))
        self.noise = torch.randn(len(self.labels), 3, shapes.SIZE, shapes.SIZE,
                                 generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            self.real_feats = clf(shapes.make_images(self.labels, seed=99))[0]
        self.rows, self.samples, self.reference = [], {}, None
        self.reference = self.add("teacher DDIM + CFG", "teacher", None, teacher, 25, 0.0, cfg["guidance"])
        self.rows[-1]["dist25"] = 0.0

    def add(self, name, row_id, seed, model, steps, eta, guidance):
        imgs = evaluate.generate(evaluate.denoiser(model, guidance), self.noise, self.cond, self.uncond, steps, eta,
                                 seed=123)
        row = {"model": name, "row": row_id, "seed": seed, "steps": steps, "eta": eta, "cfg": guidance,
               **evaluate.score(self.clf, imgs, self.labels, self.real_feats, self.reference)}
        self.rows.append(row)
        shown_eta = 0.0 if row_id == "teacher" else recommended_eta(steps)
        if seed in (None, self.cfg["seeds"][0]) and eta == shown_eta:  # the sample grid: first seed, one sampler
            self.samples[(name, steps, eta)] = imgs[sample_columns(len(imgs))]
        return imgs


def evaluate_rows(cfg, task, clf, teacher, folders: dict):
    """The teacher (CFG) and every student (CFG 1) on the sampler grid: etas x step counts, same prompts and noise."""
    ev = Evaluation(cfg, task, clf, teacher)
    for eta in cfg["etas"]:
        for s in cfg.get("steps", STEPS):
            ev.add("teacher DDIM + CFG" if eta == 0 else "teacher TCD + CFG", "teacher", None, teacher, s, eta,
                   cfg["guidance"])
    for name, row_id, seed, path, steps in student_models(cfg, folders):
        model = evaluate.lora_student(teacher, make_unet, path)
        for eta in cfg["etas"]:
            for s in steps:
                ev.add(name, row_id, seed, model, s, eta, 1.0)
        log(f"evaluated {name} seed {seed}: align " + " ".join(
            f"{r['steps']}/{r['eta']}:{r['align']:.2f}" for r in ev.rows[-len(steps) * len(cfg['etas']):]))
    with torch.no_grad():
        real_check = evaluate.score(clf, shapes.make_images(ev.labels, seed=99), ev.labels, ev.real_feats, None)
    return ev.rows, ev.samples, real_check


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


def summarise(rows) -> list:
    """Mean and sd over the seeds of every (model, steps, eta)."""
    metrics = ("align", "acc_color", "acc_shape", "acc_position", "fd", "dist25", "diversity")
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["row"], r["steps"], r["eta"]), []).append(r)
    out = []
    for (model, row, steps, eta), rs in cells.items():
        cell = {"model": model, "row": row, "steps": steps, "eta": eta, "n_seeds": len(rs)}
        for m in metrics:
            cell[m], cell[m + "_sd"] = claims.mean_sd(r[m] for r in rs)
        out.append(cell)
    return out


def run(cfg, cache: Path, out_dir: Path, quick: bool, tag: str | None = None):
    """Train (or load) and evaluate every row of cfg["rows"] (default: all) for cfg["seeds"]; writes
    quality_<tag>.* (tag default: "quick" / "full")."""
    t_start = time.time()
    task = Task(cfg)
    mode = "quick" if quick else "full"
    tag = tag or mode
    load_start = os.getloadavg()
    # Key the cache by the config so a changed budget never reuses stale models: the directory by the
    # teacher's config (+ architecture version), each file by the keys it depends on.
    cache = cache / f"{mode}-{cfg_hash(cfg, TEACHER_KEYS)}-{ARCH}"
    clf, reward_path, clf_acc = train_classifiers(cfg, task, cache)
    teacher = cached_model(cache / "teacher.safetensors", lambda: train_teacher(task, cfg), make_unet)
    folders = train_students(cfg, cache, task, teacher, reward_path)
    t_train = time.time() - t_start
    rows, samples, real_check = evaluate_rows(cfg, task, clf, teacher, folders)
    names = plans.claim_names()
    result = {
        "benchmark": "quality", "mode": mode, "tag": tag, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "machine": machine_info(), "train_or_load_s": round(t_train, 1), "total_s": round(time.time() - t_start, 1),
        "classifier_on_real_eval_images": real_check, "classifier_heldout_accuracy": clf_acc,
        "train_seconds": dict(TRAIN_SECONDS), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "seeds": list(cfg["seeds"]), "rows": rows, "summary": summarise(rows), "claims": claims.all_claims(rows, names, cfg.get("steps", STEPS)),
        "stage_logs_end": dict(STAGE_LOGS), "runs": {f"{r}-s{s}": str(f) for (r, s), f in folders.items()},
        "notes": "pixel-space 16x16 shapes; every student is a run of the product's training engine "
                 "(training.engine.run_training, benchmarks/stages.py) evaluated from the LoRA file it wrote, once per "
                 "training seed (the same seeds for every row); the teacher is one model. Students sampled at cfg 1 "
                 f"(guidance distilled), the teacher at cfg {cfg['guidance']}; eta 0 = DDIM, eta 1 = the LCM multistep "
                 "sampler; dist25 = RMS to the teacher's 25-step DDIM output from the same noise (stochastic rows also "
                 "draw their own re-noise); diversity = mean pairwise RMS distance between samples of one prompt.",
    }
    write_quality_results(result, samples, out_dir, tag)
    return result


def seed_list(text: str) -> tuple:
    """"9-14" or "3,4,5" -> a tuple of training seeds."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds as 9-14 or 3,4,5, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return tuple(seeds)


def row_list(text: str) -> tuple:
    """Row ids (benchmarks/plans.py) -> the rows to run, with the rows they need: tscd under every row
    built on it, the control beside the later stages (their claims compare with it)."""
    rows = {r.strip() for r in text.split(",") if r.strip()}
    unknown = sorted(rows - set(plans.ROWS))
    if unknown or not rows:
        raise argparse.ArgumentTypeError(f"unknown row(s) {unknown or text!r}; expected some of {list(plans.ROWS)}")
    if rows & set(plans.ON_TSCD):
        rows |= {"tscd", "control"} if rows & {"adversarial", "feedback", "dmd"} else {"tscd"}
    return tuple(r for r in plans.ROWS if r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, smoke test (< 2 min)")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("HYPERSD_BENCH_THREADS", "0")) or None,
                    help="torch threads (default: all cores; 1 is faster on a machine shared with other jobs)")
    ap.add_argument("--seeds", type=seed_list, help="training seeds, e.g. 9-14 (default: 3-5; --quick: 0,1)")
    ap.add_argument("--rows", type=row_list, help="comma-separated row ids to run (default: all); tscd and the "
                    f"control are added where needed; ids: {', '.join(plans.ROWS)}")
    ap.add_argument("--tag", type=output_tag, help="name of the outputs, quality_<tag>.* (default: full, or quick)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("seeds", args.seeds), ("rows", args.rows)) if v})
    run(cfg, args.cache, args.out, args.quick, args.tag)


if __name__ == "__main__":
    main()

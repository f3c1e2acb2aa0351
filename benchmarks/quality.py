"""Distillation-quality benchmark on a task with known ground truth (``python -m benchmarks.quality``).

A tiny pixel-space teacher (diffusers UNet2DConditionModel, eps prediction, SD's scaled-linear
schedule) is trained from scratch on 16x16 coloured shapes with captions naming colour, shape and
position. Sampling goes through the product's ``DiscreteDenoiser`` + ``sample_tcd`` (eta = 0 is DDIM).
Metrics per row, on the same prompts and initial noise:

* ``align``: accuracy of an attribute classifier (trained on ground truth) on colour / shape /
  position vs the caption (CLIP-score analogue; mean of the three);
* ``fd``: Frechet distance between classifier features of generated and real images (FID analogue);
* ``dist25``: RMS pixel distance to the teacher's 25-step output from the same noise.

Rows: the teacher at 25 and 1/2/4/8 DDIM steps; single-segment CD (LCM-style) and TSCD 8-4-2-1 with
the same budget; on top of TSCD, with one equal extra budget each: more k=1 steps (control), the
feedback stage (ReFL, ``training.feedback``; reward = a second attribute classifier's log-probability
of the caption) and score distillation (DMD, ``training.score_distill``), see ``benchmarks/stages.py``.

Heavy parts (teacher, classifiers, students) are cached under ``--cache`` (default
``~/.cache/hypersd-bench``) keyed by the config keys each depends on, so a rerun only evaluates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks import shapes
from benchmarks.distill import add_lora, distill
from schedulers import DiscreteDenoiser, sample_tcd, scaled_linear_alphas_cumprod, tcd_sigmas

# Later stages (feedback, score distillation) and the control row all get the same extra budget on top
# of the TSCD student: stage_steps optimiser steps x distill_batch.
STAGES = dict(stage_rank=8, feedback_lr=5e-4, feedback_late_fraction=1.0, dmd_lr=5e-4, dmd_gen_every=2,
              dmd_reg_weight=0.25, dmd_ref_steps=4)
FULL = dict(teacher_steps=400, teacher_batch=32, teacher_lr=2e-3, clf_steps=1500, clf_lr=3e-3, distill_steps=160,
            distill_batch=16, distill_lr=1e-3, guidance=3.0, n_eval=128, n_train=20000, n_heldout=2000,
            etas=(0.0, 0.5, 1.0), stage_steps=40, **STAGES)
QUICK = dict(teacher_steps=6, teacher_batch=4, teacher_lr=1e-3, clf_steps=10, clf_lr=3e-3, distill_steps=4,
             distill_batch=2, distill_lr=1e-3, guidance=3.0, n_eval=8, n_train=64, n_heldout=32, etas=(1.0,),
             stage_steps=2, steps=(1, 4), **STAGES)
# Which config keys each cached model depends on (a changed key retrains only what depends on it).
TEACHER_KEYS = ("teacher_steps", "teacher_batch", "teacher_lr", "n_train")
CLF_KEYS = ("clf_steps", "clf_lr", "n_train")
STEPS = (1, 2, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# UNet levels: "unet3" = 16 -> 8 -> 4 px (a 4x4 bottleneck where each cell sits in one quadrant, so the
# caption's position can be placed); "unet2" (16 -> 8, the first version) never learned position.
ARCH = "unet3"
BLOCKS = {"unet2": (32, 64), "unet3": (32, 64, 64)}


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    blocks = BLOCKS[ARCH]
    return UNet2DConditionModel(
        sample_size=shapes.SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D",) * len(blocks),
        up_block_types=("CrossAttnUpBlock2D",) * len(blocks),
        cross_attention_dim=shapes.EMBED_DIM, attention_head_dim=8, norm_num_groups=8)


def atomic_save(tensors: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class Task:
    def __init__(self, cfg):
        self.cfg = cfg
        self.text = shapes.TextEncoder()
        self.labels = shapes.sample_labels(cfg["n_train"], seed=1)
        self.images = shapes.make_images(self.labels, seed=1)

    def batch(self, gen, n):
        idx = torch.randint(len(self.labels), (n,), generator=gen)
        return self.images[idx], self.text(self.labels[idx]), self.text.empty(n)


# --- teacher ---------------------------------------------------------------------------------

def train_teacher(task, cfg):
    unet = make_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["teacher_lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["teacher_lr"], total_steps=cfg["teacher_steps"], pct_start=0.3)
    abar = scaled_linear_alphas_cumprod().float()
    gen = torch.Generator().manual_seed(0)
    unet.train()
    for step in range(cfg["teacher_steps"]):
        x0, cond, uncond = task.batch(gen, cfg["teacher_batch"])
        drop = torch.rand(len(x0), 1, 1, generator=gen) < 0.1  # unconditional branch for CFG
        cond = torch.where(drop, uncond, cond)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, cond).sample - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg["teacher_steps"] - 1:
            log(f"teacher step {step + 1}/{cfg['teacher_steps']} loss {float(loss):.4f}")
    unet.eval()
    return unet


# --- attribute classifier (metric) ----------------------------------------------------------------

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        c = torch.nn
        self.features = c.Sequential(
            c.Conv2d(3, 32, 3, padding=1), c.SiLU(), c.Conv2d(32, 32, 3, padding=1, stride=2), c.SiLU(),
            c.Conv2d(32, 64, 3, padding=1), c.SiLU(), c.Conv2d(64, 64, 3, padding=1, stride=2), c.SiLU(),
            c.Flatten(), c.Linear(64 * 16, 64), c.SiLU())
        self.heads = c.ModuleList([c.Linear(64, len(v)) for v in shapes.ATTRIBUTES.values()])

    def forward(self, x):
        f = self.features(x)
        return f, [h(f) for h in self.heads]


def train_classifier(labels, images, cfg, seed: int = 0):
    """Attribute classifier on ground-truth images (`seed`: init and batch order)."""
    torch.manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg["clf_lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["clf_lr"], total_steps=cfg["clf_steps"], pct_start=0.2)
    gen = torch.Generator().manual_seed(2 + seed)
    for step in range(cfg["clf_steps"]):
        idx = torch.randint(len(labels), (64,), generator=gen)
        x = images[idx] + 0.05 * torch.randn(images[idx].shape, generator=gen)  # robust to sampler noise
        _, logits = clf(x.clamp(-1, 1))
        loss = sum(torch.nn.functional.cross_entropy(lg, labels[idx, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == cfg["clf_steps"] - 1:
            log(f"classifier(seed {seed}) step {step + 1}/{cfg['clf_steps']} loss {float(loss):.4f}")
    clf.eval()
    return clf


@torch.no_grad()
def heldout_accuracy(clf, labels, images) -> dict:
    _, logits = clf(images)
    acc = {k: float((lg.argmax(1) == labels[:, i]).float().mean()) for i, (k, lg) in enumerate(zip(shapes.ATTRIBUTES, logits))}
    acc["mean"] = sum(acc.values()) / len(acc)
    acc["all_three"] = float(torch.stack([lg.argmax(1) == labels[:, i] for i, lg in enumerate(logits)]).all(0).float().mean())
    return acc


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm_psd(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r1 = sqrtm_psd(s1)
    cross = sqrtm_psd(r1 @ s2 @ r1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1 + s2 - 2 * cross))


# --- sampling through the product's schedulers ------------------------------------------------------

def denoiser(unet, lora: bool, guidance: float):
    def unet_fn(x, t, cond, uncond):
        if lora:
            unet.enable_adapters()
        elif hasattr(unet, "peft_config"):
            unet.disable_adapters()
        if guidance == 1.0:
            return unet(x, t, cond).sample
        e_c, e_u = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.chunk(2)
        return e_u + guidance * (e_c - e_u)

    return DiscreteDenoiser(unet_fn)


@torch.no_grad()
def generate(model, noise, cond, uncond, steps, eta, seed):
    sigmas = tcd_sigmas(steps).float()
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # unit-variance VP noise at t=999, as diffusers starts
    gen = torch.Generator().manual_seed(seed)
    ns = lambda s, sn: torch.randn(noise.shape, generator=gen)  # noqa: E731
    out = sample_tcd(model, x, sigmas, extra_args={"cond": cond, "uncond": uncond}, disable=True,
                     noise_sampler=ns, eta=eta)
    return out.clamp(-1, 1)


@torch.no_grad()
def score(clf, images, labels, real_feats, reference):
    feats, logits = clf(images)
    acc = [float((lg.argmax(1) == labels[:, i]).float().mean()) for i, lg in enumerate(logits)]
    row = {f"acc_{k}": a for k, a in zip(shapes.ATTRIBUTES, acc)}
    row["align"] = sum(acc) / len(acc)
    row["fd"] = frechet_distance(feats, real_feats)
    row["dist25"] = None if reference is None else float((images - reference).pow(2).mean().sqrt())
    return row


# --- cache ----------------------------------------------------------------------------------------

TRAIN_SECONDS: dict[str, float] = {}


def cached_model(path: Path, build, make):
    """Load `path` if cached, else build, save and record the training time (seconds, in the .json beside it)."""
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
    atomic_save(model.state_dict(), path)
    TRAIN_SECONDS[path.stem] = round(time.time() - t0, 1)
    write_atomic_text(meta, json.dumps({"train_s": TRAIN_SECONDS[path.stem], "load_average_end": os.getloadavg()}))
    log(f"trained {path.name} in {time.time() - t0:.0f} s")
    return model


def cfg_hash(cfg, keys=None) -> str:
    sub = cfg if keys is None else {k: cfg[k] for k in keys}
    return hashlib.sha1(json.dumps(sub, sort_keys=True, default=list).encode()).hexdigest()[:10]


def student_maker(rank=16):
    def make():
        unet = make_unet()
        add_lora(unet, rank)
        return unet
    return make


def run(cfg, cache: Path, out_dir: Path, quick: bool):
    t_start = time.time()
    task = Task(cfg)
    tag = "quick" if quick else "full"
    load_start = os.getloadavg()
    # Key the cache by the config so a changed budget never reuses stale models: the directory by the
    # teacher's config (+ architecture version), each file by the keys it depends on.
    cache = cache / f"{tag}-{cfg_hash(cfg, TEACHER_KEYS)}-{ARCH}"
    ck = cfg_hash(cfg, CLF_KEYS)
    # Evaluation classifier: the teacher's training images. Reward classifier (feedback stage only): a
    # disjoint split (other labels, other jitter) and another init/batch seed, so the metric is not the
    # function the feedback stage climbs.
    clf = cached_model(cache / f"classifier-{ck}.safetensors",
                       lambda: train_classifier(task.labels, task.images, cfg, seed=0), Classifier)
    r_labels = shapes.sample_labels(cfg["n_train"], seed=3)
    reward_clf = cached_model(cache / f"reward_classifier-{ck}.safetensors",
                              lambda: train_classifier(r_labels, shapes.make_images(r_labels, seed=3), cfg, seed=1),
                              Classifier)
    h_labels = shapes.sample_labels(cfg["n_heldout"], seed=5)
    h_images = shapes.make_images(h_labels, seed=5)
    clf_acc = {"eval_classifier": heldout_accuracy(clf, h_labels, h_images),
               "reward_classifier": heldout_accuracy(reward_clf, h_labels, h_images), "n_heldout": cfg["n_heldout"],
               "heldout_split": "labels + jitter seed 5 (training: seed 1 eval clf, seed 3 reward clf)"}
    log(f"held-out accuracy: {clf_acc}")
    teacher = cached_model(cache / "teacher.safetensors", lambda: train_teacher(task, cfg), make_unet)

    def data_fn(gen):
        return task.batch(gen, cfg["distill_batch"])

    def build_student(stages, seed):
        def build():
            unet = make_unet()
            unet.load_state_dict(teacher.state_dict())
            add_lora(unet)
            return distill(unet, data_fn, stages, cfg["guidance"], cfg["distill_lr"], seed, log=log)
        return build

    n = cfg["distill_steps"]
    students = {
        "CD k=1 (LCM-style)": [(1, n)],
        "TSCD 8-4-2-1": [(8, n // 4), (4, n // 4), (2, n // 4), (1, n - 3 * (n // 4))],
    }
    sk = cfg_hash(cfg, TEACHER_KEYS + ("distill_steps", "distill_batch", "distill_lr", "guidance"))
    models = {name: cached_model(cache / f"student_{i}-{sk}.safetensors", build_student(st, 10 + i), student_maker())
              for i, (name, st) in enumerate(students.items())}
    tscd = models["TSCD 8-4-2-1"]

    # Later stages on top of the TSCD student, each with the same extra budget (stage_steps x distill_batch).
    from benchmarks import stages as later
    stage_key = cfg_hash(cfg, TEACHER_KEYS + CLF_KEYS + ("distill_steps", "distill_batch", "distill_lr", "guidance",
                                                         "stage_steps") + tuple(STAGES))
    e = cfg["stage_steps"]

    def build_control():
        unet = student_maker()()
        unet.load_state_dict(tscd.state_dict())
        for p_name, p in unet.named_parameters():
            p.requires_grad_("lora_" in p_name)
        return distill(unet, data_fn, [(1, e)], cfg["guidance"], cfg["distill_lr"], 20, log=log)

    later_models = {
        f"TSCD + {e} more k=1 steps (control)": cached_model(
            cache / f"control-{stage_key}.safetensors", build_control, student_maker()),
        "TSCD + feedback (ReFL)": cached_model(
            cache / f"feedback-{stage_key}.safetensors",
            lambda: later.train_feedback(tscd, make_unet, later.AttributeReward(reward_clf), task, cfg, 21, log=log),
            lambda: later.stage_unet(make_unet, "feedback", cfg["stage_rank"])),
        "TSCD + score distillation (DMD)": cached_model(
            cache / f"dmd-{stage_key}.safetensors",
            lambda: later.train_dmd(tscd, teacher, make_unet, task, cfg, 22, log=log),
            lambda: later.stage_unet(make_unet, "dmd", cfg["stage_rank"])),
        # The same stage at DMDStage's own defaults (lr 1e-4, generator every 5th step): a second
        # point, not a tuned one.
        "TSCD + DMD (module defaults)": cached_model(
            cache / f"dmd_defaults-{stage_key}.safetensors",
            lambda: later.train_dmd(tscd, teacher, make_unet, task, dict(cfg, dmd_lr=1e-4, dmd_gen_every=5), 22, log=log),
            lambda: later.stage_unet(make_unet, "dmd", cfg["stage_rank"])),
    }
    models.update(later_models)
    t_train = time.time() - t_start

    # Evaluation set: fresh prompts, fixed noise shared by every row.
    labels = shapes.sample_labels(cfg["n_eval"], seed=99)
    cond, uncond = task.text(labels), task.text.empty(len(labels))
    noise = torch.randn(len(labels), 3, shapes.SIZE, shapes.SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        real_feats = clf(shapes.make_images(labels, seed=99))[0]
    rows, samples = [], {}

    def add(name, model_name, model, steps, eta, guidance, lora, reference):
        t0 = time.time()
        imgs = generate(denoiser(model, lora, guidance), noise, cond, uncond, steps, eta, seed=123)
        row = {"model": name, "steps": steps, "eta": eta, "cfg": guidance, **score(clf, imgs, labels, real_feats, reference),
               "sample_s": time.time() - t0}
        rows.append(row)
        samples[(name, steps, eta)] = imgs[:8]
        log(f"{name:22s} steps={steps} eta={eta} align={row['align']:.3f} fd={row['fd']:.2f} "
            f"dist25={row['dist25'] if row['dist25'] is None else round(row['dist25'], 4)}")
        return imgs

    w = cfg["guidance"]
    ref = add("teacher (DDIM)", "teacher", teacher, 25, 0.0, w, False, None)
    rows[-1]["dist25"] = 0.0
    for s in cfg.get("steps", STEPS):
        add("teacher (DDIM)", "teacher", teacher, s, 0.0, w, False, ref)
    for name, model in models.items():
        etas = (1.0,) if name.startswith("CD") else cfg["etas"]
        for eta in etas:
            for s in cfg.get("steps", STEPS):
                add(f"{name} + TCD" if not name.startswith("CD") else f"{name} + LCM", name, model, s, eta, 1.0, True, ref)
    with torch.no_grad():
        real_check = score(clf, shapes.make_images(labels, seed=99), labels, real_feats, None)
    result = {
        "benchmark": "quality", "mode": tag, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "machine": machine_info(), "train_or_load_s": round(t_train, 1), "total_s": round(time.time() - t_start, 1),
        "classifier_on_real_eval_images": real_check, "classifier_heldout_accuracy": clf_acc,
        "train_seconds": dict(TRAIN_SECONDS), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "rows": rows,
        "notes": "pixel-space 16x16 shapes; students sampled at cfg 1 (guidance distilled), teacher at cfg "
                 f"{w}; eta=1 TCD is the LCM multistep sampler; dist25 = RMS to the teacher's 25-step DDIM output "
                 "from the same noise (stochastic rows also draw their own re-noise).",
    }
    write_results(result, samples, out_dir, tag)
    return result


def machine_info():
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "gpu": "none (GPU rows not measured)"}


# --- outputs ----------------------------------------------------------------------------------------

def markdown_table(rows) -> str:
    lines = ["| model | steps | eta | cfg | align (mean) | colour | shape | position | FD | dist to teacher-25 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = "-" if r["dist25"] is None else f"{r['dist25']:.3f}"
        lines.append(f"| {r['model']} | {r['steps']} | {r['eta']} | {r['cfg']} | {r['align']:.3f} | {r['acc_color']:.3f} | "
                     f"{r['acc_shape']:.3f} | {r['acc_position']:.3f} | {r['fd']:.2f} | {d} |")
    return "\n".join(lines) + "\n"


def write_atomic_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(result, samples, out_dir: Path, tag: str):
    write_atomic_text(out_dir / f"quality_{tag}.json", json.dumps(result, indent=1))
    m = result["machine"]
    acc = result["classifier_heldout_accuracy"]
    fmt = lambda a: ", ".join(f"{k} {a[k]:.3f}" for k in ("color", "shape", "position", "all_three"))  # noqa: E731
    load = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    header = (f"# Quality benchmark ({tag})\n\nMachine: {m['cpu']}, {m['cores']} cores (shared with other jobs: load "
              f"average {load(result['load_average_start'])} at start, {load(result['load_average_end'])} at end), "
              f"torch {m['torch']}, {m['torch_threads']} torch thread(s), {m['gpu']}. Total {result['total_s']} s "
              f"(training or loading {result['train_or_load_s']} s; training seconds per model: "
              f"{json.dumps(result['train_seconds'])}).\n\n"
              f"Attribute classifiers on {acc['n_heldout']} held-out ground-truth images ({acc['heldout_split']}): "
              f"evaluation classifier {fmt(acc['eval_classifier'])}; reward classifier (feedback stage only) "
              f"{fmt(acc['reward_classifier'])}.\n\n")
    write_atomic_text(out_dir / f"quality_{tag}.md", header + markdown_table(result["rows"]) + "\n" + result["notes"] + "\n")
    from benchmarks.chart import quality_chart, sample_grid
    quality_chart(result["rows"], out_dir / f"quality_{tag}.png")
    sample_grid(samples, out_dir / f"quality_{tag}_samples.png")


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

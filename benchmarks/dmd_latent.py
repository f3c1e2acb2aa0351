"""Does the score-distillation (DMD) stage help on the default latent task? (``python -m benchmarks.dmd_latent``)

The quality benchmark's pixel task leaves every 1-step sample noise-dominated, so DMD is measured here
too, where the default plan's 1-step samples are already clean: the embedded tiny teacher and its
coloured-shapes data (`python -m training.run`'s defaults). Per training seed:

* prefix: the default plan without its DMD stage (TSCD 8-4-2-1 + feedback), one engine run;
* on the prefix's unified LoRA (`model.init_lora`), two continuations of the same number of steps:
  ``dmd`` = the default plan's DMD stage, ``control`` = TSCD at one segment (more of what came before);
* every arm (``prefix`` too) sampled with the product's TCD at 1 / 2 / 4 / 8 steps (the run's recommended
  eta), 128 samples a row (the task's 8 captions x 16 noise seeds, the same noise for every arm), and
  scored with the attribute classifier: accuracy, and Frechet distance of its features to the teacher's
  25-step CFG samples of the same captions and noise (``fd_teacher``: DMD's real score is that teacher)
  and to ground-truth renders (``fd_gt``).

The claims compare ``dmd`` with ``control`` seed for seed (benchmarks/claims.py: one-sided paired t). Engine
runs are cached under ``--cache`` keyed by their config, so a rerun only evaluates.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.claims import paired
from benchmarks.report import RESULTS, default_cache, log, machine_info, output_tag, write_atomic_text

STEPS = (1, 2, 4, 8)
EVAL_SEEDS = range(16)      # noise seeds; x the task's 8 captions = 128 samples a row
GT_SEED = 2000              # ground-truth renders (the classifier trains on RENDER_SEED + 0)
ARMS = ("prefix", "control", "dmd")
# the pre-registered claims: (metric, steps); lower is better for both FDs, higher for accuracy
CLAIMS = {"fd_teacher_1": ("fd_teacher", 1), "fd_teacher_4": ("fd_teacher", 4), "fd_gt_1": ("fd_gt", 1)}
# reported beside them, higher is better: what the FD gain costs in prompt alignment
REPORTED = {"accuracy_1": ("accuracy", 1)}


# --- the engine runs ---------------------------------------------------------------------------------

def prefix_config(seed: int):
    """The default plan without its score-distillation stage."""
    from training.config import TrainConfig

    cfg = TrainConfig(seed=seed)
    cfg.stages = [s for s in cfg.stages if s.type != "score_distill"]
    return cfg


def dmd_stage(steps: int, params: dict):
    """The default plan's DMD stage, with `steps` and any `params` overrides."""
    from training.config import TrainConfig

    stage = copy.deepcopy(next(s for s in TrainConfig().stages if s.type == "score_distill"))
    stage.steps, stage.params = steps, {**stage.params, **params}
    return stage


def continuation_config(seed: int, init_lora: str, arm: str, steps: int, dmd_params: dict):
    """One stage on the prefix's unified LoRA: the DMD stage, or TSCD at one segment for the same steps."""
    from training.config import StageConfig, TrainConfig

    cfg = TrainConfig(seed=seed)
    cfg.model.init_lora = init_lora
    cfg.stages = [dmd_stage(steps, dmd_params) if arm == "dmd" else StageConfig(segments=1, steps=steps)]
    return cfg


def cached_run(cfg, cache: Path, name: str) -> Path:
    """The unified LoRA of the engine run of `cfg`, trained once per config (benchmarks/stages.train_run's
    cache: keyed by the config with stage params resolved; the tiny default base and data)."""
    from benchmarks.stages import train_run

    cfg.output.teacher_steps = 0  # the run's own quality report: this benchmark evaluates with more samples
    folder, _ = train_run(cfg, name, cache, lambda: None, None, log=log)
    return folder / f"{cfg.output.name}.safetensors"


def lora_unet(base, lora: Path):
    """The teacher UNet with the LoRA file active (what ComfyUI / diffusers would load)."""
    from benchmarks.evaluate import lora_student

    return lora_student(base.unet, lambda: copy.deepcopy(base.unet), lora)


def features(clf, images):
    with torch.no_grad():
        return clf.features(images)


def evaluate_arm(base, unet, clf, references) -> dict:
    """steps -> {accuracy, fd_teacher, fd_gt} at the recommended eta."""
    from training.diffusion import recommended_eta
    from training.evaluate import frechet_distance, sample_accuracy

    out = {}
    for steps in STEPS:
        s = sample_accuracy(base, steps=steps, guidance=1.0, eta=recommended_eta(steps), seeds=EVAL_SEEDS,
                            unet=unet, classifier=clf, return_images=True)
        f = features(clf, s["images"])
        out[steps] = {"accuracy": float(s["mean"]), "fd_teacher": frechet_distance(f, references["teacher"]),
                      "fd_gt": frechet_distance(f, references["gt"])}
    return out


def references(base, clf) -> dict:
    """Classifier features of the teacher's 25-step CFG samples (same captions and noise as every arm) and of
    ground-truth renders; and the teacher's accuracy."""
    from training.config import OutputConfig
    from training.evaluate import sample_accuracy
    from training.models.attributes import render_set

    column = OutputConfig()  # the run's own teacher column: output.teacher_steps / teacher_guidance
    t = sample_accuracy(base, steps=column.teacher_steps, guidance=column.teacher_guidance, seeds=EVAL_SEEDS,
                        classifier=clf, return_images=True)
    gt, _ = render_set(len(t["images"]), GT_SEED)
    return {"teacher": features(clf, t["images"]), "gt": features(clf, gt), "teacher_accuracy": float(t["mean"])}


# --- the benchmark -----------------------------------------------------------------------------------

def run_seed(seed: int, cache: Path, steps: int, dmd_params: dict, base, clf, refs) -> dict:
    prefix = cached_run(prefix_config(seed), cache, f"prefix-s{seed}")
    loras = {"prefix": prefix}
    for arm in ("control", "dmd"):
        loras[arm] = cached_run(continuation_config(seed, str(prefix), arm, steps, dmd_params), cache, f"{arm}-s{seed}")
    return {arm: evaluate_arm(base, lora_unet(base, loras[arm]), clf, refs) for arm in ARMS}


def dmd_claims(per_seed: dict) -> dict:
    """DMD vs the control, seed for seed: the claims (lower FD is better), then the reported accuracy."""
    out = {}
    for table, lower in ((CLAIMS, True), (REPORTED, False)):
        for name, (metric, steps) in table.items():
            a = {s: r["dmd"][steps][metric] for s, r in per_seed.items()}
            b = {s: r["control"][steps][metric] for s, r in per_seed.items()}
            out[name] = paired(a, b, lower_is_better=lower)
    return out


def summary_table(per_seed: dict) -> list[str]:
    lines = ["| arm | steps | accuracy | FD to teacher | FD to ground truth |", "|---|---|---|---|---|"]
    for arm in ARMS:
        for steps in STEPS:
            cells = [mean_sd_cell(per_seed, arm, steps, m) for m in ("accuracy", "fd_teacher", "fd_gt")]
            lines.append(f"| {arm} | {steps} | " + " | ".join(cells) + " |")
    return lines


def mean_sd_cell(per_seed, arm, steps, metric) -> str:
    vals = [r[arm][steps][metric] for r in per_seed.values()]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.3f} ± {sd:.3f}" if metric == "accuracy" else f"{statistics.fmean(vals):.2f} ± {sd:.2f}"


def report(result: dict) -> str:
    lines = [f"# DMD on the default latent task ({result['tag']})", "",
             f"Seeds {result['seeds']}; DMD stage: {result['steps']} steps, params {result['dmd_params']}; "
             f"the control: {result['steps']} steps of TSCD at one segment. Teacher accuracy at 25 steps: "
             f"{result['teacher_accuracy']:.3f}. Machine: {result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} torch threads; {result['seconds']:.0f} s.", ""]
    lines += summary_table(result["per_seed"]) + ["", "| DMD vs control (FD: lower is better; accuracy: higher) | "
                                                  "mean diff ± sd | t | seeds better | verdict |", "|---|---|---|---|---|"]
    for name, c in result["claims"].items():
        what = name if name in CLAIMS else f"{name} (reported, not a claim)"
        lines.append(f"| {what} | {c['mean_diff']:+.3f} ± {c['sd_diff']:.3f} | {c['t']:.2f} (crit {c['t_crit']}) | "
                     f"{c['seeds_agreeing']}/{len(c['seeds'])} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def run(seeds, cache: Path, out_dir: Path, tag: str, steps: int, dmd_params: dict) -> dict:
    from training.models.attributes import train_attribute_classifier
    from training.models.base import load_tiny_base

    start = time.time()
    base, clf = load_tiny_base(), train_attribute_classifier(0)
    refs = references(base, clf)
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(seed, cache, steps, dmd_params, base, clf, refs)
        log(f"seed {seed}: " + ", ".join(f"{a} fd_teacher@1/4 {per_seed[seed][a][1]['fd_teacher']:.2f}/"
                                         f"{per_seed[seed][a][4]['fd_teacher']:.2f}" for a in ARMS))
    result = {"benchmark": "dmd_latent", "tag": tag, "seeds": list(seeds), "steps": steps, "dmd_params": dmd_params,
              "teacher_accuracy": refs["teacher_accuracy"], "per_seed": per_seed,
              "claims": dmd_claims(per_seed), "machine": machine_info(), "seconds": time.time() - start}
    write_atomic_text(out_dir / f"dmd_latent_{tag}.json", json.dumps(result, indent=1) + "\n")
    write_atomic_text(out_dir / f"dmd_latent_{tag}.md", report(result))
    return result


def param_pair(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value (a score_distill param), got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv=None):
    from benchmarks.quality import seed_list
    from training.stages import score_distill

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=seed_list, default=tuple(range(7, 13)),
                    help="training seeds (default 7-12: the committed pre-registered held-out run)")
    ap.add_argument("--steps", type=int, default=60, help="the DMD stage's steps, and the control's (default 60)")
    ap.add_argument("--param", type=param_pair, action="append", default=[],
                    help="a DMD stage param override, e.g. gen_every=5 (repeatable)")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--tag", type=output_tag, default="heldout", help="name of the outputs, dmd_latent_<tag>.* (default: heldout)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps: expected >= 1, got {args.steps}")
    dmd_params = dict(args.param)
    unknown = set(dmd_params) - set(score_distill.STAGE.params)
    if unknown:
        ap.error(f"--param: unknown score_distill param(s) {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.seeds, args.cache / "dmd-latent", args.out, args.tag, args.steps, dmd_params)


if __name__ == "__main__":
    main()

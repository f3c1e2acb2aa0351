"""The paper's claims tested on the quality benchmark's rows, seed for seed.

Rows carry a `seed` (the training seed; the teacher has one model, seed None). Methods share the seed
set, so each claim is a paired comparison: per seed, the difference between the two methods on the same
evaluation prompts and noise; then the mean and sd of that difference over the seeds and a one-sided
paired t statistic. Verdicts:

* "supported": the mean difference goes the claimed way and t exceeds the one-sided 95% critical value
  of Student's t with n - 1 degrees of freedom (2.92 for 3 seeds): few seeds make this a high bar;
* "contradicted": the same, the other way;
* "inconclusive": neither (the seeds disagree or the difference is within their spread).
"""
from __future__ import annotations

import math
import statistics

from training.diffusion import recommended_eta

# one-sided 95% critical values of Student's t by degrees of freedom; above 30 the df-30 value (conservative)
T_CRIT_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
             10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734,
             19: 1.729, 20: 1.725, 21: 1.721, 22: 1.717, 23: 1.714, 24: 1.711, 25: 1.708, 26: 1.706, 27: 1.703,
             28: 1.701, 29: 1.699, 30: 1.697}
STEPS = (1, 2, 4, 8)


def values(rows, model, steps, eta, metric) -> dict:
    """seed -> metric of `model` at (steps, eta)."""
    return {r["seed"]: r[metric] for r in rows if r["model"] == model and r["steps"] == steps and r["eta"] == eta}


def mean_sd(vals) -> tuple[float, float]:
    vals = list(vals)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def best_eta(rows, model, steps, metric="align") -> float:
    """The eta at which `model` has its best mean `metric` at `steps` (its own best sampler); None if it was
    not evaluated there."""
    etas = sorted({r["eta"] for r in rows if r["model"] == model and r["steps"] == steps})
    if not etas:
        return None  # not evaluated at that step count
    return max(etas, key=lambda e: statistics.fmean(values(rows, model, steps, e, metric).values()))


def paired(a: dict, b: dict, lower_is_better=False) -> dict:
    """a - b per shared seed, its mean / sd, t and a verdict on "a is better than b"."""
    seeds = sorted(set(a) & set(b), key=str)
    diffs = [a[s] - b[s] for s in seeds]
    if lower_is_better:
        diffs = [-d for d in diffs]
    m, sd = mean_sd(diffs)
    n = len(diffs)
    t = m / (sd / math.sqrt(n)) if sd > 0 else (math.inf if m > 0 else -math.inf if m < 0 else 0.0)
    crit = T_CRIT_95.get(n - 1, T_CRIT_95[30])
    verdict = "supported" if n > 1 and t > crit else "contradicted" if n > 1 and t < -crit else "inconclusive"
    sign = -1 if lower_is_better else 1
    return {"seeds": seeds, "diff_per_seed": [sign * d for d in diffs], "mean_diff": sign * m, "sd_diff": sd,
            "t": t, "t_crit": crit, "verdict": verdict,
            "seeds_agreeing": sum(d > 0 for d in diffs)}


def claim_a(rows, names, steps) -> dict:
    """TSCD's k-step LoRAs closer to the teacher's 25-step ODE solution than CD at k = 2 / 4 / 8 (eta 0)."""
    out = {}
    for k in (k for k in (2, 4, 8) if k in steps):
        tscd, cd = names["snapshot"][k], names["cd_full"]
        out[k] = {"dist25": paired(values(rows, tscd, k, 0.0, "dist25"), values(rows, cd, k, 0.0, "dist25"), True),
                  "align": paired(values(rows, tscd, k, 0.0, "align"), values(rows, cd, k, 0.0, "align"))}
    return {"claim": "(a) TSCD's k-step LoRAs are closer to the teacher's trajectory than CD at 2/4/8 steps "
                     "(distance to teacher-25, eta 0)", "by_steps": out,
            "verdict": overall([out[k]["dist25"]["verdict"] for k in out])}


def claim_b(rows, names, steps) -> dict:
    """The unified LoRA is flat from 1 to 8 steps (align spread <= 0.1) and at least CD's align everywhere."""
    uni, cd = names["unified"], names["cd_full"]
    out = {}
    for label, eta_of in (("recommended eta", lambda m, s: recommended_eta(s)), ("own best eta", None)):
        pick = eta_of or (lambda m, s: best_eta(rows, m, s))
        means = {s: mean_sd(values(rows, uni, s, pick(uni, s), "align").values())[0] for s in steps}
        vs_cd = {s: paired(values(rows, uni, s, pick(uni, s), "align"), values(rows, cd, s, pick(cd, s), "align"))
                 for s in steps}
        spread = max(means.values()) - min(means.values())
        out[label] = {"align_by_steps": means, "spread": spread, "flat": spread <= 0.1, "vs_cd": vs_cd,
                      "eta": {s: pick(uni, s) for s in steps}, "cd_eta": {s: pick(cd, s) for s in steps}}
    rec = out["recommended eta"]
    below = [s for s in steps if rec["vs_cd"][s]["verdict"] == "contradicted"]
    at_least = all(rec["vs_cd"][s]["mean_diff"] >= 0 for s in steps)
    verdict = ("supported" if rec["flat"] and at_least else
               "contradicted" if not rec["flat"] or below else "inconclusive")
    return {"claim": "(b) the unified LoRA is flat from 1 to 8 steps (align spread <= 0.1) and at least CD's "
                     "align at every step count", "by_sampler": out, "verdict": verdict}


def later_stage_claim(rows, names, row, control, metric, steps, text, lower_is_better=False) -> dict:
    """`row` vs its same-budget control at the recommended eta for each of `steps`, and the mean over them."""
    a, b = names[row], names[control]
    by = {s: paired(values(rows, a, s, recommended_eta(s), metric), values(rows, b, s, recommended_eta(s), metric),
                    lower_is_better) for s in steps}
    pooled = paired(mean_over_steps(rows, a, steps, metric), mean_over_steps(rows, b, steps, metric), lower_is_better)
    return {"claim": text, "metric": metric, "by_steps": by, "mean_over_steps": pooled, "verdict": pooled["verdict"]}


def mean_over_steps(rows, model, steps, metric) -> dict:
    """seed -> mean of `metric` over `steps`, each at its recommended eta."""
    per = [values(rows, model, s, recommended_eta(s), metric) for s in steps]
    return {seed: statistics.fmean(p[seed] for p in per) for seed in per[0]}


def overall(verdicts) -> str:
    if all(v == "supported" for v in verdicts):
        return "supported"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted" if all(v == "contradicted" for v in verdicts) else "mixed"
    return "inconclusive" if not any(v == "supported" for v in verdicts) else "partly supported"


# the rows each claim compares (a run of a subset of rows, --rows, tests only the claims it has rows for)
CLAIM_ROWS = {"a": ("tscd", "cd_full", "cd_last"), "b": ("unified", "cd_full", "tscd"), "c": ("feedback", "control"),
              "d": ("dmd", "control"), "e": ("adversarial", "control")}


def all_claims(rows, names, steps=STEPS) -> dict:
    """Every claim whose rows were run, on the step counts evaluated (`steps`; the full run: 1 / 2 / 4 / 8)."""
    low = tuple(s for s in (1, 2) if s in steps)
    tests = {
        "a": lambda: claim_a(rows, names, steps),
        "b": lambda: claim_b(rows, names, steps),
        "c": lambda: later_stage_claim(rows, names, "feedback", "control", "align", tuple(steps),
                                       "(c) feedback raises align over a same-budget control (mean over 1/2/4/8 steps)"),
        "d": lambda: later_stage_claim(rows, names, "dmd", "control", "fd", (1,),
                                       "(d) DMD lowers 1-step FD over a same-budget control", lower_is_better=True),
        "e": lambda: {**later_stage_claim(rows, names, "adversarial", "control", "align", low,
                                          "(e) the adversarial term helps at 1-2 steps (align; FD below)"),
                      "fd": later_stage_claim(rows, names, "adversarial", "control", "fd", low, "", lower_is_better=True)},
    }
    have = {r["row"] for r in rows}
    return {key: test() for key, test in tests.items() if set(CLAIM_ROWS[key]) <= have}

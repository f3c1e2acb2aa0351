"""The quality benchmark's outputs: quality_<tag>.json (every row per seed, the summary, the claims),
quality_<tag>.md (claims with verdicts, then tables of mean +- sd over seeds), one chart per claim
(quality_<tag>_claim_<a..e>.png) and the sample grid (quality_<tag>_samples.png)."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import plans
from benchmarks.chart import claim_chart, sample_grid
from benchmarks.claims import STEPS, best_eta
from benchmarks.report import write_atomic_text
from training.diffusion import recommended_eta

TEACHER = "teacher DDIM + CFG"


def cell(summary, model, steps, eta):
    return next((c for c in summary if c["model"] == model and c["steps"] == steps and c["eta"] == eta), None)


def pm(c, metric, digits=3) -> str:
    if c is None or c[metric] is None:
        return "-"
    return f"{c[metric]:.{digits}f}" + (f" ± {c[metric + '_sd']:.{digits}f}" if c["n_seeds"] > 1 else "")


def series(summary, model, metric, eta_of) -> dict:
    """{steps: (mean, sd)} of `model` at eta_of(steps) (None: skip)."""
    out = {}
    for s in STEPS:
        c = cell(summary, model, s, eta_of(s))
        if c is not None and c[metric] is not None:
            out[s] = (c[metric], c[metric + "_sd"])
    return out


def model_table(summary, models, eta_of, title) -> str:
    head = ("| model | " + " | ".join(f"align {s}" for s in STEPS) + " | " + " | ".join(f"FD {s}" for s in STEPS)
            + " | dist25 at 4 | diversity at 4 |\n|---|" + "---|" * (2 * len(STEPS) + 2) + "\n")
    lines = []
    for m in models:
        cells = [cell(summary, m, s, eta_of(m, s)) for s in STEPS]
        lines.append(f"| {m} | " + " | ".join(pm(c, "align") for c in cells) + " | "
                     + " | ".join(pm(c, "fd", 1) for c in cells) + f" | {pm(cells[2], 'dist25')} | "
                     + f"{pm(cells[2], 'diversity')} |")
    return f"**{title}**\n\n" + head + "\n".join(lines) + "\n"


def claims_section(result) -> str:
    lines = ["| claim | verdict | evidence (paired over seeds: mean difference ± sd, t, seeds agreeing) |",
             "|---|---|---|"]
    for key, c in result["claims"].items():
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {claim_evidence(key, c)} |")
    return "\n".join(lines) + "\n"


def fmt_pair(p, digits=3) -> str:
    return (f"{p['mean_diff']:+.{digits}f} ± {p['sd_diff']:.{digits}f}, t {p['t']:.1f}, "
            f"{p['seeds_agreeing']}/{len(p['seeds'])}")


def claim_evidence(key, c) -> str:
    if key == "a":
        return "; ".join(f"{k} steps: dist25 {fmt_pair(v['dist25'])} (align {fmt_pair(v['align'])})"
                         for k, v in c["by_steps"].items())
    if key == "b":
        rec = c["by_sampler"]["recommended eta"]
        best = c["by_sampler"]["own best eta"]
        return (f"recommended eta: spread {rec['spread']:.3f}, vs CD per step count "
                + ", ".join(f"{s}: {fmt_pair(p)}" for s, p in rec["vs_cd"].items())
                + f"; own best eta: spread {best['spread']:.3f}, vs CD "
                + ", ".join(f"{s}: {fmt_pair(p)}" for s, p in best["vs_cd"].items()))
    text = f"{c['metric']} mean over steps: {fmt_pair(c['mean_over_steps'], 2 if c['metric'] == 'fd' else 3)}; " + ", ".join(
        f"{s} steps {fmt_pair(p, 2 if c['metric'] == 'fd' else 3)}" for s, p in c["by_steps"].items())
    if "fd" in c:
        text += f"; FD: {fmt_pair(c['fd']['mean_over_steps'], 1)}"
    return text


def claim_charts(result, out_dir: Path, tag: str):
    summ, rec = result["summary"], (lambda s: recommended_eta(s))
    r = plans.ROWS
    snaps = {plans.snapshot_label(k): {k: v for k, v in series(summ, plans.snapshot_label(k), "dist25",
                                                                  lambda s: 0.0).items()} for k in plans.SNAPSHOTS}
    charts = {
        "a": ("(a) distance to the teacher's 25-step output, eta 0 (lower is closer to the trajectory)", [
            {"title": "dist to teacher-25 (eta 0)", "series": {
                **snaps, r["tscd"]: series(summ, r["tscd"], "dist25", lambda s: 0.0),
                r["cd_full"]: series(summ, r["cd_full"], "dist25", lambda s: 0.0),
                r["cd_last"]: series(summ, r["cd_last"], "dist25", lambda s: 0.0)}}]),
        "b": ("(b) unified LoRA vs CD: align per step count (recommended eta: 1 at 1 step, 0.3 above)", [
            {"title": "align", "ymax": 1.0, "series": {m: series(summ, m, "align", rec) for m in (
                r["unified"], r["cd_full"], r["tscd"])} | {TEACHER: series(summ, TEACHER, "align", lambda s: 0.0)}}]),
    }
    for key, row, metrics in (("c", "feedback", ("align", "fd")), ("d", "dmd", ("fd", "align")),
                              ("e", "adversarial", ("align", "fd"))):
        if key not in result["claims"]:
            continue
        charts[key] = (result["claims"][key]["claim"] + " (recommended eta)", [
            {"title": "FD (log scale)" if m == "fd" else m, "ymax": 1.0 if m == "align" else None, "log": m == "fd",
             "series": {x: series(summ, x, m, rec) for x in (r[row], r["control"], r["tscd"])}} for m in metrics])
    for key, (title, panels) in ((k, v) for k, v in charts.items() if k in result["claims"]):
        claim_chart(out_dir / f"quality_{tag}_claim_{key}.png", title, panels,
                    note=f"verdict: {result['claims'][key]['verdict']}; mean over seeds {result['seeds']}, bars +-1 sd")


def write_quality_results(result, samples, out_dir: Path, tag: str):
    write_atomic_text(out_dir / f"quality_{tag}.json", json.dumps(result, indent=1))
    summ = result["summary"]
    models = list(dict.fromkeys(c["model"] for c in summ if c["steps"] in STEPS and c["row"] in plans.ROWS))
    m = result["machine"]
    load = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    text = (f"# Quality benchmark ({tag})\n\nMachine: {m['cpu']}, {m['cores']} cores (load average "
            f"{load(result['load_average_start'])} at start, {load(result['load_average_end'])} at end), torch "
            f"{m['torch']}, {m['torch_threads']} torch thread(s), {m['gpu']}. Total {result['total_s']} s (training or "
            f"loading {result['train_or_load_s']} s). Seeds {result['seeds']} for every student row.\n\n"
            f"Teacher at 25 steps (DDIM, CFG): align {pm(cell(summ, TEACHER, 25, 0.0), 'align')}, FD "
            f"{pm(cell(summ, TEACHER, 25, 0.0), 'fd', 1)}, diversity {pm(cell(summ, TEACHER, 25, 0.0), 'diversity')}.\n\n"
            "## Claims\n\n" + claims_section(result) + "\n## Rows (mean ± sd over seeds)\n\n"
            + model_table(summ, [TEACHER] + models, lambda mm, s: 0.0 if mm == TEACHER else recommended_eta(s),
                          "At the recommended eta (1 at 1 step, 0.3 above; teacher: DDIM)") + "\n"
            + model_table(summ, models, lambda mm, s: best_eta(result["rows"], mm, s),
                          "Each model at its own best eta per step count (by align)") + "\n"
            + model_table(summ, [TEACHER] + models, lambda mm, s: 0.0, "At eta 0 (DDIM-like, the trajectory view)")
            + "\n" + snapshot_table(summ) + "\n" + result["notes"] + "\n")
    write_atomic_text(out_dir / f"quality_{tag}.md", text)
    claim_charts(result, out_dir, tag)
    sample_grid(samples, out_dir / f"quality_{tag}_samples.png")


def snapshot_table(summ) -> str:
    lines = ["**TSCD's k-step LoRAs at their own step count**\n", "| LoRA | eta | align | FD | dist25 | diversity |",
             "|---|---|---|---|---|---|"]
    for k in plans.SNAPSHOTS:
        for eta in (0.0, 0.3, 1.0):
            c = cell(summ, plans.snapshot_label(k), k, eta)
            if c:
                lines.append(f"| {c['model']} | {eta} | {pm(c, 'align')} | {pm(c, 'fd', 0)} | {pm(c, 'dist25')} | "
                             f"{pm(c, 'diversity')} |")
    return "\n".join(lines) + "\n"

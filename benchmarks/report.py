"""Benchmark outputs: the log line, the machine a run was measured on, and the JSON / Markdown / PNG files
written to benchmarks/results/ (shared by the quality and speed benchmarks)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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

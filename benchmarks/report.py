"""Benchmark outputs shared by the quality and speed benchmarks: the log line, the machine a run was
measured on, benchmarks/results/ and an atomic text writer."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
def default_cache() -> Path:
    """Where the quality benchmarks keep trained models (teacher, classifiers, engine run folders):
    $HYPERSD_BENCH_CACHE as it is when called, else ~/.cache/hypersd-bench."""
    return Path(os.environ.get("HYPERSD_BENCH_CACHE", "~/.cache/hypersd-bench")).expanduser()


def output_tag(text: str) -> str:
    """argparse type of --tag: the name in the output files, letters, digits, - or _."""
    import argparse

    if not text.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected letters, digits, - or _, got {text!r}")
    return text


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

def write_atomic_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

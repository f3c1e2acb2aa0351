"""Progress: tqdm bar (stage, loss, it/s), a JSONL log, optional TensorBoard (only if installed)."""
from __future__ import annotations

import json
import os
import time

from training.files import save_text_atomic, writing


class RunLogger:
    def __init__(self, out_dir, total, start, enabled=True, tensorboard=False, show_bar=True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self.bar, self.tb = None, None
        if not enabled:
            return
        truncate_log(self.path, start)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, disable=not show_bar)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                print("output.tensorboard: tensorboard is not installed; logging to log.jsonl only")

    def log(self, step, stage_desc, values):
        if not self.enabled:
            return
        self.bar.set_description(stage_desc)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float)})
        self.bar.update(1)
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "stage": stage_desc, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()


def truncate_log(path, step) -> None:
    """log.jsonl keeps the rows up to `step` (the checkpoint a run resumes from): the steps a killed run logged
    after it, and a line cut by the kill, are dropped, so no step appears twice. Rewritten atomically."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    if len(keep) != len(lines):
        save_text_atomic("".join(line + "\n" for line in keep), path)

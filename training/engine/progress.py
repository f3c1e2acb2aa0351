"""Progress: tqdm bar (stage, loss, it/s), a JSONL log, optional TensorBoard (only if installed)."""
from __future__ import annotations

import json
import os
import time


class RunLogger:
    def __init__(self, out_dir, total, start, enabled=True, tensorboard=False, show_bar=True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "log.jsonl")
        self.bar, self.tb = None, None
        if not enabled:
            return
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
        with open(self.path, "a") as f:
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

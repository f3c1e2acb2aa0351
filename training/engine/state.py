"""The run state the engine's phases share (built by setup.py, advanced by loop.py, read by finish.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trainables:
    """Everything that trains: one LoRA adapter per stage group on the shared UNet, the stages' own
    networks, and the optimizer over the adapters."""
    groups: list                 # LoRA groups in order (stages.plan_groups, minus a full-UNet score_distill)
    params: dict                 # group -> its adapter's parameters
    init_rank: int               # rank of the frozen model.init_lora adapter (0: none)
    stack: Any                   # models.adapters.AdapterStack
    ema: Any                     # models.adapters.EMA of the TSCD LoRA (the consistency target)
    persistent: dict             # stage-owned networks and optimizers (checkpointed): discriminator, fake score
    opt: Any                     # AdamW over every group's adapter (one param group per group)
    lr_sched: Any
    student: Any                 # the UNet as accelerate prepared it (DDP-wrapped when distributed)
    unet: Any                    # the same UNet unwrapped


@dataclass
class RunData:
    dataset: Any                 # pixel dataset, or a CachedDataset with data.cache_dir (None: streamed)
    sampler: Any                 # data.sampler.BucketBatchSampler over global micro-batches (None: streamed)
    empty_text: dict = None      # the empty prompt's embeddings, encoded once (the unconditional branch)
    cached_text: Any = None      # data.run_cache.CachedText when data.cache_dir is set
    cache_stats: dict = None
    stream: Any = None           # data.webdataset.WebDatasetSource (source: webdataset) instead of dataset + sampler


@dataclass
class Run:
    cfg: Any
    accelerator: Any
    out_dir: str
    base: Any                    # models.base.Base: the teacher (the shared UNet with adapters off)
    data: RunData
    resources: dict              # {stage index: object from Stage.preflight}
    full_stage: Any = None       # the score_distill stage with mode full, if any
    train: Trainables = None
    resume_dir: str = None
    step: int = 0                # optimizer steps done
    t_start: float = 0.0
    losses: dict = field(default_factory=dict)   # stage index -> [global loss per step]
    logs: dict = field(default_factory=dict)     # stage index -> [logged components per step]
    full_unet: Any = None        # the trained 1-step UNet copy (mode full), for finish
    train_seconds: float = 0.0
    summary: bool = True         # print where the files are, quality figures and usage at the end
    output_started: str = ""     # output.prepare_output: "made" / "filled" the folder, or "resumed" in it

    @property
    def device(self):
        return self.accelerator.device

    @property
    def dtype(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.optim.mixed_precision, torch.float32)

    def encode(self, prompts, size_hw=None, crop_tl=None, target_hw=None):
        from training.models.text import encode_prompts

        return encode_prompts(self.base, prompts, self.device, size_hw, crop_tl, target_hw)

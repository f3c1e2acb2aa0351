"""Stage registry: each `stages[i].type` in the config names one file here with one `Stage` object.

Stage types form LoRA groups trained in this order, each as its own adapter on top of the earlier
(frozen) ones: tscd / adversarial -> feedback -> score_distill. The protocol is in stages/base.py;
to add a stage type, add a file with a `STAGE = YourStage()` and one line to STAGE_MODULES.
"""
from __future__ import annotations

import difflib
import importlib

STAGE_MODULES = {
    "tscd": "training.stages.tscd",
    "adversarial": "training.stages.adversarial",      # TSCD + adversarial term
    "feedback": "training.stages.feedback",            # ReFL human feedback, its own LoRA
    "score_distill": "training.stages.score_distill",  # DMD-style 1-step, its own LoRA (or a full UNet)
}
GROUP_OF = {"tscd": "tscd", "adversarial": "tscd", "feedback": "feedback", "score_distill": "score_distill"}
GROUP_ORDER = ("tscd", "feedback", "score_distill")
ADAPTER_OF = {"tscd": "default", "feedback": "feedback", "score_distill": "dmd"}  # group -> peft adapter name


def known_stage_types() -> list[str]:
    return sorted(STAGE_MODULES)


def get_stage(stage_type: str):
    """The `Stage` object of a stage type."""
    return importlib.import_module(STAGE_MODULES[stage_type]).STAGE


def plan_groups(stages) -> list[str]:
    """Stage groups in order of first appearance (each group trains its own LoRA adapter)."""
    return list(dict.fromkeys(GROUP_OF[s.type] for s in stages))


def validate_stage_plan(stages, init_lora: str = "") -> None:
    """Check the config's `stages` list before any training starts; ValueError names the config key.

    A plan that starts after TSCD needs the TSCD LoRA underneath (`model.init_lora`); score
    distillation is 1-step (segments: 1).
    """
    last = -1
    for i, s in enumerate(stages):
        if s.type not in GROUP_OF:
            near = difflib.get_close_matches(s.type, list(GROUP_OF), n=1)
            raise ValueError(f"config key 'stages[{i}].type': unknown stage type {s.type!r}"
                             + (f"; did you mean {near[0]!r}?" if near else f"; known: {sorted(GROUP_OF)}"))
        rank = GROUP_ORDER.index(GROUP_OF[s.type])
        if rank < last:
            raise ValueError(f"config key 'stages[{i}].type': {s.type!r} after {stages[i - 1].type!r} is out of "
                             "order; the order is tscd/adversarial -> feedback -> score_distill")
        last = rank
        if s.type == "score_distill" and s.segments != 1:
            raise ValueError(f"config key 'stages[{i}].segments': score_distill trains 1-step generation; "
                             f"set segments: 1 (got {s.segments})")
    if stages and GROUP_OF.get(stages[0].type) != "tscd" and not init_lora:
        raise ValueError(f"config key 'stages[0].type': {stages[0].type!r} runs on top of a TSCD LoRA: put "
                         "tscd stages before it or set model.init_lora to a previous run's LoRA .safetensors")

"""The quality benchmark's students: which engine runs train them, per training seed.

Every row is a run of the product's training engine (benchmarks/stages.py adapts the task to it), and
every row is trained once per seed of the same seed set (the run's `seed`: its batch order, noise and
LoRA init), so methods are compared seed for seed:

* `cd_full`: CD as LCM-LoRA trains it, one `tscd` stage with 1 segment, the whole distillation budget N;
* `cd_last`: the same with only N / 4 steps, the budget TSCD's final k = 1 stage gets;
* `tscd`: `tscd` k = 8 -> 4 -> 2 -> 1, N / 4 steps each, with the k-step LoRAs kept as each stage ends
  (`output.stage_snapshots`);
* on top of each seed's TSCD LoRA (`model.init_lora`, frozen; a fresh rank-`stage_rank` LoRA trains), one
  equal extra budget E each:
  `control` (more TSCD: k = 2 for E / 2 then k = 1 for E / 2), `adversarial` (the same two stages with
  the adversarial term on: its ablation is exactly the control), `feedback` (ReFL, E steps), `dmd`
  (score distillation, E steps); and `unified`: adversarial -> feedback -> DMD in one run (3 E steps),
  the product's whole pipeline after TSCD.
"""
from __future__ import annotations

# Row id -> (label, run on top of the TSCD LoRA?)
ROWS = {
    "cd_full": "CD (LCM recipe), TSCD's whole budget",
    "cd_last": "CD (LCM recipe), TSCD's last-stage budget",
    "tscd": "TSCD 8-4-2-1 (final)",
    "control": "TSCD + more TSCD (control)",
    "adversarial": "TSCD + adversarial",
    "feedback": "TSCD + feedback (ReFL)",
    "dmd": "TSCD + DMD",
    "unified": "TSCD + adversarial + feedback + DMD (unified)",
}
ON_TSCD = ("control", "adversarial", "feedback", "dmd", "unified")
# TSCD's k-segment LoRAs (stages/snapshots/) and the step count each is evaluated at (its native one)
SNAPSHOTS = {8: "1_tscd_k8", 4: "2_tscd_k4", 2: "3_tscd_k2"}


def snapshot_label(k: int) -> str:
    return f"TSCD k={k} LoRA (at its {k} steps)"


def claim_names() -> dict:
    """Row id -> model label, plus TSCD's snapshot labels: how benchmarks/claims.py finds each row."""
    return {**ROWS, "snapshot": {k: snapshot_label(k) for k in SNAPSHOTS}}


def later_stage_params(cfg, reward_weights: str) -> dict:
    """The feedback and DMD stage params: the product's defaults (training/config.py's default plan) but
    for the benchmark's reward and teacher CFG, and the benchmark's stage lr (a fresh stage LoRA)."""
    feedback = {"reward": "benchmarks.stages:AttributeReward", "reward_weights": reward_weights,
                "alpha": cfg["feedback_alpha"], "reg_weight": 1.0, "lr": cfg["stage_lr"]}
    dmd = {"lr": cfg["stage_lr"], "guidance": cfg["guidance"], "gen_every": cfg["dmd_gen_every"], "reg_weight": 1.0}
    return {"feedback": feedback, "score_distill": dmd}


def tscd_pair(kind: str, steps: int) -> list[dict]:
    """k = 2 then k = 1 (half the steps each): the control's and the adversarial row's stages."""
    return [{"type": kind, "segments": 2, "steps": steps // 2}, {"type": kind, "segments": 1, "steps": steps - steps // 2}]


def row_runs(cfg, reward_weights: str) -> dict:
    """Row id -> {stages, rank, lr, snapshots}; rows in ON_TSCD start from that seed's TSCD LoRA."""
    n, e = cfg["distill_steps"], cfg["stage_steps"]
    params = later_stage_params(cfg, reward_weights)
    feedback = {"type": "feedback", "segments": 1, "steps": e, "params": params["feedback"]}
    dmd = {"type": "score_distill", "segments": 1, "steps": e, "params": params["score_distill"]}
    student = {"rank": cfg["student_rank"], "lr": cfg["distill_lr"], "snapshots": False}
    later = {"rank": cfg["stage_rank"], "lr": cfg["distill_lr"], "snapshots": False}
    return {
        "cd_full": dict(stages=[{"type": "tscd", "segments": 1, "steps": n}], **student),
        "cd_last": dict(stages=[{"type": "tscd", "segments": 1, "steps": n // 4}], **student),
        "tscd": dict(student, stages=[{"type": "tscd", "segments": k, "steps": n // 4} for k in (8, 4, 2, 1)],
                     snapshots=True),
        "control": dict(stages=tscd_pair("tscd", e), **later),
        "adversarial": dict(stages=tscd_pair("adversarial", e), **later),
        "feedback": dict(stages=[feedback], **later),
        "dmd": dict(stages=[dmd], **later),
        "unified": dict(stages=[*tscd_pair("adversarial", e), feedback, dmd], **later),
    }

"""Merge of stage LoRAs: exact rank concatenation, SVD re-rank, CLI, live-model bridges."""
import subprocess
import sys

import pytest
import torch

from training.models.tiny import tiny_unet
from training.lora_files.kohya import LoraModule, load_kohya, save_kohya
from training.lora_files.merge import merge_exact, merge_files, svd_rerank
from training.lora_files.peft_bridge import fold_kohya_into, peft_to_kohya
from training.models.adapters import add_adapter
from training.stages import validate_stage_plan


def random_lora(seed, rank, alpha):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": LoraModule(r(rank, 32), r(32, rank), alpha),
        "lora_unet_down_blocks_0_resnets_0_conv1": LoraModule(r(rank, 32, 3, 3), r(32, rank, 1, 1), alpha),
        f"lora_unet_only_in_{seed}": LoraModule(r(rank, 16), r(8, rank), alpha),
    }


def test_exact_merge_equals_sum_of_deltas_from_files(tmp_path):
    a, b = random_lora(1, 4, 2.0), random_lora(2, 8, 8.0)  # alpha != rank on purpose
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    save_kohya(str(pa), a)
    save_kohya(str(pb), b)
    merge_files([str(pa), str(pb)], str(out), weights=[1.0, 0.5])
    fa, fb, fm = load_kohya(str(pa)), load_kohya(str(pb)), load_kohya(str(out))
    assert set(fm) == set(fa) | set(fb)
    worst = 0.0
    for name, m in fm.items():
        want = (fa[name].delta() if name in fa else 0) + (0.5 * fb[name].delta() if name in fb else 0)
        err = (m.delta() - want).abs().max().item() / want.abs().max().item()
        worst = max(worst, err)
    print("merge max relative error", worst)
    assert worst < 1e-5
    conv = fm["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.down.shape == (12, 32, 3, 3) and conv.up.shape == (32, 12, 1, 1) and conv.alpha == 12


def test_svd_rerank_is_exact_at_full_rank_and_reports_error():
    merged = merge_exact([random_lora(1, 4, 4.0), random_lora(2, 4, 4.0)])
    full, errors, overall = svd_rerank(merged, 8)
    assert overall < 1e-10 and max(errors.values()) < 1e-10
    low, errors, overall = svd_rerank(merged, 2)
    print("svd rank 2 overall rel error", overall)
    assert 0.05 < overall < 1 and all(0 < e < 1 for e in errors.values())
    # Eckart-Young: the error equals the norm of the dropped singular values
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    s = torch.linalg.svdvals(merged[name].delta().reshape(32, -1))
    assert errors[name] == pytest.approx((s[2:].norm() / s.norm()).item(), rel=1e-9)
    assert low[name].down.shape == (2, 32, 3, 3) and low[name].up.shape == (32, 2, 1, 1)


def test_incompatible_shapes_and_bad_weights():
    a = {"lora_unet_x": LoraModule(torch.randn(2, 4), torch.randn(8, 2), 2.0)}
    b = {"lora_unet_x": LoraModule(torch.randn(2, 5), torch.randn(8, 2), 2.0)}
    with pytest.raises(ValueError, match="lora_unet_x"):
        merge_exact([a, b])
    with pytest.raises(ValueError, match="--weights"):
        merge_exact([a, a], [1.0])


def test_cli(tmp_path):
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "x.safetensors"
    save_kohya(str(pa), random_lora(1, 4, 4.0))
    save_kohya(str(pb), random_lora(2, 4, 4.0))
    res = subprocess.run([sys.executable, "-m", "training.merge", str(pa), str(pb), "--out", str(out),
                          "--weights", "1,1", "--rank", "3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "svd_overall_rel_error" in res.stdout
    assert all(m.rank == 3 for m in load_kohya(str(out)).values())


def test_cli_bad_inputs_one_error_exit_2_nothing_written(tmp_path):
    """A pickle, a missing file, a wrong weight count: one message naming each, exit 2, no traceback, no output."""
    import pickle

    good, pkl, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "x.safetensors"
    save_kohya(str(good), random_lora(1, 4, 4.0))
    pkl.write_bytes(pickle.dumps({"w": 1}))
    res = subprocess.run([sys.executable, "-m", "training.merge", str(good), str(pkl), str(tmp_path / "gone.safetensors"),
                          "--out", str(out), "--weights", "1,1"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert str(pkl) in res.stderr and "gone.safetensors" in res.stderr and "--weights" in res.stderr
    assert not out.exists()


def test_peft_roundtrip_and_fold_match_live_lora():
    unet = tiny_unet()
    add_adapter(unet, "s1", 4, 2.0, trainable=True)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=c).sample
    modules = peft_to_kohya(unet, "s1")
    assert any(m.down.ndim == 4 for m in modules.values()), "conv LoRAs expected"
    plain = tiny_unet()
    fold_kohya_into(plain, modules)
    with torch.no_grad():
        got = plain(x, t, encoder_hidden_states=c).sample
    assert (got - want).abs().max().item() < 1e-4


def test_stage_plan_errors():
    from training.config import StageConfig as S

    validate_stage_plan([S("tscd", 8), S("adversarial", 1), S("feedback", 1), S("score_distill", 1)])
    validate_stage_plan([S("score_distill", 1)], init_lora="tscd.safetensors")
    with pytest.raises(ValueError, match=r"stages\[0\].type.*model.init_lora"):
        validate_stage_plan([S("feedback", 1), S("score_distill", 1)])
    with pytest.raises(ValueError, match=r"stages\[2\].type.*out of order"):
        validate_stage_plan([S("tscd", 8), S("score_distill", 1), S("feedback", 1)])
    with pytest.raises(ValueError, match=r"stages\[1\].type.*did you mean 'feedback'"):
        validate_stage_plan([S("tscd", 8), S("feedbak", 1)])
    with pytest.raises(ValueError, match=r"stages\[1\].segments.*segments: 1"):
        validate_stage_plan([S("tscd", 8), S("score_distill", 2)])


@pytest.mark.parametrize("merge_rank", [0, 3])
def test_run_export_writes_stage_files_and_unified_lora(tmp_path, merge_rank):
    """training.run's export: one file per stage group + the unified file (exact, or SVD re-ranked with the
    error reported against the sum of the stage deltas)."""
    from training.config import load_config
    from training.lora_files.export import export_stages_and_merge

    cfg = load_config(None, ["lora.rank=4", "lora.alpha=2", f"output.merge_rank={merge_rank}"])
    unet = tiny_unet()
    torch.manual_seed(0)
    params = add_adapter(unet, "default", 4, 2.0, cfg.lora.targets) + add_adapter(unet, "feedback", 4, 2.0, cfg.lora.targets)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    out = tmp_path / "unified.safetensors"
    report = export_stages_and_merge(unet, str(tmp_path), str(out), {}, [("tscd", "default"), ("feedback", "feedback")],
                                     cfg.output.merge_rank, cfg.lora.rank)
    stages = [load_kohya(p) for p in report["stage_files"]]
    unified = load_kohya(str(out))
    num = den = 0.0
    for name, m in unified.items():
        want = sum(s[name].delta() for s in stages if name in s)
        num, den = num + (m.delta() - want).norm().item() ** 2, den + want.norm().item() ** 2
    err = (num / den) ** 0.5
    print(f"merge_rank {merge_rank}: rank {report['rank']}, reported rel error {report['rel_error']:.3e}, "
          f"measured {err:.3e}")
    assert report["rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-9)
    if merge_rank:
        assert report["rank"] == 3 and 1e-3 < err < 1 and report["svd_rel_error"] == pytest.approx(err, rel=1e-3)
    else:
        assert report["rank"] == 8 and err < 1e-6


@pytest.mark.parametrize("name", ["eval", "train", "to", "my adapter"])
def test_adapter_names_that_would_shadow_module_methods_are_refused(name):
    with pytest.raises(ValueError, match="adapter name"):
        add_adapter(tiny_unet(), name, 2, 2.0)

"""Real-size shapes without real-size memory: the full-size benchmark's SD1.5 / SDXL networks built on the
meta device from their published configs, the trainer's rank-64 LoRA layout on them, and the pure parts
of the benchmark (memory-model fit, safetensors writer)."""
import pytest
import torch

from benchmarks.full_size_models import build_unet, meta_counts


@pytest.fixture(scope="module")
def counts():
    return {f: meta_counts(f) for f in ("sd15", "sdxl")}


def test_published_parameter_counts(counts):
    # the released models' parameter counts (diffusers: unet / vae / text_encoder(_2) of SD1.5 and SDXL base)
    assert counts["sd15"]["unet"] == 859_520_964
    assert counts["sdxl"]["unet"] == 2_567_463_684
    assert counts["sd15"]["vae"] == counts["sdxl"]["vae"] == 83_653_863
    assert counts["sd15"]["text_encoders"] == [123_060_480]
    assert counts["sdxl"]["text_encoders"] == [123_060_480, 694_659_840]
    # the memory model's constants are these counts
    from benchmarks import full_size_memory as fm

    for f in ("sd15", "sdxl"):
        assert fm.UNET_PARAMS[f] == counts[f]["unet"] and fm.TEXT_ENCODERS[f] == sum(counts[f]["text_encoders"])
        assert fm.VAE_PARAMS == counts[f]["vae"] and fm.REWARD_PARAMS == counts[f]["reward_clip_l_vision"]


@pytest.mark.parametrize("family, modules, params", [("sd15", 272, 63_770_624), ("sdxl", 784, 194_908_160)])
def test_rank64_lora_layout(family, modules, params):
    """The trainer's default targets at rank 64: SD1.5 = 272 modules = 816 kohya keys (down, up, alpha),
    63.8M fp32 parameters = the 255 MB file the issue measured; every module has its own kohya name."""
    from training.lora_files.kohya import kohya_name
    from training.models.adapters import UNET_LORA_TARGETS, add_adapter

    unet = build_unet(family, device="meta")
    add_adapter(unet, "default", 64, 64.0, UNET_LORA_TARGETS)
    paths = [p for p, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(paths) == modules and len({kohya_name(p) for p in paths}) == modules
    assert 3 * len(paths) == {"sd15": 816, "sdxl": 2352}[family]
    assert sum(p.numel() for n, p in unet.named_parameters() if ".default." in n) == params
    assert all(unet.get_submodule(p).lora_A["default"].weight.shape[0] == 64 for p in paths)


def test_transient_fit_and_borrowed_c0():
    from benchmarks.full_size_memory import fit, fits

    rows = [{"key": "sd15/bf16/ckpt/tscd", "x": x, "transient_gb": 0.5 + 0.002 * x} for x in (1024, 4096, 8192)]
    f = fit(rows)
    assert f["c0_gb"] == pytest.approx(0.5) and f["c1_gb"] == pytest.approx(0.002) and f["c0"] == "fitted"
    one = {"key": "sd15/bf16/ckpt/feedback", "x": 1024, "transient_gb": 3.0}
    both = fits({str(i): r for i, r in enumerate(rows + [one])})
    # one size: c0 comes from the same model's TSCD fit (grads and optimizer temporaries), c1 from the point
    assert both["sd15/bf16/ckpt/feedback"]["c0_gb"] == pytest.approx(0.5)
    assert both["sd15/bf16/ckpt/feedback"]["c1_gb"] == pytest.approx(2.5 / 1024)


def test_tensor_peak_counts_what_a_step_allocates():
    from benchmarks.full_size_step import TensorPeak

    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(256, 256)
    mb = 256 * 256 * 4
    tracker = TensorPeak()
    with tracker:
        y = (x @ w).relu()       # the matmul output (freed: relu saves its own output) and y
        y.sum().backward()       # y, the grad through relu and w's grad: 3 blocks at the peak
        tracker.mark("backward")
        w.data.mul_(0.5)         # in place: nothing new
        tracker.mark("in_place")
    assert 3 * mb <= tracker.marks["backward"] < 3 * mb + 1024  # + a few scalars
    assert tracker.marks["in_place"] == tracker.live  # no new storage after the first mark
    del y
    assert mb <= tracker.live < mb + 1024  # w.grad is what stays


def test_gpu_projection_adds_up_and_grows_with_batch():
    from benchmarks.full_size_memory import max_batch, project_gpu

    fit = {"c0_gb": 0.2, "c1_gb": 1e-4}
    p1, p2 = (project_gpu("sdxl", "tscd", "bf16", fit, 194_908_160, b) for b in (1, 2))
    assert p1["total_gb"] == pytest.approx(sum(p1["parts_gb"].values()))
    assert p1["parts_gb"]["unet_weights"] == pytest.approx(2 * 2_567_463_684 / 2**30)
    assert p2["total_gb"] - p1["total_gb"] == pytest.approx(1e-4 * 128 * 128)
    assert p1["parts_gb"]["text_encoders"] == pytest.approx(4 * (123_060_480 + 694_659_840) / 2**30)
    b = max_batch("sdxl", "tscd", "bf16", fit, 194_908_160, 24)
    assert project_gpu("sdxl", "tscd", "bf16", fit, 194_908_160, b)["total_gb"] <= 24
    assert project_gpu("sdxl", "tscd", "bf16", fit, 194_908_160, b + 1)["total_gb"] > 24


def test_streaming_safetensors_writer_round_trips(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.full_size_comfy import write_safetensors_streaming

    tensors = {"a": torch.randn(3, 5).half(), "b.alpha": torch.tensor(32.0, dtype=torch.float16),
               "c": torch.randn(2, 4, 3, 3).to(torch.bfloat16), "d": torch.arange(7)}
    path = str(tmp_path / "x.safetensors")
    write_safetensors_streaming(tensors, path, {"ss_network_dim": "64"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())

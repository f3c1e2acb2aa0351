"""Full-size ComfyUI benchmark: the pack's HyperSDLoraLoader vs core LoraLoader on real-size SD1.5 / SDXL
checkpoints with a kohya LoRA on every module (rank 64), and the TCD sampler's per-step cost vs core
euler / ddim at 1024 px SDXL latents. Runs in ComfyUI's own interpreter:

    COMFYUI_PATH=/work/ComfyUI /work/comfy-venv/bin/python -m benchmarks.full_size_comfy [--work /tmp/x]

Nothing is downloaded. The checkpoints are built with ComfyUI's own classes (the UNet from its LDM
UNetModel with the published SD1.5 / SDXL configs, the text encoders from the model config's
clip_target, the SD VAE) with random weights and written in ComfyUI's checkpoint layout
(model.state_dict_for_saving), fp16, into --work (default /tmp/hypersd-full-size-comfy), never the
repository. The LoRA names every linear / conv module of the UNet's blocks and of the text encoders
from ComfyUI's own LoRA key map (SD1.5: diffusers-style kohya names; SDXL: LDM-style names, as
sd-scripts writes them). Each step runs in a fresh process; large blocks are mmap-ed, so sampled RSS
follows live memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3
# ComfyUI's LDM UNet configs of the published models (comfy/model_detection.py detects these shapes)
LDM_UNETS = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
LORA_RANK, LORA_ALPHA = 64, 32.0
# CPU memory: SDXL's UNet and text encoders in bf16 (fp32 would be 13.6 GB before any LoRA patch)
LOAD_DTYPE = {"sd15": None, "sdxl": torch.bfloat16}


def comfy_nodes():
    """ComfyUI's own top-level nodes.py (LoraLoader, KSampler, the node registry): the same module name as
    this pack's `nodes` package, which nothing here imports (tests/test_layout.py checks imports by name)."""
    import importlib

    return importlib.import_module("nodes")


def bootstrap(comfy_path: str) -> None:
    """Make ComfyUI importable the way `main.py --cpu` runs it."""
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


# --- files -----------------------------------------------------------------------------------------

ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def write_safetensors_streaming(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """A safetensors file written tensor by tensor (safetensors.save_file holds a second copy of the whole
    state dict in memory: 7 GB more for SDXL); atomic via a temporary file."""
    header, offset = {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


@torch.no_grad()
def randomize(module, gen) -> None:
    """Random weights that keep activations finite: N(0, 1/fan_in) matrices and kernels, unit norm weights,
    zero biases (ComfyUI builds its layers uninitialised)."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
        elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
            p.fill_(1.0)
        else:
            p.zero_()


def build_models(family: str):
    """(BaseModel, CLIP, VAE state dict) from ComfyUI's own classes, random weights, fp16."""
    import comfy.model_detection
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    gen = torch.Generator().manual_seed(0)
    config = comfy.model_detection.model_config_from_unet_config(dict(LDM_UNETS[family], dtype=torch.float16))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({})
    randomize(model.diffusion_model, gen)
    clip = comfy.sd.CLIP(config.clip_target({}), model_options={"dtype": torch.float16})
    randomize(clip.cond_stage_model, gen)
    vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4).to(torch.float16)
    randomize(vae, gen)
    return config, model, clip, vae.state_dict()


def lora_names(model, clip, family: str) -> dict:
    """kohya name -> (ComfyUI weight key, shape) for every linear / conv weight of the UNet's blocks and
    every text-encoder module ComfyUI maps."""
    import comfy.lora
    import comfy.utils

    unet_sd = model.diffusion_model.state_dict()
    to_diffusers = {v: k[: -len(".weight")] for k, v in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items()
                    if k.endswith(".weight")}
    out = {}
    for k, t in unet_sd.items():
        if t.ndim < 2 or not k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) \
                or k.startswith("input_blocks.0."):
            continue
        ldm = k[: -len(".weight")]
        name = to_diffusers.get(k, ldm) if family == "sd15" else ldm
        out["lora_unet_" + name.replace(".", "_")] = ("diffusion_model." + k, tuple(t.shape))
    clip_sd = clip.cond_stage_model.state_dict()
    prefixes = ("lora_te_",) if family == "sd15" else ("lora_te1_", "lora_te2_")
    for name, target in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items():
        if isinstance(target, str) and name.startswith(prefixes) and target in clip_sd:
            out[name] = (target, tuple(clip_sd[target].shape))
    return out


def lora_state_dict(names: dict, gen) -> dict:
    sd = {}
    for name, (_, shape) in sorted(names.items()):
        kernel = shape[2:]
        sd[name + ".lora_down.weight"] = (torch.randn((LORA_RANK, shape[1], *kernel), generator=gen) * 0.01).half()
        sd[name + ".lora_up.weight"] = (torch.randn((shape[0], LORA_RANK, *(1,) * len(kernel)), generator=gen) * 0.01).half()
        sd[name + ".alpha"] = torch.tensor(LORA_ALPHA, dtype=torch.float16)
    return sd


def build_files(family: str, work: Path) -> dict:
    t0 = time.perf_counter()
    config, model, clip, vae_sd = build_models(family)
    sd = model.state_dict_for_saving(clip.get_sd(), vae_sd)
    ckpt = work / "checkpoints" / f"full_{family}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(sd, str(ckpt))
    names = lora_names(model, clip, family)
    lora = work / "loras" / f"full_{family}_kohya_r{LORA_RANK}.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lsd = lora_state_dict(names, torch.Generator().manual_seed(1))
    write_safetensors_streaming(lsd, str(lora), {"ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA)})
    unet_modules = sum(n.startswith("lora_unet_") for n in names)
    return {"family": family, "model_config": type(config).__name__, "checkpoint": str(ckpt),
            "checkpoint_gb": ckpt.stat().st_size / GB, "checkpoint_tensors": len(sd),
            "unet_params": sum(p.numel() for p in model.diffusion_model.parameters()),
            "lora": str(lora), "lora_mb": lora.stat().st_size / 2**20, "lora_keys": len(lsd),
            "lora_unet_modules": unet_modules, "lora_te_modules": len(names) - unet_modules,
            "lora_params": sum(t.numel() for t in lsd.values()), "build_s": time.perf_counter() - t0}


# --- measurements (each in its own process) ---------------------------------------------------------

def load_checkpoint(family: str, work: Path):
    import comfy.sd

    dtype = LOAD_DTYPE[family]
    opts = {"dtype": dtype} if dtype is not None else {}
    out = comfy.sd.load_checkpoint_guess_config(str(work / "checkpoints" / f"full_{family}.safetensors"),
                                                output_vae=True, output_clip=True, embedding_directory=None,
                                                model_options=opts, te_model_options=opts)
    return out[0], out[1]


def load_pack(work: Path) -> None:
    """The pack through ComfyUI's own custom-node loader (as in tests/comfyui), the loras folder registered."""
    import asyncio

    import folder_paths

    nodes = comfy_nodes()
    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    custom = work / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / "comfyui_hyper_sd"
    if not link.exists():
        link.symlink_to(ROOT)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(link), set(nodes.NODE_CLASS_MAPPINGS), module_parent="custom_nodes")):
        raise RuntimeError("the pack did not load")


def core_loader(model, clip, name):
    return comfy_nodes().LoraLoader().load_lora(model, clip, name, 1.0, 1.0)  # a fresh node: no cached LoRA


def pack_loader(model, clip, name):
    r = comfy_nodes().NODE_CLASS_MAPPINGS["HyperSDLoraLoader"].execute(
        model=model, release="none (use lora_name)", lora_name=name, strength_model=1.0, strength_clip=1.0,
        download_missing=False, clip=clip).result
    return r[0], r[1]


def measure_loader(fn, model, clip, name, rss, patch_clip: bool) -> dict:
    """The node call (file read, key mapping, patches registered) and then the patching ComfyUI does before
    sampling (load_models_gpu: every patched weight computed), each timed with its peak RSS growth."""
    import comfy.model_management as mm

    gc.collect()
    before = rss.reset()
    t0, c0 = time.perf_counter(), time.thread_time()
    new_model, new_clip = fn(model, clip, name)
    node_s, node_cpu_s, node_peak = time.perf_counter() - t0, time.thread_time() - c0, rss.peak
    patchers = [new_model] + ([new_clip.patcher] if patch_clip else [])
    after_node = rss.reset()
    t0, c0 = time.perf_counter(), time.thread_time()
    mm.load_models_gpu(patchers, force_full_load=True)
    patch_s, patch_cpu_s, patch_peak = time.perf_counter() - t0, time.thread_time() - c0, rss.peak
    out = {"node_s": node_s, "node_cpu_s": node_cpu_s, "node_peak_growth_gb": (node_peak - before) / GB,
           "patch_s": patch_s, "patch_cpu_s": patch_cpu_s,
           "patch_peak_growth_gb": (patch_peak - after_node) / GB, "unet_patches": len(new_model.patches),
           "clip_patches": len(new_clip.patcher.patches)}
    mm.unload_all_models()
    del new_model, new_clip, patchers
    gc.collect()
    return out


def node_calls(loaders: dict, model, clip, name, rounds: int) -> dict:
    """Node calls alone (no patching), alternating ABBA...: {loader: [{node_s, node_cpu_s}]}. Cheap enough
    for the many rounds a stable ratio of two ~50-200 ms calls needs (one GC pass moves a call by 10+ ms)."""
    runs = {k: [] for k in loaders}
    for i in range(rounds):
        for k in (list(loaders) if i % 2 == 0 else list(loaders)[::-1]):
            gc.collect()
            t0, c0 = time.perf_counter(), time.thread_time()
            new_model, new_clip = loaders[k](model, clip, name)
            runs[k].append({"node_s": time.perf_counter() - t0, "node_cpu_s": time.thread_time() - c0})
            del new_model, new_clip
    return runs


def spread_summary(runs: dict) -> dict:
    """Median, quartiles and extremes of each loader's node time, and the ratio of the medians."""
    out = {}
    for k, rs in runs.items():
        for m in ("node_s", "node_cpu_s"):
            xs = sorted(r[m] for r in rs)
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            out.setdefault(k, {})[m] = {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0],
                                        "max": xs[-1], "n": len(xs)}
    ratio = {m: out["pack"][m]["median"] / out["core"][m]["median"] for m in ("node_s", "node_cpu_s")}
    return {"per_loader": out, "pack_over_core_median": ratio}


def loader_bench(family: str, work: Path, rounds: int, rss_limit_gb: float, node_rounds: int = 0) -> dict:
    """Core and pack loader alternately (ABBA...), after one unrecorded call of each (file in page cache);
    then ``node_rounds`` more alternating node calls without patching."""
    import logging

    from benchmarks.full_size_step import PeakRSS

    rss = PeakRSS(rss_limit_gb)
    start = rss.now()
    load_pack(work)
    t0 = time.perf_counter()
    model, clip = load_checkpoint(family, work)
    loaded = {"checkpoint_load_s": time.perf_counter() - t0, "rss_after_checkpoint_gb": rss.now() / GB,
              "rss_start_gb": start / GB, "unet_dtype": str(model.model.get_dtype())}
    not_loaded = []
    logging.getLogger().addFilter(lambda r: not_loaded.append(r.getMessage()) if "lora key not loaded" in r.getMessage() else True)
    name = f"full_{family}_kohya_r{LORA_RANK}.safetensors"
    loaders = {"core": core_loader, "pack": pack_loader}
    runs = {k: [] for k in loaders}
    patch_clip = family == "sd15"  # SDXL: UNet only (its CLIP patch would add 1.6 GB to a 12 GB peak)
    for k, fn in loaders.items():
        measure_loader(fn, model, clip, name, rss, patch_clip)  # warm-up
    counts = {}
    for i in range(rounds):
        for k in (["core", "pack"] if i % 2 == 0 else ["pack", "core"]):
            before = len(not_loaded)
            runs[k].append(measure_loader(loaders[k], model, clip, name, rss, patch_clip))
            counts[k] = len(not_loaded) - before
    out = {"family": family, **loaded, "patch_clip": patch_clip, "runs": runs, "lora_key_not_loaded": counts,
           "summary": loader_summary(runs)}
    if node_rounds:
        node_runs = node_calls(loaders, model, clip, name, node_rounds)
        out["node_only"] = {"rounds": node_rounds, "runs": node_runs, "summary": spread_summary(node_runs)}
    return out


def loader_summary(runs: dict) -> dict:
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0] if m.endswith(("_s", "_gb"))}
           for k, rs in runs.items()}
    ratio = {m: med["pack"][m] / med["core"][m] for m in med["core"] if med["core"][m] > 0}
    return {"median": med, "pack_over_core": ratio}


def sampler_bench(family: str, work: Path, steps: int, rss_limit_gb: float) -> dict:
    """KSampler at 1024 px (SDXL) with sampler tcd / euler / ddim, scheduler sgm_uniform, cfg 1 (one UNet call
    a step); the UNet's own time is clocked, so time outside it per step is the sampler's cost."""
    from benchmarks.full_size_step import PeakRSS

    nodes = comfy_nodes()
    rss = PeakRSS(rss_limit_gb)
    load_pack(work)
    model, clip = load_checkpoint(family, work)
    pos = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    px = 1024 if family == "sdxl" else 512
    latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}
    unet = model.model.diffusion_model
    clock = {"s": 0.0, "cpu_s": 0.0, "calls": 0}
    inner = unet.forward

    def timed_forward(*a, **kw):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return inner(*a, **kw)
        finally:
            clock["s"] += time.perf_counter() - t0
            clock["cpu_s"] += time.thread_time() - c0
            clock["calls"] += 1
    unet.forward = timed_forward
    nodes.common_ksampler(model, 0, 1, 1.0, "euler", "sgm_uniform", pos, neg, latent)  # warm-up: load, first call
    rows = {}
    for name in ["euler", "tcd", "ddim"]:
        clock.update(s=0.0, cpu_s=0.0, calls=0)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = nodes.common_ksampler(model, 0, steps, 1.0, name, "sgm_uniform", pos, neg, latent)[0]["samples"]
        total, total_cpu = time.perf_counter() - t0, time.thread_time() - c0
        rows.setdefault(name, []).append({"total_s": total, "total_cpu_s": total_cpu, "unet_s": clock["s"],
                                          "unet_cpu_s": clock["cpu_s"], "unet_calls": clock["calls"],
                                          "outside_unet_per_step_ms": (total - clock["s"]) / steps * 1e3,
                                          "outside_unet_cpu_per_step_ms": (total_cpu - clock["cpu_s"]) / steps * 1e3,
                                          "finite": bool(torch.isfinite(out).all())})
    return {"family": family, "px": px, "steps": steps, "latent_shape": list(latent["samples"].shape),
            "unet_dtype": str(model.model.get_dtype()), "runs": rows, "summary": sampler_summary(rows, steps),
            "peak_rss_gb": rss.peak / GB}


def sampler_summary(rows: dict, steps: int) -> dict:
    med = {k: {"step_s": statistics.median(r["total_s"] for r in rs) / steps,
               "step_cpu_s": statistics.median(r["total_cpu_s"] for r in rs) / steps,
               "outside_unet_per_step_ms": statistics.median(r["outside_unet_per_step_ms"] for r in rs),
               "outside_unet_cpu_per_step_ms": statistics.median(r["outside_unet_cpu_per_step_ms"] for r in rs)}
           for k, rs in rows.items()}
    return {"median": med, **{f"tcd_overhead_vs_{ref}{kind}": (med["tcd"]["step" + kind] - med[ref]["step" + kind])
                              / med[ref]["step" + kind] for ref in ("euler", "ddim") for kind in ("_s", "_cpu_s")}}


# --- orchestration ----------------------------------------------------------------------------------

def child(job: dict) -> dict:
    bootstrap(job["comfy"])
    work = Path(job["work"])
    if job["kind"] == "build":
        return build_files(job["family"], work)
    if job["kind"] == "loaders":
        return loader_bench(job["family"], work, job["rounds"], job["rss_limit_gb"], job.get("node_rounds", 0))
    return sampler_bench(job["family"], work, job["steps"], job["rss_limit_gb"])


def run_job(job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MALLOC_MMAP_THRESHOLD_="262144")
    out = subprocess.run([sys.executable, "-m", "benchmarks.full_size_comfy", "--_child", json.dumps(job)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {**job, "error": f"exit {out.returncode}: {(out.stdout + out.stderr).strip()[-2000:]}"}
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/hypersd-full-size-comfy", help="where the checkpoints and LoRAs go")
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--jobs", default="build,loaders,sampler")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--node-rounds", type=int, default=40,
                    help="extra alternating node calls without patching, for a stable node-call ratio")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per timed KSampler call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rss-limit-gb", type=float, default=14.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "full_size_comfy.json"))
    ap.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch as _torch

        job = json.loads(args.child)
        _torch.set_num_threads(job["threads"])
        print(json.dumps(child(job)), flush=True)
        return
    run_plan(args)


def run_plan(args) -> dict:
    from benchmarks.full_size import machine_description
    from benchmarks.report import log, write_atomic_text

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = machine_description("cpu")
    result["comfyui"] = comfy_version(os.environ["COMFYUI_PATH"])
    base = {"comfy": os.environ["COMFYUI_PATH"], "work": args.work, "threads": args.threads,
            "rss_limit_gb": args.rss_limit_gb, "rounds": args.rounds, "steps": args.steps,
            "node_rounds": args.node_rounds}
    for kind in args.jobs.split(","):
        for family in args.families.split(","):
            if kind == "sampler" and family != "sdxl":
                continue  # the 1024 px SDXL latent is what the overhead is asked at
            if kind == "build" and (Path(args.work) / "loras" / f"full_{family}_kohya_r{LORA_RANK}.safetensors").exists():
                continue
            log(f"{kind} {family}")
            r = run_job({**base, "kind": kind, "family": family})
            log(json.dumps(r.get("summary") or r)[:600])
            result.setdefault(kind, {})[family] = r
            write_atomic_text(out, json.dumps(result, indent=1))
    return result


def comfy_version(path: str) -> str:
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
        return text.split('"')[1]
    except (OSError, IndexError):
        return "unknown"


if __name__ == "__main__":
    main()

"""Shipped workflows inside real ComfyUI 0.3.64: schemas, front end, end-to-end runs.

Runs only with COMFYUI_PATH set (a ComfyUI checkout; COMFYUI_PYTHON = its interpreter, default
the current one). The browser test also needs Chromium (/usr/bin/chromium or CHROMIUM) and the
npm package playwright-core (directory given by PLAYWRIGHT_NODE_PATH, default
/work/browser-tools/node_modules).
"""
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from workflows.pack_schema import _strip_local_files
from workflows.wfkit import API_DIR, PACK_SCHEMA, REPO, UI_DIR

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH not set: no real ComfyUI to run the workflows in", allow_module_level=True)

from tests.comfyui.harness import PACK_DIR_NAME, ComfyServer, core_txt2img_prompt, make_base_dir  # noqa: E402

_SIBLING_VENV = Path(COMFYUI_PATH).resolve().parent / "comfy-venv" / "bin" / "python"
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or (str(_SIBLING_VENV) if _SIBLING_VENV.exists() else sys.executable)
UI_FILES = sorted(UI_DIR.glob("*.json"))


def _get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def write_example_with_hole(path: Path, size: int = 64) -> None:
    """The example drawing with a transparent square in the middle: Load Image's MASK for inpainting."""
    from PIL import Image

    write_example_drawing(path, size)
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    alpha = Image.new("L", (size, size), 255)
    alpha.paste(0, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    rgba.putalpha(alpha)
    rgba.save(path)


def write_example_drawing(path: Path, size: int = 64) -> None:
    """Black strokes on a white canvas: what a user draws for the scribble workflow."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse([12, 12, size - 12, size - 12], outline="black", width=3)
    draw.line([8, size - 8, size - 8, 8], fill="black", width=3)
    img.save(path)


MODEL_FOLDERS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name1": "text_encoders",
                 "clip_name2": "text_encoders", "vae_name": "vae", "control_net_name": "controlnet",
                 "lora_name": "loras"}


def model_files(api: dict):
    """(folder, file name) of every model file an API workflow names."""
    for node in api.values():
        for name, value in node["inputs"].items():
            if name in MODEL_FOLDERS and isinstance(value, str) and value != "None":
                yield MODEL_FOLDERS[name], value


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI with this pack, an example drawing, and an empty placeholder for every model file
    the workflows name (so the front end offers them: a misspelt name then shows as invalid)."""
    base = make_base_dir(tmp_path_factory.mktemp("comfy_base"), REPO)
    for api_file in API_DIR.glob("*.json"):
        for folder, name in model_files(json.loads(api_file.read_text())):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / name).touch()
    write_example_drawing(base / "input" / "example.png")
    with ComfyServer(COMFYUI_PATH, COMFYUI_PYTHON, base) as srv:
        yield srv


def test_pack_schema_file_matches_running_comfyui(server):
    info = _get(server.url + "/object_info")
    live = {k: _strip_local_files(v) for k, v in info.items() if k.startswith("HyperSD")}
    committed = json.loads(PACK_SCHEMA.read_text())
    assert sorted(live) == sorted(committed)
    for name in live:
        assert live[name] == committed[name], f"{name}: run `python -m workflows.pack_schema` (COMFYUI_PATH set)"


def test_ui_files_are_listed_in_the_templates_browser_with_thumbnails(server):
    listed = _get(server.url + "/workflow_templates")[PACK_DIR_NAME]
    assert sorted(listed) == [p.stem for p in UI_FILES]
    served = _get(f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{UI_FILES[0].name}")
    assert served == json.loads(UI_FILES[0].read_text())
    for path in UI_FILES:  # frontend 1.27 shows /api/workflow_templates/<pack>/<name>.jpg on each card
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{path.stem}.jpg") as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff", path.stem


def _run_browser_check(server, *args) -> dict:
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    node_path = os.environ.get("PLAYWRIGHT_NODE_PATH", "/work/browser-tools/node_modules")
    if not shutil.which("node") or not Path(chromium).exists() or not (Path(node_path) / "playwright-core").is_dir():
        pytest.skip(f"needs node, Chromium at {chromium} and playwright-core in {node_path}")
    env = dict(os.environ, NODE_PATH=node_path, CHROMIUM=chromium)
    out = subprocess.run(["node", str(REPO / "workflows" / "browser_check.cjs"), server.url + "/", *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def overlapping_canary(tmp: Path) -> Path:
    """A shipped workflow with the layout bug of issue 14 put back: the loader where the old layout put
    it (over the positive prompt) and KSampler saved smaller than the front end lets it be."""
    ui = json.loads((UI_DIR / "hypersd_sd15_4step_lora.json").read_text())
    for n in ui["nodes"]:
        if n["type"] == "HyperSDLoraLoader":
            prompt = next(m for m in ui["nodes"] if m.get("title") == "Positive prompt")
            n["pos"] = [prompt["pos"][0], prompt["pos"][1] - 200]
        if n["type"] == "KSampler":
            n["size"] = [100, 100]
    path = tmp / "canary_overlap.json"
    path.write_text(json.dumps(ui))
    return path


@pytest.fixture(scope="module")
def browser_report(server, tmp_path_factory):
    canary = overlapping_canary(tmp_path_factory.mktemp("canary"))
    report = _run_browser_check(server, *UI_FILES, canary)
    return report, str(canary)


def _schema_inputs(schemas: dict, api: dict) -> dict:
    """The front end also sends values of its own display widgets (Preview Any's `preview`); POST /prompt
    ignores inputs a node does not declare, so compare only the declared ones."""
    out = {}
    for node_id, node in api.items():
        declared = {k for section in schemas[node["class_type"]]["input"].values() for k in section}
        out[node_id] = dict(node, inputs={k: v for k, v in node["inputs"].items() if k in declared})
    return out


def test_ui_files_open_in_the_comfyui_front_end_without_complaint(server, browser_report):
    report, _ = browser_report
    schemas = _get(server.url + "/object_info")
    print(f"front end opened {len(UI_FILES)} workflows; startup console: {report['_startup_console']}")
    for path in UI_FILES:
        r = report[str(path)]
        where = path.name
        assert r["missing"] == [], f"{where}: front end lacks node types {r['missing']}"
        assert r["invalid"] == [], f"{where}: invalid widget values {r['invalid']}"
        assert r["dialogs"] == [] and r["toasts"] == [], f"{where}: dialog/toast {r['dialogs']} {r['toasts']}"
        assert r["console"] == [], f"{where}: console errors {r['console']}"
        ui = json.loads(path.read_text())
        assert r["nodes"] == len(ui["nodes"])
        # the front end's own UI -> API conversion equals the committed API twin
        assert _schema_inputs(schemas, r["prompt"]) == json.loads((API_DIR / path.name).read_text()), where


def test_no_node_overlaps_another_and_every_widget_shows_in_the_front_end(browser_report):
    """As ComfyUI's front end lays each UI workflow out after loading it: node boxes (title bars
    included) never intersect, no node is smaller than its computeSize(), every widget lies inside its
    node's body with no other node on it, and the front end kept the saved positions and sizes (it
    grows a node saved too small, which is how the old layout came to overlap)."""
    report, _ = browser_report
    total = {"overlaps": 0, "undersized": 0, "hidden_widgets": 0, "covered_widgets": 0, "moved": 0}
    for path in UI_FILES:
        r, ui = report[str(path)], json.loads(path.read_text())
        moved = [n["id"] for n in ui["nodes"] if r["boxes"][str(n["id"])] != [n["pos"][0], n["pos"][1] - 30,
                                                                           n["size"][0], n["size"][1] + 30]]
        for key, found in (("overlaps", r["overlaps"]), ("undersized", r["undersized"]),
                           ("hidden_widgets", r["hidden_widgets"]), ("covered_widgets", r["covered_widgets"]),
                           ("moved", moved)):
            total[key] += len(found)
            assert found == [], f"{path.name}: {key} {found}"
    print(f"{len(UI_FILES)} UI workflows in the front end: {total}")


def test_the_front_end_check_catches_the_old_overlap(browser_report):
    report, canary = browser_report
    r = report[canary]
    assert any("Hyper-SD LoRA Loader" in o and "Positive prompt" in o for o in r["overlaps"]), r["overlaps"]
    # what the issue saw: the loader's lowest widgets hidden under "Positive prompt"
    assert any(c.startswith("Hyper-SD LoRA Loader") and ".download_missing under Positive prompt" in c
               for c in r["covered_widgets"]), r["covered_widgets"]
    ui = json.loads(Path(canary).read_text())
    (ks,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert r["boxes"][str(ks["id"])][2:] != [100, 130]  # grown on load to its computeSize()


def test_committed_node_sizes_are_the_front_ends(server):
    """workflows/schemas/node_sizes.json (what the layout uses) equals computeSize() measured now."""
    from workflows.layout import measured_sizes

    committed = measured_sizes()
    live = _run_browser_check(server, "--measure", *sorted(committed))
    assert live == committed, "run `python -m workflows.node_sizes --url <this ComfyUI>`"


# --------------------------------------------------------------------------------------------------
# End to end: every SD1.5 / SDXL workflow runs on tiny random-weight models and writes an image.
# SD3 and FLUX are not run: ComfyUI detects them only at full text-encoder sizes (T5-XXL ~ 9 GB in
# fp16), far beyond CI; they are checked against the node schemas and in the front end instead.

RUNNABLE = [p.stem for p in UI_FILES if json.loads(p.read_text())["extra"]["hypersd"]["family"] in ("SD15", "SDXL")]
NOT_RUN = sorted({p.stem for p in UI_FILES} - set(RUNNABLE))
TINY_SIZE = 64
# output size at a 64 px input: hires fix upscales x1.5; side by side stitches 4 panels with 16 px between
TINY_OUTPUT = {"hypersd_sd15_hires_fix_tcd": (96, 96), "hypersd_sdxl_side_by_side": (4 * 64 + 3 * 16, 64)}
INPAINT_IMAGE = "example_hole.png"  # the mask the user would paint, as a transparent square
HINT_CONVS = ((3, 16), (16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256))  # then 256 -> model channels


def tiny_controlnet_state_dict(spec, seed: int = 0) -> dict:
    """An LDM ("control_model.") ControlNet matching a tiny UNet: its encoder half plus zero convs,
    middle_block_out and the hint encoder. Zero convs get random weights so the control visibly acts."""
    from tests.comfyui.tiny_checkpoints import random_weights

    unet = spec.ldm_shapes()
    shapes = {k: v for k, v in unet.items() if k.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block")}
    n_inputs = 1 + max(int(k.split(".")[1]) for k in unet if k.startswith("input_blocks."))
    c = spec.model_channels
    for i in range(n_inputs):
        shapes[f"zero_convs.{i}.0.weight"], shapes[f"zero_convs.{i}.0.bias"] = (c, c, 1, 1), (c,)
    shapes["middle_block_out.0.weight"], shapes["middle_block_out.0.bias"] = (c, c, 1, 1), (c,)
    for j, (cin, cout) in enumerate(HINT_CONVS + ((256, c),)):
        shapes[f"input_hint_block.{2 * j}.weight"], shapes[f"input_hint_block.{2 * j}.bias"] = (cout, cin, 3, 3), (cout,)
    return {f"control_model.{k}": v for k, v in random_weights(shapes, seed).items()}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """ComfyUI with tiny SD1.5 / SDXL checkpoints, kohya LoRAs and ControlNets under fixed names."""
    from tests.comfyui import tiny_checkpoints as tc
    from tests.comfyui.tiny_loras import build_kohya_lora

    cache = os.environ.get("HYPERSD_TINY_MODEL_CACHE")
    models = tc.TinyModels(Path(cache) if cache else tmp_path_factory.mktemp("tiny_models"))
    root = Path(models.root)
    files = {}
    for family, spec, ckpt in (("SD15", tc.SD15_UNET, lambda: models.sd15_checkpoint),
                               ("SDXL", tc.SDXL_UNET, lambda: models.sdxl_checkpoint)):
        lora = root / f"tiny-{family.lower()}-kohya-lora.safetensors"
        if not lora.exists():
            build_kohya_lora(lora, spec)
        control = root / f"tiny-{family.lower()}-controlnet.safetensors"
        if not control.exists():
            tc.atomic_save(tiny_controlnet_state_dict(spec), control)
        files[family] = {"checkpoints": ckpt(), "loras": lora, "controlnet": control}
    base = make_base_dir(tmp_path_factory.mktemp("comfy_tiny"), REPO)
    write_example_drawing(base / "input" / "example.png", TINY_SIZE)
    write_example_with_hole(base / "input" / INPAINT_IMAGE, TINY_SIZE)
    with ComfyServer(COMFYUI_PATH, COMFYUI_PYTHON, base) as srv:
        names = {fam: {folder: srv.add_model(folder, path) for folder, path in d.items()} for fam, d in files.items()}
        for release in {r for name in RUNNABLE for r in loader_releases(name)}:
            # the tiny LoRA under the official file name: the loader finds it (no download) and outputs
            # that release's settings, which the workflow wires into its sampler
            srv.add_model("loras", files[release.family]["loras"], release.filename)
        yield srv, names


def loader_releases(name: str) -> list:
    from releases import get_release

    api = json.loads((API_DIR / f"{name}.json").read_text())
    return [get_release(n["inputs"]["release"]) for n in api.values() if n["class_type"] == "HyperSDLoraLoader"]


def tiny_prompt(api: dict, names: dict) -> dict:
    """The shipped API workflow with tiny model files and a 64 px latent (the loader's release is kept:
    the tiny LoRA lies in the loras folder under the release's file name)."""
    prompt = json.loads(json.dumps(api))
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = names["checkpoints"]
        elif cls == "ControlNetLoader":
            inputs["control_net_name"] = names["controlnet"]
        elif cls == "EmptyLatentImage":
            inputs.update(width=TINY_SIZE, height=TINY_SIZE)
    for node in prompt.values():  # inpainting: Load Image's MASK comes from a transparent area
        if node["class_type"] == "SetLatentNoiseMask":
            prompt[node["inputs"]["mask"][0]]["inputs"]["image"] = INPAINT_IMAGE
    return prompt


@pytest.mark.parametrize("name", RUNNABLE)
def test_workflow_runs_end_to_end_on_tiny_models(tiny_server, name):
    from PIL import Image

    server, names = tiny_server
    family = json.loads((UI_DIR / f"{name}.json").read_text())["extra"]["hypersd"]["family"]
    api = json.loads((API_DIR / f"{name}.json").read_text())
    result = server.run_prompt(tiny_prompt(api, names[family]))
    assert result.ok, result.error_text()
    images = result.image_paths()
    assert len(images) == 1 and images[0].is_file()
    with Image.open(images[0]) as img:
        assert img.size == TINY_OUTPUT.get(name, (TINY_SIZE, TINY_SIZE))
        low, high = img.convert("L").getextrema()
        assert high > low  # not a blank image
    for rel, info in zip(loader_releases(name), preview_texts(result, api, "LoRA info")):
        assert f"{rel.filename}: applied" in info and rel.note in info, info
    log = server.log()
    for complaint in ("missing controlnet keys", "lora key not loaded", "error could not detect control model"):
        assert complaint not in log, f"ComfyUI log says {complaint!r}\n{server.log_tail()}"
    print(f"{name}: {result.seconds:.1f} s -> {images[0].name}")


def preview_texts(result, api: dict, title: str) -> list[str]:
    """What the Preview Any nodes titled `title` showed."""
    return ["".join(result.outputs[i]["text"]) for i, n in sorted(api.items())
            if n["class_type"] == "PreviewAny" and n["_meta"]["title"] == title]


def _trained_lora(path: Path, source: Path, segments: int) -> None:
    """The tiny LoRA with the metadata this project's trainer writes (training/lora_files/export.py)."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from training.lora_files.export import lora_metadata

    stage = SimpleNamespace(type="tscd", segments=segments, steps=100)
    cfg = SimpleNamespace(stages=[stage], lora=SimpleNamespace(rank=4, alpha=4.0), model=SimpleNamespace(base="tiny"))
    save_file(load_file(str(source)), str(path), metadata=lora_metadata(cfg, "SD15", "epsilon"))


SETTINGS_OUT = ("steps", "cfg", "sampler_name", "scheduler", "eta")


@pytest.mark.parametrize("file, trained, expected, said", [
    ("lcm-lora-sdv1-5.safetensors", None, ("4", "1.0", "lcm", "sgm_uniform", "1.0"), "LCM-LoRA by file name"),
    ("pcm_sd15_smallcfg_2step_converted.safetensors", None, ("2", "1.0", "euler", "sgm_uniform", "0.0"),
     "PCM small-CFG by file name"),
    ("my_distilled.safetensors", 2, ("2", "1.0", "tcd", "tcd", "0.3"), "LoRA trained by this pack (SD15) by metadata"),
    ("my_style.safetensors", None, ("4", "1.0", "tcd", "tcd", "0.3"), "unknown file"),
])
def test_loader_outputs_the_family_preset_and_ksampler_runs_with_it(tiny_server, tmp_path, file, trained, expected,
                                                                   said):
    """In real ComfyUI: a local LoRA's family (by name or by the trainer's metadata) sets the loader's
    outputs, they validate as KSampler's sampler/scheduler inputs and the image is sampled with them."""
    server, names = tiny_server
    source = Path(server.base_dir / "models" / "loras" / names["SD15"]["loras"]).resolve()
    if trained:
        _trained_lora(tmp_path / file, source, trained)
        source = tmp_path / file
    server.add_model("loras", source, file)
    prompt = core_txt2img_prompt(names["SD15"]["checkpoints"], text="a red circle", negative="", seed=1,
                                 filename_prefix=f"preset_{Path(file).stem}")
    prompt["lora"] = {"class_type": "HyperSDLoraLoader", "inputs": {
        "model": ["ckpt", 0], "release": "none (use lora_name)", "lora_name": file, "strength_model": 1.0,
        "strength_clip": 1.0, "download_missing": False}}
    prompt["sampler"]["inputs"].update(model=["lora", 0], steps=["lora", 2], cfg=["lora", 3],
                                       sampler_name=["lora", 4], scheduler=["lora", 5])
    for slot, out in enumerate(SETTINGS_OUT + ("info",), start=2):  # the loader's outputs 2..7
        prompt[f"show_{out}"] = {"class_type": "PreviewAny", "inputs": {"source": ["lora", slot]}}
    result = server.run_prompt(prompt)
    assert result.ok, result.error_text()
    shown = {out: "".join(result.outputs[f"show_{out}"]["text"]) for out in ("info",) + SETTINGS_OUT}
    assert tuple(shown[o] for o in SETTINGS_OUT) == expected, shown
    assert said in shown["info"] and f"{file}: applied" in shown["info"], shown["info"]
    assert len(result.image_paths()) == 1


def test_sd3_and_flux_are_the_only_workflows_not_run():
    assert NOT_RUN == ["hypersd_flux_8step_lora", "hypersd_sd3_8step_cfg_lora"]

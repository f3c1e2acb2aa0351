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

from tests.comfyui.harness import PACK_DIR_NAME, ComfyServer, make_base_dir  # noqa: E402

_SIBLING_VENV = Path(COMFYUI_PATH).resolve().parent / "comfy-venv" / "bin" / "python"
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or (str(_SIBLING_VENV) if _SIBLING_VENV.exists() else sys.executable)
UI_FILES = sorted(UI_DIR.glob("*.json"))


def _get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


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


def test_ui_files_are_listed_in_the_templates_browser(server):
    listed = _get(server.url + "/workflow_templates")[PACK_DIR_NAME]
    assert sorted(listed) == [p.stem for p in UI_FILES]
    served = _get(f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{UI_FILES[0].name}")
    assert served == json.loads(UI_FILES[0].read_text())


def _browser_report(server) -> dict:
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    node_path = os.environ.get("PLAYWRIGHT_NODE_PATH", "/work/browser-tools/node_modules")
    if not shutil.which("node") or not Path(chromium).exists() or not (Path(node_path) / "playwright-core").is_dir():
        pytest.skip(f"needs node, Chromium at {chromium} and playwright-core in {node_path}")
    env = dict(os.environ, NODE_PATH=node_path, CHROMIUM=chromium)
    out = subprocess.run(["node", str(REPO / "workflows" / "browser_check.cjs"), server.url + "/", *map(str, UI_FILES)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_ui_files_open_in_the_comfyui_front_end_without_complaint(server):
    report = _browser_report(server)
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
        assert r["prompt"] == json.loads((API_DIR / path.name).read_text()), where


# --------------------------------------------------------------------------------------------------
# End to end: every SD1.5 / SDXL workflow runs on tiny random-weight models and writes an image.
# SD3 and FLUX are not run: ComfyUI detects them only at full text-encoder sizes (T5-XXL ~ 9 GB in
# fp16), far beyond CI; they are checked against the node schemas and in the front end instead.

RUNNABLE = [p.stem for p in UI_FILES if json.loads(p.read_text())["extra"]["hypersd"]["family"] in ("SD15", "SDXL")]
NOT_RUN = sorted({p.stem for p in UI_FILES} - set(RUNNABLE))
TINY_SIZE = 64
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
    with ComfyServer(COMFYUI_PATH, COMFYUI_PYTHON, base) as srv:
        names = {fam: {folder: srv.add_model(folder, path) for folder, path in d.items()} for fam, d in files.items()}
        yield srv, names


def tiny_prompt(api: dict, names: dict) -> dict:
    """The shipped API workflow with tiny model files, a 64 px latent and the local LoRA file."""
    prompt = json.loads(json.dumps(api))
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = names["checkpoints"]
        elif cls == "HyperSDLoraLoader":
            inputs.update(release="none (use lora_name)", lora_name=names["loras"])
        elif cls == "ControlNetLoader":
            inputs["control_net_name"] = names["controlnet"]
        elif cls == "EmptyLatentImage":
            inputs.update(width=TINY_SIZE, height=TINY_SIZE)
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
        assert img.size == (TINY_SIZE, TINY_SIZE)
        low, high = img.convert("L").getextrema()
        assert high > low  # not a blank image
    log = server.log()
    for complaint in ("missing controlnet keys", "lora key not loaded", "error could not detect control model"):
        assert complaint not in log, f"ComfyUI log says {complaint!r}\n{server.log_tail()}"
    print(f"{name}: {result.seconds:.1f} s -> {images[0].name}")


def test_sd3_and_flux_are_the_only_workflows_not_run():
    assert NOT_RUN == ["hypersd_flux_8step_lora", "hypersd_sd3_8step_cfg_lora"]

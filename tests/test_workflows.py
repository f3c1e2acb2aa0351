"""Shipped workflows: UI/API twins in sync, every API workflow valid against the node schemas.

Needs ../shared/comfyui/object_info-0.3.64.json beside the repo (or HYPERSD_OBJECT_INFO); no ComfyUI.
"""
import copy
import json

import pytest

from workflows import blocks, build, docs_table, layout, pictures, recipes
from workflows.wfkit import API_DIR, REPO, UI_DIR, core_schema_path, load_schemas, ui_to_api, validate_api

if not core_schema_path().is_file():
    pytest.skip(f"core object_info not found at {core_schema_path()} (clone shared/ beside the repo "
                "or set HYPERSD_OBJECT_INFO)", allow_module_level=True)

SCHEMAS = load_schemas()
UI_FILES = sorted(UI_DIR.glob("*.json"))
NAMES = [p.stem for p in UI_FILES]


def _ui(name):
    return json.loads((UI_DIR / f"{name}.json").read_text())


def _api(name):
    return json.loads((API_DIR / f"{name}.json").read_text())


def test_every_defined_workflow_is_shipped_as_ui_and_api_twin():
    assert sorted(recipes.WORKFLOWS) == NAMES
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == NAMES
    assert len(NAMES) >= 21


def test_committed_files_equal_builder_output():
    files, _ = build.expected_files(SCHEMAS)
    stale = [str(p.relative_to(REPO)) for p, text in files.items() if p.read_text() != text]
    assert not stale, f"run `python -m workflows.build`: stale {stale}"


@pytest.mark.parametrize("name", NAMES)
def test_api_file_is_conversion_of_committed_ui_file(name):
    assert _api(name) == ui_to_api(_ui(name), SCHEMAS)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_against_node_schemas(name):
    assert validate_api(_api(name), SCHEMAS) == []


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_are_consistent_and_note_names_every_model_file(name):
    ui = _ui(name)
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == typ
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    for model_file in ui["extra"]["hypersd"]["models"]:
        assert model_file in notes[0], f"Note does not mention {model_file}"


def _release_of_loader(inputs: dict):
    from releases import get_release

    return get_release(inputs["release"])


def resolved(api: dict, inputs: dict, name: str):
    """An input's value as the sampler will get it: a literal, or, when it is linked to the Hyper-SD
    LoRA Loader's steps/cfg/sampler_name/scheduler/eta output, that release's setting."""
    value = inputs[name]
    fields = {slot: blocks.RELEASE_FIELD[out] for out, slot in blocks.LOADER_OUTPUT.items()}
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        return value
    origin = api[value[0]]
    if origin["class_type"] != "HyperSDLoraLoader" or value[1] not in fields:
        return value  # a model, conditioning, latent... link
    assert name == {v: k for k, v in blocks.LOADER_OUTPUT.items()}[value[1]], f"{name} wired to another output"
    return getattr(_release_of_loader(origin["inputs"]), fields[value[1]])


def test_recommended_settings_per_usage():
    """Pin the official settings (reference doc table) so an edit cannot drift silently."""
    def nodes(name, cls):
        api = _api(name)
        return [{k: resolved(api, n["inputs"], k) for k in n["inputs"]} for n in api.values() if n["class_type"] == cls]
    for fam in ("sd15", "sdxl"):
        for steps in (2, 4, 8):
            (k,) = nodes(f"hypersd_{fam}_{steps}step_lora", "KSampler")
            assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (steps, 1.0, "euler", "sgm_uniform")
        for steps in (8, 12):
            (k,) = nodes(f"hypersd_{fam}_{steps}step_cfg_lora", "KSampler")
            assert k["steps"] == steps and 5.0 <= k["cfg"] <= 8.0
            neg = _api(f"hypersd_{fam}_{steps}step_cfg_lora")[k["negative"][0]]["inputs"]["text"]
            assert neg.strip()
        for steps, eta in ((1, 1.0), (4, 0.3)):
            name = f"hypersd_{fam}_unified_tcd_{steps}step"
            assert nodes(name, "HyperSDTCDScheduler")[0]["steps"] == steps
            assert nodes(name, "HyperSDTCDSampler")[0]["eta"] == eta
            assert nodes(name, "SamplerCustom")[0]["cfg"] == 1.0
            assert nodes(name, "HyperSDLoraLoader")[0]["release"].endswith("1step-lora")
    assert nodes("hypersd_sdxl_1step_unet", "HyperSDOneStepScheduler")[0]["timestep"] == 800
    assert nodes("hypersd_sdxl_canny_controlnet_tcd_4step", "ControlNetApplyAdvanced")[0]["strength"] == 0.5
    assert nodes("hypersd_sd15_scribble_controlnet_tcd_1step", "HyperSDTCDScheduler")[0]["steps"] == 1
    assert nodes("hypersd_sd15_img2img_tcd", "HyperSDTCDScheduler")[0]["denoise"] < 1.0
    assert nodes("hypersd_sd3_8step_cfg_lora", "LoraLoaderModelOnly")[0]["strength_model"] == 0.125
    assert nodes("hypersd_flux_8step_lora", "LoraLoaderModelOnly")[0]["strength_model"] == 0.125
    assert nodes("hypersd_flux_8step_lora", "FluxGuidance")[0]["guidance"] == 3.5
    # the newer usages
    assert sorted(s["denoise"] for s in nodes("hypersd_sd15_hires_fix_tcd", "HyperSDTCDScheduler")) == [0.5, 1.0]
    assert nodes("hypersd_sd15_hires_fix_tcd", "LatentUpscaleBy")[0]["scale_by"] > 1.0
    assert len(nodes("hypersd_sd15_inpaint_tcd", "SetLatentNoiseMask")) == 1
    assert nodes("hypersd_sdxl_1step_unet_img2img", "HyperSDOneStepScheduler")[0]["timestep"] < 800
    (base,) = nodes("hypersd_sdxl_side_by_side", "KSampler")
    assert (base["steps"], base["cfg"]) == (25, 7.0)
    assert sorted(s["steps"] for s in nodes("hypersd_sdxl_side_by_side", "HyperSDTCDScheduler")) == [1, 2, 4]
    assert len({s["noise_seed"] for s in nodes("hypersd_sdxl_side_by_side", "SamplerCustom")} | {base["seed"]}) == 1


@pytest.mark.parametrize("name", NAMES)
def test_ksampler_settings_come_from_the_release_table(name):
    """Workflows that load an official LoRA sample with that release's settings (releases.RELEASES,
    the same table the loader node outputs), and the pack's loader feeds them to KSampler by links,
    so picking another release in the UI changes them too."""
    from releases import release_for_file

    api = _api(name)
    loaded = [n["inputs"].get("release", "") + ".safetensors" if n["class_type"] == "HyperSDLoraLoader"
              else n["inputs"]["lora_name"] for n in api.values()
              if n["class_type"] in ("HyperSDLoraLoader", "LoraLoaderModelOnly")]
    for k in (n["inputs"] for n in api.values() if n["class_type"] == "KSampler"):
        if k["model"][0] not in {i for i, n in api.items() if n["class_type"] in ("HyperSDLoraLoader",
                                                                                 "LoraLoaderModelOnly")}:
            continue  # the base model's own sampler (side by side)
        (rel,) = [release_for_file(f) for f in loaded]
        got = tuple(resolved(api, k, x) for x in ("steps", "cfg", "sampler_name", "scheduler"))
        assert got == (rel.steps, rel.cfg, rel.sampler, rel.scheduler)
        if api[k["model"][0]]["class_type"] == "HyperSDLoraLoader":
            assert all(isinstance(k[x], list) for x in ("steps", "cfg", "sampler_name", "scheduler")), k
    for n in api.values():
        if n["class_type"] == "LoraLoaderModelOnly":
            assert n["inputs"]["strength_model"] == release_for_file(n["inputs"]["lora_name"]).strength


@pytest.mark.parametrize("name", NAMES)
def test_samplers_after_the_loader_take_its_settings_or_say_why_not(name):
    """Every cfg of a sampler fed by the pack's loader is linked to the loader; a TCD step count or eta
    typed in instead is explained in the Note ("Fixed on purpose")."""
    api, ui = _api(name), _ui(name)
    loaders = {i for i, n in api.items() if n["class_type"] == "HyperSDLoraLoader"}
    note = next(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note")
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "SamplerCustom" and inputs["model"][0] in loaders:
            assert inputs["cfg"] == [inputs["model"][0], blocks.LOADER_OUTPUT["cfg"]], name
        if node["class_type"] in ("HyperSDTCDScheduler", "HyperSDTCDSampler") and node.get("_meta") and loaders:
            key = "steps" if node["class_type"] == "HyperSDTCDScheduler" else "eta"
            if not isinstance(inputs[key], list):
                assert "Fixed on purpose" in note, f"{name}: {node['class_type']}.{key} typed in, Note says nothing"
    if loaders:
        assert "Hyper-SD LoRA Loader's outputs" in note


def test_seed_control_widget_is_skipped_by_converter():
    ui = _ui("hypersd_sd15_4step_lora")
    (ks,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert ks["widgets_values"][:2] == [blocks.SEED, "fixed"]
    (api_ks,) = [n for n in ui_to_api(ui, SCHEMAS).values() if n["class_type"] == "KSampler"]
    assert api_ks["inputs"]["seed"] == blocks.SEED and resolved(ui_to_api(ui, SCHEMAS), api_ks["inputs"], "steps") == 4


def _broken(mutate):
    api = copy.deepcopy(_api("hypersd_sd15_canny_controlnet_tcd_4step"))
    by_class = {n["class_type"]: n for n in api.values()}
    mutate(api, by_class)
    return validate_api(api, SCHEMAS)


@pytest.mark.parametrize("mutate, message", [
    (lambda a, c: c["KSampler" if "KSampler" in c else "SamplerCustom"]["inputs"].pop("cfg"), "missing required input 'cfg'"),
    (lambda a, c: c["Canny"]["inputs"].update(low_threshold=1.5), "outside"),
    (lambda a, c: c["Canny"]["inputs"].update(low_threshold="0.4"), "is not a FLOAT"),
    (lambda a, c: c["SamplerCustom"]["inputs"].update(noise_seed=1.0), "is not a INT"),
    (lambda a, c: c["SamplerCustom"]["inputs"].update(add_noise=1), "is not a BOOLEAN"),
    (lambda a, c: c["HyperSDTCDSampler"]["inputs"].update(eta=1.5), "outside"),
    (lambda a, c: c["ControlNetLoader"]["inputs"].update(control_net_name="canny"), "not a model file name"),
    (lambda a, c: c["HyperSDScribblePreprocessor" if "HyperSDScribblePreprocessor" in c else "LoadImage"]
     ["inputs"].update(image="nope.png"), "not in"),
    (lambda a, c: c["SamplerCustom"]["inputs"].update(sigmas=c["SamplerCustom"]["inputs"]["sampler"]), "expects SIGMAS"),
    (lambda a, c: c["SamplerCustom"]["inputs"].update(model=["999", 0]), "missing node"),
    (lambda a, c: c["Canny"].update(class_type="CannyEdges"), "unknown node type"),
    (lambda a, c: c["Canny"]["inputs"].update(blur=3), "unexpected input"),
    (lambda a, c: [a.pop(k) for k, v in list(a.items()) if v["class_type"] in ("SaveImage", "PreviewAny")],
     "no output node"),
])
def test_validator_reports_each_kind_of_error(mutate, message):
    errors = _broken(mutate)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("doc", ["docs/workflows.md", "README.md"])
def test_docs_table_matches_workflows(doc):
    _, built = build.expected_files(SCHEMAS)
    text = (REPO / doc).read_text()
    assert docs_table.docs_table(built) in text, f"run `python -m workflows.build` to refresh the table in {doc}"


def test_every_pack_node_input_has_a_tooltip():
    """Contract rule, checked on the schema ComfyUI itself produced for this pack's nodes."""
    pack = json.loads((REPO / "workflows" / "schemas" / "pack_object_info.json").read_text())
    assert "HyperSDScribblePreprocessor" in pack
    for node, info in pack.items():
        for section in info["input"].values():
            for name, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


# --------------------------------------------------------------------------------------------------
# Layout as saved (the browser test checks it again as the front end shows it)

def _boxes(ui: dict) -> dict:
    """node id -> (x0, y0, x1, y1), the title bar (drawn above pos) included."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - layout.TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in ui["nodes"]}


def overlapping(ui: dict) -> list:
    boxes = sorted(_boxes(ui).items())
    return [(a, b) for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes) for b, (bx0, by0, bx1, by1) in boxes[i + 1:]
            if min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0)]


@pytest.mark.parametrize("name", NAMES)
def test_saved_node_boxes_do_not_overlap_and_fit_the_front_ends_sizes(name):
    ui = _ui(name)
    assert overlapping(ui) == []
    sizes = layout.measured_sizes()
    for n in ui["nodes"]:
        w, h = sizes[n["type"]]
        assert n["size"][0] >= w and n["size"][1] >= h, f"{n['type']} #{n['id']}: {n['size']} < front end's {w, h}"


def test_the_overlap_check_sees_the_old_layout():
    """The layout before issue 14 (columns 360 apart, rows 260 apart, 320 x 60 + 26 per slot/widget):
    the loader (398 px tall) ran into the positive prompt below it."""
    ui = copy.deepcopy(_ui("hypersd_sd15_4step_lora"))
    loader = next(n for n in ui["nodes"] if n["type"] == "HyperSDLoraLoader")
    prompt = next(n for n in ui["nodes"] if n.get("title") == "Positive prompt")
    loader.update(pos=[400, 40], size=[320, 398])
    prompt.update(pos=[400, 300], size=[320, 112])
    assert (min(loader["id"], prompt["id"]), max(loader["id"], prompt["id"])) in overlapping(ui)


def test_columns_put_each_node_just_left_of_its_first_consumer():
    #  1 -> 2 -> 4,  3 (no inputs) -> 4,  1 -> 4: 3 is pulled next to 4, 1 stays left of 2
    links = {2: [1], 4: [2, 3, 1]}
    assert layout.columns([1, 2, 3, 4], links) == {1: 0, 2: 1, 3: 1, 4: 2}


def test_a_one_line_widget_widens_its_node():
    sizes = {"CheckpointLoaderSimple": [210, 98]}
    narrow = layout.node_size("CheckpointLoaderSimple", sizes, [("ckpt_name", "a.safetensors")])
    wide = layout.node_size("CheckpointLoaderSimple", sizes,
                            [("ckpt_name", "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors")])
    assert narrow == (layout.WIDTH, 98) and wide[0] > layout.WIDTH
    with pytest.raises(KeyError, match="python -m workflows.node_sizes"):
        layout.node_size("SomethingNew", sizes)


@pytest.mark.parametrize("name", NAMES)
def test_every_ui_workflow_has_a_templates_browser_thumbnail(name):
    from PIL import Image

    with Image.open(UI_DIR / f"{name}.jpg") as img:
        assert img.format == "JPEG" and img.size == (pictures.THUMB, pictures.THUMB)


def test_readme_shows_one_picture_per_kind_of_workflow():
    _, built = build.expected_files(SCHEMAS)
    readme = (REPO / "README.md").read_text()
    for kind in docs_table.representatives(built):
        rel = f"docs/images/workflows/{docs_table.kind_slug(kind)}.png"
        assert (REPO / rel).is_file() and f"]({rel})" in readme, f"README lacks the picture of {kind!r}"

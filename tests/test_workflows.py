"""Shipped workflows: UI/API twins in sync, every API workflow valid against the node schemas.

Needs ../shared/comfyui/object_info-0.3.64.json beside the repo (or HYPERSD_OBJECT_INFO); no ComfyUI.
"""
import copy
import json

import pytest

from workflows import blocks, build, docs_table, recipes
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


def test_recommended_settings_per_usage():
    """Pin the official settings (reference doc table) so an edit cannot drift silently."""
    def nodes(name, cls):
        return [n["inputs"] for n in _api(name).values() if n["class_type"] == cls]
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



@pytest.mark.parametrize("name", NAMES)
def test_ksampler_settings_come_from_the_release_table(name):
    """Workflows that load an official LoRA sample with that release's settings (releases.RELEASES,
    the same table the loader node outputs)."""
    from releases import release_for_file

    api = _api(name)
    loaded = [n["inputs"].get("release", "") + ".safetensors" if n["class_type"] == "HyperSDLoraLoader"
              else n["inputs"]["lora_name"] for n in api.values()
              if n["class_type"] in ("HyperSDLoraLoader", "LoraLoaderModelOnly")]
    for k in (n["inputs"] for n in api.values() if n["class_type"] == "KSampler"):
        (rel,) = [release_for_file(f) for f in loaded]
        assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (rel.steps, rel.cfg, rel.sampler,
                                                                            rel.scheduler)
    for n in api.values():
        if n["class_type"] == "LoraLoaderModelOnly":
            assert n["inputs"]["strength_model"] == release_for_file(n["inputs"]["lora_name"]).strength

def test_seed_control_widget_is_skipped_by_converter():
    ui = _ui("hypersd_sd15_4step_lora")
    (ks,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert ks["widgets_values"][:2] == [blocks.SEED, "fixed"]
    (api_ks,) = [n for n in ui_to_api(ui, SCHEMAS).values() if n["class_type"] == "KSampler"]
    assert api_ks["inputs"]["seed"] == blocks.SEED and api_ks["inputs"]["steps"] == 4


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
    (lambda a, c: [a.pop(k) for k, v in list(a.items()) if v["class_type"] == "SaveImage"], "no output node"),
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

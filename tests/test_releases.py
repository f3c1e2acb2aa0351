"""Release table: exact hub file names and the reference doc's recommended settings."""
import pytest

import releases as rel

EXPECTED_FILES = {
    *(f"Hyper-SD15-{s}-lora.safetensors" for s in ("1step", "2steps", "4steps", "8steps")),
    *(f"Hyper-SDXL-{s}-lora.safetensors" for s in ("1step", "2steps", "4steps", "8steps")),
    "Hyper-SD15-8steps-CFG-lora.safetensors", "Hyper-SD15-12steps-CFG-lora.safetensors",
    "Hyper-SDXL-8steps-CFG-lora.safetensors", "Hyper-SDXL-12steps-CFG-lora.safetensors",
    "Hyper-SD3-4steps-CFG-lora.safetensors", "Hyper-SD3-8steps-CFG-lora.safetensors",
    "Hyper-SD3-16steps-CFG-lora.safetensors",
    "Hyper-FLUX.1-dev-8steps-lora.safetensors", "Hyper-FLUX.1-dev-16steps-lora.safetensors",
}


def test_release_files_are_the_hub_names():
    assert {r.filename for r in rel.RELEASES} == EXPECTED_FILES
    assert len(rel.RELEASE_NAMES) == len(set(rel.RELEASE_NAMES)) == 17


@pytest.mark.parametrize("r", rel.RELEASES, ids=lambda r: r.name)
def test_recommended_settings(r):
    if r.family in ("SD3", "FLUX"):
        assert r.strength == 0.125
    else:
        assert r.strength == 1.0
    if r.name.endswith("-1step-lora"):
        assert (r.sampler, r.scheduler, r.steps, r.eta, r.cfg) == ("tcd", "tcd", 1, 1.0, 1.0)
    elif "CFG" in r.name and r.family in ("SD15", "SDXL"):
        assert 5.0 <= r.cfg <= 8.0 and r.steps in (8, 12)
    elif r.family == "SD3":
        assert {4: 3.0, 8: 5.0, 16: 7.0}[r.steps] == r.cfg
    elif r.family == "FLUX":
        assert r.guidance == 3.5 and r.cfg == 1.0
    else:
        assert r.cfg == 1.0 and str(r.steps) in r.name and r.sampler == "euler" and r.scheduler == "sgm_uniform"


def test_lookup_by_name_and_file():
    assert rel.get_release("Hyper-SDXL-4steps-lora").steps == 4
    assert rel.release_for_file("/x/loras/sub/hyper-sd15-8steps-cfg-lora.safetensors").name == "Hyper-SD15-8steps-CFG-lora"
    assert rel.release_for_file("my_lora.safetensors") is None
    with pytest.raises(ValueError, match="release: unknown Hyper-SD release 'nope'"):
        rel.get_release("nope")

"""LoRA key conversion, family guess, module matching, path and safetensors checks (no ComfyUI).

Key names come from real libraries: PEFT adapters on a tiny diffusers UNet / transformers CLIP text
model, so the conversion is checked against the module names those libraries really write.
"""
import os

import pytest
import torch
from safetensors.torch import save_file

from nodes.lora import families, files, keys, matching

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj"]


@pytest.fixture(scope="module")
def peft_unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    modules = {name for name, m in unet.named_modules() if hasattr(m, "lora_A")}
    return get_peft_model_state_dict(unet), modules


def _kohya(name, prefix="lora_unet_"):
    return prefix + name.replace(".", "_")


@pytest.mark.parametrize("prefix", ["unet.", "base_model.model.", ""])
def test_peft_unet_keys_become_kohya_for_every_module(peft_unet, prefix):
    sd, modules = peft_unet
    conv = keys.to_kohya({prefix + k: v for k, v in sd.items()})
    assert conv.unknown == []
    assert conv.formats == {"peft": len(sd)}
    expected = {_kohya(m) + s for m in modules for s in (".lora_down.weight", ".lora_up.weight")}
    assert set(conv.state_dict) == expected
    assert any("attn1_to_q" in k for k in expected) and any("to_out_0" in k for k in expected)
    for m in modules:  # lora_A is down (r, in), lora_B is up (out, r); values untouched
        assert torch.equal(conv.state_dict[_kohya(m) + ".lora_down.weight"], sd[m + ".lora_A.weight"])
        assert torch.equal(conv.state_dict[_kohya(m) + ".lora_up.weight"], sd[m + ".lora_B.weight"])


def test_old_diffusers_attention_processor_keys(peft_unet):
    _, modules = peft_unet
    attn = sorted(m for m in modules if ".attn" in m)
    old, expected = {}, set()
    for m in attn:
        block, _, proj = m.rpartition(".attn")[0], None, m.split(".attn")[1]  # "1.to_q" / "2.to_out.0"
        attn_idx, name = proj.split(".", 1)
        name = name.replace(".0", "")
        base = f"unet.{block}.attn{attn_idx}.processor.{name}_lora"
        old[base + ".up.weight"] = torch.zeros(8, 2)
        old[base + ".down.weight"] = torch.zeros(2, 8)
        expected |= {_kohya(m) + ".lora_up.weight", _kohya(m) + ".lora_down.weight"}
    conv = keys.to_kohya(old)
    assert conv.formats == {"diffusers-old": len(old)}
    assert set(conv.state_dict) == expected


def test_text_encoder_peft_and_old_keys():
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=1000))
    from peft import get_peft_model
    peft_te = get_peft_model(te, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    sd = get_peft_model_state_dict(peft_te)
    modules = {n[len("base_model.model."):] for n, m in peft_te.named_modules() if hasattr(m, "lora_A")}
    for prefix, kohya in (("text_encoder.", "lora_te1_"), ("text_encoder_2.", "lora_te2_")):
        conv = keys.to_kohya({prefix + k.replace("base_model.model.", ""): v for k, v in sd.items()})
        assert set(conv.state_dict) == {_kohya(m, kohya) + s for m in modules
                                        for s in (".lora_down.weight", ".lora_up.weight")}
    old = keys.to_kohya({"text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight": torch.zeros(1)})
    assert list(old.state_dict) == ["lora_te1_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight"]


def test_kohya_and_flux_keys_pass_through():
    sd = {"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(1),
          "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1)}
    conv = keys.to_kohya(sd)
    assert set(conv.state_dict) == set(sd)
    assert conv.unknown == ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert families.lora_family(sd) == "FLUX"


def test_alpha_keys_follow_their_module():
    conv = keys.to_kohya({"unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(8.0),
                        "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 3)})
    assert set(conv.state_dict) == {"lora_unet_mid_block_attentions_0_proj_in.alpha",
                                    "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"}


@pytest.mark.parametrize("width,family", [(768, "SD15"), (2048, "SDXL"), (1024, "SD2")])
def test_family_from_cross_attention_width(width, family):
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    alpha = key.replace(".lora_down.weight", ".alpha")  # scalar first: must not end the search
    assert families.lora_family({alpha: torch.tensor(4.0), key: torch.zeros(4, width)}) == family
    peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert families.lora_family({peft: torch.zeros(4, width)}) == family


def test_match_modules_reports_matched_unmatched_and_shape_mismatch():
    sd = {"a.lora_up.weight": torch.zeros(10, 4), "a.lora_down.weight": torch.zeros(4, 20),
          "b.lora_up.weight": torch.zeros(10, 4), "b.lora_down.weight": torch.zeros(4, 768),
          "c.lora_up.weight": torch.zeros(3, 4), "c.lora_down.weight": torch.zeros(4, 3), "c.alpha": torch.tensor(1.0)}
    key_map = {"a": "m.a.weight", "b": "m.b.weight"}
    report = matching.match_modules(sd, key_map, {"m.a.weight": (10, 20), "m.b.weight": (10, 2048)})
    assert report.matched == ["a"] and report.unmatched == ["c"]
    assert report.shape_mismatch == [("b", (10, 768), (10, 2048))] and report.total == 3


@pytest.mark.parametrize("name", ["../x.safetensors", "a/../../x.safetensors", "/etc/passwd",
                                  "C:\\loras\\x.safetensors", "..\\x.safetensors", "", "   "])
def test_path_tricks_are_refused(name):
    with pytest.raises(ValueError, match="lora_name"):
        files.safe_relative_name(name)


def test_resolve_inside_accepts_subfolders_and_refuses_symlink_escape(tmp_path):
    (tmp_path / "loras" / "sub").mkdir(parents=True)
    assert files.resolve_inside(str(tmp_path / "loras"), "sub/a.safetensors").endswith("sub/a.safetensors")
    os.symlink(tmp_path, tmp_path / "loras" / "escape")
    with pytest.raises(ValueError, match="outside the loras folder"):
        files.resolve_inside(str(tmp_path / "loras"), "escape/secret.safetensors")


def _valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.ones(64, 64)}, str(path))
    return path


def test_safetensors_checks(tmp_path):
    ok = _valid_file(tmp_path)
    assert list(files.load_safetensors(str(ok))) == ["lora_unet_x.lora_up.weight"]
    with pytest.raises(ValueError, match="lora_name: file not found"):
        files.check_safetensors(str(tmp_path / "missing.safetensors"))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(ok.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        files.check_safetensors(str(truncated))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all}" + b"\x00" * 8)
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        files.check_safetensors(str(corrupt))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ValueError, match="empty or truncated"):
        files.check_safetensors(str(tiny))


class _Boom:
    def __reduce__(self):  # would run if the file were ever unpickled
        return (os.system, ("touch /tmp/hypersd_pickle_was_loaded",))


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.ckpt"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, name):
    import pickle

    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Boom(), protocol=4))
    marker = "/tmp/hypersd_pickle_was_loaded"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(ValueError, match="not a .safetensors file"):
        files.load_safetensors(str(path))
    assert not os.path.exists(marker)


def test_model_family_names():
    assert families.model_family("SD15") == "SD15"
    assert families.model_family("Segmind_Vega") == "SDXL"
    assert families.model_family("Flux") == "FLUX"

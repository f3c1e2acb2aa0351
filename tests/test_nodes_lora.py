"""LoRA key conversion, family guess, module matching, path and safetensors checks (no ComfyUI).

Key names come from real libraries: PEFT adapters on a tiny diffusers UNet / transformers CLIP text
model, so the conversion is checked against the module names those libraries really write.
"""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from nodes.lora import families, files, keys, lycoris, matching

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


# -- module shapes: every kind ComfyUI applies, checked against its own formulas ------------------------

def _comfy_change(kind: str, t: dict) -> torch.Tensor:
    """The weight change as ComfyUI 0.3.64 computes it (comfy/weight_adapter/lora.py, loha.py, lokr.py),
    before its final reshape to the weight's shape; raises where ComfyUI's own call would fail."""
    def tucker(core, b, a):
        return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)

    if kind == "LoRA":
        down = t["down"]
        if "mid" in t:
            mid = t["mid"]
            final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(final).transpose(0, 1)
        return torch.mm(t["up"].flatten(1), down.flatten(1))
    if kind == "LoHa":
        if "hada_t1" in t:
            return tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"]) * tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return torch.mm(t["hada_w1_a"], t["hada_w1_b"]) * torch.mm(t["hada_w2_a"], t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:
        w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
    if w2.ndim == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2)


GOOD_MODULES = {
    "lora linear": ("LoRA", {"down": (4, 20), "up": (10, 4)}),
    "lora conv": ("LoRA", {"down": (4, 8, 3, 3), "up": (10, 4, 1, 1)}),
    "locon mid": ("LoRA", {"down": (4, 8, 1, 1), "mid": (4, 4, 3, 3), "up": (10, 4, 1, 1)}),
    "loha": ("LoHa", {"hada_w1_a": (10, 2), "hada_w1_b": (2, 20), "hada_w2_a": (10, 3), "hada_w2_b": (3, 20)}),
    "loha tucker": ("LoHa", {"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 10), "hada_w1_b": (2, 8),
                             "hada_t2": (3, 3, 3, 3), "hada_w2_a": (3, 10), "hada_w2_b": (3, 8)}),
    "lokr full": ("LoKr", {"lokr_w1": (2, 4), "lokr_w2": (5, 5)}),
    "lokr low rank": ("LoKr", {"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 5)}),
    "lokr conv": ("LoKr", {"lokr_w1": (2, 4), "lokr_w2": (5, 2, 3, 3)}),
}
LOKR_TUCKER = {"lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 5), "lokr_w2_b": (2, 2)}
BAD_MODULES = {
    "lora rank": ({"down": (4, 20), "up": (10, 8)}, "up", "lora_down has rank 4 but lora_up has rank 8"),
    "locon mid": ({"down": (4, 8, 1, 1), "mid": (3, 3, 3, 3), "up": (10, 4, 1, 1)}, "mid", "lora_mid (3, 3, 3, 3)"),
    "loha rank": ({"hada_w1_a": (10, 2), "hada_w1_b": (3, 20), "hada_w2_a": (10, 3), "hada_w2_b": (3, 20)},
                  "hada_w1_b", "hada_w1_a has rank 2 but hada_w1_b has rank 3"),
    "loha factors": ({"hada_w1_a": (10, 2), "hada_w1_b": (2, 20), "hada_w2_a": (10, 3), "hada_w2_b": (3, 30)},
                     "hada_w2_a", "the two Hadamard factors have different shapes: (10, 20) vs (10, 30)"),
    "lokr rank": ({"lokr_w1": (2, 4), "lokr_w2_a": (5, 2), "lokr_w2_b": (3, 5)}, "lokr_w2_b",
                  "lokr_w2_a has rank 2 but lokr_w2_b has rank 3"),
}


@pytest.mark.parametrize("case", sorted(GOOD_MODULES))
def test_module_change_shape_is_what_comfyui_computes(case):
    kind, shapes = GOOD_MODULES[case]
    tensors = {role: torch.randn(shape) for role, shape in shapes.items()}
    got_kind, change = matching.module_change(shapes)
    comfy = _comfy_change(kind, tensors)
    assert got_kind == kind
    assert change["weight"][0] == comfy.shape[0] and torch.Size(change["weight"]).numel() == comfy.numel()


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_modules_comfyui_cannot_combine_are_defects(case):
    shapes, role, message = BAD_MODULES[case]
    kind = matching.module_kind(shapes)
    with pytest.raises(RuntimeError):  # ComfyUI's own formula fails: it would log and skip the module
        _comfy_change(kind, {r: torch.randn(s) for r, s in shapes.items()})
    with pytest.raises(matching.ModuleDefect, match=re.escape(message)) as err:
        matching.module_change(shapes)
    assert err.value.role == role


def test_rank_mismatch_is_refused_naming_the_key_not_counted_as_applied():
    """Issue 13 item 6: up rank 8, down rank 4 fitted the weight by (out, in) and was reported applied."""
    sd = {"lora_unet_a.lora_down.weight": torch.zeros(4, 20), "lora_unet_a.lora_up.weight": torch.zeros(10, 8),
          "lora_unet_a.alpha": torch.tensor(4.0),
          "lora_unet_b.lora_down.weight": torch.zeros(4, 20), "lora_unet_b.lora_up.weight": torch.zeros(10, 4)}
    report = matching.match_modules(sd, {"lora_unet_a": "m.a.weight", "lora_unet_b": "m.b.weight"},
                                    {"m.a.weight": (10, 20), "m.b.weight": (10, 20)})
    assert report.matched == ["lora_unet_b"]
    assert report.defects == [("lora_unet_a.lora_up.weight", "lora_down has rank 4 but lora_up has rank 8 "
                               "(lora_down (4, 20), lora_up (10, 8)); up @ down cannot be multiplied")]


@pytest.mark.parametrize("extra,message", [
    ({"m.alpha": torch.ones(4)}, "alpha must be one number, got a tensor of shape (4,)"),
    ({"m.hada_w1_a": torch.zeros(10, 2)}, "mixes LoRA and LoHa tensors in one module"),
])
def test_module_defects(extra, message):
    sd = {"m.lora_down.weight": torch.zeros(4, 20), "m.lora_up.weight": torch.zeros(10, 4), **extra}
    report = matching.match_modules(sd, {"m": "w.weight"}, {"w.weight": (10, 20)})
    assert report.matched == [] and len(report.defects) == 1 and message in report.defects[0][1]


@pytest.mark.parametrize("sd,message", [
    ({"m.alpha": torch.tensor(1.0)}, "has only alpha and no weights"),
    ({"m.lora_up.weight": torch.zeros(10, 4)}, "has lora_up but no lora_down"),
    ({"m.lokr_w2": torch.zeros(5, 5)}, "has no lokr_w1 (nor lokr_w1_a + lokr_w1_b)"),
])
def test_incomplete_modules_are_defects(sd, message):
    report = matching.match_modules(sd, {"m": "w.weight"}, {"w.weight": (10, 20)})
    assert report.defects == [(next(iter(sd)), message)]


def test_lycoris_modules_are_matched_and_counted_by_kind():
    """Issue 13 item 7: LoHa / LoKr keys were no module at all ('none of the 0 LoRA modules match')."""
    z = torch.zeros
    sd = {"lora_unet_a.hada_w1_a": z(10, 2), "lora_unet_a.hada_w1_b": z(2, 20), "lora_unet_a.hada_w2_a": z(10, 2),
          "lora_unet_a.hada_w2_b": z(2, 20), "lora_unet_a.alpha": torch.tensor(2.0),
          "lora_unet_b.lokr_w1": z(2, 4), "lora_unet_b.lokr_w2": z(5, 5),
          "lora_unet_c.lora_down.weight": z(4, 20), "lora_unet_c.lora_up.weight": z(10, 4),
          "lora_unet_d.diff": z(10, 20), "lora_unet_d.diff_b": z(10),
          "lora_unet_e.w_norm": z(10), "lora_unet_e.b_norm": z(10),
          "lora_unet_f.hada_w1_a": z(10, 2), "lora_unet_f.hada_w1_b": z(2, 30), "lora_unet_f.hada_w2_a": z(10, 2),
          "lora_unet_f.hada_w2_b": z(2, 30),
          "bundle_emb.foo.string_to_param.*": z(1, 768)}
    key_map = {f"lora_unet_{m}": f"m.{m}.weight" for m in "abcdef"}
    shapes = {"m.a.weight": (10, 20), "m.b.weight": (10, 20), "m.c.weight": (10, 20), "m.d.weight": (10, 20),
              "m.d.bias": (10,), "m.e.weight": (10,), "m.e.bias": (10,), "m.f.weight": (10, 20)}
    report = matching.match_modules(sd, key_map, shapes)
    assert report.kinds == {"lora_unet_a": "LoHa", "lora_unet_b": "LoKr", "lora_unet_c": "LoRA",
                            "lora_unet_d": "full", "lora_unet_e": "norm"}
    assert report.kind_counts() == {"LoHa": 1, "LoKr": 1, "LoRA": 1, "full": 1, "norm": 1}
    assert report.shape_mismatch == [("lora_unet_f", (10, 30), (10, 20))]
    assert report.unknown_keys == ["bundle_emb.foo.string_to_param.*"] and report.defects == []


@pytest.mark.parametrize("change,weight,fits", [
    ((10, 72), (10, 8, 3, 3), True),  # LoHa / LoKr on a conv: the change is reshaped to the weight
    ((10, 20), (10, 40), False),
    ((20, 10), (10, 20), False),  # reshape would work, but rows are the weight's outputs: a transposed LoRA
])
def test_reshaped_changes_fit_by_outputs_and_size(change, weight, fits):
    assert matching._fits("LoHa", change, weight) is fits


def test_sliced_targets_are_checked_against_the_slice():
    """ComfyUI maps e.g. FLUX/SD3 q, k, v LoRAs onto slices of one fused qkv weight: (key, (dim, start, size))."""
    sd = {"q.lora_down.weight": torch.zeros(4, 16), "q.lora_up.weight": torch.zeros(16, 4),
          "k.lora_down.weight": torch.zeros(4, 16), "k.lora_up.weight": torch.zeros(48, 4)}
    key_map = {"q": ("qkv.weight", (0, 0, 16)), "k": ("qkv.weight", (0, 16, 16))}
    report = matching.match_modules(sd, key_map, {"qkv.weight": (48, 16)})
    assert report.matched == ["q"] and report.shape_mismatch == [("k", (48, 16), (16, 16))]


def test_lycoris_keys_keep_their_roles_through_conversion():
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(1),
          "lycoris_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.zeros(1),
          "unet.mid_block.attentions.0.proj_in.hada_w2_b": torch.zeros(1),
          "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}
    conv = keys.to_kohya(sd)
    assert conv.formats == {"kohya": 1, "lycoris": 2, "peft": 1}
    assert set(conv.state_dict) == {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
                                    "lycoris_down_blocks_0_attentions_0_proj_in.lokr_w1",
                                    "lora_unet_mid_block_attentions_0_proj_in.hada_w2_b",
                                    "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"}
    assert conv.origin["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"] == \
        "unet.mid_block.attentions.0.proj_in.lora_A.weight"


@pytest.mark.parametrize("w1", [{"lokr_w1": (2, 4)}, {"lokr_w1_a": (2, 3), "lokr_w1_b": (3, 4)}])
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_tucker_lokr_is_precomputed_to_what_the_file_describes(w1, alpha):
    """ComfyUI's own formula fails on a Tucker LoKr (einsum's non-contiguous w2 in torch.kron) and it
    skips the module; the rewritten module gives the file's change, scale included, through that formula."""
    gen = torch.Generator().manual_seed(0)
    t = {f"m.{r}": torch.randn(s, generator=gen) for r, s in {**w1, **LOKR_TUCKER}.items()}
    if alpha is not None:
        t["m.alpha"] = torch.tensor(alpha)
    roles = {k.split(".", 1)[1]: v for k, v in t.items()}
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        _comfy_change("LoKr", roles)
    assert matching.module_change({r: tuple(v.shape) for r, v in roles.items()})[1] == {"weight": (10, 8, 3, 3)}
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", roles["lokr_t2"], roles["lokr_w2_b"], roles["lokr_w2_a"])
    w1_full = roles["lokr_w1"] if "lokr_w1" in roles else roles["lokr_w1_a"] @ roles["lokr_w1_b"]
    scale = 1.0 if alpha is None else alpha / 2  # ComfyUI: alpha / rank of the Tucker w2 (w2_b rows)
    expected = scale * torch.kron(w1_full[:, :, None, None], w2.contiguous())
    out, n = lycoris.materialize_lokr_tucker(t)
    assert n == 1 and set(out) == set(t) - {"m.lokr_t2", "m.lokr_w2_a", "m.lokr_w2_b"} | {"m.lokr_w2"}
    new = {k.split(".", 1)[1]: v for k, v in out.items()}
    new_scale = alpha / 3 if alpha is not None and "lokr_w1_b" in new else 1.0  # ComfyUI's scale for the new module
    assert torch.allclose(new_scale * _comfy_change("LoKr", new), expected, rtol=1e-5, atol=1e-6)


class _CustomStateDict(torch.nn.Module):
    """A module whose state dict names a weight its attributes do not (as some quantised layers do)."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Parameter(torch.zeros(5, 6))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "packed.weight"] = self.inner


def test_model_weight_shapes_read_the_module_tree_like_the_state_dict():
    """Every state-dict key (parameters, buffers, nested and conv weights, a second root) gets its state-dict
    shape through the module tree; a key only a custom state dict has falls back to the full state dicts."""
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False)))
    clip = torch.nn.ModuleDict({"clip_l": torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 7)}),
                                "odd": _CustomStateDict()})
    shapes = matching.ModelWeightShapes(unet, clip)
    expected = {k: tuple(v.shape) for root in (unet, clip) for k, v in root.state_dict().items()}
    assert "odd.packed.weight" in expected and "1.running_mean" in expected
    assert shapes._all is None
    assert {k: shapes.get(k) for k in expected if k != "odd.packed.weight"} == \
        {k: s for k, s in expected.items() if k != "odd.packed.weight"}
    assert shapes._all is None  # no state dict built for keys the module tree reaches
    assert shapes.get("odd.packed.weight") == (5, 6)
    assert shapes.get("2.0.bias") is None and shapes.get("nope.weight") is None  # bias=False, absent


def test_grouping_once_gives_what_each_step_groups_itself():
    """The loader groups a file's modules once and hands the grouping to matching, the family guess and the
    Tucker LoKr pass: each gives what it gives grouping the state dict itself."""
    gen = torch.Generator().manual_seed(0)
    sd = {"lora_unet_a_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
          "lora_unet_a_attn2_to_k.lora_up.weight": torch.zeros(10, 4), "lora_unet_a_attn2_to_k.alpha": torch.tensor(2.0),
          "odd.thing": torch.zeros(1),
          **{f"t.{r}": torch.randn(s, generator=gen) for r, s in {"lokr_w1": (2, 4), **LOKR_TUCKER}.items()}}
    grouped = matching.group_modules(sd)
    key_map = {"lora_unet_a_attn2_to_k": "k.weight", "t": "t.weight"}
    shapes = {"k.weight": (10, 2048), "t.weight": (10, 8, 3, 3)}
    report = matching.match_modules(sd, key_map, shapes, grouped)
    assert report.matched == ["lora_unet_a_attn2_to_k", "t"] and vars(report) == vars(matching.match_modules(sd, key_map, shapes))
    assert families.lora_family(sd, grouped[0]) == families.lora_family(sd) == "SDXL"
    known = {k: v for k, v in sd.items() if k not in grouped[1]}
    (with_groups, n1), (alone, n2) = lycoris.materialize_lokr_tucker(known, grouped[0]), lycoris.materialize_lokr_tucker(known)
    assert n1 == n2 == 1 and with_groups.keys() == alone.keys() and torch.equal(with_groups["t.lokr_w2"], alone["t.lokr_w2"])
    plain = {k: v for k, v in known.items() if not k.startswith("t.")}
    assert lycoris.materialize_lokr_tucker(plain, grouped[0]) == (plain, 0)  # modules absent from the dict: skipped

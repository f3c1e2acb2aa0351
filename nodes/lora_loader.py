"""HyperSDLoraLoader: load a Hyper-SD LoRA (local file or official release) in any key format.

Every SD1.5/SDXL key format (kohya, old diffusers, PEFT) is renamed to kohya names first
(``lora.keys.to_kohya``) because ComfyUI drops PEFT attention keys; the keys are then matched
against the model's own key map before patching, so a LoRA for another family or with zero
matching keys fails loudly instead of being logged as "lora key not loaded".
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from ..releases import (NO_RELEASE, RELEASE_NAMES, Release, download_release, get_release, missing_file_hint,
                        release_for_file)
from .lora.families import lora_family, model_family
from .lora.files import check_safetensors, read_lora_file, safe_relative_name
from .lora.keys import to_kohya
from .lora.lycoris import materialize_lokr_tucker
from .lora.matching import MatchReport, ModelWeightShapes, group_modules, match_modules
from .lora.presets import recommended_settings

log = logging.getLogger("HyperSD")
NO_FILE = "None"


def loras_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def local_lora_path(name: str) -> str:
    """Path of a file picked in the ``lora_name`` combo, refusing path tricks."""
    import folder_paths

    safe_relative_name(name, "lora_name")
    roots = folder_paths.get_folder_paths("loras")
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"lora_name: {name!r} is not in the loras folder(s) {roots}")
    path = os.path.abspath(path)  # normalised, symlinks kept (model folders are often symlinked)
    if not any(os.path.commonpath([os.path.abspath(r), path]) == os.path.abspath(r) for r in roots):
        raise ValueError(f"lora_name: {name!r} resolves outside the loras folders {roots}")
    return path


def release_path(release: Release, download: bool) -> str:
    """The release's file in the loras folder, downloaded from the hub when missing."""
    import folder_paths

    existing = folder_paths.get_full_path("loras", release.filename)
    if existing is not None:
        return existing
    target_dir = loras_dir()
    if not download:
        raise ValueError(f"release: {release.filename} is not in the loras folder and download_missing is off; "
                         f"{missing_file_hint(release.filename, target_dir)}")
    path = download_release(release.filename, target_dir)
    check_safetensors(path, "release")
    return path


def _model_family_name(model) -> str:
    return model_family(type(model.model.model_config).__name__)


def _refuse_broken(report: MatchReport, conv, source: str, name: str) -> None:
    if report.defects:
        key, problem = report.defects[0]
        raise ValueError(f"{source}: {name} has {len(report.defects)} broken LoRA module(s), e.g. "
                         f"{conv.origin.get(key, key)!r}: {problem}; the file is refused and nothing is applied "
                         "(re-export or re-convert the LoRA)")
    if not report.total:
        raise ValueError(f"{source}: {name} has no LoRA or LyCORIS tensors ({len(report.unknown_keys)} tensors "
                         f"of unknown kind, e.g. {report.unknown_keys[:3]}); expected kohya, diffusers, PEFT, "
                         "LoHa or LoKr keys")


def model_key_map(model, clip) -> dict:
    """ComfyUI's LoRA key map of the model (and the CLIP, when connected): LoRA module name -> weight key.
    Built once a load: matching and patching both read it (core load_lora_for_models builds its own)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def _check_matches(lora_sd: dict, grouped: tuple, key_map: dict, model, clip, source: str, conv,
                   name: str) -> tuple[MatchReport, str]:
    roots = [model.model] + ([clip.cond_stage_model] if clip is not None else [])
    report = match_modules(lora_sd, key_map, ModelWeightShapes(*roots), grouped)
    _refuse_broken(report, conv, source, name)
    family, lora_fam = _model_family_name(model), lora_family(lora_sd, grouped[0])
    if lora_fam is not None and family in ("SD15", "SD2", "SDXL", "SD3", "FLUX") and lora_fam != family:
        raise ValueError(f"{source}: this LoRA is for {lora_fam} but the model is {family}; "
                         f"pick a {family} LoRA (or the matching checkpoint)")
    if report.shape_mismatch:
        name, got, want = report.shape_mismatch[0]
        raise ValueError(
            f"{source}: LoRA shapes do not fit this {family} model ({len(report.shape_mismatch)} modules, e.g. "
            f"{name}: LoRA {got} vs model {want}); the LoRA is for another model family"
        )
    if not report.matched:
        raise ValueError(
            f"{source}: none of the {report.total} LoRA modules match this {family} model (e.g. "
            f"{report.unmatched[:3]}); expected an SD1.5/SDXL/SD3/FLUX LoRA for this model's family "
            "in kohya, diffusers or PEFT format"
        )
    if len(report.unmatched) > len(report.matched):
        raise ValueError(
            f"{source}: only {len(report.matched)} of {report.total} LoRA modules match this {family} model; "
            f"the LoRA is probably for another model family (unmatched e.g. {report.unmatched[:3]})"
        )
    return report, family


def _drop_text_encoder(sd: dict) -> tuple[dict, int]:
    kept = {k: v for k, v in sd.items() if not k.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder"))}
    return kept, (len(sd) - len(kept))


def apply_patches(model, clip, lora_sd: dict, key_map: dict, matched: list, strength_model: float,
                  strength_clip: float):
    """(patched model, patched CLIP) as core comfy.sd.load_lora_for_models makes them, from the key map
    built for matching. comfy.lora.load_lora tries every adapter format on every key-map entry (3,000
    names for SD1.5 with CLIP), which is most of core's node time; given only the matched modules' entries
    (in key-map order, so any entries aliasing one weight resolve as in core) it returns the same patches:
    it reads a module's tensors only under that module's own name. A file ComfyUI's convert_lora renames
    (BFL control, Wan Fun, USO LoRAs) gets the whole key map, as in core."""
    import comfy.lora
    import comfy.lora_convert

    converted = comfy.lora_convert.convert_lora(lora_sd)
    wanted = set(matched)
    to_load = {n: t for n, t in key_map.items() if n in wanted} if converted is lora_sd else key_map
    loaded = comfy.lora.load_lora(converted, to_load)
    new_model = model.clone()
    applied = set(new_model.add_patches(loaded, strength_model))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        applied.update(new_clip.add_patches(loaded, strength_clip))
    for key in loaded:
        if key not in applied:
            log.warning("NOT LOADED %s", key)
    return new_model, new_clip


def load_and_apply(model, clip, path: str, strength_model: float, strength_clip: float, source: str):
    """(patched model, patched CLIP, match report, info, the file's metadata); every piece of work once:
    the header read, the modules grouped, the key map built."""
    name = os.path.basename(path)
    raw, metadata = read_lora_file(path, source)
    if not raw:
        raise ValueError(f"{source}: {name} contains no tensors (an empty LoRA file)")
    conv = to_kohya(raw)
    sd, dropped = (conv.state_dict, 0) if clip is not None else _drop_text_encoder(conv.state_dict)
    if not sd:
        raise ValueError(f"{source}: {name} has no UNet LoRA keys (text-encoder only) and no CLIP is connected")
    grouped = group_modules(sd)
    key_map = model_key_map(model, clip)
    report, family = _check_matches(sd, grouped, key_map, model, clip, source, conv, name)
    # Only validated modules go to ComfyUI, so `info` says exactly what was applied.
    unknown = set(report.unknown_keys)
    sd, _ = materialize_lokr_tucker({k: v for k, v in sd.items() if k not in unknown}, grouped[0])
    new_model, new_clip = apply_patches(model, clip, sd, key_map, report.matched, strength_model, strength_clip)
    info = _describe(name, report, family, conv, strength_model, strength_clip, dropped)
    return new_model, new_clip, report, info, metadata


def _describe(name: str, report: MatchReport, family: str, conv, strength_model: float, strength_clip: float,
              dropped: int) -> str:
    formats = ", ".join(f"{n} {fmt}" for fmt, n in sorted(conv.formats.items()))
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(report.kind_counts().items()))
    info = (f"{name}: applied {len(report.matched)}/{report.total} modules to {family} "
            f"({kinds}; tensors: {formats}); strength model {strength_model:g}, clip {strength_clip:g}")
    if dropped:
        info += f"; {dropped} text-encoder tensors skipped (no CLIP connected)"
    if report.unknown_keys:
        info += f"; {len(report.unknown_keys)} tensors of unknown kind not applied, e.g. {report.unknown_keys[:3]}"
    if report.unmatched:
        info += f"; {len(report.unmatched)} modules not in this model, e.g. {report.unmatched[:3]}"
    if report.unmatched or report.unknown_keys:
        log.warning("HyperSD LoRA: %s", info)
    else:
        log.info("HyperSD LoRA: %s", info)
    return info


def family_settings(path: str, metadata: dict) -> tuple:
    """Steps, cfg, sampler, scheduler, eta and their description for a file that is no official release:
    its own hypersd.* metadata (read with the file), or a known fast-LoRA family by name (lora/presets.py),
    else the defaults."""
    import comfy.samplers

    preset, notes = recommended_settings(path, metadata, comfy.samplers.SAMPLER_NAMES,
                                         comfy.samplers.SCHEDULER_NAMES)
    described = "; ".join([preset.describe()] + notes)
    return preset.steps, preset.cfg, preset.sampler, preset.scheduler, preset.eta, described


class HyperSDLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers
        import folder_paths

        return io.Schema(
            node_id="HyperSDLoraLoader",
            display_name="Hyper-SD LoRA Loader",
            category="loaders",
            description="Loads a Hyper-SD LoRA (kohya, diffusers or PEFT keys, all applied) and outputs the "
                        "recommended steps, cfg, sampler, scheduler and TCD eta: the release's, a trained file's "
                        "own hypersd.* metadata, or its fast-LoRA family's (LCM, Lightning, DMD2, PCM, TCD).",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.5, SDXL, SD3 or FLUX) to patch."),
                io.Combo.Input("release", options=[NO_RELEASE] + RELEASE_NAMES, default="Hyper-SDXL-1step-lora",
                               tooltip="An official ByteDance/Hyper-SD LoRA (downloaded into the loras folder "
                                       "if missing), or 'none' to use lora_name."),
                io.Combo.Input("lora_name", options=[NO_FILE] + folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from the loras folder; used when release is 'none'."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength on the model, relative to the release's recommended "
                                       "scale (1.0 = 1.0 for SD1.5/SDXL, 0.125 for SD3/FLUX)."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength on the text encoder (same scaling as strength_model)."),
                io.Boolean.Input("download_missing", default=True,
                                 tooltip="Download a missing official release file from the Hugging Face hub."),
                io.Clip.Input("clip", optional=True, tooltip="Optional CLIP to patch too."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.Int.Output(display_name="steps", tooltip="Recommended steps."),
                io.Float.Output(display_name="cfg", tooltip="Recommended KSampler cfg."),
                io.Combo.Output(display_name="sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                                tooltip="Recommended sampler (connects to KSampler's sampler_name)."),
                io.Combo.Output(display_name="scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                                tooltip="Recommended scheduler (connects to KSampler's scheduler)."),
                io.Float.Output(display_name="eta", tooltip="Recommended TCD eta (HyperSDTCDSampler)."),
                io.String.Output(display_name="info", tooltip="What was applied."),
            ],
        )

    @classmethod
    def execute(cls, model, release, lora_name, strength_model, strength_clip, download_missing=True,
                clip=None) -> io.NodeOutput:
        if release != NO_RELEASE:
            rel = get_release(release)
            path = release_path(rel, bool(download_missing))
        else:
            if lora_name in (None, "", NO_FILE):
                raise ValueError("lora_name: pick a LoRA file (or choose an official release)")
            path = local_lora_path(lora_name)
            rel = release_for_file(path)
        scale = rel.strength if rel is not None else 1.0
        source = "release" if release != NO_RELEASE else "lora_name"
        new_model, new_clip, _, info, metadata = load_and_apply(
            model, clip, path, strength_model * scale, strength_clip * scale, source)
        if rel is not None:
            steps, cfg, sampler, scheduler, eta = rel.steps, rel.cfg, rel.sampler, rel.scheduler, rel.eta
            info += f"; {rel.name}: {rel.note}" if rel.note else ""
        else:
            steps, cfg, sampler, scheduler, eta, described = family_settings(path, metadata)
            info += f"; {described}"
        return io.NodeOutput(new_model, new_clip, steps, float(cfg), sampler, scheduler, float(eta), info)


NODES = [HyperSDLoraLoader]

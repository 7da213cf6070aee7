#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO open implementation authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Load a Diffusion-DPO result into a stock diffusers pipeline; generate with it, or compare it with its base.

Compare a result with its base (same seeds, base on the left, DPO on the right, the prompt under each row):
    python pipeline_dpo.py compare --base stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dpo sd15-dpo-lora --prompts prompts.txt --out grid.png --device cuda --dtype float16
    python pipeline_dpo.py compare --base stabilityai/stable-diffusion-xl-base-1.0 \
        --dpo mhdang/dpo-sdxl-text2image-v1 --prompts prompts.txt --out grid.png --device cuda --dtype float16
    python pipeline_dpo.py compare --base stabilityai/stable-diffusion-3.5-medium \
        --dpo sd35-medium-dpo-lora --prompts prompts.txt --out grid.png --device cuda --dtype bfloat16
    python pipeline_dpo.py compare --base black-forest-labs/FLUX.1-dev \
        --dpo flux-dev-dpo-lora --prompts prompts.txt --out grid.png --device cuda --dtype bfloat16

Generate with a result (writes PNGs and generate.json into --out):
    python pipeline_dpo.py generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 --dpo sd15-dpo \
        --prompt "a cute corgi wearing a red scarf" --prompt "a lighthouse at sunset" --seed 0 --out images

In Python (returns a plain StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or
FluxPipeline):
    import torch
    from pipeline_dpo import load_dpo_pipeline
    pipe = load_dpo_pipeline("stabilityai/stable-diffusion-xl-base-1.0", "mhdang/dpo-sdxl-text2image-v1",
                             torch_dtype=torch.float16, device="cuda")
    image = pipe("a cute corgi wearing a red scarf", guidance_scale=5.0).images[0]

`dpo` is told apart by what is there, in this order (a hub id by its file listing, the same way). The denoiser is
what DPO trains: the UNet of SD 1.x/2.x and SDXL (unet/), the MMDiT transformer of SD3 / SD3.5 or of FLUX.1
(transformer/; its config.json names which, SD3Transformer2DModel or FluxTransformer2DModel).
  1. a *.safetensors file: LoRA weights in the diffusers format (any name)
  2. a folder with model_index.json: a full pipeline (the training scripts' default); only its unet/ or
     transformer/ (and its scheduler/, which says the prediction type it was trained for) is used, everything
     else comes from the base (DPO trains the denoiser alone)
  3. a folder with pytorch_lora_weights.safetensors (the scripts' --use_lora result, and each of its
     checkpoint-N folders): LoRA, at the strength (lora_alpha) it was trained with
  4. a folder with unet/config.json or transformer/config.json: a denoiser alone (--save_unet_only,
     --save_transformer_only, a full-run checkpoint-N folder, and the authors' releases such as
     mhdang/dpo-sdxl-text2image-v1)
  5. a folder whose config.json names UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel: the
     denoiser folder itself
The base's family decides the pipeline and must match the result's denoiser (a UNet, or LoRA keys unet.*, for SD
and SDXL; an SD3Transformer2DModel for SD3 and a FluxTransformer2DModel for FLUX.1, or LoRA keys transformer.*
whose modules and widths the base's transformer has). Weights load from safetensors only, and no remote code is
ever run.

SD3 and FLUX prompts go to T5 with the token length the result was trained with (--max_sequence_length of
train_diffusion_dpo_sd3.py or train_diffusion_dpo_flux.py, read from the result's training_args.json; the script's
default, 77 for SD3 and 512 for FLUX, where the result has none). FLUX's guidance_scale is the distilled guidance
strength of FLUX.1-dev (no classifier-free guidance pass); FLUX.1-schnell-layout bases (a transformer without that
input) sample with 4 steps and guidance 0.

Seeds: image j of every prompt uses seed + j, drawn from a CPU generator, so the starting noise is the same
on every device and `generate --seed S` reproduces the DPO half of `compare --seed S`.
"""

import argparse
import gc
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import diffusers
from diffusers import (DiffusionPipeline, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)


@dataclass(frozen=True)
class Family:
    """What pipeline_dpo needs to know about one pipeline family."""

    name: str  # as messages call it
    denoiser: str  # the model DPO trains: the pipeline's attribute and the result's subfolder, "unet" or "transformer"
    denoiser_class: str  # its model class (a key of DENOISERS): SD3 and FLUX both have a transformer/, of two kinds
    num_inference_steps: int
    guidance_scale: float
    # T5 tokens per prompt where the family has a T5 encoder (SD3, FLUX): its training script's --max_sequence_length
    # default, for results that do not record theirs (SD3's pipeline default, 256, is not what they trained on)
    max_sequence_length: int | None = None
    # (steps, guidance) for a base whose transformer has no distilled-guidance input (config guidance_embeds false:
    # FLUX.1-schnell's layout, timestep-distilled); None where the family has no such variant
    no_guidance_embeds_defaults: tuple[int, float] | None = None


# Keyed by the pipeline class name in a base's model_index.json. Sampling defaults are the authors' evaluation
# settings (50 steps; guidance 7.5 for SD1.5, 5 for SDXL); for SD3, diffusers' and Stability's (28 steps, guidance
# 7.0; also train_diffusion_dpo_sd3.py's validation defaults); for FLUX.1-dev, diffusers' and Black Forest Labs'
# (28 steps, distilled guidance 3.5; train_diffusion_dpo_flux.py's validation defaults and training guidance), and
# for FLUX.1-schnell theirs (4 steps, guidance 0).
FAMILIES = {
    "StableDiffusionPipeline": Family("Stable Diffusion 1.x/2.x", "unet", "UNet2DConditionModel", 50, 7.5),
    "StableDiffusionXLPipeline": Family("SDXL", "unet", "UNet2DConditionModel", 50, 5.0),
    "StableDiffusion3Pipeline": Family("Stable Diffusion 3 / 3.5", "transformer", "SD3Transformer2DModel", 28, 7.0,
                                       max_sequence_length=77),
    "FluxPipeline": Family("FLUX.1", "transformer", "FluxTransformer2DModel", 28, 3.5, max_sequence_length=512,
                           no_guidance_embeds_defaults=(4, 0.0)),
}
SUPPORTED_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)


@dataclass(frozen=True)
class Denoiser:
    """One kind of model DPO trains."""

    model_class: type
    folder: str  # the pipeline's attribute and the result's subfolder
    label: str  # as messages call it
    # config entries that must agree between the base's and a DPO result's for the swap to make sense (checked before
    # any weights load)
    fit_keys: tuple[str, ...]


# Keyed by model class name (a config.json's _class_name). The transformers' fit keys include their depth and width:
# SD3.5 large and medium share the text encoders and the VAE, so a mix-up would still sample; FLUX's also its
# guidance input (a FLUX.1-dev transformer does not fit a schnell base, nor the reverse).
DENOISERS = {
    "UNet2DConditionModel": Denoiser(
        UNet2DConditionModel, "unet", "UNet",
        ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "block_out_channels")),
    "SD3Transformer2DModel": Denoiser(
        SD3Transformer2DModel, "transformer", "SD3 transformer",
        ("in_channels", "out_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim", "num_layers",
         "num_attention_heads", "attention_head_dim")),
    "FluxTransformer2DModel": Denoiser(
        FluxTransformer2DModel, "transformer", "FLUX transformer",
        ("in_channels", "joint_attention_dim", "pooled_projection_dim", "num_layers", "num_single_layers",
         "num_attention_heads", "attention_head_dim", "guidance_embeds")),
}
DENOISER_FOLDERS = ("unet", "transformer")
FOLDER_LABELS = {"unet": "UNet", "transformer": "transformer"}  # what LoRA keys unet.* / transformer.* are for
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ADAPTER_NAME = "dpo"  # name of the LoRA adapter load_dpo_pipeline adds (pipe.set_adapters / disable_lora use it)

# Files that identify each kind of result (see the module docstring for the order they are tried in).
PIPELINE_INDEX = "model_index.json"
# The checkpoints' resumable adapters come last: found alone, they are refused with the folder to load instead.
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "unet_lora_adapter.safetensors",
                     "transformer_lora_adapter.safetensors")
# Key prefixes of diffusers-format LoRA files, and the denoiser the first ones belong to.
LORA_KEY_PREFIXES = {"unet.": "unet", "lora_unet_": "unet", "transformer.": "transformer", "text_encoder.": None,
                     "text_encoder_2.": None, "lora_te": None}
DENOISER_WEIGHTS = "diffusion_pytorch_model"
RUN_RESULT = "run_result.json"  # which run wrote a training output folder's results (its run_id, its last step)
TRAINING_ARGS = "training_args.json"  # the training scripts' record of their flags: {"args": {...}, "run": {...}}
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")
WHAT_WE_LOOK_FOR = (
    "model_index.json (a full pipeline), pytorch_lora_weights.safetensors, unet_lora_adapter.safetensors or "
    "transformer_lora_adapter.safetensors (LoRA), unet/config.json or transformer/config.json (a denoiser alone), "
    "config.json naming UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel (a denoiser folder), or "
    "the path of a LoRA .safetensors file"
)
# PEFT-format LoRA keys of a transformer (what the SD3 and FLUX scripts save): the module and the matrix, A or B.
TRANSFORMER_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<matrix>[AB])(\.[^.]+)?\.weight$")
# A UNet's in the diffusers format: lora.down / lora.up (A / B), or PEFT's lora_A / lora_B
UNET_LORA_KEY = re.compile(
    r"^unet\.(?P<module>.+)\.(lora\.(?P<direction>down|up)|lora_(?P<matrix>[AB]))(\.[^.]+)?\.weight$")
# Only FLUX's transformer has single-stream blocks: LoRA keys under them are FLUX's, whatever the base.
FLUX_ONLY_MODULES = "single_transformer_blocks."
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DpoResultError(ValueError):
    """`dpo` (or `base`) is not something load_dpo_pipeline can load; the message says what was found."""


@dataclass(frozen=True)
class DpoResult:
    """Where a DPO result is and what kind it is: "pipeline", "unet" (a whole UNet) or "transformer" (a whole SD3 or
    FLUX transformer), or "lora"."""

    kind: str
    location: str  # local folder or file, or a hub repo id
    on_hub: bool = False
    # the denoiser's folder inside `location` ("unet", "transformer"), or None for the folder itself
    subfolder: str | None = None
    weight_name: str | None = None  # LoRA file name inside `location`
    variant: str | None = None  # denoiser weight variant to load ("fp16"), where the result has one
    # "scheduler" where the result carries its own sampling scheduler (trained with --prediction_type): it then
    # replaces the base's, so the model samples with the prediction type it was trained for
    scheduler_subfolder: str | None = None
    # the model class of a whole denoiser (a key of DENOISERS); None for LoRA, whose file's keys say it on loading
    denoiser: str | None = None
    # the training_args.json of the run that made the result, where it is on this machine (SD3 and FLUX read their T5
    # length from it)
    training_args_file: str | None = None

    @property
    def is_lora(self):
        return self.kind == "lora"


# ----------------------------------------------------------------------------------------------------------------
# Telling what a DPO result is
# ----------------------------------------------------------------------------------------------------------------
def _dtype_kwarg(dtype):
    """from_pretrained's dtype keyword: `dtype` where diffusers deprecates `torch_dtype`, else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _denoiser_weights_variant(files, prefix, variant, where, denoiser):
    """The variant to load the denoiser under `prefix` with (None: the plain file); raises if it has no safetensors."""
    label = DENOISERS[denoiser].label
    plain = {f"{prefix}{DENOISER_WEIGHTS}.safetensors", f"{prefix}{DENOISER_WEIGHTS}.safetensors.index.json"}
    if variant is not None:
        variant_files = {f"{prefix}{DENOISER_WEIGHTS}.{variant}.safetensors",
                         f"{prefix}{DENOISER_WEIGHTS}.safetensors.index.{variant}.json"}
        if files & variant_files:
            return variant
    if files & plain:
        return None
    found = sorted(f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])
    pickled = [f for f in found if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    variants = [f for f in found if f.startswith(f"{prefix}{DENOISER_WEIGHTS}.") and f.endswith(".safetensors")]
    if variants:
        hint = f" It has variant weights ({', '.join(variants)}): pass that variant (variant=..., --variant)."
    elif pickled:
        hint = (f" It has only pickled weights; pipeline_dpo loads safetensors only (re-save the {label} with "
                "save_pretrained(..., safe_serialization=True)).")
    else:
        hint = ""
    raise DpoResultError(f"{where}: the {label} config is there but no {prefix}{DENOISER_WEIGHTS}.safetensors (or "
                         f"sharded index) next to it. Found: {found}.{hint}")


def _denoiser_folder(files):
    """The denoiser subfolder ("unet" or "transformer") whose config.json is among `files`, or None."""
    return next((folder for folder in DENOISER_FOLDERS if f"{folder}/config.json" in files), None)


def _denoiser_class(folder, read_json, where):
    """The model class (a key of DENOISERS) of the denoiser in subfolder `folder`. A unet/ is a UNet2DConditionModel
    (read no further, as releases are); a transformer/ is an SD3 or a FLUX one, as its config.json says."""
    if folder == "unet":
        return "UNet2DConditionModel"
    class_name = read_json(f"{folder}/config.json").get("_class_name")
    if class_name not in DENOISERS or DENOISERS[class_name].folder != folder:
        known = " or ".join(name for name, denoiser in DENOISERS.items() if denoiser.folder == folder)
        raise DpoResultError(f"{where}: {folder}/config.json is for {class_name!r}; pipeline_dpo loads {known} "
                             f"{folder}s.")
    return class_name


def _classify(files, read_json, location, on_hub, variant, training_args_file=None):
    """Decide what kind of DPO result a folder or hub repo holds, from its relative file paths."""
    where = f"{'hub repo' if on_hub else 'folder'} {location!r}"
    found = {"on_hub": on_hub, "training_args_file": training_args_file,
             "scheduler_subfolder": "scheduler" if "scheduler/scheduler_config.json" in files else None}
    folder = _denoiser_folder(files)
    if PIPELINE_INDEX in files:
        if folder is None:
            raise DpoResultError(f"{where} holds a pipeline ({PIPELINE_INDEX}) without unet/config.json or "
                                 "transformer/config.json; a DPO result needs its trained UNet (SD, SDXL) or "
                                 "transformer (SD3, FLUX).")
        denoiser = _denoiser_class(folder, read_json, where)
        return DpoResult("pipeline", location, subfolder=folder, denoiser=denoiser, **found,
                         variant=_denoiser_weights_variant(files, f"{folder}/", variant, where, denoiser))
    for name in LORA_WEIGHT_NAMES:
        if name in files:
            return DpoResult("lora", location, weight_name=name, **found)
    if folder is not None:
        denoiser = _denoiser_class(folder, read_json, where)
        return DpoResult(folder, location, subfolder=folder, denoiser=denoiser, **found,
                         variant=_denoiser_weights_variant(files, f"{folder}/", variant, where, denoiser))
    if "config.json" in files:
        class_name = read_json("config.json").get("_class_name")
        if class_name in DENOISERS:
            return DpoResult(DENOISERS[class_name].folder, location, denoiser=class_name, **found,
                             variant=_denoiser_weights_variant(files, "", variant, where, class_name))
        raise DpoResultError(f"{where} has a config.json for {class_name!r}, not "
                             f"{' or '.join(DENOISERS)}. Looked for {WHAT_WE_LOOK_FOR}.")
    shown = sorted(files)
    listing = ", ".join(shown[:25]) + (f", ... ({len(shown)} files)" if len(shown) > 25 else "")
    hints = []
    if any(f.startswith("checkpoint-") for f in files):
        hints.append("It holds training checkpoints: pass one of its checkpoint-N folders, or wait for the run to "
                     "finish and save its result.")
    other_safetensors = [f for f in shown if f.endswith(".safetensors") and "/" not in f]
    if other_safetensors:
        hints.append(f"For a LoRA file with another name, pass the file's path (e.g. {other_safetensors[0]!r}).")
    raise DpoResultError(f"{where} holds no DPO result that pipeline_dpo can load. Looked for {WHAT_WE_LOOK_FOR}. "
                         f"Found: {listing or 'nothing (empty)'}." + "".join(" " + h for h in hints))


def _local_files(folder):
    """Relative paths of the files in `folder` and its direct subfolders (as deep as results go); folders end in /."""
    files = set()
    for entry in os.scandir(folder):
        if entry.is_file():
            files.add(entry.name)
        elif entry.is_dir():
            files.add(f"{entry.name}/")
            files.update(f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path) if sub.is_file())
    return files


def _hub_listing(repo_id):
    """Files of a hub repo, or (offline) the folder of its cached snapshot; a clear error when neither works."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        return set(HfApi().list_repo_files(repo_id)), None
    except Exception as hub_error:  # offline, unknown repo, gated, no network: all end the same way
        try:
            return None, snapshot_download(repo_id, local_files_only=True)
        except Exception:
            offline = os.environ.get("HF_HUB_OFFLINE", "0")
            raise DpoResultError(
                f"{repo_id!r} is not a local file or folder, and it could not be looked up as a Hugging Face Hub "
                f"repo ({type(hub_error).__name__}: {hub_error}). Give the path of a training result, or check "
                f"the repo id, your login (`hf auth login`) and network (HF_HUB_OFFLINE={offline})."
            ) from hub_error


def _find_training_args(folder):
    """The training_args.json of the run a local result folder comes from, or None: in the folder itself, or above a
    denoiser folder (result/transformer) and a checkpoint-N folder, where the training scripts write it."""
    folder = Path(folder).resolve()
    candidates = [folder]
    if folder.name in DENOISER_FOLDERS:
        candidates.append(folder.parent)
    if CHECKPOINT_NAME.match(candidates[-1].name):
        candidates.append(candidates[-1].parent)
    return next((str(c / TRAINING_ARGS) for c in candidates if (c / TRAINING_ARGS).is_file()), None)


def _refuse_weights_of_another_run(folder):
    """A training output folder whose training_args.json is of a run that has not finished (it failed, or is still
    running) holds another run's weights, or none: refused, instead of loading them under the new run's flags. The
    scripts record the run in training_args.json and, once the results are written, in run_result.json."""
    try:
        started = json.loads((folder / TRAINING_ARGS).read_text())["run"]["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a training output folder, or one of a version that did not record its runs
    try:
        result = json.loads((folder / RUN_RESULT).read_text())
    except (OSError, ValueError):
        result = {}
    if result.get("run_id") == started:
        return
    written = (f"the weights there are from run {result.get('run_id')}, which finished at step "
               f"{result.get('global_step')}" if result else "no run has finished writing weights there")
    raise DpoResultError(
        f"{str(folder)!r}: the run recorded in its {TRAINING_ARGS} (run {started}) did not finish (it failed or is "
        f"still running), and {written}. Let that run finish (--resume_from_checkpoint latest), load one of its "
        "checkpoint-N folders, or train into a fresh --output_dir.")


def result_training_args(result):
    """The flags the result was trained with (the "args" of its training_args.json), or {} where it has none."""
    if result is None or result.training_args_file is None:
        return {}
    try:
        record = json.loads(Path(result.training_args_file).read_text())
    except (OSError, ValueError) as error:
        raise DpoResultError(f"{result.training_args_file!r} cannot be read as JSON ({error}); restore it from the "
                             "training run, or move it away to sample with the defaults.") from error
    args = record.get("args") if isinstance(record, dict) else None
    return args if isinstance(args, dict) else {}  # another tool's file of that name: not ours to read


def resolve_dpo_result(dpo, variant=None):
    """Tell what `dpo` is (local path or hub id) by what is there; returns a DpoResult or raises DpoResultError."""
    dpo = os.fspath(dpo)
    path = Path(dpo).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise DpoResultError(f"{dpo!r} is a {path.suffix or 'suffix-less'} file; a LoRA file must be "
                                 ".safetensors (pickled weights are not loaded). For a full result, pass its folder.")
        return DpoResult("lora", str(path.parent), weight_name=path.name,
                         training_args_file=_find_training_args(path.parent))
    if path.is_dir():
        files = _local_files(path)

        def read_json(name):
            return json.loads((path / name).read_text())

        _refuse_weights_of_another_run(path)
        return _classify(files, read_json, str(path), on_hub=False, variant=variant,
                         training_args_file=_find_training_args(path))
    if not HUB_ID.match(dpo) or dpo.endswith(".safetensors"):
        raise DpoResultError(f"{dpo!r} does not exist (no such file or folder) and is not a hub repo id.")

    files, cached_folder = _hub_listing(dpo)
    if cached_folder is not None:  # offline with a cached snapshot: decide (and load) from the cache
        return resolve_dpo_result(cached_folder, variant=variant)

    def read_hub_json(name):
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(dpo, name)).read_text())

    return _classify(files, read_hub_json, dpo, on_hub=True, variant=variant)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def base_pipeline_class_name(base, revision=None):
    """The base's pipeline class name from its model_index.json; raises unless it is SD 1.x/2.x, SDXL, SD3 or
    FLUX."""
    try:
        config = DiffusionPipeline.load_config(base, revision=revision)
    except Exception as error:
        raise DpoResultError(f"Could not read model_index.json of the base {base!r} ({type(error).__name__}: "
                             f"{error}). --base must be a diffusers pipeline folder or hub id.") from error
    class_name = config.get("_class_name")
    if class_name not in FAMILIES:
        raise DpoResultError(f"The base {base!r} is a {class_name}; pipeline_dpo supports text-to-image "
                             f"{', '.join(FAMILIES)} bases.")
    return class_name


def pipeline_family(pipe):
    """The Family of a loaded pipeline (one of SUPPORTED_PIPELINES)."""
    return FAMILIES[type(pipe).__name__]


def _refuse_other_family(what, label, trained_for, family, base_name):
    """The error for a result of another family than the base's; trained_for: the pipeline class names it may be for."""
    names = " or ".join(FAMILIES[name].name for name in trained_for)
    raise DpoResultError(
        f"{what} holds {label} weights ({names}), but {base_name} is a {family.name} pipeline (denoiser: "
        f"{family.denoiser_class}). Pass the {names} base the result was trained from.")


def _check_denoiser_fits(result_denoiser, family, what, base_name):
    """Refuse a whole denoiser (a DENOISERS class name) that is not the base family's (an SD3 transformer for an SDXL
    or a FLUX base, ...)."""
    if result_denoiser is not None and result_denoiser != family.denoiser_class:
        trained_for = [name for name, f in FAMILIES.items() if f.denoiser_class == result_denoiser]
        _refuse_other_family(what, DENOISERS[result_denoiser].label, trained_for, family, base_name)


def check_dpo_result_fits(base, result, *, revision=None, dpo_name=None):
    """Refuse a result for another family than the base's (an SD3 transformer or LoRA for an SDXL base, a FLUX one for
    SD3, an SDXL UNet for SD3, ...) or a denoiser whose config differs from the base's, before any weights load:
    compare and win-rate sample the base first, which at full size takes minutes."""
    family = FAMILIES[base_pipeline_class_name(base, revision=revision)]
    dpo_name = dpo_name or result.location
    denoiser_class = DENOISERS[family.denoiser_class].model_class
    if result.is_lora:
        def base_modules():  # the base's transformer built on the meta device: its modules and widths, no weights
            config = denoiser_class.load_config(base, subfolder=family.denoiser, revision=revision)
            with torch.device("meta"):
                return dict(denoiser_class.from_config(config).named_modules())

        _check_lora_fits(result, family, f"The LoRA {dpo_name!r}", f"the base {base!r}", base_modules)
        return
    _check_denoiser_fits(result.denoiser, family, f"The DPO result {dpo_name!r}", f"the base {base!r}")
    base_config = denoiser_class.load_config(base, subfolder=family.denoiser, revision=revision)
    _check_denoiser_config(result, base_config, f"the base {base!r}")


def _check_denoiser_config(result, base_config, base_name):
    """Refuse a whole DPO denoiser whose architecture (DENOISERS' fit keys) differs from the base's."""
    denoiser = DENOISERS[result.denoiser]
    dpo_config = denoiser.model_class.load_config(result.location, subfolder=result.subfolder)
    differences = [f"{key}: base {base_config.get(key)!r}, DPO {dpo_config.get(key)!r}"
                   for key in denoiser.fit_keys if base_config.get(key) != dpo_config.get(key)]
    if differences:
        raise DpoResultError(f"The DPO {denoiser.label} in {result.location!r} does not fit {base_name} "
                             f"({'; '.join(differences)}). Pass the base model the result was trained from.")


def load_dpo_denoiser(result, base_config, torch_dtype=None, base_name="the base"):
    """The UNet or transformer of a full-pipeline or denoiser-only DPO result (safetensors only), checked against
    the base's denoiser config.

    The configs are compared before any weights load, so a mismatched pair fails in a second, not after minutes.
    """
    _check_denoiser_config(result, base_config, base_name)
    return DENOISERS[result.denoiser].model_class.from_pretrained(
        result.location, subfolder=result.subfolder, variant=result.variant, use_safetensors=True,
        **_dtype_kwarg(torch_dtype),
    )


def load_result_scheduler(result):
    """The sampling scheduler a DPO result carries (see DpoResult.scheduler_subfolder), in its own class."""
    config = diffusers.DDPMScheduler.load_config(result.location, subfolder=result.scheduler_subfolder)
    return getattr(diffusers, config["_class_name"]).from_config(config)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA result's file, read as far as its header: where it is, which denoiser its keys are for ("unet",
    "transformer", or None for text-encoder adapters alone), and the shapes of each denoiser module's A and B
    matrices ({module: {"A": shape, "B": shape}})."""

    path: str
    denoiser: str | None
    modules: dict


def _lora_file(result):
    """The LoraFile of a LoRA result (downloaded from the hub if needed), checked to hold LoRA weights in the diffusers
    format that `load_lora_weights` reads with its adapter config."""
    from safetensors import safe_open

    if result.on_hub:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(result.location, result.weight_name)
    else:
        file = os.path.join(result.location, result.weight_name)
    with safe_open(file, framework="pt") as weights:
        keys = list(weights.keys())
        modules = {}
        for key in keys:
            match = TRANSFORMER_LORA_KEY.match(key) or UNET_LORA_KEY.match(key)
            if match:
                matrix = match["matrix"] or {"down": "A", "up": "B"}[match.groupdict().get("direction")]
                modules.setdefault(match["module"], {})[matrix] = weights.get_slice(key).get_shape()
    if not any("lora" in key for key in keys):
        raise DpoResultError(f"{file!r} holds no LoRA weights (keys such as {', '.join(keys[:3])}). A whole "
                             "denoiser must come as a folder with config.json (UNet2DConditionModel, "
                             "SD3Transformer2DModel or FluxTransformer2DModel save_pretrained).")
    prefixes = [next((p for p in LORA_KEY_PREFIXES if key.startswith(p)), None) for key in keys]
    if not any(prefixes):
        # A training checkpoint's resumable adapter: PEFT keys, without the adapter config (alpha) beside them.
        raise DpoResultError(f"{file!r} is a training checkpoint's resumable LoRA adapter, which does not carry its "
                             "lora_alpha. Load the checkpoint folder instead: its pytorch_lora_weights.safetensors "
                             "holds the same adapter with its config.")
    denoiser = next((LORA_KEY_PREFIXES[p] for p in prefixes if p and LORA_KEY_PREFIXES[p]), None)
    return LoraFile(file, denoiser, modules)


def _transformer_lora_family(lora, result):
    """The pipeline class name a transformer LoRA was trained for, where it can be told before loading: FLUX where it
    adapts single-stream blocks (only FLUX's transformer has them), else the family of the base its run's
    training_args.json names, where that base is on this machine; None where neither says."""
    if any(module.startswith(FLUX_ONLY_MODULES) for module in lora.modules):
        return "FluxPipeline"
    trained_from = result_training_args(result).get("pretrained_model_name_or_path")
    # A relative path was relative to the run's working directory, which is not known here.
    if not isinstance(trained_from, str) or (os.path.exists(trained_from) and not os.path.isabs(trained_from)):
        return None
    try:
        class_name = DiffusionPipeline.load_config(trained_from, local_files_only=True).get("_class_name")
    except Exception:  # not here (a hub id out of the cache, a moved folder): the keys alone decide
        return None
    return class_name if class_name in FAMILIES and FAMILIES[class_name].denoiser == "transformer" else None


def _lora_module_problems(lora, modules):
    """What in a LoRA does not fit the denoiser whose named modules are `modules`: modules it lacks, and Linear layers
    whose input (A's columns) or output (B's rows) width differs."""
    problems = []
    for name, shapes in lora.modules.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: not in the base's {lora.denoiser}")
            continue
        layer = getattr(module, "base_layer", module)  # a layer that carries adapters already wraps the Linear
        for matrix, axis, feature in (("A", 1, "in_features"), ("B", 0, "out_features")):
            width = getattr(layer, feature, None)
            if width is not None and matrix in shapes and shapes[matrix][axis] != width:
                problems.append(f"{name}: {feature} LoRA {shapes[matrix][axis]}, base {width}")
    return problems


def _check_lora_fits(result, family, what, base_name, base_modules):
    """Refuse a LoRA for another family than the base's: UNet keys for a transformer base or the reverse, a FLUX LoRA
    for an SD3 base or the reverse, or modules or widths the base's denoiser does not have (an SDXL LoRA on SD1.5,
    which diffusers would stop with a raw size mismatch). base_modules: a callable giving the base denoiser's named
    modules."""
    lora = _lora_file(result)
    if lora.denoiser is None:  # text-encoder adapters alone: load_lora_weights says whether they match
        return
    lora_family = _transformer_lora_family(lora, result) if lora.denoiser == "transformer" else None
    if lora.denoiser != family.denoiser or (lora_family is not None and FAMILIES[lora_family] != family):
        trained_for = [lora_family] if lora_family else [name for name, f in FAMILIES.items()
                                                         if f.denoiser == lora.denoiser]
        _refuse_other_family(what, FOLDER_LABELS[lora.denoiser], trained_for, family, base_name)
    problems = _lora_module_problems(lora, base_modules())
    if problems:
        others = [f.name for f in FAMILIES.values() if f.denoiser == family.denoiser and f != family]
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DpoResultError(
            f"{what} does not fit {base_name}, a {family.name} pipeline ({shown}). It was trained for another base: "
            f"a {family.name} model of another size, or {' or '.join(others)}. Pass the base the result was trained "
            "from.")


def _check_lora_options(result, lora_scale, fuse_lora, dpo_name):
    if (result is None or not result.is_lora) and (lora_scale != 1.0 or fuse_lora):
        what = "not given" if result is None else f"{dpo_name!r}, a whole {DENOISERS[result.denoiser].label}"
        raise DpoResultError(f"lora_scale and fuse_lora apply to LoRA results; the DPO result is {what}.")


def apply_dpo_result(pipe, result, *, torch_dtype=None, lora_scale=1.0, fuse_lora=False, dpo_name=None):
    """Put a DPO result into a loaded base pipeline, in place: swap its denoiser (UNet or transformer), or add the
    LoRA adapter.

    The base denoiser is released before the DPO one moves to the pipeline's device, so only one is ever on it.
    """
    dpo_name = dpo_name or result.location
    _check_lora_options(result, lora_scale, fuse_lora, dpo_name)
    family = pipeline_family(pipe)
    if not result.is_lora:
        _check_denoiser_fits(result.denoiser, family, f"The DPO result {dpo_name!r}", "the loaded base")
    if result.scheduler_subfolder is not None:
        pipe.scheduler = load_result_scheduler(result)
    if not result.is_lora:
        base_denoiser = getattr(pipe, family.denoiser)
        dpo_denoiser = load_dpo_denoiser(result, base_denoiser.config, torch_dtype=torch_dtype or base_denoiser.dtype,
                                         base_name="the loaded base")
        device = base_denoiser.device
        del base_denoiser  # with the pipeline's reference replaced next, nothing holds the base denoiser
        setattr(pipe, family.denoiser, dpo_denoiser)  # still on the CPU: the base one leaves the device first
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        getattr(pipe, family.denoiser).to(device)
        return pipe

    _check_lora_fits(result, family, f"The LoRA {dpo_name!r}", "the loaded base",
                     lambda: dict(getattr(pipe, family.denoiser).named_modules()))
    file = _lora_file(result).path
    # By path, not as a state dict: diffusers then reads the adapter config (lora_alpha) from the file's header; a
    # dict loses it and the adapter would apply at alpha = rank (a --rank 4 --lora_alpha 8 result at half strength).
    pipe.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file), adapter_name=ADAPTER_NAME)
    loaded_into = [component for component, names in pipe.get_list_adapters().items() if ADAPTER_NAME in names]
    if not loaded_into:
        raise DpoResultError(f"No weight in the LoRA {dpo_name!r} matched a module of the base: was it trained "
                             "on another base model?")
    if fuse_lora:
        # fuse_lora scales the adapter itself; set_adapters first would apply the scale twice.
        pipe.fuse_lora(components=loaded_into, lora_scale=lora_scale, adapter_names=[ADAPTER_NAME])
        pipe.unload_lora_weights()  # the fused weights stay; the separate LoRA matrices go
    else:
        # adapter_weights scales each LoRA update; 0 adds exactly nothing, so the images equal the base's.
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[lora_scale])
    return pipe


def load_dpo_pipeline(base, dpo=None, *, torch_dtype=None, device=None, variant=None, lora_scale=1.0,
                      fuse_lora=False, revision=None):
    """A stock StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline (its class
    follows `base`) with `dpo` in it.

    base: hub id or folder of the model the result was trained from. dpo: None (the base alone), a full
    pipeline folder or hub id (its UNet or transformer is used), a folder or hub id holding unet/ or transformer/,
    a UNet or transformer folder, or LoRA weights (a folder with pytorch_lora_weights.safetensors, or a
    .safetensors file); see the module docstring. A DpoResult from resolve_dpo_result is taken as it is.
    variant and revision apply to the base (variant also to a DPO denoiser that has such files).
    lora_scale: strength of a LoRA result (0 gives exactly the base, 1 as trained); fuse_lora merges it into
    the weights at that scale and drops the adapter (slightly faster sampling; cannot be switched off after).
    """
    base = os.fspath(base)
    pipeline_class_name = base_pipeline_class_name(base, revision=revision)
    family = FAMILIES[pipeline_class_name]
    if dpo is None or isinstance(dpo, DpoResult):
        result = dpo
    else:
        result = resolve_dpo_result(dpo, variant=variant)
    dpo_name = None if result is None else (result.location if isinstance(dpo, DpoResult) else os.fspath(dpo))
    _check_lora_options(result, lora_scale, fuse_lora, dpo_name)
    if result is not None:  # a result of another family or size fails before any weights load
        check_dpo_result_fits(base, result, revision=revision, dpo_name=dpo_name)

    components = {}
    if result is not None and not result.is_lora:
        # Load the DPO denoiser instead of the base's, never both.
        base_config = DENOISERS[family.denoiser_class].model_class.load_config(base, subfolder=family.denoiser,
                                                                               revision=revision)
        components[family.denoiser] = load_dpo_denoiser(result, base_config, torch_dtype=torch_dtype,
                                                        base_name=f"the base {base!r}")
        if result.scheduler_subfolder is not None:
            components["scheduler"] = load_result_scheduler(result)
    pipe = DiffusionPipeline.from_pretrained(base, revision=revision, variant=variant, use_safetensors=True,
                                             **_dtype_kwarg(torch_dtype), **components)
    if type(pipe).__name__ != pipeline_class_name or not isinstance(pipe, SUPPORTED_PIPELINES):
        raise DpoResultError(f"The base {base!r} loaded as {type(pipe).__name__}, expected {pipeline_class_name}.")
    if device is not None:
        pipe.to(device)
    if result is not None and result.is_lora:
        apply_dpo_result(pipe, result, torch_dtype=torch_dtype, lora_scale=lora_scale, fuse_lora=fuse_lora,
                         dpo_name=dpo_name)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Generating and comparing
# ----------------------------------------------------------------------------------------------------------------
def family_sampling_defaults(pipe):
    """(num_inference_steps, guidance_scale) the family samples with by default: FAMILIES', or for a base whose
    transformer has no distilled-guidance input (FLUX.1-schnell's layout) the family's no_guidance_embeds_defaults."""
    family = pipeline_family(pipe)
    if family.no_guidance_embeds_defaults is not None and not getattr(pipe, family.denoiser).config.guidance_embeds:
        return family.no_guidance_embeds_defaults
    return family.num_inference_steps, family.guidance_scale


def sampling_settings(pipe, num_inference_steps=None, guidance_scale=None, max_sequence_length=None, result=None):
    """Steps and guidance: what was asked, else the family's default (the authors' values). SD3 and FLUX also get
    their T5 length: what was asked, else what `result` was trained with (its training_args.json), else the training
    script's default; base and DPO images then see the same prompt embedding, the one the result trained on."""
    family = pipeline_family(pipe)
    default_steps, default_guidance = family_sampling_defaults(pipe)
    settings = {
        "num_inference_steps": num_inference_steps if num_inference_steps is not None else default_steps,
        "guidance_scale": guidance_scale if guidance_scale is not None else default_guidance,
    }
    if family.max_sequence_length is not None:
        trained = result_training_args(result).get("max_sequence_length")
        settings["max_sequence_length"] = next(
            length for length in (max_sequence_length, trained, family.max_sequence_length) if length is not None)
    elif max_sequence_length is not None:
        raise DpoResultError(f"max_sequence_length is the T5 prompt length of SD3 and FLUX pipelines; the base is a "
                             f"{family.name} pipeline, which has no T5 encoder. Drop it.")
    return settings


def generate_images(pipe, prompts, *, seed=0, num_images_per_prompt=1, num_inference_steps=50, guidance_scale=7.5,
                    height=None, width=None, label="", batch_size=1, max_sequence_length=None):
    """Images in prompt-major order; image j of each prompt starts from seed + j (a CPU generator).

    `batch_size` images go through the pipeline at once, each with its own generator, so the starting noise of
    every image is the same at any batch size (the pictures may differ by float rounding between batch sizes).
    max_sequence_length: SD3's and FLUX's T5 tokens per prompt (None for SD and SDXL, whose pipelines do not take
    it). guidance_scale is FLUX's distilled guidance strength (FluxPipeline runs no classifier-free guidance).
    """
    t5_length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    jobs = [(prompt, seed + j) for prompt in prompts for j in range(num_images_per_prompt)]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        print(f"[{label or 'generate'}] images {start + 1}-{start + len(chunk)}/{len(jobs)}, seed {chunk[0][1]}: "
              f"{chunk[0][0]}", file=sys.stderr, flush=True)
        generators = [torch.Generator("cpu").manual_seed(image_seed) for _, image_seed in chunk]
        images.extend(pipe([prompt for prompt, _ in chunk], num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, height=height, width=width,
                           generator=generators if len(chunk) > 1 else generators[0], **t5_length).images)
    return images


def label_font(size):
    """A font for grid labels: the scalable default where Pillow has one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(text, font, max_width, max_lines):
    """Greedy word wrap to max_width pixels; beyond max_lines the last line ends in '...'."""
    lines = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while font.getlength(word) > max_width and len(word) > 1:  # a word wider than the row: hard-break it
                cut = max(1, int(len(word) * max_width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and font.getlength(lines[-1] + "...") > max_width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines or [""]


def make_comparison_grid(prompts, groups, num_images_per_prompt, scores=None, cell_scale=1, max_caption_lines=3):
    """One row per prompt: each model's images of it side by side, a gap between models, each model's name over its
    columns, the prompt under the row, and under each image its score where `scores` has one.

    Args:
        groups: {label: images} in column order, e.g. {"base": ..., "DPO": ...}; each list prompt-major (prompt p's
            images at p * n ... p * n + n - 1) and from the same seeds in every group.
        scores: None, or {label: [one number per image]} (a reward) for some or all of the groups.
        cell_scale: each image enlarged by this whole factor (nearest neighbour), for images of a few pixels.

    Returns (grid, layout); layout gives every cell's position (what a JSON records and tests check):
    layout["columns"][label] the left edges of a group's cells, layout["row_tops"] the top of each row.
    """
    labels = list(groups)
    n = num_images_per_prompt
    cell_width, cell_height = (side * cell_scale for side in next(iter(groups.values()))[0].size)
    gap = max(4, cell_width // 32)
    font = label_font(max(10, min(cell_height, 2 * cell_width) // 24))
    line_height = font.getbbox("Ag")[3] + 4
    pad = 4
    group_width = n * cell_width
    grid_width = len(labels) * group_width + (len(labels) - 1) * gap
    captions = [_wrap(prompt, font, grid_width - 2 * pad, max_caption_lines) for prompt in prompts]
    header_height = line_height + 2 * pad
    score_height = line_height if scores else 0
    caption_height = max(len(lines) for lines in captions) * line_height + 2 * pad
    row_height = cell_height + score_height + caption_height
    grid = Image.new("RGB", (grid_width, header_height + len(prompts) * row_height), "white")
    draw = ImageDraw.Draw(grid)

    columns = {label: [g * (group_width + gap) + j * cell_width for j in range(n)] for g, label in enumerate(labels)}
    for label in labels:
        draw.text((columns[label][0] + (group_width - font.getlength(label)) / 2, pad), label, fill="black", font=font)
    row_tops = [header_height + p * row_height for p in range(len(prompts))]
    for p, top in enumerate(row_tops):
        for label, images in groups.items():
            for j in range(n):
                image = images[p * n + j].convert("RGB")
                if cell_scale != 1:
                    image = image.resize((cell_width, cell_height), Image.Resampling.NEAREST)
                grid.paste(image, (columns[label][j], top))
                if scores and label in scores:
                    text = f"{scores[label][p * n + j]:.3g}"
                    draw.text((columns[label][j] + (cell_width - font.getlength(text)) / 2, top + cell_height + 2),
                              text, fill="dimgray", font=font)
        for k, line in enumerate(captions[p]):
            draw.text((pad, top + cell_height + score_height + pad + k * line_height), line, fill="black", font=font)
    layout = {"cell_width": cell_width, "cell_height": cell_height, "gap": gap, "header_height": header_height,
              "score_height": score_height, "caption_height": caption_height, "columns": columns,
              "row_tops": row_tops}
    return grid, layout


def read_prompts(file):
    """Prompts from a text file, one per line; blank lines and lines starting with '#' are skipped."""
    prompts = [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in prompts if prompt and not prompt.startswith("#")]
    if not prompts:
        raise SystemExit(f"{file} holds no prompts (one per line; '#' starts a comment line).")
    return prompts


def run_record(args, pipe, settings, result, images):
    """What was run, for the JSON written next to the images."""
    return {
        "base": args.base, "dpo": args.dpo, "dpo_kind": result.kind if result else None,
        "pipeline": type(pipe).__name__, "seed": args.seed, "num_images_per_prompt": args.num_images_per_prompt,
        **settings, "height": images[0].height, "width": images[0].width, "dtype": args.dtype,
        "device": args.device, "variant": args.variant, "revision": args.revision,
        "lora_scale": args.lora_scale, "fuse_lora": args.fuse_lora,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def _slug(text, length=40):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def generate(args):
    result = resolve_dpo_result(args.dpo, variant=args.variant) if args.dpo else None
    pipe = load_dpo_pipeline(args.base, result, torch_dtype=DTYPES[args.dtype], device=args.device,
                             variant=args.variant, revision=args.revision, lora_scale=args.lora_scale,
                             fuse_lora=args.fuse_lora)
    pipe.set_progress_bar_config(disable=False)
    settings = sampling_settings(pipe, args.num_inference_steps, args.guidance_scale, args.max_sequence_length, result)
    images = generate_images(pipe, args.prompt, seed=args.seed, num_images_per_prompt=args.num_images_per_prompt,
                             height=args.height, width=args.width, label="dpo" if args.dpo else "base",
                             batch_size=args.batch_size, **settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for index, image in enumerate(images):
        p, j = divmod(index, args.num_images_per_prompt)
        name = f"{p:03d}-{j:02d}-seed{args.seed + j}-{_slug(args.prompt[p])}.png"
        image.save(out / name)
        files.append({"file": name, "prompt": args.prompt[p], "seed": args.seed + j})
    record = {"command": "generate", **run_record(args, pipe, settings, result, images), "images": files}
    (out / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {len(files)} images and generate.json to {out}")


def compare(args):
    prompts = read_prompts(args.prompts)
    result = resolve_dpo_result(args.dpo, variant=args.variant)  # fail on a bad --dpo before any sampling
    _check_lora_options(result, args.lora_scale, args.fuse_lora, args.dpo)
    check_dpo_result_fits(args.base, result, revision=args.revision, dpo_name=args.dpo)
    # One pipeline: the base's images first, then the DPO denoiser replaces the base's (or the LoRA is added).
    pipe = load_dpo_pipeline(args.base, None, torch_dtype=DTYPES[args.dtype], device=args.device,
                             variant=args.variant, revision=args.revision)
    pipe.set_progress_bar_config(disable=False)
    settings = sampling_settings(pipe, args.num_inference_steps, args.guidance_scale, args.max_sequence_length, result)
    common = dict(seed=args.seed, num_images_per_prompt=args.num_images_per_prompt, height=args.height,
                  width=args.width, batch_size=args.batch_size, **settings)
    base_images = generate_images(pipe, prompts, label="base", **common)
    apply_dpo_result(pipe, result, torch_dtype=DTYPES[args.dtype], lora_scale=args.lora_scale,
                     fuse_lora=args.fuse_lora, dpo_name=args.dpo)
    dpo_images = generate_images(pipe, prompts, label="dpo", **common)

    grid, layout = make_comparison_grid(prompts, {"base": base_images, "DPO": dpo_images},
                                        args.num_images_per_prompt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    record = {"command": "compare", "grid": out.name, **run_record(args, pipe, settings, result, base_images),
              "prompts": prompts, "seeds": [args.seed + j for j in range(args.num_images_per_prompt)],
              "layout": layout}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out} ({grid.width}x{grid.height}: {len(prompts)} rows, base left, DPO right) and "
          f"{out.with_suffix('.json')}")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", required=True,
                        help="Hub id or folder of the base pipeline the result was trained from "
                             "(Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3 / 3.5, or FLUX.1 dev or schnell).")
    common.add_argument("--seed", type=int, default=0,
                        help="Image j of every prompt starts from seed + j (CPU generator: same noise on any device).")
    common.add_argument("--num_images_per_prompt", type=int, default=1, help="Images per prompt (and per model).")
    common.add_argument("--num_inference_steps", type=int, default=None,
                        help="Sampling steps. Default per family: 50 for SD 1.x/2.x and SDXL (the authors' "
                             "setting), 28 for SD3 and FLUX.1-dev (diffusers'), 4 for FLUX.1-schnell.")
    common.add_argument("--guidance_scale", type=float, default=None,
                        help="Classifier-free guidance scale; for FLUX the distilled guidance strength the "
                             "transformer is given. Default per family: 7.5 for SD 1.x/2.x, 5.0 for SDXL (the "
                             "authors' values), 7.0 for SD3, 3.5 for FLUX.1-dev (diffusers' defaults), 0 for "
                             "FLUX.1-schnell.")
    common.add_argument("--max_sequence_length", type=int, default=None,
                        help="SD3 and FLUX only: T5 tokens per prompt. Default: what the result was trained with "
                             "(its training_args.json), else the training script's default (77 SD3, 512 FLUX).")
    common.add_argument("--height", type=int, default=None, help="Image height in pixels. Default: the model's.")
    common.add_argument("--batch_size", type=int, default=1,
                        help="Images per pipeline call; each keeps its own seed, so the noise is the same at any size.")
    common.add_argument("--width", type=int, default=None, help="Image width in pixels. Default: the model's.")
    common.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="Weights' dtype. float16/bfloat16 halve memory (use them on a GPU).")
    common.add_argument("--device", default="cpu", help="Device to sample on: cpu, cuda, cuda:1, mps, ...")
    common.add_argument("--variant", default=None,
                        help="Weight variant of the base (e.g. fp16); also used for a DPO UNet or transformer "
                             "that has it.")
    common.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the base.")
    common.add_argument("--lora_scale", type=float, default=1.0,
                        help="LoRA results only: strength of the adapter (0 = the base exactly, 1 = as trained).")
    common.add_argument("--fuse_lora", action="store_true",
                        help="LoRA results only: merge the adapter into the UNet or transformer at --lora_scale "
                             "(a little faster).")

    parser = argparse.ArgumentParser(description="Load Diffusion-DPO results into stock diffusers pipelines: "
                                                 "generate images, or compare a result with its base.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,compare}")
    generate_parser = commands.add_parser(
        "generate", parents=[common], help="Generate images with a DPO result (or the base alone).",
        description="Write one PNG per prompt and seed into --out, plus generate.json recording what was run.")
    generate_parser.add_argument("--dpo", default=None,
                                 help="The DPO result: full pipeline, unet/ or transformer/ folder or hub id, UNet "
                                      "or transformer folder, LoRA folder or .safetensors file. Omit to generate "
                                      "with the base alone.")
    generate_parser.add_argument("--prompt", action="append", required=True,
                                 help="A prompt; repeat the flag for more prompts.")
    generate_parser.add_argument("--out", required=True, help="Folder to write the images and generate.json to.")

    compare_parser = commands.add_parser(
        "compare", parents=[common], help="Base and DPO images from the same seeds, side by side, in one grid.",
        description="One row per prompt: base images on the left, DPO images on the right, the prompt under the "
                    "row. Writes the grid and a JSON of what was run next to it (grid.png -> grid.json).")
    compare_parser.add_argument("--dpo", required=True,
                                help="The DPO result: full pipeline, unet/ or transformer/ folder or hub id, UNet or "
                                     "transformer folder, LoRA folder or .safetensors file.")
    compare_parser.add_argument("--prompts", required=True,
                                help="Text file of prompts, one per line ('#' lines and blank lines are skipped).")
    compare_parser.add_argument("--out", required=True, help="Path of the grid image to write, e.g. grid.png.")
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    if args.num_images_per_prompt < 1:
        parser.error("--num_images_per_prompt must be at least 1.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8, got {value}.")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        parser.error(f"--max_sequence_length must be between 1 and 512 (T5's limit in SD3 and FLUX), got "
                     f"{args.max_sequence_length}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for CUDA, but torch sees no CUDA device here.")
    return args


def main(args):
    try:
        if args.command == "generate":
            generate(args)
        else:
            compare(args)
    except DpoResultError as error:  # a user's mistake: say what is wrong, without a traceback
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main(parse_args())

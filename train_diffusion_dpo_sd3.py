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
"""Flow-DPO fine-tuning of Stable Diffusion 3 / 3.5 on preference pairs (Diffusion-DPO, Wallace et al., 2311.12908,
carried over to flow matching as in VideoAlign's Flow-DPO).

Launch (one GPU, LoRA, SD3.5 medium, text embeddings and latents cached first):
    accelerate launch train_diffusion_dpo_sd3.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
        --dataset_name yuvalkirstain/pickapic_v2 --cache_latents --use_lora --rank 16 \
        --train_batch_size 1 --gradient_accumulation_steps 64 --learning_rate 1e-5 --gradient_checkpointing \
        --beta_dpo 500 --max_train_steps 2000 --mixed_precision bf16 --output_dir sd35-medium-dpo-lora

The full fine-tune of SD3.5 large (8B) shards the transformer with FSDP:
    accelerate launch --config_file configs/fsdp_sd3.yaml --num_processes 8 train_diffusion_dpo_sd3.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-large ... --cache_latents \
        --train_batch_size 1 --gradient_accumulation_steps 32 --learning_rate 1e-8 --scale_lr \
        --use_adafactor --gradient_checkpointing --mixed_precision bf16

Same flags and meanings as train_diffusion_dpo.py (SD 1.x/2.x), plus what SD3 needs: a rectified-flow target
(x_t = (1 - sigma) x_0 + sigma eps, velocity eps - x_0) with SD3's timestep densities and loss weightings from
diffusers.training_utils, three text encoders (CLIP-L, CLIP-G, T5-XXL; joint and pooled embeddings as the pipeline
computes them), and the VAE's shift and scaling factors. The DPO math lives in `diffusion_dpo_loss`, unchanged: it
takes the per-sample velocity errors where the SD scripts give noise errors.
Functions marked `# Copied from train_diffusion_dpo.<name>` are kept identical to the SD script by a test, with what
the SD script calls its UNet renamed to the transformer.
This file is self-contained: it imports only pip packages, so it runs when copied alone.
"""
# Every "# Copied from train_diffusion_dpo.<name>" below also renames unet->transformer, UNet->transformer,
#     UNet2DConditionModel->SD3Transformer2DModel, StableDiffusionPipeline->StableDiffusion3Pipeline.

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image, ImageDraw, ImageFont, ImageOps

import diffusers
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (cast_training_params, compute_density_for_timestep_sampling,
                                      compute_loss_weighting_for_sd3)
from diffusers.utils import check_min_version
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


check_min_version("0.30.0")

logger = get_logger(__name__, log_level="INFO")

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sft", "mapo", "sdpo")
REFERENCE_FREE_LOSSES = ("sft", "mapo")  # no reference model is built, and no reference forward runs
MAPO_SNR, MAPO_TIMESTEPS = 0.5, 1000  # MaPO's snr_value and the T its margin is scaled by (the authors' code)
# SD3's timestep densities and loss weightings, as diffusers.training_utils names them (and diffusers' SD3 examples)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# accelerate's trackers (accelerate.utils.LoggerType), listed here so --help needs none of them imported
REPORT_TO = ("tensorboard", "wandb", "all", "none", "aim", "trackio", "comet_ml", "mlflow", "clearml", "dvclive",
             "swanlab")
DEFAULT_FULL_LEARNING_RATE = 1e-8  # per pair, with --scale_lr: the authors' 2.048e-5 at 2048 pairs
DEFAULT_LORA_LEARNING_RATE = 5e-5  # LoRA adapters start at zero: at the full fine-tune's rate they barely move
DEFAULT_VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a cute corgi wearing a red scarf, studio portrait",
    "a bowl of ramen on a wooden table, cinematic lighting",
    "a watercolor painting of a lighthouse at sunset",
]
# The joint-attention blocks' projections: image stream (to_*), text stream (add_*_proj, to_add_out), as diffusers'
# SD3 LoRA example targets them. Feed-forward layers: add "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,
# ff_context.net.2".
DEFAULT_LORA_TARGETS = "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj," \
                       "attn.to_add_out"
# Names of the files the final results are made of; the hub push uploads these and nothing else.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_LORA_NAME = "transformer_lora_adapter.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# The DPO objective
# ----------------------------------------------------------------------------------------------------------------
# Copied from train_diffusion_dpo.diffusion_dpo_loss
def diffusion_dpo_loss(model_losses, ref_losses, beta_dpo, loss_type="sigmoid"):
    """Diffusion-DPO loss from per-sample denoising errors (Wallace et al. 2023, eq. 14).

    L = -log sigmoid( -(beta_dpo / 2) * [ (m_w - m_l) - (r_w - r_l) ] )

    with m_* = ||target - eps_theta(x_t, t, c)||^2 and r_* the same under the frozen reference, each a mean over
    C, H, W. The -beta/2 convention is the authors' (their T * omega(lambda_t) weighting folded into beta).

    Args:
    MaPO (Hong et al. 2024, arXiv 2406.06424; the authors' code), reference-free, with f(m) = s*m / (e^(s*m) - 1)
    (falls from 1 as the error m grows; s = MAPO_SNR = 0.5) and T = MAPO_TIMESTEPS = 1000:

    L_MaPO = mean(m_w) - beta * mean( log sigmoid( T * (f(m_w) - f(m_l)) ) )

    Args:
        model_losses: float tensor [2B], the policy's errors ordered [winners; losers]. For "sft" only the
            winners' errors, shape [B] (the SFT step never runs the losers).
        ref_losses: float tensor [2B], the reference's errors in the same order; None for "sft" and "mapo".
        beta_dpo: the objective's beta (> 0): DPO's KL-regularisation strength, or MaPO's beta_mapo.
        loss_type: "sigmoid" (the paper's DPO), "hinge" (SLiC, Zhao et al. 2023: relu(1 - inside)),
            "ipo" (Azar et al. 2023, eq. 17: (logits - 1/(2 beta))^2 with logits = inside / beta),
            "sft" (plain denoising loss on the winners, paper section 5.5), "mapo" (above), or "sdpo"
            (Diffusion-SDPO: the sigmoid loss on errors whose losers' gradient sdpo_safeguarded_errors scaled).

    Returns:
        (loss, metrics): a scalar loss and a dict of detached scalars: implicit_acc (fraction of pairs whose
        winner the model prefers more than the reference does, a tie counting half: pair_implicit_accuracy),
        reward_margin (mean of inside), and the mean errors model_mse_w, model_mse_l, ref_mse_w, ref_mse_l. MaPO
        has no reference: margin_acc (pairs whose winner scores higher, f(m_w) > f(m_l)), reward_margin (mean of
        T * (f(m_w) - f(m_l))) and the model's errors.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; valid types are {', '.join(LOSS_TYPES)}.")
    model_losses = model_losses.float()
    if loss_type == "sft":
        loss = model_losses.mean()
        return loss, {"model_mse_w": model_losses.detach().mean()}

    if loss_type == "mapo":
        model_mse_w, model_mse_l = model_losses.chunk(2)
        margin = MAPO_TIMESTEPS * (mapo_score(model_mse_w) - mapo_score(model_mse_l))
        loss = model_mse_w.mean() - beta_dpo * F.logsigmoid(margin).mean()
        return loss, {"margin_acc": pair_implicit_accuracy(margin.detach()).mean(),
                      "reward_margin": margin.detach().mean(), "model_mse_w": model_mse_w.detach().mean(),
                      "model_mse_l": model_mse_l.detach().mean()}

    if ref_losses is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference model's errors (ref_losses).")
    # 1. How much more the policy prefers the winner than the reference does, per pair (>0 = better than reference).
    inside = dpo_implicit_reward(model_losses, ref_losses.float(), beta_dpo)
    # 2. The loss on that margin.
    if loss_type in ("sigmoid", "sdpo"):  # sdpo: the same loss; its safeguard acts on the losers' gradient
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - inside)
    elif loss_type == "ipo":
        logits = inside / beta_dpo
        losses = (logits - 1.0 / (2.0 * beta_dpo)) ** 2
    else:
        raise AssertionError(f"loss_type {loss_type!r} is in LOSS_TYPES but has no branch here; add one.")
    model_mse_w, model_mse_l = model_losses.detach().chunk(2)
    ref_mse_w, ref_mse_l = ref_losses.detach().float().chunk(2)
    metrics = {
        "implicit_acc": pair_implicit_accuracy(inside.detach()).mean(),
        "reward_margin": inside.mean().detach(),
        "model_mse_w": model_mse_w.mean(),
        "model_mse_l": model_mse_l.mean(),
        "ref_mse_w": ref_mse_w.mean(),
        "ref_mse_l": ref_mse_l.mean(),
    }
    return losses.mean(), metrics


# Copied from train_diffusion_dpo.mapo_score
def mapo_score(errors):
    """MaPO's score of a denoising error, f(m) = s*m / (e^(s*m) - 1) with s = MAPO_SNR: 1 at m = 0, falling as m
    grows (expm1 keeps it exact for small errors)."""
    scaled = MAPO_SNR * errors
    safe = torch.where(scaled == 0, torch.ones_like(scaled), scaled)  # no 0/0 in the branch not taken (its gradient)
    return torch.where(scaled == 0, torch.ones_like(scaled), safe / torch.expm1(safe))


# Copied from train_diffusion_dpo.sdpo_safeguarded_errors
def sdpo_safeguarded_errors(errors, output_gradients, mu):
    """Diffusion-SDPO's safeguard (Fu et al. 2025, arXiv 2511.03317; the authors' code): the losers' errors keep
    their values, and their gradient is scaled by one lambda in [0, 1] per micro-batch, so that to first order the
    step still lowers the winners' error by at least mu * ||g_w||^2:

        (-g_w + lambda * g_l) . g_w <= -mu * ||g_w||^2
        =>  lambda = clip((1 - mu) * ||g_w||^2 / (g_l . g_w), 0, 1)  where g_l . g_w > 0, else 1

    g_w and g_l are the gradients of the winners' and the losers' errors with respect to the model's output, over
    the whole micro-batch (up to a common factor: the residuals prediction - target, weighted as the errors are).
    DPO raises the losers' error; where the two gradients align, that push raises the winners' error too, which is
    what the safeguard bounds.

    Args:
        errors: [2B] per-sample errors ordered [winners; losers], with their graph.
        output_gradients: [2B, ...] in the same order (taken as constants).
        mu: the margin in [0, 1] (0: the winners' error must not rise; 1: lambda = 0, the losers' gradient off).
    Returns:
        the errors, equal in value, the losers' gradient multiplied by lambda.
    """
    g_w, g_l = output_gradients.detach().float().chunk(2)
    alignment = (g_w * g_l).sum()
    bound = ((1.0 - mu) * g_w.pow(2).sum() / (alignment + 1e-9)).clamp(0.0, 1.0)
    scale = torch.where(alignment > 0, bound, torch.ones_like(bound))
    errors_w, errors_l = errors.chunk(2)
    return torch.cat([errors_w, errors_l.detach() + scale * (errors_l - errors_l.detach())])


# Copied from train_diffusion_dpo.objective_beta
def objective_beta(args):
    """The beta of the chosen objective: MaPO's --beta_mapo, else DPO's --beta_dpo."""
    return args.beta_mapo if args.loss_type == "mapo" else args.beta_dpo


# Copied from train_diffusion_dpo.objective_settings
def objective_settings(args):
    """The objective's own parameters, for the model card."""
    if args.loss_type == "mapo":
        return {"beta_mapo": args.beta_mapo}
    return {"beta_dpo": args.beta_dpo, **({"sdpo_mu": args.sdpo_mu} if args.loss_type == "sdpo" else {})}


# Copied from train_diffusion_dpo.objective_reference
def objective_reference(args):
    """The objective a run trained with, as its model card names it (Markdown, with the paper's link)."""
    return {
        "sigmoid": "Diffusion-DPO ([Wallace et al., 2023](https://arxiv.org/abs/2311.12908))",
        "hinge": "Diffusion-DPO's margin under the SLiC hinge loss ([Wallace et al., 2023](https://arxiv.org/abs/"
                 "2311.12908), `--loss_type hinge`)",
        "ipo": "Diffusion-DPO's margin under the IPO loss ([Wallace et al., 2023](https://arxiv.org/abs/2311.12908), "
               "`--loss_type ipo`)",
        "sft": "supervised fine-tuning on the preferred images (the Diffusion-DPO paper's SFT baseline)",
        "mapo": "MaPO ([Hong et al., 2024](https://arxiv.org/abs/2406.06424)), reference-free",
        "sdpo": "Diffusion-SDPO ([Fu et al., 2025](https://arxiv.org/abs/2511.03317)): Diffusion-DPO with the winners' "
                "error safeguarded",
    }[args.loss_type]


# Copied from train_diffusion_dpo.dpo_implicit_reward
def dpo_implicit_reward(model_losses, ref_losses, beta_dpo):
    """Per pair, the argument of the DPO log-sigmoid (Wallace et al. 2023, eq. 14): [2B] errors in, [B] out.

    inside = -(beta_dpo / 2) * ((m_w - m_l) - (r_w - r_l)), errors ordered [winners; losers]. Computed in the
    inputs' dtype (float32 in training; evaluate.py passes float64).
    """
    model_mse_w, model_mse_l = model_losses.chunk(2)
    ref_mse_w, ref_mse_l = ref_losses.chunk(2)
    return -(beta_dpo / 2) * ((model_mse_w - model_mse_l) - (ref_mse_w - ref_mse_l))


# Copied from train_diffusion_dpo.pair_implicit_accuracy
def pair_implicit_accuracy(inside):
    """Per pair: 1 where the model prefers the winner more than the reference does (inside > 0), 0 where less, and
    0.5 on a tie, so a model equal to its reference scores 0.5 (no preference), as the diffusers example counts it."""
    return (inside > 0).to(inside.dtype) + 0.5 * (inside == 0).to(inside.dtype)


# Copied from train_diffusion_dpo.lora_adapters_disabled
@contextlib.contextmanager
def lora_adapters_disabled(transformer):
    """Run the transformer as the frozen reference: its LoRA adapters off, switched back on even if the body raises."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


# Copied from train_diffusion_dpo.pair_generator
def pair_generator(seed, step, pair_index):
    """A torch.Generator for one pair at one optimizer step.

    Noise, timestep and VAE sample of a pair depend on (seed, step, pair) only, never on which process or
    micro-batch draws them: 2 processes equal 1 process, batch 8 equals batch 1 x 8 accumulation, and a resumed
    run draws what an uninterrupted one would.
    """
    digest = hashlib.sha256(f"{seed}/{step}/{pair_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_flow_timesteps(generators, noise_scheduler, args):
    """One timestep and its sigma per pair, from the pair's own generator, with SD3's timestep density.

    diffusers' compute_density_for_timestep_sampling gives u in [0, 1) (logit-normal, mode or uniform, as
    --weighting_scheme says); u indexes the scheduler's training sigmas, which carry the model's shift (SD3: 3.0),
    as in diffusers' SD3 examples. Returns (timesteps [B], sigmas [B]).
    """
    u = torch.cat([compute_density_for_timestep_sampling(
        args.weighting_scheme, 1, logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
        generator=generator) for generator in generators])
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    indices = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return noise_scheduler.timesteps[indices], noise_scheduler.sigmas[indices]


# ----------------------------------------------------------------------------------------------------------------
# Data: Pick-a-Pic-format preference pairs
# ----------------------------------------------------------------------------------------------------------------
# Copied from train_diffusion_dpo.UnusableImage
class UnusableImage(ValueError):
    """An image cell that cannot be used; `reason` is the count it goes to (missing_image, undecodable_image)."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


# Copied from train_diffusion_dpo.load_pil_image
def load_pil_image(value):
    """Decode one image cell as stored by parquet/datasets (bytes, {"bytes", "path"}, PIL, or a path) to RGB.

    Usable odd images are made right: EXIF rotation applied; grayscale, palette, CMYK and 16-bit images converted;
    transparency composited on white. Missing or undecodable images raise UnusableImage with the reason.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, (bytes, bytearray, str)) and len(value) == 0):
        raise UnusableImage("missing_image", "the image cell is empty")
    if isinstance(value, str) and not os.path.isfile(value):
        # Only regular files are opened: a FIFO or a device would block the run forever, a folder is no image.
        if not os.path.exists(value):
            raise UnusableImage("missing_image", f"the image file {value!r} does not exist")
        raise UnusableImage("undecodable_image", f"{value!r} is not a regular file")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(value)
        else:
            raise ValueError(f"cannot read an image from a {type(value).__name__}")
        image.load()  # decode now, so truncated bytes fail here and not inside the model step
        # Phone photos carry their rotation in EXIF; apply it so the pixels match what the user saw.
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise UnusableImage("undecodable_image", f"cannot decode the image: {error}") from error
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale to 8 bits instead of clipping everything above 255 to white
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


# Copied from train_diffusion_dpo.preprocess_pair
def preprocess_pair(winner, loser, resolution, random_crop, hflip, rng):
    """Resize, crop and flip a winner/loser pair *jointly*, and return normalized tensors.

    Both images get the same resize (short side = resolution, the loser as if brought to the winner's size first),
    the same crop and the same flip, so that neither image of a pair is favoured by augmentation. Only the crop is
    resampled, from its box in each image's own pixels: the work is resolution^2 pixels whatever the aspect ratio
    (resizing the whole image first made a 1 x 20000 PNG of 256 bytes into resolution x 20000*resolution pixels).

    Returns (winner [3,R,R] in [-1,1], loser likewise, original_size (h, w), crop_top_left (top, left)) with the
    crop's corner in the resized winner's coordinates, as SDXL's micro-conditioning expects.
    """
    original_size = (winner.height, winner.width)
    scale = resolution / min(winner.width, winner.height)
    resized = (max(resolution, round(winner.width * scale)), max(resolution, round(winner.height * scale)))
    if random_crop:
        top = rng.randint(0, resized[1] - resolution)
        left = rng.randint(0, resized[0] - resolution)
    else:
        top = (resized[1] - resolution) // 2
        left = (resized[0] - resolution) // 2

    def crop(image):
        x_scale, y_scale = image.width / resized[0], image.height / resized[1]
        box = (left * x_scale, top * y_scale, (left + resolution) * x_scale, (top + resolution) * y_scale)
        return image.resize((resolution, resolution), resample=Image.BILINEAR, box=box)

    winner, loser = crop(winner), crop(loser)
    if hflip and rng.random() < 0.5:
        winner = winner.transpose(Image.FLIP_LEFT_RIGHT)
        loser = loser.transpose(Image.FLIP_LEFT_RIGHT)

    def to_tensor(image):
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div(127.5).sub(1.0)

    return to_tensor(winner), to_tensor(loser), original_size, (top, left)


# Copied from train_diffusion_dpo.preference_label
def preference_label(value):
    """A label as a number, whether stored as one or as a string ("1", "0.5"); NaN (an invalid label) otherwise.
    The map-style filter and the streamed rows both read labels through this, so they keep the same rows."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# Copied from train_diffusion_dpo.load_preference_dataset
def load_preference_dataset(args):
    """Load the dataset, check its columns, and return (dataset, column names, counts of dropped rows).

    Rows are kept when they hold a usable preference: a string caption and Pick-a-Pic labels (1, 0) or (0, 1);
    ties (0.5, 0.5), other labels and missing captions are dropped and counted by reason, reading only the
    caption and label columns. A chosen/rejected layout has no labels. Image problems are found (and counted)
    when the images are decoded during training.
    """
    from datasets import load_dataset

    source = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
    dataset = load_dataset(source, args.dataset_config_name, split=args.dataset_split_name, cache_dir=args.cache_dir,
                           streaming=args.streaming)

    if args.chosen_column is not None:
        columns = {"caption": args.caption_column, "winner": args.chosen_column, "loser": args.rejected_column}
    else:
        columns = {
            "caption": args.caption_column,
            "image_0": args.image_0_column,
            "image_1": args.image_1_column,
            "label_0": args.label_0_column,
            "label_1": args.label_1_column,
        }
    column_names = dataset.column_names or list(next(iter(dataset)).keys())
    missing = [name for name in columns.values() if name not in column_names]
    if missing:
        raise ValueError(
            f"Dataset {source!r} has no column(s) {missing}. Its columns are {column_names}. Map yours with "
            "--caption_column, --image_0_column/--image_1_column/--label_0_column/--label_1_column (Pick-a-Pic "
            "layout) or --chosen_column/--rejected_column (chosen/rejected layout)."
        )

    if args.streaming:  # rows are checked (and counted) as they stream past
        return dataset, columns, {}
    counts = {"rows": len(dataset), "ties": 0, "invalid_labels": 0, "bad_caption": 0}
    keep = np.ones(len(dataset), dtype=bool)
    # A caption must be a string (empty is allowed: it is what prompt dropout trains on anyway).
    captions = dataset.select_columns([columns["caption"]])[columns["caption"]]
    has_caption = np.fromiter((isinstance(c, str) for c in captions), dtype=bool, count=len(dataset))
    counts["bad_caption"] = int((~has_caption).sum())
    keep &= has_caption
    if args.chosen_column is None:
        # Read only the two label columns (no image decoding) to choose the rows to keep.
        labels = dataset.select_columns([columns["label_0"], columns["label_1"]])
        label_0 = np.fromiter(map(preference_label, labels[columns["label_0"]]), dtype=np.float64, count=len(dataset))
        label_1 = np.fromiter(map(preference_label, labels[columns["label_1"]]), dtype=np.float64, count=len(dataset))
        is_tie = (label_0 == 0.5) & (label_1 == 0.5)
        is_decided = ((label_0 == 1) & (label_1 == 0)) | ((label_0 == 0) & (label_1 == 1))
        # Each dropped row is counted once, under its first reason in the order caption, tie, labels.
        counts["ties"] = int((is_tie & keep).sum())
        counts["invalid_labels"] = int((~is_tie & ~is_decided & keep).sum())
        keep &= is_decided
    if not keep.all():
        dataset = dataset.select(np.flatnonzero(keep))
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(
            f"Dataset {source!r} has no usable preference pairs after filtering ({counts['rows']} rows: "
            f"{counts['ties']} ties, {counts['invalid_labels']} with invalid labels, {counts['bad_caption']} without "
            "a string caption). Check the columns (--caption_column, --label_0_column/--label_1_column) or use "
            "--chosen_column/--rejected_column."
        )
    counts["pairs"] = len(dataset)
    return dataset, columns, counts


class PreferencePairDataset(torch.utils.data.Dataset):
    """Pairs as model inputs: the caption tokenized by all three tokenizers (CLIP-L, CLIP-G, T5) and winner and
    loser pixels with a joint crop and flip.

    Augmentation randomness depends on (seed, epoch, index) only, so it is the same on every process count and
    after a resume. A row whose images are missing or cannot be decoded is replaced by a seeded random row and
    reported in the example (`skipped`: (row, reason) pairs), so batches keep their size and no process waits
    on another. Captions longer than a tokenizer's limit (77 CLIP tokens; --max_sequence_length T5 tokens) are
    truncated and reported (`truncated`). Prompt dropout empties the caption, so all three encoders see ''.
    """

    def __init__(self, dataset, columns, tokenizers, args):
        self.dataset = dataset
        self.columns = columns
        self.tokenizers = tokenizers
        self.resolution = args.resolution
        self.random_crop = args.random_crop
        self.hflip = not args.no_hflip
        self.proportion_empty_prompts = args.proportion_empty_prompts
        self.seed = args.seed
        self.epoch = 0  # set by the training loop before each epoch's iterator is built

    # Copied from train_diffusion_dpo.PreferencePairDataset.__len__
    def __len__(self):
        return len(self.dataset)

    # Copied from train_diffusion_dpo.PreferencePairDataset.decode_pair
    def decode_pair(self, row):
        if "winner" in self.columns:
            return load_pil_image(row[self.columns["winner"]]), load_pil_image(row[self.columns["loser"]])
        image_0 = load_pil_image(row[self.columns["image_0"]])
        image_1 = load_pil_image(row[self.columns["image_1"]])
        # Rows were filtered to labels (1, 0) or (0, 1): the winner is the image labelled 1.
        return (image_0, image_1) if preference_label(row[self.columns["label_0"]]) == 1.0 else (image_1, image_0)

    # Copied from train_diffusion_dpo.PreferencePairDataset.__getitem__
    def __getitem__(self, index):
        skipped = []
        for row_index in replacement_rows(self.seed, self.epoch, index, len(self.dataset)):
            row = self.dataset[row_index]
            try:
                winner, loser = self.decode_pair(row)
                break
            except UnusableImage as error:
                skipped.append((row_index, error.reason))
        else:
            raise ValueError(no_usable_rows_message(skipped))
        example = self.make_example(row, None, decoded=(winner, loser), index=index)
        example.update(skipped=skipped, truncated=[row_index] if example["truncated"] else [])
        return example

    # Copied from train_diffusion_dpo.PreferencePairDataset.make_example
    def make_example(self, row, stream_key, decoded=None, index=None):
        """Model inputs for one row; `index` (map-style) or `stream_key` (streaming) seeds its augmentation."""
        winner, loser = decoded if decoded is not None else self.decode_pair(row)
        if stream_key is not None:
            index = stream_pair_index(*stream_key)
            rng = random.Random(f"{self.seed}/stream/{index}")
        else:
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        caption = row[self.columns["caption"]]
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        example = self.model_inputs(winner, loser, caption, rng)
        example["index"] = index
        return example

    def model_inputs(self, winner, loser, caption, rng):
        pixels_w, pixels_l, _, _ = preprocess_pair(winner, loser, self.resolution, self.random_crop, self.hflip, rng)
        # CLIP-L, CLIP-G (pads with "!") and T5 (pads with <pad>), each padded and cut as the pipeline does.
        tokenized = [tokenize_caption(tokenizer, caption) for tokenizer in self.tokenizers]
        example = {"pixels_w": pixels_w, "pixels_l": pixels_l, "truncated": any(cut for _, cut in tokenized)}
        example.update(zip(("input_ids", "input_ids_2", "input_ids_3"), (ids for ids, _ in tokenized)))
        return example

    def cache_views(self, winner, loser):
        """What --cache_latents stores for a pair: pixels [flips, (w, l), 3, R, R] of the centre crop, unflipped
        then flipped (the flip is the last draw of preprocess_pair, so the cache can pick it later), and per-flip
        extras (none for SD3)."""
        pixels_w, pixels_l, _, _ = preprocess_pair(winner, loser, self.resolution, False, False, None)
        pixels = torch.stack([pixels_w, pixels_l])
        views = [pixels, pixels.flip(-1)] if self.hflip else [pixels]
        return torch.stack(views), {}

    def prompt_truncated(self, caption):
        return any(tokenize_caption(tokenizer, caption)[1] for tokenizer in self.tokenizers)


MAX_REPLACEMENT_DRAWS = 1000


# Copied from train_diffusion_dpo.replacement_rows
def replacement_rows(seed, epoch, index, num_rows):
    """The row at sampler position `index`, then, while rows are unusable, rows drawn uniformly from (seed, epoch,
    index): a block of bad rows spreads its replacements over the dataset instead of making the next usable row
    fill it (2000 bad rows once made one pair 2001 of 2010 draws of an epoch, found by a quadratic search). After
    MAX_REPLACEMENT_DRAWS draws, every row in turn: a dataset with any usable row always yields one."""
    yield index
    rng = random.Random(f"{seed}/{epoch}/{index}/replacement")
    for _ in range(MAX_REPLACEMENT_DRAWS - 1):
        yield rng.randrange(num_rows)
    for offset in range(1, num_rows + 1):
        yield (index + offset) % num_rows


# Copied from train_diffusion_dpo.no_usable_rows_message
def no_usable_rows_message(skipped):
    reasons = sorted({reason for _, reason in skipped})
    return (f"No row of the dataset has usable images ({len({row for row, _ in skipped})} rows tried: "
            f"{', '.join(reasons)}). Check the image columns (--image_0_column/--image_1_column or "
            "--chosen_column/--rejected_column).")


# Copied from train_diffusion_dpo.tokenize_caption
def tokenize_caption(tokenizer, caption):
    """Token ids padded to the tokenizer's limit, and whether the caption had to be cut to fit (end token kept)."""
    limit = tokenizer.model_max_length
    token_ids = tokenizer(caption).input_ids
    truncated = len(token_ids) > limit
    if truncated:
        token_ids = token_ids[: limit - 1] + token_ids[-1:]
    token_ids = token_ids + [tokenizer.pad_token_id] * (limit - len(token_ids))
    return torch.tensor(token_ids, dtype=torch.long), truncated


def collate_pairs(examples):
    return {
        "pixels_w": torch.stack([e["pixels_w"] for e in examples]),
        "pixels_l": torch.stack([e["pixels_l"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "input_ids_2": torch.stack([e["input_ids_2"] for e in examples]),
        "input_ids_3": torch.stack([e["input_ids_3"] for e in examples]),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "skipped": [item for e in examples for item in e["skipped"]],
        "truncated": [row for e in examples for row in e["truncated"]],
        "stream_state": examples[-1].get("stream_state"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Latent and text-embedding cache (--cache_latents)
# ----------------------------------------------------------------------------------------------------------------
ROW_USABLE, ROW_MISSING_IMAGE, ROW_UNDECODABLE_IMAGE = 1, 2, 3
ROW_STATUS_REASONS = {ROW_MISSING_IMAGE: "missing_image", ROW_UNDECODABLE_IMAGE: "undecodable_image"}


# Copied from train_diffusion_dpo.weights_fingerprint
def weights_fingerprint(model, without_adapters=False):
    """A cheap digest of a model's weights (names, shapes and first values of every tensor). without_adapters: of
    the base weights alone, named as without LoRA (PEFT adds .base_layer), so any adapters give the same digest."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if without_adapters and "lora_" in name:
            continue
        name = name.replace(".base_layer", "") if without_adapters else name
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:8].float().cpu().numpy().tobytes())
    return digest.hexdigest()


# Copied from train_diffusion_dpo.dataset_content_digest
def dataset_content_digest(dataset, columns):
    """A digest of what the cache is built from: every row's caption, labels and image bytes, in the dataset's order.

    `datasets` fingerprints local files by path and modification time, so data rewritten in place with its mtime kept
    (an `rsync -a`), or another machine's data at the same path under a shared cache folder, had the same key as
    the latents stored for the old data. Reading the bytes costs a pass over the files (no decoding; 0.5 GB/s measured
    on a 2-core CPU), small beside encoding them."""
    digest = hashlib.blake2b(digest_size=16)
    names = sorted(set(columns.values()))
    image_columns = {name for role, name in columns.items() if role not in ("caption", "label_0", "label_1")}
    for batch in dataset.select_columns(names).with_format("arrow").iter(batch_size=256):
        for name in names:
            for value in batch.column(name).to_pylist():
                if isinstance(value, dict):  # a datasets Image cell: its bytes, or its path when it has none
                    value = value.get("bytes") or value.get("path")
                if name in image_columns and isinstance(value, str) and os.path.isfile(value):
                    value = Path(value).read_bytes()  # an image stored as a path: its file's content
                value = value if isinstance(value, bytes) else repr(value).encode()
                digest.update(len(value).to_bytes(8, "little"))
                digest.update(value)
    return digest.hexdigest()


# Copied from train_diffusion_dpo.latent_cache_path
def latent_cache_path(args, dataset, columns, vae, text_encoders, cache_dtype, data_digest=None):
    """Cache folder for these inputs: any change of model weights, resolution, flip, data or dtype gives a new key.
    The data enters by its content (`dataset_content_digest`, computed here unless given), not by its file names."""
    key = {
        "format": 2, "model": args.pretrained_model_name_or_path, "revision": args.revision,
        "variant": args.variant, "vae": weights_fingerprint(vae), "vae_config": dict(vae.config),
        "text_encoders": [weights_fingerprint(encoder) for encoder in text_encoders],
        "resolution": args.resolution, "hflip": not args.no_hflip,
        "data": data_digest if data_digest is not None else dataset_content_digest(dataset, columns),
        "columns": columns, "dtype": str(cache_dtype),
        # what else shapes the stored arrays: the T5 length of the flow scripts, the VAE's dtype (--upcast_vae)
        "max_sequence_length": getattr(args, "max_sequence_length", None), "vae_dtype": str(vae.dtype),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(args.latent_cache_dir) / digest


# Copied from train_diffusion_dpo.build_latent_cache
def build_latent_cache(args, accelerator, dataset, columns, pairs, vae, encode_text, text_encoders, weight_dtype):
    """Encode every image (both orientations when flipping) and every unique prompt once, on disk.

    `pairs` (the dataset class) decodes rows and says what to store (`cache_views`); `encode_text(prompts)`
    returns the named text tensors of a batch of prompts. Each process encodes its share of rows and prompts
    into shared memory-mapped .npy files; the folder is complete once meta.json exists, and a later run with
    the same key reuses it without loading a pixel. Returns (LatentCache, stats of what this run encoded).
    """
    cache_dtype = np.float16 if weight_dtype == torch.float16 else np.float32  # bf16 is stored exactly as fp32
    from accelerate.utils import broadcast_object_list

    # the data is read once, by the main process, and its digest shared
    data_digest = broadcast_object_list(
        [dataset_content_digest(dataset, columns) if accelerator.is_main_process else None])[0]
    cache_dir = latent_cache_path(args, dataset, columns, vae, text_encoders, cache_dtype, data_digest)
    with cache_build_lock(accelerator, cache_dir):
        if accelerator.is_main_process:
            _clear_damaged_cache(cache_dir)
        accelerator.wait_for_everyone()
        # the main process decides for all (on a network file system the others may see its folder late)
        reused = broadcast_object_list([(cache_dir / "meta.json").exists() if accelerator.is_main_process else None])[0]
        stats = {"cache_dir": str(cache_dir), "reused": reused, "images_encoded": 0, "prompts_encoded": 0}
        if stats["reused"]:
            logger.info(f"Reusing the latent cache {cache_dir}")
            return LatentCache(cache_dir), stats
        building = cache_dir.with_name(f".building-{cache_dir.name}")  # private: published by a rename when complete
        _encode_into(args, accelerator, dataset, columns, pairs, vae, encode_text, cache_dtype, building, stats)
        if accelerator.is_main_process:
            os.replace(building, cache_dir)
            logger.info(f"Latent cache complete: {cache_dir}")
        accelerator.wait_for_everyone()
    return LatentCache(cache_dir), stats


# Copied from train_diffusion_dpo.cache_build_lock
@contextlib.contextmanager
def cache_build_lock(accelerator, cache_dir):
    """One job at a time builds or checks a cache folder: jobs sharing --latent_cache_dir (its default is one per
    user) wait for a cache another job is building, then reuse it. The main process holds the lock; the others wait
    for it at the barriers inside."""
    if not accelerator.is_main_process:
        yield
        return
    import fcntl

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.with_name(f"{cache_dir.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"Another job is building the latent cache {cache_dir}; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Copied from train_diffusion_dpo.cache_problem
def cache_problem(cache_dir):
    """Why a published cache folder cannot be used (files missing, cut short or of the wrong shape, rows never
    written), or None. Cheap: array headers, the small status arrays and a sample of rows, no full read."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        rows, prompts, flips = meta["rows"], meta["prompts"], meta["flips"]
        expected = {"posteriors": (rows, 2, flips), "row_prompt": (rows,), "row_status": (rows,),
                    "prompt_truncated": (prompts,)}
        expected.update({f"text_{name}": (prompts,) for name in meta["text"]})
        expected.update({f"row_{name}": (rows, flips) for name in meta["row_extras"]})
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"meta.json cannot be read ({error})"
    arrays = {}
    for name, leading in expected.items():
        try:
            arrays[name] = np.load(cache_dir / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            return f"{name}.npy cannot be read ({error})"
        if arrays[name].shape[:len(leading)] != leading:
            return f"{name}.npy has shape {arrays[name].shape}, expected {leading} first"
    status = np.asarray(arrays["row_status"])
    if (status == 0).any():
        return f"{int((status == 0).sum())} rows were never written"
    usable = np.flatnonzero(status == ROW_USABLE)
    sample = usable[np.linspace(0, len(usable) - 1, min(len(usable), 64)).astype(int)] if len(usable) else usable
    if len(sample) and not np.asarray(arrays["posteriors"][sample]).any(axis=tuple(range(1, 6))).all():
        return "posteriors.npy holds rows of zeros (it was overwritten while being built)"
    return None


# Copied from train_diffusion_dpo._clear_damaged_cache
def _clear_damaged_cache(cache_dir):
    """Move a damaged cache folder out of the way (then delete it), saying why: it is built again."""
    if not cache_dir.exists():
        return
    problem = cache_problem(cache_dir)
    if problem is None:
        return
    logger.warning(f"The latent cache {cache_dir} is damaged ({problem}); rebuilding it.")
    damaged = cache_dir.with_name(f".damaged-{cache_dir.name}-{os.getpid()}")
    os.replace(cache_dir, damaged)
    shutil.rmtree(damaged, ignore_errors=True)


# Copied from train_diffusion_dpo._encode_into
def _encode_into(args, accelerator, dataset, columns, pairs, vae, encode_text, cache_dtype, cache_dir, stats):
    """Every process encodes its share of rows and prompts into the folder `cache_dir`, which ends complete."""
    num_rows = len(dataset)
    flips = 2 if not args.no_hflip else 1
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    posterior_shape = (2 * vae.config.latent_channels, latent_size, latent_size)
    captions = dataset[columns["caption"]]
    prompts = [""] + sorted(set(captions) - {""})  # id 0 is the empty prompt that prompt dropout uses
    prompt_ids = {prompt: i for i, prompt in enumerate(prompts)}
    with torch.no_grad():
        text_shapes = {name: tuple(t.shape[1:]) for name, t in encode_text([""]).items()}
    probe_row = next((r for r in range(num_rows) if _decodable(pairs, dataset[r])), None)
    if probe_row is None:
        raise ValueError(f"No row of the dataset has usable images ({num_rows} rows, every image missing or "
                         "undecodable): check the image columns (--image_0_column/--image_1_column or "
                         "--chosen_column/--rejected_column).")
    _, extras = pairs.cache_views(*pairs.decode_pair(dataset[probe_row]))
    if accelerator.is_main_process:
        logger.info(f"Building the latent cache {cache_dir}: {num_rows} pairs, {len(prompts)} unique prompts")
        arrays = {"posteriors": ((num_rows, 2, flips) + posterior_shape, cache_dtype)}
        arrays.update({f"text_{name}": ((len(prompts),) + shape, cache_dtype) for name, shape in text_shapes.items()})
        arrays.update({f"row_{name}": ((num_rows,) + tuple(value.shape), value.numpy().dtype)
                       for name, value in extras.items()})
        _allocate_cache_files(cache_dir, arrays, np.array([prompt_ids[c] for c in captions], dtype=np.int64))
    accelerator.wait_for_everyone()
    pause = InjectedFaults.from_environment().cache_pause  # a test's second job arrives while this one builds

    posteriors = np.load(cache_dir / "posteriors.npy", mmap_mode="r+")
    text_arrays = {name: np.load(cache_dir / f"text_{name}.npy", mmap_mode="r+") for name in text_shapes}
    extra_arrays = {name: np.load(cache_dir / f"row_{name}.npy", mmap_mode="r+") for name in extras}
    rank, world = accelerator.process_index, accelerator.num_processes
    status = np.zeros(num_rows, dtype=np.int8)
    truncated = np.zeros(len(prompts), dtype=bool)
    my_rows = list(range(rank, num_rows, world))
    chunk = args.vae_encode_batch_size
    rows_per_chunk = max(1, chunk // (2 * flips))  # each row is 2 images per orientation
    with torch.no_grad():
        for start in tqdm(range(0, len(my_rows), rows_per_chunk), desc="Caching latents",
                          disable=not accelerator.is_local_main_process):
            rows, views = [], []
            for row in my_rows[start:start + rows_per_chunk]:
                try:
                    winner, loser = pairs.decode_pair(dataset[row])
                except UnusableImage as error:
                    status[row] = ROW_MISSING_IMAGE if error.reason == "missing_image" else ROW_UNDECODABLE_IMAGE
                    continue
                status[row] = ROW_USABLE
                row_views, row_extras = pairs.cache_views(winner, loser)
                for name, value in row_extras.items():
                    extra_arrays[name][row] = value.numpy()
                rows.append(row)
                views.append(row_views)
            if not rows:
                continue
            views = torch.stack(views)  # [rows, flips, (w, l), 3, R, R]
            params = vae.encode(views.flatten(0, 2).to(vae.device, dtype=vae.dtype)).latent_dist.parameters
            params = params.float().cpu().numpy().astype(cache_dtype).reshape((len(rows), flips, 2) + posterior_shape)
            posteriors[rows] = params.swapaxes(1, 2)
            stats["images_encoded"] += params.shape[0] * flips * 2
            time.sleep(pause)
            pause = 0.0
        stats["prompts_encoded"] += _encode_prompts(pairs, encode_text, prompts, range(rank, len(prompts), world),
                                                    chunk, text_arrays, truncated)
    for array in [posteriors, *text_arrays.values(), *extra_arrays.values()]:
        array.flush()
    _publish_cache(accelerator, cache_dir, status, truncated, {
        "rows": num_rows, "prompts": len(prompts), "flips": flips, "text": sorted(text_shapes),
        "row_extras": sorted(extras)})


# Copied from train_diffusion_dpo._encode_prompts
def _encode_prompts(pairs, encode_text, prompts, my_prompt_ids, chunk, text_arrays, truncated):
    """Encode this process's share of the unique prompts into the cache's text arrays; returns how many."""
    my_prompt_ids = list(my_prompt_ids)
    for start in range(0, len(my_prompt_ids), chunk):
        ids = my_prompt_ids[start:start + chunk]
        batch_prompts = [prompts[i] for i in ids]
        for name, tensor in encode_text(batch_prompts).items():
            text_arrays[name][ids] = tensor.float().cpu().numpy().astype(text_arrays[name].dtype)
        truncated[ids] = [pairs.prompt_truncated(prompt) for prompt in batch_prompts]
    return len(my_prompt_ids)


# Copied from train_diffusion_dpo._allocate_cache_files
def _allocate_cache_files(cache_dir, arrays, row_prompt):
    """The cache's memory-mapped .npy files at their full size ({name: (shape, dtype)}), and each row's prompt id,
    in a fresh folder. The space is checked first: a memory map on a full disk dies of SIGBUS, with no message."""
    shutil.rmtree(cache_dir, ignore_errors=True)  # what an interrupted build left
    cache_dir.mkdir(parents=True)
    needed = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        shutil.rmtree(cache_dir, ignore_errors=True)
        raise OSError(f"The latent cache needs {needed / 1e9:.2f} GB in {cache_dir.parent}, which has "
                      f"{free / 1e9:.2f} GB free. Free some space or point --latent_cache_dir at a larger disk.")
    for name, (shape, dtype) in arrays.items():
        np.lib.format.open_memmap(cache_dir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    np.save(cache_dir / "row_prompt.npy", row_prompt)


# Copied from train_diffusion_dpo._publish_cache
def _publish_cache(accelerator, cache_dir, status, truncated, meta):
    """Unite every process's row status and truncated prompts, then write meta.json: the folder is complete."""
    rank, world = accelerator.process_index, accelerator.num_processes
    np.save(cache_dir / f"status-{rank}.npy", status)
    np.save(cache_dir / f"truncated-{rank}.npy", truncated)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        status = np.max([np.load(cache_dir / f"status-{r}.npy") for r in range(world)], axis=0)
        truncated = np.any([np.load(cache_dir / f"truncated-{r}.npy") for r in range(world)], axis=0)
        np.save(cache_dir / "row_status.npy", status)
        np.save(cache_dir / "prompt_truncated.npy", truncated)
        for r in range(world):
            os.remove(cache_dir / f"status-{r}.npy")
            os.remove(cache_dir / f"truncated-{r}.npy")
        # meta.json last, through a rename: its presence means the cache is complete
        with open(cache_dir / "meta.tmp", "w") as f:
            json.dump(meta, f)
        os.replace(cache_dir / "meta.tmp", cache_dir / "meta.json")
    accelerator.wait_for_everyone()


# Copied from train_diffusion_dpo._decodable
def _decodable(pairs, row):
    try:
        pairs.decode_pair(row)
        return True
    except UnusableImage:
        return False


# Copied from train_diffusion_dpo.LatentCache
class LatentCache:
    """Read side of the cache: memory-mapped posteriors [rows, (w, l), flips, 2C, h, w], text tensors per
    unique prompt, per-row-and-flip extras (SDXL's time ids), and which rows and prompts had problems."""

    def __init__(self, cache_dir):
        meta = json.loads((cache_dir / "meta.json").read_text())
        self.posteriors = np.load(cache_dir / "posteriors.npy", mmap_mode="r")
        self.text = {name: np.load(cache_dir / f"text_{name}.npy", mmap_mode="r") for name in meta["text"]}
        self.row_extras = {name: np.load(cache_dir / f"row_{name}.npy", mmap_mode="r") for name in meta["row_extras"]}
        self.row_prompt = np.load(cache_dir / "row_prompt.npy")
        self.row_status = np.load(cache_dir / "row_status.npy")
        self.prompt_truncated = np.load(cache_dir / "prompt_truncated.npy")

    def problem_counts(self):
        counts = {reason: int((self.row_status == status).sum()) for status, reason in ROW_STATUS_REASONS.items()}
        usable = self.row_status == ROW_USABLE
        counts["truncated_caption"] = int(self.prompt_truncated[self.row_prompt[usable]].sum())
        return counts


# Copied from train_diffusion_dpo.CachedPairDataset
class CachedPairDataset(torch.utils.data.Dataset):
    """PreferencePairDataset's pairs from the cache: the same rows, flips and prompt dropout, no decoding."""

    def __init__(self, cache, args):
        self.cache = cache
        self.hflip = not args.no_hflip
        self.proportion_empty_prompts = args.proportion_empty_prompts
        self.seed = args.seed
        self.epoch = 0

    def __len__(self):
        return len(self.cache.row_status)

    def __getitem__(self, index):
        skipped = []
        for row in replacement_rows(self.seed, self.epoch, index, len(self)):  # as when decoding
            if self.cache.row_status[row] == ROW_USABLE:
                break
            skipped.append((row, ROW_STATUS_REASONS[int(self.cache.row_status[row])]))
        else:
            raise ValueError(no_usable_rows_message(skipped))
        # the same draws, in the same order, as PreferencePairDataset.make_example with a centre crop
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        prompt = 0 if rng.random() < self.proportion_empty_prompts else int(self.cache.row_prompt[row])
        flip = int(self.hflip and rng.random() < 0.5)
        posteriors = torch.from_numpy(np.array(self.cache.posteriors[row, :, flip]))
        example = {"posterior_w": posteriors[0], "posterior_l": posteriors[1], "index": index, "skipped": skipped,
                   "truncated": [row] if prompt and self.cache.prompt_truncated[prompt] else []}
        example.update({name: torch.from_numpy(np.array(array[prompt])) for name, array in self.cache.text.items()})
        example.update({name: torch.from_numpy(np.array(array[row, flip]))
                        for name, array in self.cache.row_extras.items()})
        return example


# Copied from train_diffusion_dpo.collate_cached_pairs
def collate_cached_pairs(examples):
    batch = {key: torch.stack([e[key] for e in examples]) for key, value in examples[0].items()
             if isinstance(value, torch.Tensor)}
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    batch["skipped"] = [item for e in examples for item in e["skipped"]]
    batch["truncated"] = [row for e in examples for row in e["truncated"]]
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Streaming (--streaming): datasets too large to download
# ----------------------------------------------------------------------------------------------------------------
# Copied from train_diffusion_dpo.row_label_problem
def row_label_problem(row, columns):
    """Why a streamed row holds no usable preference (the map-style checks, one row at a time), or None."""
    if not isinstance(row[columns["caption"]], str):
        return "bad_caption"
    if "winner" in columns:
        return None
    labels = (preference_label(row[columns["label_0"]]), preference_label(row[columns["label_1"]]))
    if labels == (0.5, 0.5):
        return "ties"
    if labels not in ((1, 0), (0, 1)):
        return "invalid_labels"
    return None


# Copied from train_diffusion_dpo.StreamingPairDataset
class StreamingPairDataset(torch.utils.data.IterableDataset):
    """This process's shard of a streamed dataset as model inputs, endlessly, epoch after epoch.

    The stream is split by process (disjoint shards) and shuffled with a seeded buffer re-seeded every epoch, so
    its order is a function of (seed, epoch, process). Each example carries `stream_state` = (epoch, rows read):
    a checkpoint stores it, and a resumed run skips exactly that many rows of the same order. Rows without a
    usable preference or image are skipped and reported (`skipped`) like in the map-style dataset.
    """

    def __init__(self, stream, columns, tokenizer, args, rank):
        self.stream = stream
        self.rank = rank
        self.pairs = PreferencePairDataset(None, columns, tokenizer, args)  # decoding, augmentation, tokens
        self.start_state = (0, 0)

    def __iter__(self):
        epoch, rows_read = self.start_state
        while True:
            self.stream.set_epoch(epoch)
            skipped, yielded = [], False
            for position, row in enumerate(self.stream):
                if position < rows_read:
                    continue  # resume: these rows were trained on before the checkpoint
                row_key = f"{epoch}/{self.rank}/{position}"
                reason = row_label_problem(row, self.pairs.columns)
                if reason is None:
                    try:
                        example = self.pairs.make_example(row, (epoch, self.rank, position))
                    except UnusableImage as error:
                        reason = error.reason
                if reason is not None:
                    skipped.append((row_key, reason))
                    continue
                example.update(skipped=skipped, truncated=[row_key] if example["truncated"] else [],
                               stream_state=(epoch, position + 1))
                skipped, yielded = [], True
                yield example
            if not yielded:
                raise ValueError(f"Process {self.rank}'s shard of the stream has no usable preference pairs.")
            epoch, rows_read = epoch + 1, 0


# Copied from train_diffusion_dpo.stream_pair_index
def stream_pair_index(epoch, rank, position):
    """A unique integer per streamed row and epoch: the key of its noise, timestep and augmentation."""
    return (epoch * 4096 + rank) * (1 << 40) + position


# Copied from train_diffusion_dpo.EpochPermutationSampler
class EpochPermutationSampler(torch.utils.data.Sampler):
    """Shuffles with a permutation that depends on (seed, epoch) only, so a resume can find its position."""

    def __init__(self, num_items, seed):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        description="Flow-DPO (Diffusion-DPO for flow matching) fine-tuning of Stable Diffusion 3 / 3.5 on preference "
                    "pairs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --validation_prompt must not quietly become --validation_prompts
    )
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="Hub id or local folder of a diffusers Stable Diffusion 3 / 3.5 pipeline (medium, large, "
                            "large-turbo).")
    model.add_argument("--revision", type=str, default=None, help="Hub revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. 'fp16'.")
    model.add_argument("--upcast_vae", action="store_true",
                       help="Run the VAE in float32 whatever the mixed precision (default: the mixed-precision "
                            "dtype, like the other frozen parts). It only encodes the training images (once, with "
                            "--cache_latents) and decodes validation images; use it with fp16 if they come out "
                            "black or NaN.")
    model.add_argument("--max_sequence_length", type=int, default=77,
                       help="T5 tokens per prompt (longer captions are cut and counted), as diffusers' SD3 examples "
                            "train; validation samples with the same length. SD3 accepts up to 512.")

    flow = parser.add_argument_group("flow matching (SD3)")
    flow.add_argument("--weighting_scheme", type=str, default="logit_normal", choices=WEIGHTING_SCHEMES,
                      help="How each pair's sigma is drawn and its error weighted (diffusers.training_utils): "
                           "logit_normal, mode or uniform draw sigma from that density with unit weight (SD3's "
                           "recipe: logit_normal); sigma_sqrt and cosmap draw it uniformly and weight the error.")
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal density.")
    flow.add_argument("--mode_scale", type=float, default=1.29,
                      help="Scale of the mode density (--weighting_scheme mode), as in the SD3 paper.")

    dpo = parser.add_argument_group("DPO objective")
    dpo.add_argument("--loss_type", type=str, default="sigmoid", choices=LOSS_TYPES,
                     help="sigmoid: the paper's Diffusion-DPO; hinge: SLiC hinge; ipo: IPO squared loss; sft: "
                          "denoising loss on winners only (paper 5.5 baseline, no reference pass); mapo: MaPO "
                          "(Hong et al. 2024), margin-aware and reference-free (no reference model is built: its "
                          "memory and forward pass are saved), with --beta_mapo; sdpo: Diffusion-SDPO (Fu et al. "
                          "2025), the paper's DPO loss with the losers' gradient scaled so that the winners' error "
                          "keeps falling, with --sdpo_mu. Neither is in the Diffusion-DPO paper.")
    dpo.add_argument("--beta_dpo", type=float, default=500.0,
                     help="KL strength beta, in the authors' convention: inside = -(beta_dpo/2) * ((m_w - m_l) - "
                          "(r_w - r_l)), here on velocity errors (mean over C, H, W). Larger keeps the model closer "
                          "to the reference. Default 500: the SD family's 5000 on noise errors carried over, since a "
                          "noise error is (1 - sigma) times the velocity error and (1 - sigma)^2 averages about 0.1 "
                          "under SD3's shifted logit-normal sigmas (flow_grpo's SD3 DPO uses 100). The mean makes "
                          "beta independent of the resolution (keep it when you change --resolution); a recipe that "
                          "sums the error over C*H*W has a beta C*H*W times smaller. Measured on the toy SD3 base "
                          "(make toy FAMILY=sd3): a beta x learning-rate sweep kept 100 at 3e-5, and 500 was worse at "
                          "full length; sweep downward from 500 on your data.")
    dpo.add_argument("--beta_mapo", type=float, default=0.1,
                     help="--loss_type mapo: the weight of MaPO's margin term beside the winners' denoising loss "
                          "(the MaPO authors' default 0.1, with learning rate 1e-5).")
    dpo.add_argument("--sdpo_mu", type=float, default=0.9,
                     help="--loss_type sdpo: the safeguard margin in [0, 1]; each step must lower the winners' error "
                          "by at least mu * ||g_w||^2 to first order (the SDPO authors used 0.9 for SD1.5, 0.6 for "
                          "SDXL).")


    dpo.add_argument("--reference_errors", type=str, default=None,
                     help="A folder for the reference's errors, computed once: every pair's inputs at every step "
                          "depend only on (seed, step, pair), so the frozen reference's errors can be computed in a "
                          "pre-pass, stored (two floats per pair and step) and reused by every run that draws the "
                          "same inputs (a sweep over beta, loss type or learning rate). If the folder holds errors "
                          "whose key matches this run they are read, else computed first and written there; either "
                          "way the training step never runs the reference, and a full fine-tune keeps no copy of it.")
    dpo.add_argument("--reference_batch_size", type=int, default=8,
                     help="Pairs of one step per reference forward in the --reference_errors pre-pass.")
    dpo.add_argument("--reference_errors_on_mismatch", type=str, default="recompute", choices=["recompute", "refuse"],
                     help="When --reference_errors holds errors of another run (the log names the settings that "
                          "differ): recompute them (overwriting the folder) or refuse to start.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--use_lora", action="store_true",
                      help="Train LoRA adapters instead of the whole transformer; the reference is the same "
                           "transformer with its adapters disabled (no second copy in memory).")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (scale = alpha / rank). Default: rank.")
    lora.add_argument("--lora_target_modules", "--lora_layers", type=str, default=DEFAULT_LORA_TARGETS,
                      help="Comma-separated transformer module names that get adapters (--lora_layers: diffusers' "
                           "SD3 name). Default: the attention projections of both streams; add 'ff.net.0.proj,"
                           "ff.net.2,ff_context.net.0.proj,ff_context.net.2' for the feed-forward layers.")

    ema = parser.add_argument_group("EMA (not in the paper)")
    ema.add_argument("--use_ema", action="store_true",
                     help="Full fine-tune: keep an exponential moving average of the trained weights (diffusers' "
                          "EMAModel, in float32) and save it as the result; every validation grid shows it. "
                          "Checkpoints hold it and resume it exactly (their loadable transformer/ is the trained "
                          "weights). Not in the paper: the authors' results are without EMA.")
    ema.add_argument("--ema_decay", type=float, default=0.9999,
                     help="EMA decay per optimizer step, ramped up as (1 + step) / (10 + step) at the start "
                          "(diffusers' EMAModel). 0.9999 averages over ~10000 steps; at the paper's 2000 steps "
                          "0.999 or lower follows the training.")
    ema.add_argument("--offload_ema", action="store_true",
                     help="Keep the EMA weights in CPU memory, moved to the device and back for each update: one "
                          "transformer less on the GPU, two copies more per step.")
    ema.add_argument("--foreach_ema", action="store_true",
                     help="Update the EMA with fused multi-tensor ops: faster, with more peak memory.")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="Hub dataset id, or a local folder of parquet files, in Pick-a-Pic format.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the dataset, if any.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Local folder of parquet (or json/csv) files in Pick-a-Pic format; instead of "
                           "--dataset_name.")
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split to train on.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column with the prompt.")
    data.add_argument("--image_0_column", type=str, default="jpg_0", help="Column with the first image (bytes).")
    data.add_argument("--image_1_column", type=str, default="jpg_1", help="Column with the second image (bytes).")
    data.add_argument("--label_0_column", type=str, default="label_0",
                      help="Column with the first image's label: 1 preferred, 0 rejected, 0.5 tie (dropped).")
    data.add_argument("--label_1_column", type=str, default="label_1", help="Column with the second image's label.")
    data.add_argument("--chosen_column", type=str, default=None,
                      help="For datasets that store a chosen and a rejected image with no labels: the chosen "
                           "image's column (give --rejected_column too; label columns are then ignored).")
    data.add_argument("--rejected_column", type=str, default=None, help="The rejected image's column.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a seeded random subset of this many pairs (after dropping ties).")
    data.add_argument("--resolution", type=int, default=1024,
                      help="Training resolution; a multiple of 16 (VAE factor 8 x patch size 2). SD3 / SD3.5: 1024.")
    data.add_argument("--random_crop", action="store_true",
                      help="Random crop instead of center crop (same crop for winner and loser).")
    data.add_argument("--no_hflip", action="store_true",
                      help="Disable the random horizontal flip (applied to winner and loser together).")
    data.add_argument("--proportion_empty_prompts", type=float, default=0.2,
                      help="Fraction of captions replaced by '' (the authors' 0.2), for classifier-free guidance. "
                           "The same '' goes to all three text encoders, as the pipeline encodes its empty negative "
                           "prompt.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Worker processes that decode images; 0 decodes in the main process.")
    data.add_argument("--streaming", action="store_true",
                      help="Stream the dataset instead of downloading it (Pick-a-Pic v2 is ~335 GB): each process "
                           "reads its own shard through a seeded shuffle buffer; rows are checked and counted as "
                           "they pass. Needs --max_train_steps; decodes in the main process; resumes at the exact "
                           "row by re-reading the shard up to it.")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000,
                      help="Rows in the streaming shuffle buffer (more = better mixed, more memory).")
    data.add_argument("--cache_latents", action="store_true",
                      help="Encode every image (both orientations, for the flip) and every unique prompt once, "
                           "before training, into --latent_cache_dir; training then never runs the VAE or the three "
                           "text encoders (T5-XXL alone is 4.7B parameters), which leave the accelerator. Reused by "
                           "later runs with the same model, data, resolution and dtype. Needs the centre crop (not "
                           "--random_crop). Disk: each prompt's joint embedding is (77 + --max_sequence_length) x "
                           "4096 values.")
    data.add_argument("--latent_cache_dir", type=str,
                      default=os.path.join(os.path.expanduser("~"), ".cache", "diffusion-dpo", "latents"),
                      help="Where --cache_latents keeps its caches; one subfolder per model/data/resolution key.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="diffusion-dpo-sd3",
                       help="Where results and checkpoints go.")
    train.add_argument("--seed", type=int, default=0,
                       help="Seed for reproducible training; noise, timesteps and crops depend on it.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Pairs per process per micro-batch.")
    train.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, unless --max_train_steps is set.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimizer steps to train; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step. Effective batch = processes x batch x this.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in backward: less memory, about 20-30%% slower.")
    train.add_argument("--learning_rate", type=float, default=None,
                       help="Learning rate (per pair of the effective batch when --scale_lr is given). Default: "
                            f"{DEFAULT_FULL_LEARNING_RATE:g} for a full fine-tune (the authors' SD/SDXL rate with "
                            f"--scale_lr, i.e. 2.048e-5 at 2048 pairs), {DEFAULT_LORA_LEARNING_RATE:g} with --use_lora "
                            "(LoRA trains at 1e-5..1e-4).")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by processes x batch size x accumulation steps.")
    train.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", choices=LR_SCHEDULERS,
                       help="Learning-rate schedule (diffusers.optimization.get_scheduler).")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup optimizer steps.")
    train.add_argument("--lr_num_cycles", type=int, default=1,
                       help="Hard restarts of the cosine_with_restarts schedule.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: optimizer state in 8 bit.")
    train.add_argument("--use_adafactor", action="store_true",
                       help="transformers Adafactor (the authors' SDXL optimizer): factored second moments.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument("--max_nonfinite_steps", type=int, default=20,
                       help="Stop after this many optimizer steps in a row with a NaN/Inf loss or gradient "
                            "(each such step is skipped and counted).")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Mixed precision; default: accelerate config. Frozen models run in this dtype (the VAE "
                            "too unless --upcast_vae), trained parameters stay float32. SD3.5 was trained in bf16.")
    train.add_argument("--vae_encode_batch_size", type=int, default=8,
                       help="Images the VAE encodes (and prompts the text encoders encode, with --cache_latents) "
                            "at once; lower it if encoding at 1024 px runs out of memory.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs CUDA and the xformers package); default is PyTorch SDPA.")

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument("--checkpointing_steps", type=int, default=500,
                             help="Save a resumable checkpoint every this many optimizer steps.")
    checkpoints.add_argument("--checkpoints_total_limit", type=int, default=None,
                             help="Keep at most this many checkpoints (the oldest are removed).")
    checkpoints.add_argument("--resume_from_checkpoint", type=str, default=None,
                             help="A checkpoint folder, or 'latest' for the newest complete one in --output_dir.")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_prompts", type=str, nargs="+", default=DEFAULT_VALIDATION_PROMPTS,
                            help="Prompts for the paired reference-vs-trained validation grid.")
    validation.add_argument("--validation_prompts_file", type=str, default=None,
                            help="A text file of validation prompts, one per line (blank lines skipped); replaces "
                                 "--validation_prompts.")
    validation.add_argument("--validation_steps", type=int, default=200,
                            help="Run validation every this many optimizer steps (and always at the end).")
    validation.add_argument("--num_validation_images", type=int, default=2,
                            help="Images per prompt and model; 0 disables validation.")
    validation.add_argument("--validation_num_inference_steps", type=int, default=28,
                            help="Sampling steps (SD3's default 28; SD3.5 large-turbo: 4).")
    validation.add_argument("--validation_guidance_scale", type=float, default=7.0,
                            help="Classifier-free guidance scale for validation (SD3's default 7.0; SD3.5 "
                                 "large-turbo: 0).")

    output = parser.add_argument_group("results, logging and hub")
    output.add_argument("--save_transformer_only", action="store_true",
                        help="Full fine-tune: save only transformer/ instead of the complete pipeline folder.")
    output.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    output.add_argument("--report_to", type=str, default="tensorboard", choices=REPORT_TO,
                        help="Tracker for metrics and validation grids: one accelerate supports, 'all' of those "
                             "installed, or 'none' (trackers are imported only when asked).")
    output.add_argument("--tracker_project_name", type=str, default="diffusion-dpo-sd3", help="Tracker project name.")
    output.add_argument("--push_to_hub", action="store_true",
                        help="Upload the final weights, model card and grid (never checkpoints or logs).")
    output.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; default: the output folder name.")
    output.add_argument("--hub_token", type=str, default=None,
                        help="Not accepted (a failed launch prints its command line): log in with `huggingface-cli "
                             "login` or set HF_TOKEN; --push_to_hub uses that login.")
    add_diffusers_flags(parser)
    return parser


# Copied from train_diffusion_dpo.parse_args
def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    validate_args(parser, args)
    return args


def validate_args(parser, args):
    """Refuse bad settings before anything is loaded, each with what to do instead (the SD script's checks, and
    those of the flags only this script has)."""
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("No dataset given: pass --dataset_name (hub id or parquet folder) or --train_data_dir.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("Pass either --dataset_name or --train_data_dir, not both.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        parser.error(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
    if (args.chosen_column is None) != (args.rejected_column is None):
        parser.error("--chosen_column and --rejected_column go together; give both or neither.")
    if not args.beta_dpo > 0 or not math.isfinite(args.beta_dpo):
        parser.error(f"--beta_dpo must be a finite number > 0 (got {args.beta_dpo}); 500 is this script's default "
                     "for SD3's velocity errors.")
    if not args.beta_mapo > 0 or not math.isfinite(args.beta_mapo):
        parser.error(f"--beta_mapo must be a finite number > 0 (got {args.beta_mapo}); MaPO's authors used 0.1.")
    if not 0.0 <= args.sdpo_mu <= 1.0:
        parser.error(f"--sdpo_mu must be between 0 and 1 (got {args.sdpo_mu}).")
    if args.resolution <= 0 or args.resolution % 16 != 0:
        parser.error(f"--resolution must be a positive multiple of 16 (the VAE downsamples by 8 and the transformer "
                     f"takes 2x2 latent patches); got {args.resolution}.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error("--proportion_empty_prompts must be between 0 and 1.")
    if args.streaming:
        if args.max_train_steps is None:
            parser.error("--streaming has no epoch length: give --max_train_steps.")
        for flag in ("cache_latents", "max_train_samples"):
            if getattr(args, flag):
                parser.error(f"--{flag} needs the whole dataset on disk; it does not combine with --streaming.")
        if args.dataloader_num_workers:
            parser.error("--streaming decodes in the main process (its exact resume counts rows there); "
                         "drop --dataloader_num_workers.")
    if args.cache_latents and args.random_crop:
        parser.error("--cache_latents stores one centre crop per image (both orientations for the flip); drop "
                     "--random_crop, or train without the cache.")
    if args.use_ema and args.use_lora:
        parser.error("--use_ema averages the whole transformer of a full fine-tune; LoRA adapters are not "
                     "averaged: drop --use_ema or --use_lora.")
    if (args.offload_ema or args.foreach_ema) and not args.use_ema:
        parser.error("--offload_ema and --foreach_ema set up --use_ema; add --use_ema or drop them.")
    if not 0.0 < args.ema_decay < 1.0:
        parser.error(f"--ema_decay must be between 0 and 1 (got {args.ema_decay}); 0.9999 is diffusers' default.")
    if args.use_8bit_adam and args.use_adafactor:
        parser.error("Choose one optimizer: --use_8bit_adam or --use_adafactor.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "rank",
                 "checkpointing_steps", "validation_steps", "max_nonfinite_steps", "vae_encode_batch_size",
                 "shuffle_buffer_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if not 1 <= args.max_sequence_length <= 512:
        parser.error(f"--max_sequence_length must be between 1 and 512 (T5's limit in SD3); got "
                     f"{args.max_sequence_length}.")
    if not args.logit_std > 0 or not args.mode_scale >= 0:
        parser.error("--logit_std must be > 0 and --mode_scale >= 0.")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 when given.")
    if args.num_validation_images < 0 or args.dataloader_num_workers < 0 or args.lr_warmup_steps < 0:
        parser.error("--num_validation_images, --dataloader_num_workers and --lr_warmup_steps must be >= 0.")
    diffusers_flags_onto_ours(parser, args)
    resolve_validation_and_rate_flags(parser, args)
    if not args.learning_rate > 0:
        parser.error("--learning_rate must be > 0.")
    if not args.max_grad_norm > 0:
        parser.error("--max_grad_norm must be > 0 (use a large value such as 1e9 to disable clipping).")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist; pass a checkpoint "
                     "folder or 'latest'.")
    if args.reference_errors is not None:
        if args.loss_type in REFERENCE_FREE_LOSSES:
            parser.error(f"--loss_type {args.loss_type} has no reference; drop --reference_errors.")
        if args.streaming:
            parser.error("--reference_errors replays the run's pairs in a pre-pass, which a stream cannot; train "
                         "from a dataset on disk, or drop --reference_errors.")
    if args.reference_batch_size < 1:
        parser.error("--reference_batch_size must be at least 1.")
    refuse_unsafe_outputs(parser, args)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank


# Flags of diffusers' text-to-image examples that this script has no flag of that name for: a diffusers user's
# command line gets the flag that does it here, or why it is not supported, never "unrecognized arguments".
# None: accepted, with the diffusers meaning (see diffusers_flags_onto_ours).
DIFFUSERS_FLAGS = {
    "center_crop": None,  # the default here (--random_crop for random crops)
    "random_flip": None,  # the default here (--no_hflip turns it off)
    "tracker_name": None,  # diffusers' DPO example: --tracker_project_name
    "local_rank": None,  # torch.distributed.launch passes it; accelerate sets the rank itself
    "image_column": "a preference pair has two images: use --image_0_column/--image_1_column with "
                    "--label_0_column/--label_1_column (Pick-a-Pic), or --chosen_column/--rejected_column",
    "validation_prompt": "use --validation_prompts (one or more prompts) or --validation_prompts_file",
    "validation_epochs": "use --validation_steps (in optimizer steps)",
    "pretrained_vae_model_name_or_path": "not supported by this script (the SDXL script takes it, for SDXL's "
                                         "fp16-fixed VAE)",
    "prediction_type": "not supported by this script: flow-matching models (SD3, FLUX.1) are trained on the "
                       "velocity (the SD and SDXL scripts take it)",
    "image_interpolation_mode": "not supported: both images of a pair are resampled bilinearly",
    "train_text_encoder": "not supported: Diffusion-DPO trains the denoiser; the text encoders stay frozen",
    "non_ema_revision": "not supported: --use_ema starts its average from the weights trained, those of "
                        "--revision",
    "snr_gamma": "not supported: the paper's loss weighs every timestep alike (Min-SNR is a supervised "
                 "fine-tuning recipe)",
    "noise_offset": "not supported: both models are scored on plain Gaussian noise, as in the paper",
    "input_perturbation": "not supported: a supervised fine-tuning regulariser, not part of Diffusion-DPO",
    "dream_training": "not supported: DREAM is a supervised fine-tuning method",
    "dream_detail_preservation": "not supported (no DREAM training)",
    "timestep_bias_strategy": "not supported: timesteps are drawn as the paper draws them",
    "timestep_bias_multiplier": "not supported (no timestep bias)", "timestep_bias_begin": "not supported (no "
    "timestep bias)", "timestep_bias_end": "not supported (no timestep bias)",
    "timestep_bias_portion": "not supported (no timestep bias)",
    "enable_npu_flash_attention": "not supported: attention is PyTorch SDPA, or xformers on CUDA",
    "debug_loss": "not supported: the losses and errors are logged every step (train/loss, train/model_mse_w, ...)",
}


# Copied from train_diffusion_dpo.add_diffusers_flags
def add_diffusers_flags(parser):
    """Register DIFFUSERS_FLAGS that this script does not define itself, hidden from --help; each takes an optional
    value (a diffusers switch and a diffusers flag with a value both parse), read by diffusers_flags_onto_ours."""
    defined = {option for action in parser._actions for option in action.option_strings}
    for flag in DIFFUSERS_FLAGS:
        if f"--{flag}" not in defined:
            parser.add_argument(f"--{flag}", dest=f"diffusers_{flag}", nargs="?", const=True, default=None,
                                help=argparse.SUPPRESS)


# Copied from train_diffusion_dpo.diffusers_flags_onto_ours
def diffusers_flags_onto_ours(parser, args):
    """Apply the diffusers flags accepted here, refuse the others with what to use; then drop them from args (the
    saved flags hold this script's own)."""
    for flag, refusal in DIFFUSERS_FLAGS.items():
        dest = f"diffusers_{flag}"
        if not hasattr(args, dest):
            continue  # the script has a flag of that name
        value = getattr(args, dest)
        delattr(args, dest)
        if value is None:
            continue
        if refusal is not None:
            parser.error(f"--{flag} (from diffusers' training examples): {refusal}.")
        if flag == "center_crop" and args.random_crop:
            parser.error("--center_crop and --random_crop contradict each other; the centre crop is the default.")
        if flag == "random_flip" and args.no_hflip:
            parser.error("--random_flip and --no_hflip contradict each other; the flip is on by default.")
        if flag == "tracker_name":
            args.tracker_project_name = value


# Copied from train_diffusion_dpo.resolve_validation_and_rate_flags
def resolve_validation_and_rate_flags(parser, args):
    """--validation_prompts_file into the prompt list; the learning rate's default by training mode."""
    if args.validation_prompts_file is not None:
        try:
            lines = Path(args.validation_prompts_file).read_text().splitlines()
        except OSError as error:
            parser.error(f"--validation_prompts_file cannot be read: {error}")
        args.validation_prompts = [line.strip() for line in lines if line.strip()]
        if not args.validation_prompts:
            parser.error(f"--validation_prompts_file {args.validation_prompts_file!r} holds no prompt.")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LORA_LEARNING_RATE if args.use_lora else DEFAULT_FULL_LEARNING_RATE
    if args.lr_num_cycles < 1 or not args.lr_power > 0:
        parser.error("--lr_num_cycles must be at least 1 and --lr_power > 0.")


# Copied from train_diffusion_dpo.refuse_unsafe_outputs
def refuse_unsafe_outputs(parser, args):
    """The output folder must be writable and not the base model's; the hub token stays off the command line."""
    output_parent = Path(args.output_dir).resolve()
    while not output_parent.exists():
        output_parent = output_parent.parent
    if not os.access(output_parent, os.W_OK):
        parser.error(f"--output_dir {args.output_dir!r} is not writable ({output_parent} is read-only).")
    base = Path(args.pretrained_model_name_or_path).expanduser()
    if base.is_dir() and base.resolve() == Path(args.output_dir).resolve():
        parser.error(f"--output_dir {args.output_dir!r} is the base model's folder: the results would overwrite the "
                     "base model. Choose another folder.")
    if args.hub_token is not None:
        # `accelerate launch` prints the whole command line of a run that fails: a token there ends up in job logs
        parser.error("--hub_token is not accepted (accelerate launch prints the command line of a failed run, token "
                     "included). Log in once with `huggingface-cli login`, or set HF_TOKEN in the job's "
                     "environment; --push_to_hub uses that login.")


# ----------------------------------------------------------------------------------------------------------------
# Stages of main
# ----------------------------------------------------------------------------------------------------------------
def build_models(args, accelerator, weight_dtype):
    """Load the flow-matching scheduler, the three tokenizers, the frozen text encoders and VAE, the trained
    transformer and the frozen reference."""
    load = {"revision": args.revision, "cache_dir": args.cache_dir}
    pipeline_class = StableDiffusion3Pipeline.load_config(args.pretrained_model_name_or_path, **load)["_class_name"]
    if pipeline_class != "StableDiffusion3Pipeline":
        raise ValueError(f"{args.pretrained_model_name_or_path!r} is a {pipeline_class}, not a Stable Diffusion 3 "
                         "pipeline; train SD 1.x/2.x with train_diffusion_dpo.py and SDXL with "
                         "train_diffusion_dpo_sdxl.py.")
    noise_scheduler = load_noise_scheduler(args)
    tokenizers = (
        CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **load),
        CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer_2", **load),
        # T5 prompts are padded and cut to --max_sequence_length, as the pipeline's max_sequence_length does
        T5TokenizerFast.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer_3",
                                        model_max_length=args.max_sequence_length, **load),
    )
    vae_dtype = torch.float32 if args.upcast_vae else weight_dtype
    # Frozen models are loaded in their dtype (from_pretrained keeps what a model marks float32 in float32; a cast
    # with .to(dtype) would not, and diffusers warns at every one).
    text_encoders = (
        CLIPTextModelWithProjection.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                    variant=args.variant, dtype=weight_dtype, **load),
        CLIPTextModelWithProjection.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder_2",
                                                    variant=args.variant, dtype=weight_dtype, **load),
        T5EncoderModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder_3",
                                       variant=args.variant, dtype=weight_dtype, **load),
    )
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant,
                                        dtype=vae_dtype, **load)
    if vae.config.shift_factor is None:
        raise ValueError("This VAE has no shift_factor; SD3's latents are (sample - shift_factor) * scaling_factor.")
    # LoRA: the frozen base in the weight dtype (only the adapters train, in float32); a full fine-tune in float32
    transformer = SD3Transformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", variant=args.variant,
        dtype=weight_dtype if args.use_lora else torch.float32, **load)

    for frozen in (vae, *text_encoders):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(accelerator.device)

    if args.enable_xformers_memory_efficient_attention:
        enable_xformers(transformer)

    ref_transformer = None
    if args.use_lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.to(accelerator.device)
        transformer.add_adapter(LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
            target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
        ))
        cast_training_params(transformer, dtype=torch.float32)
    elif args.loss_type not in REFERENCE_FREE_LOSSES and args.reference_errors is None:
        # A frozen copy of the starting transformer is the reference: weight dtype (norms float32), no grads, and
        # the policy's train mode (SD3's transformer has no dropout; the mode only picks kernels, see the SD script).
        ref_transformer = copy.deepcopy(transformer)
        ref_transformer.requires_grad_(False)
        ref_transformer.train()
        cast_keeping_norms_in_float32(ref_transformer, weight_dtype).to(accelerator.device)
        transformer.to(accelerator.device)
    else:
        transformer.to(accelerator.device)
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return noise_scheduler, tokenizers, text_encoders, vae, transformer, ref_transformer


def load_noise_scheduler(args):
    """The base's flow-matching schedule: its training sigmas (1000, with the model's shift: SD3 3.0) are what each
    pair's sigma is drawn from."""
    config = FlowMatchEulerDiscreteScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                         revision=args.revision, cache_dir=args.cache_dir)
    if config["_class_name"] != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"The model's scheduler is {config['_class_name']}; this script trains flow-matching SD3 "
                         "models (FlowMatchEulerDiscreteScheduler).")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def cast_keeping_norms_in_float32(model, dtype):
    """Cast a frozen copy's weights to `dtype`, except those of its normalization layers, which stay float32:
    autocast runs them in float32 with the policy's float32 weights, so rounded weights there would make the
    reference differ from the policy before the first step. They are a few thousand parameters.

    Two more than in the SD script, each of which alone moves the reference's bf16 step-1 loss off log 2 (by ~0.01
    on the tiny SD3.5): diffusers' RMSNorm (SD3.5's query/key norm, whose scale autocast leaves to the weight's
    dtype) keeps its float32 weight, and the buffers stay float32 (the patch embedding adds its positional
    embeddings, a float32 buffer, outside any autocast op).
    """
    from diffusers.models.normalization import RMSNorm

    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm, RMSNorm)):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
    return model


# Copied from train_diffusion_dpo.enable_xformers
def enable_xformers(transformer):
    if not torch.cuda.is_available():
        raise ValueError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag (PyTorch SDPA "
                         "attention, the default, is as fast on recent PyTorch).")
    try:
        import xformers  # noqa: F401
    except ImportError as error:
        raise ImportError("--enable_xformers_memory_efficient_attention needs `pip install xformers`.") from error
    transformer.enable_xformers_memory_efficient_attention()


# Copied from train_diffusion_dpo.build_optimizer
def build_optimizer(args, params, learning_rate=None):
    """The optimizer the flags choose, at `learning_rate` (the run's, after --scale_lr; default --learning_rate)."""
    learning_rate = args.learning_rate if learning_rate is None else learning_rate
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs `pip install bitsandbytes`.") from error
        return bnb.optim.AdamW8bit(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_adafactor:
        from transformers.optimization import Adafactor

        # A fixed learning rate, like the authors: Adafactor's own relative-step schedule is switched off.
        return Adafactor(params, lr=learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=args.adam_weight_decay)
    # Fused AdamW: one kernel per step on CUDA and on the CPU, where the default for-loop path is ~8x slower (SD1.5's
    # 860M parameters on 2 cores: 2.4 s per step instead of 0.31 s; benchmarks/README.md).
    return torch.optim.AdamW(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True)


# Copied from train_diffusion_dpo.sample_latents
def sample_latents(posterior_params, generators, scaling_factor):
    """One latent sample per image from its VAE posterior (mean and log-variance, as the VAE outputs them).

    The same function serves freshly encoded and cached posteriors, so both give the same latents.
    """
    posterior = DiagonalGaussianDistribution(posterior_params)
    sample_noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators])
    latents = posterior.mean + posterior.std * sample_noise.to(posterior.mean.device, posterior.mean.dtype)
    return latents * scaling_factor


def encode_posteriors(vae, pixels, chunk_size):
    """The VAE posterior parameters (mean and log-variance) of pixels [N,3,H,W], chunk_size images per call
    (VAE activations at 1024 px are large), in the VAE's dtype (float32 with --upcast_vae)."""
    chunks = [pixels[start:start + chunk_size] for start in range(0, pixels.shape[0], chunk_size)]
    return torch.cat([vae.encode(chunk.to(vae.device, dtype=vae.dtype)).latent_dist.parameters for chunk in chunks])


def encode_prompt(text_encoders, input_ids_list):
    """SD3's text condition, as StableDiffusion3Pipeline.encode_prompt computes it (a test holds the two equal).

    Returns (prompt_embeds [B, 77 + T5 length, T5 width]: the penultimate hidden states of CLIP-L and CLIP-G,
    concatenated and zero-padded to T5's width, then T5's last hidden states; pooled_prompt_embeds
    [B, projection_L + projection_G]: both CLIP encoders' pooled projections, concatenated).
    """
    clip_states, pooled = [], []
    for text_encoder, input_ids in zip(text_encoders[:2], input_ids_list[:2]):
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
        clip_states.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    t5 = text_encoders[2]
    t5_states = t5(input_ids_list[2].to(t5.device))[0]
    clip_states = torch.cat(clip_states, dim=-1)
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def dpo_step_losses(args, batch, models, noise_scheduler, global_step, weight_dtype,
                    passes=("reference", "policy")):
    """Per-sample velocity errors of the policy and the reference for one micro-batch of pairs (Flow-DPO).

    Rectified flow noises a latent x_0 to x_t = (1 - sigma) x_0 + sigma eps and the transformer predicts the
    velocity v = eps - x_0. Each pair draws one sigma (SD3's density, --weighting_scheme) and one eps, shared by
    winner and loser, and each image's error is the mean over C, H, W of w(sigma) (v_hat - v)^2, with diffusers'
    SD3 loss weighting w (1 for the density schemes): the errors diffusion_dpo_loss takes.

    Returns (model_losses, ref_losses): [2B] ordered [winners; losers], or winners only [B] for sft (ref None).
    `passes` leaves out the reference (training with --reference_errors) or the policy (its pre-pass); the one
    left out comes back None.
    """
    transformer, ref_transformer, vae, text_encoders = models
    device = transformer.device
    num_pairs = batch["index"].shape[0]
    generators = [pair_generator(args.seed, global_step, int(i)) for i in batch["index"]]

    # 1. One sigma and one noise per pair, shared by winner and loser (the same generator, drawn in order).
    timesteps, sigmas = draw_flow_timesteps(generators, noise_scheduler, args)
    with torch.no_grad():
        # 2. Latents sampled from each image's VAE posterior, then shifted and scaled as SD3's VAE prescribes; the
        #    losers' sample noise has its own generator. Text encoded once per pair, repeated for the loser.
        sft = args.loss_type == "sft"  # winners only
        if "posterior_w" in batch:  # --cache_latents: posteriors and text embeddings computed once, before training
            posterior_params = batch["posterior_w"] if sft else torch.cat([batch["posterior_w"], batch["posterior_l"]])
            prompt_embeds = batch["prompt_embeds"].to(device, dtype=weight_dtype)
            pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device, dtype=weight_dtype)
        else:
            pixels = batch["pixels_w"] if sft else torch.cat([batch["pixels_w"], batch["pixels_l"]])
            posterior_params = encode_posteriors(vae, pixels, args.vae_encode_batch_size)
            prompt_embeds, pooled_prompt_embeds = encode_prompt(
                text_encoders, [batch["input_ids"], batch["input_ids_2"], batch["input_ids_3"]])
        if not sft:
            generators = generators + [pair_generator(args.seed, global_step, f"{int(i)}/l") for i in batch["index"]]
        latents = sample_latents(posterior_params.to(device, dtype=weight_dtype), generators, 1.0)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        generators = generators[:num_pairs]
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    noise = noise.to(device, dtype=latents.dtype)
    repeats = latents.shape[0] // num_pairs
    noise, timesteps = noise.repeat(repeats, 1, 1, 1), timesteps.to(device).repeat(repeats)
    sigmas = sigmas.to(device).repeat(repeats).view(-1, 1, 1, 1)  # float32: sigma_sqrt's sigma^-2 overflows fp16
    prompt_embeds = prompt_embeds.to(device).repeat(repeats, 1, 1)
    pooled_prompt_embeds = pooled_prompt_embeds.to(device).repeat(repeats, 1)

    # 3. Noise both images along the straight path; the target is the velocity from data to noise.
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas).float()
    sigmas = sigmas.to(latents.dtype)
    noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
    target = noise - latents

    def per_sample_mse(model):
        # The run's autocast around every model, policy (accelerate wraps it in the same) and frozen reference alike:
        # a reference equal to the policy then gives equal errors (step 1: loss log 2, no preference).
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            prediction = model(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                               pooled_projections=pooled_prompt_embeds, return_dict=False)[0]
        residuals = prediction.float() - target.float()
        errors = (weighting * residuals.pow(2)).mean(dim=(1, 2, 3))
        if args.loss_type == "sdpo" and torch.is_grad_enabled():  # the policy's pass in training; the gradient
            errors = sdpo_safeguarded_errors(errors, weighting * residuals, args.sdpo_mu)  # of w * r^2 is ~ w * r
        return errors

    # 4. Reference first, under no_grad: its activations are freed before the policy's are kept. A full fine-tune with
    #    --reference_errors keeps no frozen copy: its pre-pass runs before any step, when the policy is the reference.
    ref_losses = model_losses = None
    if args.loss_type not in REFERENCE_FREE_LOSSES and "reference" in passes:
        with torch.no_grad():
            if args.use_lora:
                with lora_adapters_disabled(transformer_module(transformer)) as reference:
                    ref_losses = per_sample_mse(reference)
            else:
                ref_losses = per_sample_mse(ref_transformer if ref_transformer is not None else transformer_module(transformer))
    if "policy" in passes:
        model_losses = per_sample_mse(transformer)
    return model_losses, ref_losses


# Copied from train_diffusion_dpo.unet_module
def transformer_module(transformer):
    """The bare transformer under any DDP/compile wrapper (the reference pass must not go through DDP's hooks)."""
    while hasattr(transformer, "module") or hasattr(transformer, "_orig_mod"):
        transformer = getattr(transformer, "module", None) or transformer._orig_mod
    return transformer


# Copied from train_diffusion_dpo.weights_are_sharded
def weights_are_sharded(accelerator):
    """True under FSDP and DeepSpeed ZeRO-3: no process holds the whole trained transformer, so every process must run its
    forward passes (validation) and take part in gathering its weights (checkpoints, results)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


# Copied from train_diffusion_dpo.unet_from_state_dict
def transformer_from_state_dict(transformer, state_dict):
    """A plain transformer with the trained transformer's config holding state_dict (gathered from FSDP/ZeRO-3 shards), to save."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        plain = SD3Transformer2DModel.from_config(transformer_module(transformer).config)
    plain.load_state_dict(state_dict, assign=True)
    return plain


# Copied from train_diffusion_dpo.exchange_through_files
def exchange_through_files(output_dir, accelerator, report):
    """Every process's small JSON report, read by all (output_dir is shared, as checkpoints already need): the
    end-of-run summary without a tensor collective, whose gloo teardown at exit can deadlock."""
    path = os.path.join(output_dir, f".report-{accelerator.process_index}.json")
    with open(path, "w") as f:
        json.dump(report, f)
    accelerator.wait_for_everyone()
    reports = []
    for rank in range(accelerator.num_processes):
        with open(os.path.join(output_dir, f".report-{rank}.json")) as f:
            reports.append(json.load(f))
    accelerator.wait_for_everyone()
    os.remove(path)
    return reports


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_RECORD = "dpo_checkpoint.json"  # written last into a checkpoint: its step, run, settings and file sizes
RUN_RESULT = "run_result.json"  # written after the results: which run wrote them, and at which step


# Copied from train_diffusion_dpo.checkpoint_dirs
def checkpoint_dirs(output_dir):
    """The checkpoint folders this script writes (checkpoint-<step>) in output_dir, oldest first. Temporary folders of
    interrupted saves and folders of other names (a user's checkpoint-best-1) are not ours: never resumed or pruned."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if CHECKPOINT_NAME.match(d)]
    return sorted(names, key=lambda name: int(name.split("-")[1]))


# Copied from train_diffusion_dpo.is_record_less_checkpoint
def is_record_less_checkpoint(path):
    """A checkpoint of this script's versions before the record: accelerate's state and the trained weights are
    there. It is resumed (a run under way survives an upgrade), with its step from its folder's name and no checks."""
    path = Path(path)
    weights = [CHECKPOINT_LORA_NAME, "transformer", "transformer"]
    return (path / "random_states_0.pkl").is_file() and any((path / name).exists() for name in weights)


# Copied from train_diffusion_dpo.is_write_failure
def is_write_failure(error):
    """An OSError, or a RuntimeError of torch's file writer (a full disk reads "basic_ios::clear"), not an out-of-memory
    or a collective's error raised while gathering weights to save."""
    return isinstance(error, OSError) or any(
        text in str(error) for text in ("basic_ios", "PytorchStreamWriter", "file write failed", "No space left"))


# Copied from train_diffusion_dpo.write_failure
def write_failure(folder, error):
    """An OSError naming the folder a write failed in and the free space of its disk (a full disk reads as
    "basic_ios::clear" from torch.save, or SIGBUS from a memory map)."""
    existing = Path(folder).resolve()
    while not existing.exists():
        existing = existing.parent
    free = f"{shutil.disk_usage(existing).free / 1e9:.2f} GB free"
    return OSError(f"Could not write {folder} ({type(error).__name__}: {error}); its disk has {free}. Free some space "
                   "or choose another --output_dir.")


# Copied from train_diffusion_dpo.checkpoint_problem
def checkpoint_problem(path):
    """Why a checkpoint folder cannot be resumed, or None when it is whole: every file its record lists is there at
    the size it was saved with (a truncated copy, a missing adapter and an empty folder all fail this)."""
    try:
        files = json.loads((Path(path) / CHECKPOINT_RECORD).read_text())["files"]
    except FileNotFoundError:
        if is_record_less_checkpoint(path):
            return None
        return f"it has no {CHECKPOINT_RECORD} (an empty folder or an interrupted copy)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {CHECKPOINT_RECORD} cannot be read ({error})"
    for name, size in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was saved"
    return None


# Copied from train_diffusion_dpo.save_checkpoint
def save_checkpoint(args, accelerator, run, faults=None):
    """Save a resumable state atomically: written to a temporary folder, renamed when complete, and only then are
    old checkpoints pruned (a kill during the save leaves the previous one).

    Each process adds its run state (data position, bad rows found, non-finite counts); the main process adds the
    record that `checkpoint_problem` checks and a resume reads its step and settings from.
    """
    final_dir = os.path.join(args.output_dir, f"checkpoint-{run.global_step}")
    temp_dir = os.path.join(args.output_dir, f".tmp-checkpoint-{run.global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(temp_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temp_dir)
        with open(os.path.join(temp_dir, f"run_state_{accelerator.process_index}.json"), "w") as f:
            json.dump(run.resumable_state(), f)
    except (OSError, RuntimeError) as error:
        if not is_write_failure(error):
            raise
        raise write_failure(temp_dir, error) from error
    accelerator.wait_for_everyone()
    if faults is not None:  # a test's crash here: the checkpoint is written but not yet renamed
        faults.crash_if_saving(run.global_step)
    if accelerator.is_main_process:
        files = {str(f.relative_to(temp_dir)): f.stat().st_size for f in Path(temp_dir).rglob("*") if f.is_file()}
        record = {"global_step": run.global_step, "run_id": run.run_id, "settings": run.settings,
                  "learning_rate": run.learning_rate, "learning_rate_changes": run.learning_rate_changes,
                  "files": files}
        try:
            with open(os.path.join(temp_dir, CHECKPOINT_RECORD), "w") as f:
                json.dump(record, f, indent=2)
        except OSError as error:
            raise write_failure(temp_dir, error) from error
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(temp_dir, final_dir)
        logger.info(f"Saved checkpoint {final_dir}")
        if args.checkpoints_total_limit is not None:  # the newest kept are this one and the highest steps
            older = [name for name in checkpoint_dirs(args.output_dir) if name != os.path.basename(final_dir)]
            for name in older[: max(0, len(older) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(os.path.join(args.output_dir, name))
    run.last_checkpoint = os.path.abspath(final_dir)
    accelerator.wait_for_everyone()


def register_checkpoint_hooks(args, accelerator):
    """Checkpoints hold the LoRA adapter alone (not the frozen base) or the full transformer, and restore in place.

    Restoring in place matters for LoRA: loading saved LoRA weights as a new adapter would put a fresh adapter
    beside the trained one, which is the resume bug of the reference implementation.
    """
    from safetensors.torch import load_file, save_file

    def save_model_hook(models, weights, output_dir):
        # Under FSDP and DeepSpeed, accelerate has already saved the engine's own state (which load_state restores
        # without the load hook); what this writes is the loadable copy, for pipeline_dpo.py.
        for model in models:
            transformer = transformer_module(model)
            # FSDP / ZeRO-3: the full weights, gathered from every process's shard (all processes take part)
            full_state = accelerator.get_state_dict(model) if weights_are_sharded(accelerator) else None
            if accelerator.is_main_process:
                if args.use_lora:
                    from peft import get_peft_model_state_dict

                    state = get_peft_model_state_dict(transformer, state_dict=full_state)
                    state = {k: v.contiguous() for k, v in state.items()}
                    save_file(state, os.path.join(output_dir, CHECKPOINT_LORA_NAME))
                    # Beside the resumable adapter, the file stock diffusers samples a checkpoint from
                    # (`pipe.load_lora_weights("checkpoint-N")`), written as the final result is, alpha included.
                    # In PEFT's key format, as save_results writes it (see there).
                    StableDiffusion3Pipeline.save_lora_weights(
                        output_dir, transformer_lora_layers=state, safe_serialization=True,
                        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
                else:
                    plain = transformer if full_state is None else transformer_from_state_dict(transformer, full_state)
                    plain.save_pretrained(os.path.join(output_dir, "transformer"))
            if weights:
                weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            transformer = transformer_module(models.pop())
            if args.use_lora:
                from peft import set_peft_model_state_dict

                adapter = load_file(os.path.join(input_dir, CHECKPOINT_LORA_NAME))
                result = set_peft_model_state_dict(transformer, adapter)
                if getattr(result, "unexpected_keys", None):
                    raise ValueError(f"Checkpoint has LoRA keys this transformer lacks: {result.unexpected_keys[:5]}")
            else:
                loaded = SD3Transformer2DModel.from_pretrained(input_dir, subfolder="transformer")
                transformer.load_state_dict(loaded.state_dict())
                del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


# Copied from train_diffusion_dpo.resolve_resume_dir
def resolve_resume_dir(args):
    """The checkpoint folder to resume, or None. 'latest' is the newest intact checkpoint-<step> of output_dir; the
    damaged ones it passes over are named in the log, and a folder whose checkpoints are all damaged is refused."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        problem = checkpoint_problem(args.resume_from_checkpoint)
        if problem is not None:
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint} cannot be resumed: {problem}. "
                             "Pass another checkpoint, or 'latest'.")
        return args.resume_from_checkpoint
    damaged = []
    for name in reversed(checkpoint_dirs(args.output_dir)):
        problem = checkpoint_problem(os.path.join(args.output_dir, name))
        if problem is None:
            if damaged:
                logger.warning(f"Resuming from {name}, the newest intact checkpoint; passed over: "
                               + "; ".join(f"{bad} ({why})" for bad, why in damaged))
            return os.path.join(args.output_dir, name)
        damaged.append((name, problem))
    if damaged:
        raise ValueError(f"No checkpoint in {args.output_dir} can be resumed: "
                         + "; ".join(f"{bad} ({why})" for bad, why in damaged)
                         + ". Move them away to start the run anew.")
    return None


# What a checkpoint's state depends on: resumed with other values, the run would go on as another run than the one
# saved (or fail on a raw size mismatch). The learning rate and the step count may change (see resume_from).
RESUME_SETTINGS = ("pretrained_model_name_or_path", "train_batch_size", "gradient_accumulation_steps", "use_lora",
                   "rank", "lora_alpha", "lora_target_modules", "resolution", "seed", "loss_type", "beta_dpo",
                   "streaming", "max_train_samples", "no_hflip", "random_crop", "proportion_empty_prompts",
                   "use_ema", "ema_decay", "beta_mapo", "sdpo_mu")


# Copied from train_diffusion_dpo.resume_settings
def resume_settings(args, run, counts):
    settings = {name: getattr(args, name, None) for name in RESUME_SETTINGS}
    settings.update(num_processes=run.num_processes, pairs=counts.get("pairs"), data=counts.get("data_digest"))
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the checkpoint


# Copied from train_diffusion_dpo.apply_learning_rate
def apply_learning_rate(run, learning_rate):
    """Put a new base learning rate into the restored optimizer and schedule, at the schedule's current point (the
    restored state would otherwise keep the saved rate, whatever the flags say)."""
    scheduler = getattr(run.lr_scheduler, "scheduler", run.lr_scheduler)  # accelerate wraps the LambdaLR
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for group, lr_lambda in zip(run.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]


# Copied from train_diffusion_dpo.resume_from
def resume_from(args, accelerator, run, resume_dir):
    """Restore a checkpoint: its settings checked against the flags first, then the state, the step and run from its
    record, and each process's run state (data position, bad rows found, non-finite counts)."""
    if not (Path(resume_dir) / CHECKPOINT_RECORD).exists():
        resume_record_less(args, accelerator, run, resume_dir)
        return
    record = json.loads((Path(resume_dir) / CHECKPOINT_RECORD).read_text())
    # A setting the checkpoint's version did not record yet is not checked (it had only that setting's default).
    changed = [f"{name}: saved {record['settings'].get(name)}, now {value}" for name, value in run.settings.items()
               if record["settings"].get(name, value) != value]
    if changed:
        raise ValueError(
            f"{resume_dir} was saved by a run with other settings ({'; '.join(changed)}). Resume with the saved "
            "values (the learning rate and --max_train_steps may change on resume), or start a new run in another "
            "--output_dir.")
    logger.info(f"Resuming from {resume_dir} (step {record['global_step']})")
    accelerator.load_state(resume_dir)
    if run.ema is not None and not args.offload_ema:  # accelerate loads a registered object's tensors on the CPU
        run.ema.to(accelerator.device)
    run.global_step, run.run_id = record["global_step"], record["run_id"]
    run.last_checkpoint = os.path.abspath(resume_dir)
    with open(os.path.join(resume_dir, f"run_state_{accelerator.process_index}.json")) as f:
        state = json.load(f)
    for reason, rows in state["row_problems"].items():
        run.row_problems.setdefault(reason, set()).update(rows)
    run.nonfinite_steps, run.nonfinite_in_a_row = state["nonfinite_steps"], state["nonfinite_in_a_row"]
    run.learning_rate_changes = record["learning_rate_changes"]
    if not math.isclose(record["learning_rate"], run.learning_rate, rel_tol=1e-9):
        apply_learning_rate(run, run.learning_rate)
        run.learning_rate_changes = run.learning_rate_changes + [[run.global_step, run.learning_rate]]
        logger.warning(f"The learning rate changed on resume: {record['learning_rate']:g} when saved, now "
                       f"{run.learning_rate:g}, applied from step {run.global_step + 1}.")
    continue_data_from(args, run, state["stream_state"])


# Copied from train_diffusion_dpo.continue_data_from
def continue_data_from(args, run, stream_state):
    """The data position after run.global_step: the stream's own (a stream_state) or epoch and batch of the order."""
    if args.streaming:
        run.train_dataset.start_state = tuple(stream_state)
    else:
        run.first_epoch = run.global_step // run.steps_per_epoch
        run.resume_batches = (run.global_step % run.steps_per_epoch) * args.gradient_accumulation_steps


# Copied from train_diffusion_dpo.resume_record_less
def resume_record_less(args, accelerator, run, resume_dir):
    """Resume a checkpoint written before checkpoints had a record (see is_record_less_checkpoint)."""
    logger.warning(f"{resume_dir} has no {CHECKPOINT_RECORD} (written by an earlier version): resuming it with the "
                   "step of its folder's name, without checking the settings it was saved with.")
    accelerator.load_state(resume_dir)
    if run.ema is not None and not args.offload_ema:
        run.ema.to(accelerator.device)
    run.global_step = int(os.path.basename(os.path.normpath(resume_dir)).split("-")[-1])
    run.last_checkpoint = os.path.abspath(resume_dir)
    stream_state = None
    if args.streaming:
        with open(os.path.join(resume_dir, f"stream_state_{accelerator.process_index}.json")) as f:
            stream_state = json.load(f)
    continue_data_from(args, run, stream_state)


# Copied from train_diffusion_dpo.run_already_finished
def run_already_finished(args):
    """True when a requeued job (--resume_from_checkpoint) finds its run finished in output_dir: the run recorded in
    training_args.json wrote the results, for the steps these flags ask for. It is then a no-op."""
    if args.resume_from_checkpoint is None:
        return False
    try:
        result = json.loads(Path(args.output_dir, RUN_RESULT).read_text())
        started = json.loads(Path(args.output_dir, "training_args.json").read_text())["run"]["run_id"]
        requested = {"max_train_steps": args.max_train_steps, "num_train_epochs": args.num_train_epochs}
        finished = (result["run_id"] == started and result["requested"] == requested
                    and result["global_step"] >= result["max_train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if finished:
        logger.info(f"{args.output_dir} holds the results of run {started}, already finished at step "
                    f"{result['global_step']}: nothing to do.")
    return finished


def sampling_scheduler(args):
    """The base pipeline's own sampling scheduler (SD3: FlowMatchEulerDiscreteScheduler with its shift), for
    validation and the saved pipeline; flow matching has no prediction type to override."""
    config = FlowMatchEulerDiscreteScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                         revision=args.revision, cache_dir=args.cache_dir)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build_pipeline(args, accelerator, transformer, text_encoders, vae, tokenizers, weight_dtype):
    """A StableDiffusion3Pipeline around the given modules (text_encoders and tokenizers are SD3's three)."""
    return StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1], text_encoder_3=text_encoders[2], vae=vae, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2], scheduler=sampling_scheduler(args),
        revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype,
    )


def generate_images(pipeline, args, device, weight_dtype):
    """num_validation_images per prompt, image j of every prompt from seed (seed + j): paired across models.

    The denoising loop runs under autocast (float32 trained weights beside half-precision frozen ones); the VAE
    decodes outside it, in its own dtype (float32 with --upcast_vae), after undoing SD3's shift and scale. Prompts
    get the T5 length the model was trained with.
    """
    images = []
    autocast = (torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32
                else contextlib.nullcontext())
    vae = pipeline.vae
    for prompt in args.validation_prompts:
        for j in range(args.num_validation_images):
            generator = torch.Generator(device=device).manual_seed(args.seed + j)
            with autocast:
                latents = pipeline(
                    prompt, num_inference_steps=args.validation_num_inference_steps,
                    guidance_scale=args.validation_guidance_scale, generator=generator,
                    height=args.resolution, width=args.resolution, output_type="latent",
                    max_sequence_length=args.max_sequence_length,
                ).images
            latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            images += pipeline.image_processor.postprocess(vae.decode(latents).sample, output_type="pil")
    return images


# Copied from train_diffusion_dpo.label_font
def label_font(size):
    """A font for grid labels: the scalable default where Pillow has one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


# Copied from train_diffusion_dpo._wrap
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


# Copied from train_diffusion_dpo.make_comparison_grid
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


# Copied from train_diffusion_dpo.log_validation with tokenizer->tokenizers, text_encoder->text_encoders
def log_validation(args, accelerator, models, tokenizers, weight_dtype, global_step, reference_images):
    """Reference and trained model from the same seeds, side by side: a row per prompt, reference on the left.

    Returns (grid path, reference images); the reference never changes, so its images are made once.
    """
    transformer, ref_transformer, vae, text_encoders = models
    policy = transformer_module(transformer)
    logger.info(f"Validation at step {global_step}: {len(args.validation_prompts)} prompts")
    policy.eval()
    with torch.no_grad():
        pipeline = build_pipeline(args, accelerator, policy, text_encoders, vae, tokenizers, weight_dtype)
        pipeline.set_progress_bar_config(disable=True)
        if reference_images is None:
            if args.use_lora:
                with lora_adapters_disabled(policy):
                    reference_images = generate_images(pipeline, args, accelerator.device, weight_dtype)
            elif ref_transformer is not None:
                pipeline.transformer = ref_transformer
                reference_images = generate_images(pipeline, args, accelerator.device, weight_dtype)
                pipeline.transformer = policy
            else:  # sft full fine-tune keeps no reference copy: the base is what we started from, on disk
                base_transformer = SD3Transformer2DModel.from_pretrained(
                    args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision,
                    variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype).to(accelerator.device)
                pipeline.transformer = base_transformer
                reference_images = generate_images(pipeline, args, accelerator.device, weight_dtype)
                pipeline.transformer = policy
                del base_transformer
        trained_images = generate_images(pipeline, args, accelerator.device, weight_dtype)
    policy.train()
    del pipeline

    if not accelerator.is_main_process:  # sharded weights: this process only took part in the forward passes
        return None, reference_images
    trained_label = {"sft": "SFT", "mapo": "MaPO", "sdpo": "SDPO"}.get(args.loss_type, "DPO")
    grid, _ = make_comparison_grid(args.validation_prompts, {"base": reference_images, trained_label: trained_images},
                                   args.num_validation_images)
    grid_dir = os.path.join(args.output_dir, "validation")
    os.makedirs(grid_dir, exist_ok=True)
    grid_path = os.path.join(grid_dir, f"step-{global_step:06d}.png")
    grid.save(grid_path)
    widget_dir = Path(grid_path).with_suffix("")  # the trained model's first image of each prompt: the card's widget
    widget_dir.mkdir(exist_ok=True)
    for p in range(len(args.validation_prompts)):
        trained_images[p * args.num_validation_images].save(widget_dir / f"{p:02d}.png")

    for tracker in accelerator.trackers:  # the grid is also logged, so a dashboard shows it beside the curves
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/reference_vs_dpo", np.asarray(grid), global_step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/reference_vs_dpo": wandb.Image(grid, caption="left: base, right: trained")},
                        step=global_step)
    return grid_path, reference_images


def safe_validation(args, accelerator, models, tokenizers, weight_dtype, global_step, reference_images, grid_path):
    """Validation that cannot end a run: a failure (e.g. out of memory while sampling) is logged, training goes on."""
    frozen_encoders = [models[2], *models[3]]  # the VAE and the three text encoders
    try:
        if args.cache_latents:  # the encoders wait on the CPU while training from the cache
            for encoder in frozen_encoders:
                encoder.to(accelerator.device)
        return log_validation(args, accelerator, models, tokenizers, weight_dtype, global_step, reference_images)
    except Exception as error:  # noqa: BLE001 - any sampling failure must not cost the training run
        logger.warning(f"Validation at step {global_step} failed and was skipped: {type(error).__name__}: {error}")
        transformer_module(models[0]).train()
        return grid_path, reference_images
    finally:
        if args.cache_latents:
            for encoder in frozen_encoders:
                encoder.to("cpu")
        free_accelerator_memory()


# Copied from train_diffusion_dpo.free_accelerator_memory
def free_accelerator_memory():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Reference errors computed once (--reference_errors)
# ----------------------------------------------------------------------------------------------------------------
# Copied from train_diffusion_dpo.reference_errors_key
def reference_errors_key(args, accelerator, run, models, dataset):
    """What a run's reference errors depend on: every flag but those below (so a flag added later counts until it
    is known not to), the launch (processes, precision, steps), the data, and the frozen weights (the reference's
    without LoRA adapters, the VAE's, the text encoders'). None without --reference_errors.

    Taken before a resume loads the checkpoint: a full fine-tune's policy is the reference only until it trains.
    """
    if args.reference_errors is None:
        return None
    if weights_are_sharded(accelerator):
        raise ValueError("--reference_errors does not run under FSDP or ZeRO-3 yet (the pre-pass needs the whole "
                         "reference on every process); drop it, or train with DDP or ZeRO-2.")
    # Flags that change neither a pair's inputs nor the reference's output: runs that differ from the one that
    # computed the errors only here reuse them (a sweep over beta, loss type, learning rate, optimizer, rank).
    free_flags = frozenset({
        "beta_dpo", "loss_type", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1",
        "adam_beta2", "adam_weight_decay", "adam_epsilon", "use_8bit_adam", "use_adafactor", "max_grad_norm",
        "max_nonfinite_steps", "rank", "lora_alpha", "lora_target_modules", "gradient_checkpointing", "output_dir",
        "logging_dir", "report_to", "tracker_project_name", "checkpointing_steps", "checkpoints_total_limit",
        "resume_from_checkpoint", "validation_prompts", "validation_steps", "num_validation_images",
        "validation_num_inference_steps", "validation_guidance_scale", "push_to_hub", "hub_model_id", "hub_token",
        "save_transformer_only", "dataloader_num_workers", "cache_dir", "latent_cache_dir",
        "reference_errors", "reference_batch_size", "reference_errors_on_mismatch", "lr_num_cycles", "lr_power",
        "validation_prompts_file", "beta_mapo", "sdpo_mu", "use_ema", "ema_decay", "offload_ema", "foreach_ema",
    })
    transformer, _, vae, text_encoders = models
    encoders = text_encoders if isinstance(text_encoders, (tuple, list)) else [text_encoders]
    key = {
        "format": 1, "script": Path(__file__).name,
        "args": {name: value for name, value in sorted(vars(args).items()) if name not in free_flags},
        "num_processes": run.num_processes, "mixed_precision": run.mixed_precision,
        "max_train_steps": run.max_train_steps, "pairs": len(run.train_dataset),
        "dataset": getattr(dataset, "_fingerprint", None),
        "reference": weights_fingerprint(transformer_module(transformer), without_adapters=True),
        "vae": weights_fingerprint(vae), "text_encoders": [weights_fingerprint(encoder) for encoder in encoders],
    }
    return json.loads(json.dumps(key, default=str))  # as it reads back from key.json


# Copied from train_diffusion_dpo.ReferenceErrors
class ReferenceErrors:
    """The reference's per-sample errors of this process's pairs, by (optimizer step, pair index)."""

    def __init__(self, steps, indices, errors):
        self.rows = {(int(step), int(index)): row for step, index, row in zip(steps, indices, errors.tolist())}

    def losses(self, global_step, indices, device):
        """ref_losses as dpo_step_losses returns them: [winners; losers] of the batch's pairs."""
        try:
            rows = [self.rows[(global_step, int(index))] for index in indices]
        except KeyError as error:
            raise RuntimeError(f"--reference_errors has no errors for pair {error.args[0][1]} at step "
                               f"{global_step + 1}: the pairs of this run differ from those of the pre-pass. Delete "
                               "the folder's key.json to recompute them.") from None
        errors = torch.tensor(rows, dtype=torch.float32)
        return torch.cat([errors[:, 0], errors[:, 1]]).to(device)


# Copied from train_diffusion_dpo.compute_reference_errors
def compute_reference_errors(args, accelerator, run, models, noise_scheduler, weight_dtype):
    """The pre-pass: the reference's errors of every pair of every step this run will train, from its resume
    position on, each process its own pairs. The micro-batches are the training loop's own (training_batches on a
    copy of the run: the same order, skips and bad-row checks), joined into forwards of --reference_batch_size pairs
    of one step. Returns (steps, indices, errors [N, 2]) as numpy arrays."""
    shadow = replace(run, row_problems={reason: set() for reason in run.row_problems}, step_metrics={})
    steps, indices, errors, pending = [], [], [], []
    progress = tqdm(total=run.max_train_steps - run.global_step, desc="Reference errors",
                    disable=not accelerator.is_local_main_process)

    def flush(step):
        batch = {name: torch.cat([b[name] for b in pending]) for name, value in pending[0].items()
                 if torch.is_tensor(value)}
        _, ref_losses = dpo_step_losses(args, batch, models, noise_scheduler, step, weight_dtype, passes=("reference",))
        pairs = batch["index"].shape[0]
        steps.extend([step] * pairs)
        indices.extend(batch["index"].tolist())
        errors.append(torch.stack([ref_losses[:pairs], ref_losses[pairs:]], dim=1).float().cpu())
        pending.clear()

    for batch in training_batches(args, accelerator, shadow):
        # accumulate() decides where an optimizer step ends exactly as in training (epoch ends included)
        with accelerator.accumulate(shadow.transformer):
            if pending and sum(b["index"].shape[0] for b in pending + [batch]) > args.reference_batch_size:
                flush(shadow.global_step)
            pending.append(batch)
            if accelerator.sync_gradients:
                flush(shadow.global_step)
            if accelerator.sync_gradients:
                shadow.global_step += 1
                progress.update(1)
    progress.close()
    accelerator.step = 0  # the training loop counts its micro-batches from the start again
    errors = torch.cat(errors).numpy() if errors else np.zeros((0, 2), dtype=np.float32)  # resumed at the end
    return np.array(steps, dtype=np.int32), np.array(indices, dtype=np.int32), errors


# Copied from train_diffusion_dpo.prepare_reference_errors
def prepare_reference_errors(args, accelerator, run, models, noise_scheduler, weight_dtype, key):
    """--reference_errors: this process's ReferenceErrors, read from the folder when its key matches the run's `key`
    (reference_errors_key), else computed by the pre-pass and written there atomically (key.json last) first; None
    without the flag. The folder must be one every process sees, as --output_dir is."""
    if args.reference_errors is None:
        return None
    folder = Path(args.reference_errors)
    rank_file = folder / f"errors_rank{accelerator.process_index}.npz"
    saved = json.loads((folder / "key.json").read_text()) if (folder / "key.json").exists() else None
    if saved is not None and saved["key"] == key and saved["first_step"] <= run.global_step:
        logger.info(f"Reading the reference errors from {folder}")
        stored = np.load(rank_file)
        return ReferenceErrors(stored["steps"], stored["indices"], stored["errors"])
    if saved is not None:
        differs = sorted({f"args.{name}" for name in set(key["args"]) | set(saved["key"].get("args", {}))
                          if key["args"].get(name) != saved["key"].get("args", {}).get(name)}
                         | {name for name in set(key) | set(saved["key"]) if name != "args"
                            and key.get(name) != saved["key"].get(name)})
        why = (f"differs in {', '.join(differs)}" if differs else
               f"starts at step {saved['first_step'] + 1}, after this run's step {run.global_step + 1}")
        message = f"--reference_errors {folder} holds the errors of another run ({why})"
        if args.reference_errors_on_mismatch == "refuse":
            raise ValueError(f"{message}; pass another folder, or --reference_errors_on_mismatch recompute.")
        logger.warning(f"{message}; computing this run's errors instead")
    if run.global_step > 0 and not args.use_lora:
        raise ValueError(f"--reference_errors {folder} has no errors for this run, and a resumed full fine-tune can "
                         "no longer compute them (its policy has moved from the reference and no copy was kept): "
                         "resume with the folder the run started with, or without --reference_errors.")
    started = time.perf_counter()
    steps, indices, errors = compute_reference_errors(args, accelerator, run, models, noise_scheduler, weight_dtype)
    logger.info(f"Reference errors of {len(steps)} pairs computed in {time.perf_counter() - started:.1f} s")
    partial = folder / ".partial"
    if accelerator.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    np.savez(partial / rank_file.name, steps=steps, indices=indices, errors=errors)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # a reader trusts the files only once key.json says whose they are
        (folder / "key.json").unlink(missing_ok=True)
        for rank in range(accelerator.num_processes):
            os.replace(partial / f"errors_rank{rank}.npz", folder / f"errors_rank{rank}.npz")
        temp_key = partial / "key.json"
        temp_key.write_text(json.dumps({"key": key, "first_step": run.global_step}, indent=2))
        os.replace(temp_key, folder / "key.json")
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ReferenceErrors(steps, indices, errors)


def save_results(args, transformer, full_state=None):
    """Full fine-tune: a complete SD3 pipeline folder (or transformer/ alone). LoRA: pytorch_lora_weights.safetensors,
    which StableDiffusion3Pipeline.load_lora_weights reads."""
    policy = transformer_module(transformer)
    if full_state is not None and not args.use_lora:  # FSDP / ZeRO-3: the weights gathered from all processes
        policy = transformer_from_state_dict(policy, full_state)
    if args.use_lora:
        from peft import get_peft_model_state_dict

        # PEFT's key format, as diffusers' SD3 example saves it: convert_state_dict_to_diffusers (the SD scripts')
        # renames to_q/k/v/out but not add_*_proj, and SD3's loader then drops the image stream's adapters.
        lora_state = get_peft_model_state_dict(policy, state_dict=full_state)
        # The adapter's config travels with the weights: without it a loader assumes alpha == rank.
        StableDiffusion3Pipeline.save_lora_weights(
            args.output_dir, transformer_lora_layers=lora_state, safe_serialization=True,
            transformer_lora_adapter_metadata=policy.peft_config["default"].to_dict())
    elif args.save_transformer_only:
        policy.save_pretrained(os.path.join(args.output_dir, "transformer"), safe_serialization=True)
    else:
        # The frozen parts come from the base as it is stored (the copies on the accelerator were cast for training);
        # only the transformer is the trained one.
        if policy.dtype != torch.float32:  # DeepSpeed's half-precision engine; saved in float32 all the same
            policy = policy.to(torch.float32)
        pipeline = StableDiffusion3Pipeline.from_pretrained(
            args.pretrained_model_name_or_path, transformer=policy,
            scheduler=sampling_scheduler(args), revision=args.revision, variant=args.variant,
            cache_dir=args.cache_dir)
        pipeline.save_pretrained(args.output_dir, safe_serialization=True)


def hub_upload_patterns(args):
    """What --push_to_hub uploads: final artifacts, card and grid; never checkpoints, logs or saved arguments."""
    if args.use_lora:
        allow = [LORA_WEIGHTS_NAME]
    elif args.save_transformer_only:
        allow = ["transformer/*"]
    else:
        allow = ["model_index.json", "transformer/*", "vae/*", "scheduler/*"]
        allow += [f"{part}{suffix}/*" for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")]
    allow += ["README.md", "validation_grid.png", "images/*"]
    ignore = ["checkpoint-*", ".tmp-checkpoint-*", "logs/*", "validation/*", "*.bin", "*.pkl"]
    return allow, ignore


def write_model_card(args, run, counts, grid_path):
    repo_id = args.hub_model_id or Path(args.output_dir).name
    if grid_path is not None:
        shutil.copyfile(grid_path, os.path.join(args.output_dir, "validation_grid.png"))
    if args.use_lora:
        usage = (f'pipe = StableDiffusion3Pipeline.from_pretrained("{args.pretrained_model_name_or_path}", '
                 'dtype=torch.bfloat16).to("cuda")\n'
                 f'pipe.load_lora_weights("{repo_id}")')
    elif args.save_transformer_only:
        usage = (f'transformer = SD3Transformer2DModel.from_pretrained("{repo_id}", subfolder="transformer", '
                 'dtype=torch.bfloat16)\n'
                 f'pipe = StableDiffusion3Pipeline.from_pretrained("{args.pretrained_model_name_or_path}", '
                 'transformer=transformer, dtype=torch.bfloat16).to("cuda")')
    else:
        usage = f'pipe = StableDiffusion3Pipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16).to("cuda")'
    # The validation settings and the T5 length the model was trained with (the pipeline's default is 256)
    call = (f'pipe("a photo of an astronaut riding a horse on mars", '
            f'num_inference_steps={args.validation_num_inference_steps},\n'
            f'             guidance_scale={args.validation_guidance_scale}, '
            f'max_sequence_length={args.max_sequence_length}).images[0]')
    dataset = args.dataset_name or "local preference data"
    settings = {
        "mode": f"LoRA (rank {args.rank}, alpha {args.lora_alpha})" if args.use_lora else (
            f"full fine-tune, EMA of the weights (decay {args.ema_decay:g})" if args.use_ema else "full fine-tune"),
        "objective": f"{'Flow-DPO' if args.loss_type not in REFERENCE_FREE_LOSSES else args.loss_type} (velocity "
                     "errors, constant beta)", "loss_type": args.loss_type,
        **objective_settings(args), "learning_rate": run.learning_rate, "scale_lr": args.scale_lr,
        "lr_scheduler": args.lr_scheduler,
        "optimizer": "Adafactor" if args.use_adafactor else ("AdamW8bit" if args.use_8bit_adam else "AdamW"),
        "effective batch (pairs)": args.train_batch_size * args.gradient_accumulation_steps * run.num_processes,
        "optimizer steps": run.global_step, "resolution": args.resolution, "mixed_precision": run.mixed_precision,
        "sigma density / weighting": args.weighting_scheme, "T5 tokens": args.max_sequence_length,
        "pairs used": counts.get("pairs", "streamed"), "ties dropped": counts.get("ties"), "seed": args.seed,
    }
    grid_md = ("![the base model and the trained one, same seeds](./validation_grid.png)\n\nA row per prompt (written "
               "under it): the base model's images on the left, the trained model's on the right, from the same "
               "seeds.\n" if grid_path is not None else "")
    used = sorted(name for name in ("StableDiffusion3Pipeline", "SD3Transformer2DModel") if name + "." in usage)
    diffusers_import = f"from diffusers import {', '.join(used)}"
    description = f"""# Flow-DPO (Stable Diffusion 3): {repo_id}

{"LoRA adapters" if args.use_lora else "A transformer"} for `{args.pretrained_model_name_or_path}` aligned to \
human preference pairs from `{dataset}` with {objective_reference(args)} \
carried over to flow matching (on velocity errors; for the DPO losses that is Flow-DPO, with a constant beta).

## Validation

{grid_md}"""
    usage_md = f"""```python
import torch
{diffusers_import}

{usage}
image = {call}
```

With `pipeline_dpo.py` from the Diffusion-DPO training repository, one call loads any DPO result (full
pipeline, transformer alone, or LoRA) into a stock diffusers pipeline:

```python
from pipeline_dpo import load_dpo_pipeline

pipe = load_dpo_pipeline("{args.pretrained_model_name_or_path}", "{repo_id}")
```
"""
    training_md = """| setting | value |
|---|---|
""" + "".join(f"| {key} | {value} |\n" for key, value in settings.items())
    # SD3 and SD3.5 weights are released under the Stability AI Community License: a derivative keeps it.
    metadata = dict(
        **card_metadata(args, {
            "license": "other", "license_name": "stabilityai-ai-community",
            "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md"}),
        datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else None)
    tags = ["diffusion-dpo", "dpo", "flow-dpo", "sd3", "sd3-diffusers", "text-to-image", "diffusers"] + (
        ["lora", "diffusers-training"] if args.use_lora else ["diffusers-training"])
    save_model_card(args, description, usage_md, training_md, metadata, tags, grid_path)


# Copied from train_diffusion_dpo.save_model_card
def save_model_card(args, description, usage_md, training_md, metadata, tags, grid_path):
    """README.md on diffusers' training-card template, the one load_or_create_model_card fills for a training script
    (diffusers.utils.hub_utils), tagged by populate_model_card: the Hub's metadata (license, base model, datasets, a
    widget of the last validation's images) and every section of the template filled.

    load_or_create_model_card itself is not called: its load half would keep a card the Hub repo already has (a
    rerun's card would describe the earlier run), and it takes hub ids only (a local output folder raises).
    """
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    widget = card_widget(args, grid_path)
    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", inference=True if widget else None, widget=widget, **metadata),
        template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    limitations = (
        "Diffusion-DPO moves the model toward the preferred images of its training pairs, so it learns the "
        "preferences of whoever labelled them (Pick-a-Pic: its users and their prompts), biases included. It "
        "keeps the base model's limitations and biases, and a beta too small for the data can cost image "
        "quality or fidelity to the prompt: compare the validation grid with the base before use.")
    placeholders = {"```python\n# TODO: add an example code snippet for running this diffusion pipeline\n```": usage_md,
                    "[TODO: provide examples of latent issues and potential remediations]": limitations,
                    "[TODO: describe the data used to train the model]": training_md}
    for placeholder, section in placeholders.items():
        if placeholder not in card.text:
            logger.warning(f"diffusers' model card template has changed: no {placeholder!r} to fill; that part of "
                           "the card is left out, the rest is written.")
        card.text = card.text.replace(placeholder, section.strip())
    populate_model_card(card, tags=tags)
    card.save(os.path.join(args.output_dir, "README.md"))


# Copied from train_diffusion_dpo.card_widget
def card_widget(args, grid_path):
    """The card's widget, as diffusers' training scripts list theirs: the trained model's first image of each
    validation prompt at the last validation, copied to images/ (uploaded with the card). None without one."""
    images = Path(grid_path).with_suffix("") if grid_path is not None else None
    if images is None or not images.is_dir():
        return None
    os.makedirs(os.path.join(args.output_dir, "images"), exist_ok=True)
    widget = []
    for p, prompt in enumerate(args.validation_prompts):
        shutil.copyfile(images / f"{p:02d}.png", os.path.join(args.output_dir, "images", f"validation_{p}.png"))
        widget.append({"text": prompt, "output": {"url": f"images/validation_{p}.png"}})
    return widget


# Copied from train_diffusion_dpo.card_metadata
def card_metadata(args, family_license):
    """The card's base_model and license fields. base_model only for a hub id (a local folder names nothing on the
    Hub); the license of the base's own card where it can be read (its folder, or the hub cache: nothing is
    downloaded), else `family_license`, the license the family's weights are released under."""
    from huggingface_hub import ModelCard, hf_hub_download

    base = args.pretrained_model_name_or_path
    local = os.path.exists(base)
    try:
        card_file = (os.path.join(base, "README.md") if local else
                     hf_hub_download(base, "README.md", revision=args.revision, local_files_only=True))
        base_card = ModelCard.load(card_file).data if os.path.isfile(card_file) else None
    except (OSError, ValueError):  # not in the cache, or no card: the family's license
        base_card = None
    fields = dict(family_license)
    if base_card is not None and base_card.get("license"):
        fields = {key: base_card.get(key) for key in ("license", "license_name", "license_link")
                  if base_card.get(key)}
    return {"base_model": None if local else base, **fields}


# Copied from train_diffusion_dpo.create_hub_repo
def create_hub_repo(args, accelerator):
    """--push_to_hub: the repo is created, and the login checked, before any model loads, so a bad token or repo id
    fails at once rather than after the training. args.hub_model_id becomes the hub's own id (namespace/name), which
    the card's snippets use."""
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        args.hub_model_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
        logger.info(f"The results will be pushed to https://huggingface.co/{args.hub_model_id}")


# Copied from train_diffusion_dpo.push_to_hub
def push_to_hub(args):
    """Upload the final artifacts to the repo create_hub_repo made."""
    from huggingface_hub import upload_folder

    allow, ignore = hub_upload_patterns(args)
    upload_folder(repo_id=args.hub_model_id, folder_path=args.output_dir, commit_message="Diffusion-DPO final weights",
                  allow_patterns=allow, ignore_patterns=ignore)
    logger.info(f"Pushed the final artifacts to https://huggingface.co/{args.hub_model_id}")


# Copied from train_diffusion_dpo.public_config
def public_config(args):
    """The run's arguments without secrets, for trackers and the saved args file."""
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    config["validation_prompts"] = " | ".join(args.validation_prompts)
    return config


# Copied from train_diffusion_dpo.write_run_info
def write_run_info(args, run):
    """Save the flags (without secrets), what the run derived from them and the library versions, so a run can be
    reproduced or reported."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
        json.dump({"args": public_config(args), "run": run.record(), "versions": versions}, f, indent=2, default=str)


# Copied from train_diffusion_dpo.StopRequest
class StopRequest:
    """Turns SIGTERM (a preempted cloud job) into a checkpoint at the next optimizer step, then a clean exit."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        self.stop_with_the_launcher()

    @staticmethod
    def stop_with_the_launcher():
        """A one-process `accelerate launch` runs the script as its child and does not pass SIGTERM on: killed, it
        left the trainer training on, orphaned, with no checkpoint. Where the parent is accelerate's launcher, Linux
        is asked to send this process SIGTERM when the parent exits, which checkpoints and stops it."""
        parent = os.getppid()
        try:
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # not Linux
            return
        if b"accelerate" not in command:
            return
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before the request: act on it now
            os.kill(os.getpid(), signal.SIGTERM)

    def request(self, signum, frame):
        self.requested = True


# Copied from train_diffusion_dpo.InjectedFaults
@dataclass(frozen=True)
class InjectedFaults:
    """Faults the reliability tests and the device check inject through DIFFUSION_DPO_TEST_* variables, read here
    and nowhere else; all off in normal use. NAN_STEPS: optimizer steps whose loss is NaN ("2,3"); OVERFLOW_STEPS:
    steps whose loss is multiplied by 1e35, finite in float32 but with fp16-scaled gradients that overflow (what a
    GradScaler must survive); STEP_DELAY: seconds added to every micro-batch; CRASH_IN_SAVE: the step whose
    checkpoint is written but never renamed (the process dies); CACHE_PAUSE: seconds of sleep after the first
    chunk of a latent cache build (a second job arrives meanwhile)."""

    nan_steps: frozenset = frozenset()
    overflow_steps: frozenset = frozenset()
    step_delay: float = 0.0
    crash_in_save: int | None = None
    cache_pause: float = 0.0

    @classmethod
    def from_environment(cls):
        def read(name):
            return os.environ.get(f"DIFFUSION_DPO_TEST_{name}", "")

        def steps(name):
            return frozenset(int(step) for step in read(name).split(",") if step)

        return cls(nan_steps=steps("NAN_STEPS"), overflow_steps=steps("OVERFLOW_STEPS"),
                   step_delay=float(read("STEP_DELAY") or 0), crash_in_save=int(read("CRASH_IN_SAVE") or 0) or None,
                   cache_pause=float(read("CACHE_PAUSE") or 0))

    def crash_if_saving(self, global_step):
        if self.crash_in_save == global_step:
            os._exit(17)


# Copied from train_diffusion_dpo.TrainingRun
@dataclass
class TrainingRun:
    """The state of a run: what it prepared, what it derived at run time and where the loop stands.

    `args` stays the parsed flags; what the run derives from them and from the launch (the learning rate after
    --scale_lr, the process count, the precision, the step and epoch counts) lives here, and training_args.json
    records both, so the saved flags and the tracker config cannot disagree.
    """

    transformer: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    train_dataset: object
    train_dataloader: object
    params: list  # the prepared trainable parameters (FSDP2 replaces the transformer's: clip these)
    learning_rate: float
    num_processes: int
    mixed_precision: str
    max_train_steps: int
    num_train_epochs: int
    steps_per_epoch: int
    global_step: int = 0
    first_epoch: int = 0
    resume_batches: int = 0  # micro-batches of first_epoch already trained before a resume
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    step_metrics: dict = field(default_factory=dict)  # summed over the micro-batches of the current step
    micro_steps: int = 0
    stream_state: tuple | None = None
    # rows skipped (or captions cut) by reason; streaming also finds ties, labels and captions here
    row_problems: dict = field(default_factory=dict)
    grid_path: str | None = None
    reference_images: list | None = None
    reference_errors: object = None  # ReferenceErrors with --reference_errors
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # kept across resumes; names who wrote what
    settings: dict = field(default_factory=dict)  # resume_settings: what a checkpoint of this run depends on
    last_checkpoint: str | None = None  # the path of the newest checkpoint this run wrote or resumed from
    checkpoint_stream_state: tuple | None = None  # the stream's position at the last optimizer step
    learning_rate_changes: list = field(default_factory=list)  # [step, rate] for each change on a resume
    ema: object = None  # --use_ema: diffusers' EMAModel of run.params

    def record(self):
        return {"run_id": self.run_id, "learning_rate": self.learning_rate,
                "learning_rate_changes": self.learning_rate_changes, "num_processes": self.num_processes,
                "mixed_precision": self.mixed_precision, "max_train_steps": self.max_train_steps,
                "num_train_epochs": self.num_train_epochs}

    def resumable_state(self):
        """What this process's part of a checkpoint holds beside accelerate's state."""
        return {"stream_state": self.checkpoint_stream_state,
                "row_problems": {reason: sorted(rows) for reason, rows in self.row_problems.items()},
                "nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row}


# Copied from train_diffusion_dpo.setup_accelerator
def setup_accelerator(args):
    """The Accelerator, logging on the main process, seeds, and the output folder."""
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    if args.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise ImportError("--report_to wandb needs `pip install wandb`.") from error
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        # Warnings, not diffusers' info chatter at every pipeline load (config defaults such as SDXL's
        # {'add_watermarker'} "not found in config", dtypes of instantiation)
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


# Copied from train_diffusion_dpo.load_data
def load_data(args, accelerator):
    """The preference pairs and their counts, first of all: a wrong column or an empty dataset fails before any
    model is loaded. data_summary.json is rewritten at the end with the image problems found while training."""
    with accelerator.main_process_first():
        dataset, columns, counts = load_preference_dataset(args)
    if not args.streaming:  # which pairs, by content: a resume checks it (the images are not read here)
        counts["data_digest"] = dataset_content_digest(
            dataset, {role: name for role, name in columns.items() if role in ("caption", "label_0", "label_1")})
    if not args.streaming:
        logger.info(f"Preference pairs: {counts['pairs']} of {counts['rows']} rows (dropped: {counts['ties']} ties, "
                    f"{counts['invalid_labels']} invalid labels, {counts['bad_caption']} missing captions)")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "data_summary.json"), "w") as f:
            json.dump(counts, f, indent=2)
    return dataset, columns, counts


def build_cache(args, accelerator, dataset, columns, tokenizers, text_encoders, vae, weight_dtype, counts):
    """--cache_latents: every image encoded once, every prompt once through the three text encoders; the VAE and
    the encoders (T5-XXL alone is 4.7B parameters) then leave the accelerator. Returns (cache, stats), or
    (None, None) without the flag.
    """
    if not args.cache_latents:
        return None, None

    def encode_text(prompts):
        input_ids = [torch.stack([tokenize_caption(tokenizer, prompt)[0] for prompt in prompts])
                     for tokenizer in tokenizers]
        prompt_embeds, pooled_prompt_embeds = encode_prompt(text_encoders, input_ids)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

    pairs = PreferencePairDataset(dataset, columns, tokenizers, args)
    cache, cache_stats = build_latent_cache(args, accelerator, dataset, columns, pairs, vae, encode_text,
                                            text_encoders, weight_dtype)
    counts.update(cache.problem_counts())
    for frozen in (vae, *text_encoders):
        frozen.to("cpu")
    free_accelerator_memory()
    return cache, cache_stats


# Copied from train_diffusion_dpo.build_dataloader with tokenizer->tokenizers, text_encoder->text_encoders
def build_dataloader(args, accelerator, dataset, columns, tokenizers, cache):
    """(dataset, dataloader), chosen once: plain, cached or streamed.

    Map-style data goes through a (seed, epoch)-seeded permutation that accelerate shards across processes. A stream
    is split here, each process reading its own shard (given to accelerate, every process would read every shard).
    """
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
        stream = stream.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        train_dataset = StreamingPairDataset(stream, columns, tokenizers, args, accelerator.process_index)
        return train_dataset, torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size,
                                                          collate_fn=collate_pairs)
    if cache is not None:
        train_dataset, collate_fn = CachedPairDataset(cache, args), collate_cached_pairs
    else:
        train_dataset, collate_fn = PreferencePairDataset(dataset, columns, tokenizers, args), collate_pairs
    sampler = EpochPermutationSampler(len(train_dataset), args.seed)
    return train_dataset, torch.utils.data.DataLoader(
        train_dataset, sampler=sampler, batch_size=args.train_batch_size, collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers)


# Copied from train_diffusion_dpo.prepare_training
def prepare_training(args, accelerator, transformer, train_dataset, train_dataloader):
    """Optimizer, learning-rate schedule and step counts, prepared by accelerate; returns the TrainingRun."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, [p for p in transformer.parameters() if p.requires_grad], learning_rate)
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * math.ceil(
            len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    if args.streaming:  # one endless pass: the stream itself moves from epoch to epoch
        if accelerator.distributed_type == DistributedType.DEEPSPEED:  # it reads the micro-batch off a DataLoader
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        steps_per_epoch, num_train_epochs = max_train_steps, 1
    else:
        transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, train_dataloader,
                                                                              lr_scheduler)
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    row_problems = {reason: set() for reason in ("missing_image", "undecodable_image", "truncated_caption")}
    if args.streaming:
        row_problems.update({reason: set() for reason in ("ties", "invalid_labels", "bad_caption")})
    params = [p for p in transformer.parameters() if p.requires_grad]
    return TrainingRun(
        transformer=transformer, optimizer=optimizer, lr_scheduler=lr_scheduler, train_dataset=train_dataset,
        train_dataloader=train_dataloader, params=params, learning_rate=learning_rate,
        num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
        max_train_steps=max_train_steps, num_train_epochs=num_train_epochs, steps_per_epoch=steps_per_epoch,
        row_problems=row_problems, ema=build_ema(args, accelerator, params))


# Copied from train_diffusion_dpo.build_ema
def build_ema(args, accelerator, params):
    """--use_ema: diffusers' EMAModel over the trained parameters, registered so that checkpoints hold its average
    and step count (a resume continues it exactly)."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    if weights_are_sharded(accelerator):
        raise ValueError("--use_ema averages the whole transformer on every process, and FSDP / DeepSpeed ZeRO-3 give each "
                         "process a shard of it: train with DDP or ZeRO-2 (configs/multi_gpu_ddp.yaml, "
                         "configs/deepspeed_zero2.yaml), or drop --use_ema.")
    ema = EMAModel(params, decay=args.ema_decay, foreach=args.foreach_ema)
    # In float32 whatever the weights are kept in (DeepSpeed's half-precision engine holds bf16/fp16 weights): a
    # step adds (1 - decay) of a small difference, which half precision would round away.
    ema.to("cpu" if args.offload_ema else None, dtype=torch.float32)
    accelerator.register_for_checkpointing(ema)
    return ema


# Copied from train_diffusion_dpo.update_ema
def update_ema(args, accelerator, run):
    if args.offload_ema:
        run.ema.to(accelerator.device)
    run.ema.step(run.params)
    if args.offload_ema:
        run.ema.to("cpu")


# Copied from train_diffusion_dpo.ema_weights
@contextlib.contextmanager
def ema_weights(run):
    """The EMA's weights in the trained transformer inside the block (validation samples the average), the trained weights
    back after it; nothing without --use_ema."""
    if run.ema is None:
        yield
        return
    run.ema.store(run.params)
    run.ema.copy_to(run.params)
    try:
        yield
    finally:
        run.ema.restore(run.params)


# Copied from train_diffusion_dpo.start_run
def start_run(args, accelerator, run, counts, noise_scheduler):
    """The resume position, then trackers and the run's record: --resume_from_checkpoint restores the state, the
    step and the run's counts; the data continues where that step left it (the stream's own position when
    streaming)."""
    from accelerate.utils import broadcast_object_list

    # the main process chooses for all: every process must resume the same checkpoint
    resume_dir = broadcast_object_list([resolve_resume_dir(args) if accelerator.is_main_process else None])[0]
    run.settings = resume_settings(args, run, counts)
    if args.resume_from_checkpoint is not None and resume_dir is None:
        logger.info("No checkpoint found in --output_dir; starting a new run.")
    if resume_dir is not None:
        resume_from(args, accelerator, run, resume_dir)
    elif accelerator.is_main_process and os.path.exists(os.path.join(args.output_dir, RUN_RESULT)):
        logger.warning(f"{args.output_dir} holds the results of an earlier run; this run replaces them when it "
                       "finishes (until then pipeline_dpo.py refuses the folder: its weights are not this run's).")
    if accelerator.is_main_process:
        write_run_info(args, run)
        scalars = {k: v for k, v in run.record().items() if k != "learning_rate_changes"}  # trackers take scalars
        accelerator.init_trackers(args.tracker_project_name, config={**public_config(args), **scalars})
        accelerator.log({f"data/{name}": value for name, value in counts.items() if name != "data_digest"}, step=0)
    total_batch_size = args.train_batch_size * run.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Diffusion-DPO ({args.loss_type}, "
                f"{'beta_mapo' if args.loss_type == 'mapo' else 'beta_dpo'}={objective_beta(args)}, "
                f"{'LoRA' if args.use_lora else 'full'}) *****")
    logger.info(f"  Pairs = {'streamed' if args.streaming else len(run.train_dataset)}, epochs = "
                f"{'endless' if args.streaming else run.num_train_epochs}, effective batch = "
                f"{total_batch_size} pairs, optimizer steps = {run.max_train_steps}")
    default = {DEFAULT_LORA_LEARNING_RATE: " (the LoRA default; --learning_rate chooses)",
               DEFAULT_FULL_LEARNING_RATE: " (the full fine-tune's default; --learning_rate chooses)"}
    logger.info(f"  Learning rate = {run.learning_rate:g}{default.get(args.learning_rate, '')}")
    if args.use_lora and run.learning_rate < 1e-6:
        logger.warning(f"LoRA at a learning rate of {run.learning_rate:g}: its adapters start at zero and barely move "
                       "at this rate; LoRA DPO trains at 1e-5 to 1e-4.")
    few_steps = getattr(noise_scheduler, "training_timesteps", None)  # SDXL's --is_turbo sets it
    logger.info(f"  Timesteps = {'0..T-1' if few_steps is None else f'the few-step schedule {few_steps.tolist()}'}")


# Copied from train_diffusion_dpo.training_batches
def training_batches(args, accelerator, run):
    """Micro-batches from the resume position on, epoch after epoch, until the last optimizer step: none is read
    after it (its bad rows would be counted, a stream's position moved), and a resume at the end reads none."""
    for epoch in range(run.first_epoch, run.num_train_epochs):
        if run.global_step >= run.max_train_steps:
            return
        dataloader = run.train_dataloader
        if not args.streaming:
            # accelerate re-sets the sampler's epoch from its own counter when iteration starts: set it there
            dataloader.set_epoch(epoch)
            run.train_dataset.epoch = epoch
        if epoch == run.first_epoch and run.resume_batches:
            dataloader = accelerator.skip_first_batches(dataloader, run.resume_batches)
        batches = iter(dataloader)
        while run.global_step < run.max_train_steps:
            batch = next(batches, None)
            if batch is None:
                break
            for row, reason in batch["skipped"]:
                run.row_problems[reason].add(row)
            run.row_problems["truncated_caption"].update(batch["truncated"])
            run.stream_state = batch.get("stream_state")
            yield batch


# Copied from train_diffusion_dpo.micro_batch_step
def micro_batch_step(args, accelerator, run, batch, models, noise_scheduler, weight_dtype, faults=InjectedFaults()):
    """Per-sample errors, the DPO loss and its backward for one micro-batch; returns the loss.

    The metrics are summed as tensors, not read with .item(): no device sync per micro-batch (optimizer_step reads
    them once per step).
    """
    if run.reference_errors is None:
        model_losses, ref_losses = dpo_step_losses(args, batch, models, noise_scheduler, run.global_step, weight_dtype)
    else:  # --reference_errors: computed once, before training; no reference forward here
        model_losses, _ = dpo_step_losses(args, batch, models, noise_scheduler, run.global_step, weight_dtype,
                                          passes=("policy",))
        ref_losses = run.reference_errors.losses(run.global_step, batch["index"], model_losses.device)
    loss, metrics = diffusion_dpo_loss(model_losses, ref_losses, objective_beta(args), args.loss_type)
    if run.global_step + 1 in faults.nan_steps:
        loss = loss * float("nan")
    if run.global_step + 1 in faults.overflow_steps:
        loss = loss * 1e35
    if faults.step_delay:
        time.sleep(faults.step_delay)
    accelerator.backward(loss)
    metrics["loss"] = loss.detach()
    metrics["nonfinite"] = (~torch.isfinite(loss.detach())).float()
    for name, value in metrics.items():
        run.step_metrics[name] = run.step_metrics.get(name, 0.0) + value.float()
    run.micro_steps += 1
    return loss


# Copied from train_diffusion_dpo.optimizer_step
def optimizer_step(args, accelerator, run, stop_requested=False):
    """Clip, average the step's metrics across processes, then step (or skip a non-finite step); returns the logs.

    The SIGTERM flag is averaged with the metrics, so every process takes the same skip and stop decisions in the
    same collective. logs["stop"] says whether any process was asked to stop.
    """
    grad_norm = accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
    run.step_metrics["stop_requested"] = torch.tensor(float(stop_requested) * run.micro_steps,
                                                      device=accelerator.device)
    names = sorted(run.step_metrics)
    averaged = accelerator.reduce(torch.stack([run.step_metrics[n] for n in names]) / run.micro_steps,
                                  reduction="mean")
    logs = dict(zip(names, averaged.tolist()))
    # None: DeepSpeed, which clips and steps inside accelerator.backward (older accelerate reports no norm). A
    # non-finite loss still counts, but DeepSpeed has already applied that step.
    norm_finite = grad_norm is None or math.isfinite(float(grad_norm))
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    loss_finite = logs.pop("nonfinite") == 0
    finite = loss_finite and norm_finite
    stop = logs.pop("stop_requested") > 0
    if finite or accelerator.scaler is not None:
        # fp16's GradScaler must see every step: it skips a non-finite one itself and lowers its scale. Left out,
        # it stays "unscaled" and the next clip_grad_norm_ raises.
        run.optimizer.step()
    if finite:
        run.nonfinite_in_a_row = 0
        if run.ema is not None:  # a skipped step changed no weight, and is not averaged in
            update_ema(args, accelerator, run)
    elif loss_finite and accelerator.scaler is not None:
        # A finite loss whose fp16 gradients overflowed: the scaler finding its scale, not divergence (counted, but
        # no streak: a lowered scale cannot overflow forever).
        run.nonfinite_steps += 1
        logger.info(f"Step {run.global_step + 1}: fp16 gradient overflow, step skipped; gradient scale now "
                    f"{accelerator.scaler.get_scale():g}")
    else:
        run.nonfinite_steps += 1
        run.nonfinite_in_a_row += 1
        logger.warning(f"Step {run.global_step + 1}: non-finite loss or gradient; optimizer step skipped")
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step_metrics, run.micro_steps = {}, 0
    run.global_step += 1
    run.checkpoint_stream_state = run.stream_state
    logs.update({"lr": run.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                 "nonfinite_steps": run.nonfinite_steps})
    logs.update({f"rows_{reason}": len(rows) for reason, rows in run.row_problems.items()})
    return logs, stop


# Copied from train_diffusion_dpo.after_step with tokenizer->tokenizers, text_encoder->text_encoders
def after_step(args, accelerator, run, logs, stop, models, tokenizers, weight_dtype, faults=InjectedFaults()):
    """Log the step, stop a diverged run, checkpoint, stop on SIGTERM, validate; True when the run ends here.

    No checkpoint is written while steps are non-finite: the weights may have diverged, and with a total limit the
    good checkpoints would be pruned for them.
    """
    accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=run.global_step)
    if run.nonfinite_in_a_row > args.max_nonfinite_steps:
        accelerator.end_training()
        raise RuntimeError(
            f"{run.nonfinite_in_a_row} optimizer steps in a row had a NaN/Inf loss or gradient; stopping. "
            f"{checkpoint_before_streak(run)} Likely causes: an fp16 VAE overflowing (use fp32 or a fixed VAE), a "
            "learning rate too high, or a beta_dpo so large that the sigmoid saturates.")
    if run.global_step % args.checkpointing_steps == 0 or stop:
        if run.nonfinite_in_a_row:
            logger.warning(f"Step {run.global_step}: no checkpoint while steps are non-finite "
                           f"({run.nonfinite_in_a_row} in a row). {checkpoint_before_streak(run)}")
        else:
            save_checkpoint(args, accelerator, run, faults)
    if stop:
        logger.warning(f"SIGTERM: stopped after step {run.global_step}; the newest checkpoint is "
                       f"{run.last_checkpoint}. Resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        return True
    # Under FSDP / ZeRO-3 every process holds a shard of the transformer, so every process takes part in sampling
    if ((accelerator.is_main_process or weights_are_sharded(accelerator)) and args.num_validation_images > 0
            and run.global_step % args.validation_steps == 0 and run.global_step < run.max_train_steps):
        with ema_weights(run):
            run.grid_path, run.reference_images = safe_validation(
                args, accelerator, models, tokenizers, weight_dtype, run.global_step, run.reference_images,
                run.grid_path)
    return False


# Copied from train_diffusion_dpo.checkpoint_before_streak
def checkpoint_before_streak(run):
    if run.last_checkpoint is None:
        return "No checkpoint was written before the non-finite steps."
    return (f"The last checkpoint written before the non-finite steps is {run.last_checkpoint}: resume from it "
            "with a lower --learning_rate.")


# Copied from train_diffusion_dpo.stop_mid_step
def stop_mid_step(args, accelerator, run, stop_requested):
    """SIGTERM inside a step's gradient accumulation: stop at this micro-batch, not at the step's end, which with
    many accumulation steps can be minutes away, past a launcher's grace (torch elastic SIGKILLs its workers 30 s
    after passing SIGTERM on). The checkpoint is the state after the last completed step; resuming it runs this
    step's micro-batches again, exactly. Every process decides at the same micro-batch. True when the run stops."""
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(stop_requested), device=accelerator.device)
        stop_requested = accelerator.reduce(flag, reduction="sum").item() > 0
    if not stop_requested:
        return False
    # Back to the state at the last step's end: no gradients, and accelerate's micro-batch count (saved, and on
    # resume the phase of the accumulation) at that step's boundary.
    run.optimizer.zero_grad(set_to_none=True)
    accelerator.step -= run.micro_steps
    run.step_metrics, run.micro_steps = {}, 0
    saved = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{run.global_step}"))
    if run.global_step > 0 and run.last_checkpoint != saved and not run.nonfinite_in_a_row:
        save_checkpoint(args, accelerator, run)
    logger.warning(f"SIGTERM: stopped inside step {run.global_step + 1}; the newest checkpoint is "
                   f"{run.last_checkpoint}. Resume with --resume_from_checkpoint latest")
    accelerator.end_training()
    return True


# Copied from train_diffusion_dpo.finish_run with tokenizer->tokenizers, text_encoder->text_encoders
def finish_run(args, accelerator, run, models, tokenizers, weight_dtype, counts, cache, cache_stats):
    """Final validation, the results, the data summary, the model card and the hub push; then an orderly exit."""
    accelerator.wait_for_everyone()
    if run.ema is not None:  # the average is the result: validated, saved and shared
        run.ema.copy_to(run.params)
    if args.num_validation_images > 0 and (accelerator.is_main_process or weights_are_sharded(accelerator)):
        run.grid_path, run.reference_images = safe_validation(args, accelerator, models, tokenizers, weight_dtype,
                                                              run.global_step, run.reference_images, run.grid_path)
    full_state = accelerator.get_state_dict(run.transformer) if weights_are_sharded(accelerator) else None  # all processes
    if accelerator.is_main_process:
        try:
            save_results(args, run.transformer, full_state)
        except (OSError, RuntimeError) as error:
            if not is_write_failure(error):
                raise
            raise write_failure(args.output_dir, error) from error
    # Rows with problems, united over processes (a row may have gone to another process in another epoch)
    reports = exchange_through_files(args.output_dir, accelerator, {
        "problems": {reason: sorted(rows) for reason, rows in run.row_problems.items()}, "cache_stats": cache_stats})
    if accelerator.is_main_process:
        if cache is None:  # with the cache, every row was checked (and counted) when the cache was built
            for reason in run.row_problems:
                counts[reason] = len(set().union(*(set(report["problems"][reason]) for report in reports)))
        counts["nonfinite_steps"] = run.nonfinite_steps
        if cache_stats is not None:
            for name in ("images_encoded", "prompts_encoded"):
                cache_stats[name] = sum(report["cache_stats"][name] for report in reports)
            with open(os.path.join(args.output_dir, "latent_cache_stats.json"), "w") as f:
                json.dump(cache_stats, f, indent=2)
        with open(os.path.join(args.output_dir, "data_summary.json"), "w") as f:
            json.dump(counts, f, indent=2)
        write_model_card(args, run, counts, run.grid_path)
        with open(os.path.join(args.output_dir, RUN_RESULT), "w") as f:  # which run wrote the results
            json.dump({"run_id": run.run_id, "global_step": run.global_step, "max_train_steps": run.max_train_steps,
                       "requested": {"max_train_steps": args.max_train_steps,
                                     "num_train_epochs": args.num_train_epochs}}, f, indent=2)
        if args.push_to_hub:
            push_to_hub(args)
        logger.info(f"Done: {run.global_step} steps; results in {args.output_dir}")
    # Last collective: a barrier, then an orderly process-group teardown. Left to interpreter exit, the DDP
    # reducer's teardown (holding the GIL) can wait forever on a gloo thread that needs the GIL.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# main: a table of contents of the stages above
# ----------------------------------------------------------------------------------------------------------------
# Copied from train_diffusion_dpo.main with tokenizer->tokenizers, text_encoder->text_encoders
def main(args):
    accelerator = setup_accelerator(args)
    if run_already_finished(args):
        return  # a requeued job whose run has finished
    create_hub_repo(args, accelerator)
    dataset, columns, counts = load_data(args, accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_scheduler, tokenizers, text_encoders, vae, transformer, ref_transformer = build_models(args, accelerator, weight_dtype)
    register_checkpoint_hooks(args, accelerator)
    cache, cache_stats = build_cache(args, accelerator, dataset, columns, tokenizers, text_encoders, vae, weight_dtype,
                                     counts)
    train_dataset, train_dataloader = build_dataloader(args, accelerator, dataset, columns, tokenizers, cache)
    run = prepare_training(args, accelerator, transformer, train_dataset, train_dataloader)
    models = (run.transformer, ref_transformer, vae, text_encoders)
    reference_key = reference_errors_key(args, accelerator, run, models, dataset)  # before a resume loads weights
    start_run(args, accelerator, run, counts, noise_scheduler)
    run.reference_errors = prepare_reference_errors(args, accelerator, run, models, noise_scheduler, weight_dtype,
                                                    reference_key)
    faults, stop_request = InjectedFaults.from_environment(), StopRequest()
    progress_bar = tqdm(range(run.max_train_steps), initial=run.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    for batch in training_batches(args, accelerator, run):
        with accelerator.accumulate(run.transformer):
            micro_batch_step(args, accelerator, run, batch, models, noise_scheduler, weight_dtype, faults)
            stepped = accelerator.sync_gradients
            if stepped:
                logs, stop = optimizer_step(args, accelerator, run, stop_request.requested)
        if not stepped:
            if stop_mid_step(args, accelerator, run, stop_request.requested):
                return  # stopped on SIGTERM inside a step, the last step's checkpoint written
            continue
        progress_bar.update(1)
        accuracy = logs.get("implicit_acc", logs.get("margin_acc", float("nan")))  # MaPO: no reference
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{accuracy:.2f}",
                                 lr=f"{logs['lr']:.2e}")
        if after_step(args, accelerator, run, logs, stop, models, tokenizers, weight_dtype, faults):
            return  # stopped on SIGTERM with a checkpoint written

    finish_run(args, accelerator, run, models, tokenizers, weight_dtype, counts, cache, cache_stats)


if __name__ == "__main__":
    main(parse_args())

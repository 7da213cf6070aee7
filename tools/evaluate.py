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
"""Evaluate a Diffusion-DPO result: implicit reward accuracy on held-out pairs, and reward win rate vs its base.

Implicit reward accuracy (the paper's Table 2) of a trained model on held-out Pick-a-Pic-format pairs:
    python tools/evaluate.py implicit-accuracy --base stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dpo sd15-dpo --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name validation_unique \
        --resolution 512 --num_draws 4 --device cuda --output_dir eval-implicit
    python tools/evaluate.py implicit-accuracy --base stabilityai/stable-diffusion-xl-base-1.0 \
        --dpo sdxl-dpo --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name validation_unique \
        --num_draws 4 --device cuda --dtype bfloat16 --output_dir eval-implicit-sdxl
    python tools/evaluate.py implicit-accuracy --base stabilityai/stable-diffusion-3.5-medium \
        --dpo sd35-medium-dpo-lora --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name validation_unique \
        --num_draws 4 --device cuda --dtype bfloat16 --output_dir eval-implicit-sd3
    python tools/evaluate.py implicit-accuracy --base black-forest-labs/FLUX.1-dev \
        --dpo flux-dev-dpo-lora --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name validation_unique \
        --num_draws 4 --device cuda --dtype bfloat16 --output_dir eval-implicit-flux

Win rate of the DPO model against its base under a reward model (same seeds for both):
    python tools/evaluate.py win-rate --base stable-diffusion-v1-5/stable-diffusion-v1-5 --dpo sd15-dpo \
        --prompts prompts.txt --reward pickscore --reward_model yuvalkirstain/PickScore_v1 \
        --reward_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K --device cuda --dtype float16 --output_dir eval-win

implicit-accuracy: for every pair and each of --num_draws fixed (timestep, noise) draws (seeded by
train_diffusion_dpo.pair_generator at the fixed steps "implicit-accuracy/<draw>", so every run and every model
sees the same draws), the DPO term
    inside = -(beta_dpo / 2) * ((m_w - m_l) - (r_w - r_l))
of the trained denoiser (m: UNet, SD3 or FLUX transformer) against the reference (r: the base's; for a LoRA result,
the same denoiser with its adapters disabled), computed exactly as the training script of the base's family does:
dpo_step_losses of train_diffusion_dpo.py (SD 1.x/2.x), of train_diffusion_dpo_sdxl.py (SDXL: both text encoders,
the micro-conditioning time ids of the centre crop, the VAE in float32, timesteps from all of 0..T-1 as training
without --is_turbo), of train_diffusion_dpo_sd3.py (SD3: velocity errors, the three text encoders with the T5
length, sigma density and loss weighting the result was trained with, as its training_args.json records them; the
script's defaults where it has none) or of train_diffusion_dpo_flux.py (FLUX: velocity errors of the packed latents,
CLIP-L and T5, with the T5 length, distilled guidance strength, sigma density and loss weighting the result was
trained with, the same way). --resolution defaults to that script's training resolution (512 SD, 1024 SDXL, SD3 and
FLUX). The inside term is averaged over the draws; the pair counts as correct when the mean is > 0, wrong when
< 0, and half when it is exactly 0: the implicit reward model p(winner) = sigmoid(inside) is then a coin flip, so a
model identical to the reference scores 0.5 (all ties), as a coin would. Wins, ties and losses are reported
separately. beta_dpo scales the inside term only (default: the script's, 5000 SD/SDXL, 500 SD3 and FLUX); the
accuracy does not depend on it.

win-rate: each prompt's image j starts from seed + j for base and DPO alike; both are scored by the reward
(the same reward options as tools/relabel_pairs.py). A DPO image beats its base twin when its reward is higher;
equal rewards count half. Both modes report a 95% Wilson score interval and write a per-item CSV and a JSON
summary into --output_dir; win-rate also writes grid.png (base | DPO, the prompt under each row) of the
largest wins and losses.

SD 1.x/2.x, SDXL, SD3 / SD3.5 and FLUX.1 results are evaluated; the family follows --base (pipeline_dpo.FAMILIES).
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the training script and pipeline_dpo.py sit at the repo root
import pipeline_dpo  # noqa: E402
import train_diffusion_dpo as sd  # noqa: E402
import train_diffusion_dpo_flux as flux  # noqa: E402
import train_diffusion_dpo_sd3 as sd3  # noqa: E402
import train_diffusion_dpo_sdxl as sdxl  # noqa: E402
from tools import relabel_pairs  # noqa: E402


WILSON_Z = 1.959963984540054  # two-sided 95% normal quantile
DTYPES = pipeline_dpo.DTYPES
# The training script of each family (keys: pipeline_dpo.FAMILIES): its data pipeline and dpo_step_losses are reused.
FAMILY_SCRIPTS = {"StableDiffusionPipeline": sd, "StableDiffusionXLPipeline": sdxl, "StableDiffusion3Pipeline": sd3,
                  "FluxPipeline": flux}
# train_diffusion_dpo_sd3.py's flags that shape its errors beyond the data: the T5 length of the prompt embedding,
# the sigma density and loss weighting, and the VAE's dtype. Evaluation takes them as the result was trained.
SD3_ERROR_FLAGS = ("max_sequence_length", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "upcast_vae")
# train_diffusion_dpo_flux.py's: the same, and the distilled guidance strength the transformer was conditioned on.
FLUX_ERROR_FLAGS = ("max_sequence_length", "guidance_scale", "weighting_scheme", "logit_mean", "logit_std",
                    "mode_scale", "upcast_vae")
# The flow-matching scripts: their error flags, and the base's subfolder of the T5 tokenizer.
FLOW_SCRIPTS = {sd3: (SD3_ERROR_FLAGS, "tokenizer_3"), flux: (FLUX_ERROR_FLAGS, "tokenizer_2")}


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------
def wilson_interval(successes, n, z=WILSON_Z):
    """Wilson score interval for a binomial proportion (Wilson 1927); ties counted half make `successes` x.5."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


def outcome_summary(margins):
    """Wins (> 0), ties (== 0), losses (< 0) of a vector of margins; rate = (wins + ties / 2) / n with its
    95% Wilson interval. The rate is the training script's own per-pair rule (sd.pair_implicit_accuracy), so an
    implicit accuracy here means what train/implicit_acc means in training."""
    margins = torch.as_tensor(np.asarray(margins, dtype=np.float64))
    wins, ties = int((margins > 0).sum()), int((margins == 0).sum())
    n = len(margins)
    losses = n - wins - ties
    rate = float(sd.pair_implicit_accuracy(margins).mean()) if n else float("nan")
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "rate": rate, "ci95_low": low, "ci95_high": high}


def implicit_reward_margins(model_losses, ref_losses, beta_dpo, script=sd):
    """Per-pair DPO inside term averaged over draws: the training script's dpo_implicit_reward on each draw.

    model_losses, ref_losses: [draws, 2B] per-sample errors ordered [winners; losers] within each draw.
    Returns [B] in float64: mean over draws of -(beta_dpo / 2) * ((m_w - m_l) - (r_w - r_l)).
    """
    per_draw = [script.dpo_implicit_reward(model, ref, beta_dpo)
                for model, ref in zip(model_losses.double(), ref_losses.double(), strict=True)]
    return torch.stack(per_draw).mean(dim=0)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------------------
# implicit-accuracy
# ----------------------------------------------------------------------------------------------------------------
def family_script(base):
    """The training script of the base's family, train_diffusion_dpo (SD 1.x/2.x), train_diffusion_dpo_sdxl,
    train_diffusion_dpo_sd3 or train_diffusion_dpo_flux: its data pipeline and dpo_step_losses are reused, so the
    errors are those its training computes."""
    return FAMILY_SCRIPTS[pipeline_dpo.base_pipeline_class_name(base)]


def trained_error_flags(args, result, script):
    """The error flags of a flow-matching `script` (FLOW_SCRIPTS) as the result was trained: its training_args.json,
    else the script's defaults; the T5 length from --max_sequence_length where given. Returned as command-line flags
    for the script's parse_args."""
    error_flags = FLOW_SCRIPTS[script][0]
    values = {name: value for name, value in pipeline_dpo.result_training_args(result).items()
              if name in error_flags and value is not None}
    if args.max_sequence_length is not None:
        values["max_sequence_length"] = args.max_sequence_length
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):  # a store_true flag: given or not
            argv += [f"--{name}"] if value else []
        else:
            argv += [f"--{name}", str(value)]
    return argv


def load_accuracy_models(args, script, device, dtype, result=None, settings=None):
    """(denoiser, ref_denoiser or None, vae, text_encoders, tokenizers, noise_scheduler, is_lora): the DPO model via
    load_dpo_pipeline; the reference is the base's UNet or transformer, or for LoRA the same denoiser with its
    adapters disabled.

    text_encoders and tokenizers are what `script` takes: SD's one text encoder and tokenizer, SDXL's two as pairs,
    SD3's three (CLIP-L, CLIP-G, T5) as triples, FLUX's two (CLIP-L, T5) as pairs. result: the resolved --dpo
    (resolved here when None). settings: the script's parsed flags (training_args; built here at the script's default
    resolution when None), which SD3's and FLUX's T5 tokenizer, noise scheduler and VAE dtype follow.
    """
    from diffusers import DDPMScheduler

    if result is None:
        result = pipeline_dpo.resolve_dpo_result(args.dpo, variant=args.variant)
    pipe = pipeline_dpo.load_dpo_pipeline(args.base, result, torch_dtype=dtype, device=device, variant=args.variant)
    family = pipeline_dpo.pipeline_family(pipe)
    denoiser = getattr(pipe, family.denoiser)
    ref_denoiser = None
    if not result.is_lora:
        denoiser_class = pipeline_dpo.DENOISERS[family.denoiser_class].model_class
        ref_denoiser = denoiser_class.from_pretrained(args.base, subfolder=family.denoiser, variant=args.variant,
                                                      torch_dtype=dtype).to(device)
    if script in FLOW_SCRIPTS:
        from transformers import T5TokenizerFast

        if settings is None:
            settings = training_args(args, script, script.build_parser().get_default("resolution"), result)
        # T5 prompts padded and cut to the trained --max_sequence_length, as the script's build_models loads its
        # tokenizer (the base's own T5 tokenizer pads to its model_max_length instead).
        t5_tokenizer = T5TokenizerFast.from_pretrained(args.base, subfolder=FLOW_SCRIPTS[script][1],
                                                       model_max_length=settings.max_sequence_length)
        if script is sd3:
            text_encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
            tokenizers = (pipe.tokenizer, pipe.tokenizer_2, t5_tokenizer)
        else:  # FLUX: CLIP-L (pooled) and T5
            text_encoders = (pipe.text_encoder, pipe.text_encoder_2)
            tokenizers = (pipe.tokenizer, t5_tokenizer)
        if settings.upcast_vae:  # as training with --upcast_vae: the VAE in float32 whatever the dtype
            pipe.vae.to(dtype=torch.float32)
        # The script's own flow-matching schedule (the base's training sigmas, with its shift): no prediction type to
        # follow, so it is the same for every result of this base.
        noise_scheduler = script.load_noise_scheduler(settings)
    else:
        # The loaded pipeline's scheduler: the result's own where it carries one (a --prediction_type run), so the
        # errors use the target the model was trained for.
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if script is sdxl:
            text_encoders, tokenizers = (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)
            if pipe.vae.dtype != torch.float32:  # as SDXL training runs the model's own VAE: it overflows in fp16
                pipe.vae.to(dtype=torch.float32)
            noise_scheduler.training_timesteps = None  # t from all of 0..T-1, as training without --is_turbo
        else:
            text_encoders, tokenizers = pipe.text_encoder, pipe.tokenizer
    frozen = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None))
    for model in (denoiser, ref_denoiser, pipe.vae, *frozen):
        if model is not None:
            model.requires_grad_(False)
            model.eval()
    return denoiser, ref_denoiser, pipe.vae, text_encoders, tokenizers, noise_scheduler, result.is_lora


def training_args(args, script, resolution, result):
    """The training script's own parsed flags for evaluation, checked by its parse_args as a training run's are: the
    same data columns and seed, at `resolution`, with no crop or flip randomness and no prompt dropout; --use_lora
    for a LoRA `result`, and for SD3 and FLUX the flags that shape their errors as the result was trained
    (trained_error_flags)."""
    argv = ["--pretrained_model_name_or_path", args.base, "--output_dir", args.output_dir, "--seed", str(args.seed),
            "--resolution", str(resolution), "--no_hflip", "--proportion_empty_prompts", "0",
            "--dataset_split_name", args.dataset_split_name, "--caption_column", args.caption_column,
            "--image_0_column", args.image_0_column, "--image_1_column", args.image_1_column,
            "--label_0_column", args.label_0_column, "--label_1_column", args.label_1_column]
    optional = {"--train_data_dir": args.train_data_dir, "--dataset_name": args.dataset_name,
                "--dataset_config_name": args.dataset_config_name, "--cache_dir": args.cache_dir,
                "--chosen_column": args.chosen_column, "--rejected_column": args.rejected_column,
                "--max_train_samples": args.max_pairs}
    argv += [item for flag, value in optional.items() if value is not None for item in (flag, str(value))]
    if script in FLOW_SCRIPTS:
        argv += trained_error_flags(args, result, script)
    elif args.max_sequence_length is not None:
        raise SystemExit(f"--max_sequence_length is the T5 prompt length of SD3 and FLUX; the base {args.base!r} "
                         "has no T5 encoder. Drop it.")
    return script.parse_args(argv + (["--use_lora"] if result.is_lora else []))


def implicit_accuracy(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    script = family_script(args.base)
    training_defaults = script.build_parser()
    resolution = args.resolution if args.resolution is not None else training_defaults.get_default("resolution")
    beta_dpo = args.beta_dpo if args.beta_dpo is not None else training_defaults.get_default("beta_dpo")
    result = pipeline_dpo.resolve_dpo_result(args.dpo, variant=args.variant)
    settings = training_args(args, script, resolution, result)  # before any model loads: a bad flag fails at once
    denoiser, ref_denoiser, vae, text_encoders, tokenizers, noise_scheduler, is_lora = load_accuracy_models(
        args, script, device, dtype, result=result, settings=settings)
    dataset, columns, counts = script.load_preference_dataset(settings)
    pairs = script.PreferencePairDataset(dataset, columns, tokenizers, settings)
    models = (denoiser, ref_denoiser, vae, text_encoders)

    # 1. Decode each pair once (unusable rows are skipped and counted, never replaced by another row).
    examples, unusable = [], {"missing_image": 0, "undecodable_image": 0}
    for row_index in range(len(dataset)):
        row = dataset[row_index]
        try:
            winner, loser = pairs.decode_pair(row)
        except script.UnusableImage as error:
            unusable[error.reason] += 1
            continue
        example = pairs.model_inputs(winner, loser, row[columns["caption"]], rng=None)
        # What the dataset's __getitem__ adds, so the script's own collate_pairs batches these examples.
        example.update(index=row_index, caption=row[columns["caption"]], skipped=[],
                       truncated=[row_index] if example["truncated"] else [])
        examples.append(example)
    if not examples:
        raise SystemExit("No pair with usable images to evaluate.")

    # 2. Per-sample errors of both models for every draw, in batches of pairs.
    from tqdm.auto import tqdm

    margins = []
    batches = range(0, len(examples), args.batch_size)
    for start in tqdm(batches, desc="implicit accuracy", unit="batch"):
        # The training batch: pixels, token ids (SDXL's, SD3's and FLUX's further ones), SDXL's time ids and row
        # indices.
        batch = script.collate_pairs(examples[start : start + args.batch_size])
        model_draws, ref_draws = [], []
        with torch.no_grad():
            for draw in range(args.num_draws):
                model_losses, ref_losses = script.dpo_step_losses(settings, batch, models, noise_scheduler,
                                                                  f"implicit-accuracy/{draw}", dtype)
                model_draws.append(model_losses)
                ref_draws.append(ref_losses)
        margins.append(implicit_reward_margins(torch.stack(model_draws), torch.stack(ref_draws), beta_dpo, script))
    margins = torch.cat(margins).tolist()

    # 3. Accuracy, per-pair CSV, summary.
    summary = outcome_summary(margins)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "implicit_accuracy.csv", [
        {"row": e["index"], "caption": e["caption"], "mean_inside": margin,
         "outcome": "correct" if margin > 0 else "tie" if margin == 0 else "wrong"}
        for e, margin in zip(examples, margins, strict=True)])
    record = {"command": "implicit-accuracy", "base": args.base, "dpo": args.dpo, "lora": is_lora,
              "dataset": args.train_data_dir or args.dataset_name, "split": args.dataset_split_name,
              "num_draws": args.num_draws, "seed": args.seed, "resolution": resolution,
              "beta_dpo": beta_dpo, "mean_inside": float(np.mean(margins)), "accuracy": summary["rate"],
              **summary, "dataset_counts": counts, "unusable_pairs": unusable}
    if script in FLOW_SCRIPTS:  # the settings the errors were computed with, as the result was trained
        record["training_settings"] = {name: getattr(settings, name) for name in FLOW_SCRIPTS[script][0]}
    (output_dir / "implicit_accuracy.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Implicit reward accuracy {summary['rate']:.3f} "
          f"(95% CI {summary['ci95_low']:.3f}-{summary['ci95_high']:.3f}) on {summary['n']} pairs: {summary['wins']} correct, {summary['ties']} ties, {summary['losses']} wrong. "
          f"Wrote {output_dir / 'implicit_accuracy.csv'} and implicit_accuracy.json.")
    return record


# ----------------------------------------------------------------------------------------------------------------
# win-rate
# ----------------------------------------------------------------------------------------------------------------
def load_prompts(args):
    if args.prompts is not None:
        prompts = pipeline_dpo.read_prompts(args.prompts)
    else:
        from datasets import load_dataset

        source = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
        dataset = load_dataset(source, args.dataset_config_name, split=args.dataset_split_name,
                               cache_dir=args.cache_dir)
        if args.caption_column not in dataset.column_names:
            raise SystemExit(f"Dataset {source!r} has no column {args.caption_column!r}; its columns are "
                             f"{dataset.column_names}. Set --caption_column.")
        prompts = list(dict.fromkeys(c for c in dataset[args.caption_column] if isinstance(c, str) and c.strip()))
    return prompts[: args.max_prompts] if args.max_prompts is not None else prompts


def score_in_batches(reward, images, captions, batch_size):
    scores = []
    for start in range(0, len(images), batch_size):
        scores.extend(relabel_pairs.score_images(reward, images[start : start + batch_size],
                                                 captions[start : start + batch_size]))
    return np.asarray(scores, dtype=np.float64)


def extremes(margins, count):
    """Indices of the `count` largest and `count` smallest margins, largest first, each index once."""
    order = np.argsort(-np.asarray(margins), kind="stable")
    chosen = list(order[:count]) + [i for i in order[-count:] if i not in set(order[:count])]
    return [int(i) for i in chosen]


def win_rate(args):
    prompts = load_prompts(args)
    dtype = DTYPES[args.dtype]
    result = pipeline_dpo.resolve_dpo_result(args.dpo, variant=args.variant)  # fail on a bad --dpo before sampling
    pipeline_dpo.check_dpo_result_fits(args.base, result, dpo_name=args.dpo)
    # 1. Images: the base's first, then the DPO result goes into the same pipeline (one denoiser on the device).
    pipe = pipeline_dpo.load_dpo_pipeline(args.base, None, torch_dtype=dtype, device=args.device, variant=args.variant)
    pipe.set_progress_bar_config(disable=True)
    settings = pipeline_dpo.sampling_settings(pipe, args.num_inference_steps, args.guidance_scale,
                                              args.max_sequence_length, result)
    common = dict(seed=args.seed, num_images_per_prompt=args.num_images_per_prompt, height=args.height,
                  width=args.width, batch_size=args.batch_size, **settings)
    base_images = pipeline_dpo.generate_images(pipe, prompts, label="base", **common)
    pipeline_dpo.apply_dpo_result(pipe, result, torch_dtype=dtype, dpo_name=args.dpo)
    dpo_images = pipeline_dpo.generate_images(pipe, prompts, label="dpo", **common)
    del pipe

    # 2. Rewards, then wins per (prompt, seed).
    reward = relabel_pairs.build_reward(args, device=args.device)
    captions = [prompt for prompt in prompts for _ in range(args.num_images_per_prompt)]
    seeds = [args.seed + j for _ in prompts for j in range(args.num_images_per_prompt)]
    base_rewards = score_in_batches(reward, base_images, captions, args.reward_batch_size)
    dpo_rewards = score_in_batches(reward, dpo_images, captions, args.reward_batch_size)
    margins = dpo_rewards - base_rewards
    summary = outcome_summary(margins)

    # 3. CSV, grid of the largest wins and losses, summary.
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "win_rate.csv", [
        {"prompt": caption, "seed": seed, "base_reward": base, "dpo_reward": dpo, "margin": margin,
         "outcome": "win" if margin > 0 else "tie" if margin == 0 else "loss"}
        for caption, seed, base, dpo, margin in zip(captions, seeds, base_rewards, dpo_rewards, margins, strict=True)])
    shown = extremes(margins, args.grid_rows)
    grid, _ = pipeline_dpo.make_comparison_grid(
        [f"{'win' if margins[i] > 0 else 'tie' if margins[i] == 0 else 'loss'} {margins[i]:+.3g} (seed {seeds[i]}): "
         f"{captions[i]}" for i in shown],
        {"base": [base_images[i] for i in shown], "DPO": [dpo_images[i] for i in shown]}, 1,
        scores={"base": [float(base_rewards[i]) for i in shown], "DPO": [float(dpo_rewards[i]) for i in shown]})
    grid.save(output_dir / "grid.png")
    record = {"command": "win-rate", "base": args.base, "dpo": args.dpo, "reward": args.reward,
              "reward_model": args.reward_model, "reward_fn": args.reward_fn, "num_prompts": len(prompts),
              "num_images_per_prompt": args.num_images_per_prompt, "seed": args.seed, **settings,
              "win_rate": summary["rate"], **summary, "mean_base_reward": float(base_rewards.mean()),
              "mean_dpo_reward": float(dpo_rewards.mean())}
    (output_dir / "win_rate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"DPO win rate vs base {summary['rate']:.3f} (95% CI {summary['ci95_low']:.3f}-{summary['ci95_high']:.3f}) "
          f"over {summary['n']} images: {summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses. "
          f"Wrote win_rate.csv, win_rate.json and grid.png to {output_dir}.")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def add_data_arguments(parser, pairs):
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id, or a local parquet folder.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Local parquet folder; instead of --dataset_name.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the dataset, if any.")
    data.add_argument("--dataset_split_name", type=str, default="train",
                      help="Split to read (Pick-a-Pic v2's held-out pairs: validation_unique or test_unique).")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column with the prompt.")
    if pairs:
        data.add_argument("--image_0_column", type=str, default="jpg_0", help="Column with the first image.")
        data.add_argument("--image_1_column", type=str, default="jpg_1", help="Column with the second image.")
        data.add_argument("--label_0_column", type=str, default="label_0", help="Column with the first image's label.")
        data.add_argument("--label_1_column", type=str, default="label_1", help="Column with the second image's label.")
        data.add_argument("--chosen_column", type=str, default=None,
                          help="Chosen/rejected layout: the chosen image's column (with --rejected_column).")
        data.add_argument("--rejected_column", type=str, default=None, help="The rejected image's column.")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", type=str, required=True,
                        help="Hub id or folder of the base the result was trained from.")
    common.add_argument("--dpo", type=str, required=True,
                        help="The DPO result: pipeline folder, UNet or transformer folder, or LoRA weights (as "
                             "pipeline_dpo.py reads).")
    common.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. 'fp16'.")
    common.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device for the models.")
    common.add_argument("--dtype", type=str, default="float32", choices=tuple(DTYPES),
                        help="dtype of the models (the training run's mixed precision).")
    common.add_argument("--max_sequence_length", type=int, default=None,
                        help="SD3 and FLUX only: T5 tokens per prompt. Default: what the result was trained with "
                             "(its training_args.json), else the training script's default (77 SD3, 512 FLUX).")
    common.add_argument("--seed", type=int, default=0,
                        help="Seed of the draws (implicit-accuracy) or images (win-rate).")
    common.add_argument("--output_dir", type=str, required=True, help="Folder for the CSV, JSON (and grid).")

    parser = argparse.ArgumentParser(description="Evaluate a Diffusion-DPO result against its base.")
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("implicit-accuracy", parents=[common],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                   help="Implicit reward accuracy on held-out preference pairs (paper Table 2); "
                                        "SD 1.x/2.x, SDXL, SD3 and FLUX.")
    add_data_arguments(accuracy, pairs=True)
    accuracy.add_argument("--max_pairs", type=int, default=None,
                          help="Evaluate a seeded random subset of this many pairs.")
    accuracy.add_argument("--resolution", type=int, default=None,
                          help="Resolution of the centre crop; a multiple of 8 (16 for SD3 and FLUX). Default: the "
                               "family's training resolution (512 SD 1.x/2.x, 1024 SDXL, SD3 and FLUX).")
    accuracy.add_argument("--num_draws", type=int, default=4,
                          help="Fixed (timestep, noise) draws per pair; the inside term is averaged over them.")
    accuracy.add_argument("--beta_dpo", type=float, default=None,
                          help="Scales the reported inside term (authors' convention); the accuracy ignores it. "
                               "Default: the family's training default (5000 SD 1.x/2.x and SDXL, 500 SD3 and "
                               "FLUX).")
    accuracy.add_argument("--batch_size", type=int, default=8, help="Pairs per forward pass.")

    wins = commands.add_parser("win-rate", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                               help="Reward win rate of the DPO model against its base, same seeds.")
    wins.add_argument("--prompts", type=str, default=None, help="Text file, one prompt per line ('#' comments).")
    add_data_arguments(wins, pairs=False)
    wins.add_argument("--max_prompts", type=int, default=None, help="Use only the first this many prompts.")
    wins.add_argument("--num_images_per_prompt", type=int, default=1, help="Images per prompt and model (seed + j).")
    wins.add_argument("--num_inference_steps", type=int, default=None,
                      help="Sampling steps; default: the family's (50 SD and SDXL, 28 SD3 and FLUX.1-dev, 4 "
                           "FLUX.1-schnell).")
    wins.add_argument("--guidance_scale", type=float, default=None,
                      help="Guidance (FLUX: the distilled guidance strength); default: the family's (7.5 SD, 5.0 "
                           "SDXL, 7.0 SD3, 3.5 FLUX.1-dev, 0 FLUX.1-schnell).")
    wins.add_argument("--height", type=int, default=None, help="Image height; default: the model's.")
    wins.add_argument("--width", type=int, default=None, help="Image width; default: the model's.")
    wins.add_argument("--batch_size", type=int, default=1, help="Images per pipeline call (each keeps its seed).")
    wins.add_argument("--grid_rows", type=int, default=4,
                      help="The grid shows this many largest wins and this many largest losses.")
    relabel_pairs.add_reward_arguments(wins)
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        parser.error(f"--max_sequence_length must be between 1 and 512 (T5's limit in SD3 and FLUX), got "
                     f"{args.max_sequence_length}.")
    if args.command == "implicit-accuracy":
        if (args.dataset_name is None) == (args.train_data_dir is None):
            parser.error("implicit-accuracy: give exactly one of --dataset_name and --train_data_dir.")
        if (args.chosen_column is None) != (args.rejected_column is None):
            parser.error("--chosen_column and --rejected_column go together.")
        if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
            parser.error("--resolution must be a positive multiple of 8.")
        for name in ("num_draws", "batch_size"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be at least 1.")
        if args.beta_dpo is not None and not args.beta_dpo > 0:
            parser.error("--beta_dpo must be > 0.")
    else:
        sources = [args.prompts, args.dataset_name, args.train_data_dir]
        if sum(source is not None for source in sources) != 1:
            parser.error("win-rate: give exactly one of --prompts, --dataset_name and --train_data_dir.")
        if args.num_images_per_prompt < 1 or args.grid_rows < 1 or args.reward_batch_size < 1:
            parser.error("--num_images_per_prompt, --grid_rows and --reward_batch_size must be at least 1.")
    return args


def main(args):
    return implicit_accuracy(args) if args.command == "implicit-accuracy" else win_rate(args)


if __name__ == "__main__":
    main(parse_args())

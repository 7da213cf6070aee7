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
"""Relabel preference pairs with a reward model (AI feedback, Diffusion-DPO paper section 5.4).

    python tools/relabel_pairs.py --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name train \
        --reward pickscore --reward_model yuvalkirstain/PickScore_v1 \
        --reward_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K --output_dir pickapic-pickscore
    python tools/relabel_pairs.py --train_data_dir tiny-pickapic --reward callable \
        --reward_fn my_rewards.py:brightness --min_margin 0.01 --output_dir tiny-relabelled
    accelerate launch tools/relabel_pairs.py ...   # each process scores its share; the main process writes

Both images of every pair are scored against the caption; the image with the higher reward becomes the
winner. The output is a Pick-a-Pic-format parquet folder (same column names as the input, every other input
column carried over) with the labels replaced and three columns added:
  reward_0, reward_1   the reward of image 0 and image 1 (float64)
  reward_margin        reward of the winner minus reward of the loser (>= 0); 0 means the reward can't tell,
                       and such a row is written as a tie (0.5, 0.5), which training drops and counts
`train_diffusion_dpo.py --train_data_dir OUTPUT_DIR` trains on it as it is (as do the SDXL and SD3 scripts, whose
data loading is the same; the relabelling does not depend on the model family). relabel.json next to it records
the counts: rows read, original ties and unusable rows dropped, near-ties dropped by --min_margin, pairs whose
label the reward flipped, pairs written.

Rewards (--reward):
  pickscore  a CLIP model fine-tuned on preferences (PickScore_v1): logit_scale * cos(image, text), the
             PickScore recipe. --reward_model is the model, --reward_processor its processor (default: the model).
  clip       CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image, text), 0), with
             any CLIP model as --reward_model.
  aesthetic  LAION aesthetic predictor: a CLIP ViT-L/14 (--reward_model, e.g. openai/clip-vit-large-patch14)
             image embedding, L2-normalised, into the MLP head in --aesthetic_head (.pth/.pt/.safetensors). Two
             LAION head formats are read by their state-dict keys:
               improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE.pth): keys layers.{0,2,4,6,7}.weight/
                 bias, Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16)
                 Linear(16,1), no activations (dropout is inactive at inference);
               aesthetic v1 linear head (sa_0_4_vit_l_14_linear.pth): keys weight [1,768] and bias [1].
             The caption is ignored.
  hpsv2      HPSv2 through the `hpsv2` package (pip install hpsv2) and a local checkpoint in --reward_model
             (e.g. HPS_v2.1_compressed.pt); refused with a clear error when either is missing.
  callable   your own function, --reward_fn module:function or path/to/file.py:function, called as
             fn(list of PIL images, list of captions) -> list of floats (higher is better).
"""

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the training script sits at the repo root
import train_diffusion_dpo as sd  # noqa: E402


REWARDS = ("pickscore", "clip", "aesthetic", "hpsv2", "callable")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLIP_SCORE_WEIGHT = 100.0  # torchmetrics' CLIPScore scale (Hessel et al. use 2.5; the ranking is the same)
OUTPUT_FILE = "train-00000-of-00001.parquet"


# ----------------------------------------------------------------------------------------------------------------
# Rewards: each is a callable (list of PIL images, list of captions) -> list of floats, higher is better
# ----------------------------------------------------------------------------------------------------------------
def _pooled(features):
    """CLIP's get_*_features returns a tensor (transformers 4) or an output with pooler_output (transformers 5)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClipReward:
    """PickScore (logit_scale * cos) or CLIP score (100 * max(cos, 0)) from a transformers CLIPModel."""

    def __init__(self, model_path, processor_path=None, kind="pickscore", device="cpu", dtype=torch.float32):
        from transformers import AutoProcessor, CLIPModel

        self.kind = kind
        self.device = device
        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.model = CLIPModel.from_pretrained(model_path, torch_dtype=dtype).eval().to(device)

    @torch.no_grad()
    def __call__(self, images, captions):
        # padding="max_length" to CLIP's context length, as PickScore's reference code does
        inputs = self.processor(images=images, text=list(captions), padding="max_length", truncation=True,
                                max_length=self.processor.tokenizer.model_max_length, return_tensors="pt")
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        image_embeds = _pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype)))
        text_embeds = _pooled(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs["attention_mask"]))
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        if self.kind == "pickscore":
            scores = self.model.logit_scale.exp().float() * cosine
        else:
            scores = CLIP_SCORE_WEIGHT * cosine.clamp(min=0)
        return scores.cpu().tolist()


class LaionAestheticMlp(torch.nn.Module):
    """LAION's improved-aesthetic-predictor MLP (its dropout slots as Identity), keys layers.N.*."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, embeds):
        return self.layers(embeds)


def aesthetic_head_from_state_dict(state_dict):
    """The LAION aesthetic head as an nn.Module, built from its state dict (format in the module docstring)."""
    if "weight" in state_dict and "bias" in state_dict:  # aesthetic v1: one linear layer
        head = torch.nn.Linear(state_dict["weight"].shape[1], state_dict["weight"].shape[0])
        head.load_state_dict(state_dict)
        return head.eval()
    state_dict = {name.removeprefix("module."): value for name, value in state_dict.items()}
    linear_indices = sorted({int(name.split(".")[1]) for name in state_dict if name.startswith("layers.")})
    if not linear_indices:
        raise ValueError(f"Unknown aesthetic head format (keys {sorted(state_dict)[:6]}...): expected LAION's "
                         "improved-aesthetic-predictor (layers.N.weight) or the v1 linear head (weight, bias).")
    layers = []
    for position in range(linear_indices[-1] + 1):
        if position in linear_indices:
            weight = state_dict[f"layers.{position}.weight"]
            layers.append(torch.nn.Linear(weight.shape[1], weight.shape[0]))
        else:
            layers.append(torch.nn.Identity())  # a Dropout slot: inactive at inference
    head = LaionAestheticMlp(layers)
    head.load_state_dict(state_dict)
    return head.eval()


class AestheticReward:
    """LAION aesthetic score: MLP head on the L2-normalised CLIP image embedding; captions are ignored."""

    def __init__(self, model_path, head_path, processor_path=None, device="cpu", dtype=torch.float32):
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = device
        self.processor = CLIPImageProcessor.from_pretrained(processor_path or model_path)
        self.model = CLIPModel.from_pretrained(model_path, torch_dtype=dtype).eval().to(device)
        if str(head_path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(head_path)
        else:
            state_dict = torch.load(head_path, map_location="cpu", weights_only=True)
        self.head = aesthetic_head_from_state_dict(state_dict).to(device)

    @torch.no_grad()
    def __call__(self, images, captions):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        embeds = _pooled(self.model.get_image_features(pixel_values=pixels)).float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).squeeze(-1).cpu().tolist()


class HpsV2Reward:
    """HPSv2 via the hpsv2 package and a local checkpoint (no download)."""

    def __init__(self, checkpoint, hps_version="v2.1"):
        try:
            import hpsv2
        except ImportError as error:
            raise SystemExit("--reward hpsv2 needs the hpsv2 package: `pip install hpsv2`, then pass its checkpoint "
                             "(e.g. HPS_v2.1_compressed.pt) as --reward_model.") from error
        if checkpoint is None or not os.path.isfile(checkpoint):
            raise SystemExit(f"--reward hpsv2 needs the HPSv2 checkpoint file as --reward_model (got {checkpoint!r}); "
                             "download HPS_v2.1_compressed.pt from xswu/HPSv2 and pass its path.")
        self.hpsv2 = hpsv2
        self.checkpoint = checkpoint
        self.hps_version = hps_version

    def __call__(self, images, captions):
        scores = []
        for image, caption in zip(images, captions, strict=True):  # hpsv2.score takes one prompt per call
            score = self.hpsv2.score([image], caption, cp=self.checkpoint, hps_version=self.hps_version)
            scores.append(float(np.asarray(score).reshape(-1)[0]))
        return scores


def load_callable(spec):
    """`module:function` (importable) or `path/to/file.py:function`."""
    if ":" not in spec:
        raise SystemExit(f"--reward_fn must be module:function or path/to/file.py:function, got {spec!r}.")
    module_name, function_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SystemExit(f"{module_name} has no callable {function_name!r} (from --reward_fn {spec}).")
    return function


def build_reward(args, device="cpu"):
    """The reward named by --reward, as fn(images, captions) -> list of floats."""
    dtype = DTYPES[args.reward_dtype]
    if args.reward in ("pickscore", "clip", "aesthetic") and args.reward_model is None:
        raise SystemExit(f"--reward {args.reward} needs --reward_model (a CLIP model folder or hub id).")
    if args.reward in ("pickscore", "clip"):
        return ClipReward(args.reward_model, args.reward_processor, kind=args.reward, device=device, dtype=dtype)
    if args.reward == "aesthetic":
        if args.aesthetic_head is None:
            raise SystemExit("--reward aesthetic needs --aesthetic_head (the LAION MLP head's weights file).")
        return AestheticReward(args.reward_model, args.aesthetic_head, args.reward_processor, device=device,
                               dtype=dtype)
    if args.reward == "hpsv2":
        return HpsV2Reward(args.reward_model)
    if args.reward == "callable":
        if args.reward_fn is None:
            raise SystemExit("--reward callable needs --reward_fn module:function.")
        return load_callable(args.reward_fn)
    raise ValueError(f"Unknown reward {args.reward!r}; valid rewards are {', '.join(REWARDS)}.")


def score_images(reward, images, captions):
    """Call a reward and check that it returned one finite float per image."""
    scores = np.asarray(reward(images, captions), dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(images):
        raise ValueError(f"The reward returned {scores.shape[0]} scores for {len(images)} images.")
    if not np.isfinite(scores).all():
        raise ValueError("The reward returned a NaN or infinite score.")
    return scores


def add_reward_arguments(parser):
    """The reward flags; tools/evaluate.py win-rate shares them."""
    reward = parser.add_argument_group("reward")
    reward.add_argument("--reward", type=str, required=True, choices=REWARDS,
                        help="Reward model that scores each image against its caption (see the module docstring).")
    reward.add_argument("--reward_model", type=str, default=None,
                        help="pickscore/clip/aesthetic: CLIP model folder or hub id (PickScore: "
                             "yuvalkirstain/PickScore_v1; aesthetic: a CLIP ViT-L/14). hpsv2: the checkpoint file.")
    reward.add_argument("--reward_processor", type=str, default=None,
                        help="Processor folder or hub id, when not stored with --reward_model (PickScore_v1: "
                             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K).")
    reward.add_argument("--aesthetic_head", type=str, default=None,
                        help="--reward aesthetic: the LAION head weights (.pth/.pt/.safetensors).")
    reward.add_argument("--reward_fn", type=str, default=None,
                        help="--reward callable: module:function or path/to/file.py:function, called as "
                             "fn(images, captions) -> list of floats.")
    reward.add_argument("--reward_batch_size", type=int, default=16, help="Images per reward call.")
    reward.add_argument("--reward_dtype", type=str, default="float32", choices=tuple(DTYPES),
                        help="dtype of the reward model's weights.")
    return reward


# ----------------------------------------------------------------------------------------------------------------
# Relabelling
# ----------------------------------------------------------------------------------------------------------------
def load_rows(args):
    """The dataset, and the indices of rows to score with counts of the rows left out (by reason)."""
    from datasets import load_dataset

    source = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
    dataset = load_dataset(source, args.dataset_config_name, split=args.dataset_split_name, cache_dir=args.cache_dir)
    columns = [args.caption_column, args.image_0_column, args.image_1_column, args.label_0_column,
               args.label_1_column]
    missing = [name for name in columns if name not in dataset.column_names]
    if missing:
        raise SystemExit(f"Dataset {source!r} has no column(s) {missing}; its columns are {dataset.column_names}. "
                         "Map yours with --caption_column, --image_0_column/--image_1_column, "
                         "--label_0_column/--label_1_column.")
    captions = dataset[args.caption_column]
    labels = dataset.select_columns([args.label_0_column, args.label_1_column]).with_format("numpy")
    label_0 = np.asarray(labels[args.label_0_column], dtype=np.float64)
    label_1 = np.asarray(labels[args.label_1_column], dtype=np.float64)
    has_caption = np.fromiter((isinstance(c, str) for c in captions), dtype=bool, count=len(dataset))
    is_tie = (label_0 == 0.5) & (label_1 == 0.5)
    keep = has_caption & (~is_tie if not args.keep_ties else True)
    counts = {"rows": len(dataset), "bad_caption": int((~has_caption).sum()),
              "ties_dropped": 0 if args.keep_ties else int((is_tie & has_caption).sum())}
    indices = np.flatnonzero(keep)
    if args.max_samples is not None:
        indices = indices[: args.max_samples]
    return dataset, indices.tolist(), counts


def score_pairs(args, dataset, indices, reward, accelerator):
    """{row: (reward_0, reward_1)} for the rows whose images decode; the rows that don't, with their reason.

    Each process scores its share (accelerate's split_between_processes); the results are gathered on all.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    pairs_per_call = max(1, args.reward_batch_size // 2)
    scores, unusable = {}, []
    with accelerator.split_between_processes(indices) as my_indices:
        progress = tqdm(total=len(my_indices), desc="scoring pairs", unit="pair",
                        disable=not accelerator.is_local_main_process)
        for start in range(0, len(my_indices), pairs_per_call):
            batch_rows, images_0, images_1, captions = [], [], [], []
            for row_index in my_indices[start : start + pairs_per_call]:
                row = dataset[row_index]
                try:
                    image_0 = sd.load_pil_image(row[args.image_0_column])
                    image_1 = sd.load_pil_image(row[args.image_1_column])
                except sd.UnusableImage as error:
                    unusable.append((row_index, error.reason))
                    continue
                batch_rows.append(row_index)
                images_0.append(image_0)
                images_1.append(image_1)
                captions.append(row[args.caption_column])
            if batch_rows:
                # One call over [images 0; images 1], each with its pair's caption.
                rewards = score_images(reward, images_0 + images_1, captions + captions)
                for position, row_index in enumerate(batch_rows):
                    scores[row_index] = (rewards[position], rewards[len(batch_rows) + position])
            progress.update(len(my_indices[start : start + pairs_per_call]))
        progress.close()
    gathered_scores = gather_object([list(scores.items())])
    gathered_unusable = gather_object([unusable])
    scores = dict(item for part in gathered_scores for item in part)
    unusable = [item for part in gathered_unusable for item in part]
    return scores, unusable


def relabel_table(args, dataset, scores, counts):
    """The output arrow table (Pick-a-Pic format, relabelled, reward columns added) and the updated counts."""
    import pyarrow as pa

    rows = sorted(scores)
    reward_0 = np.array([scores[row][0] for row in rows], dtype=np.float64)
    reward_1 = np.array([scores[row][1] for row in rows], dtype=np.float64)
    margin = np.abs(reward_0 - reward_1)
    near_tie = margin < args.min_margin
    counts["near_ties_dropped"] = int(near_tie.sum())
    keep = ~near_tie
    rows = [row for row, kept in zip(rows, keep, strict=True) if kept]
    reward_0, reward_1, margin = reward_0[keep], reward_1[keep], margin[keep]
    # The higher reward wins; equal rewards are written as a Pick-a-Pic tie (0.5, 0.5).
    new_label_0 = np.where(reward_0 > reward_1, 1.0, np.where(reward_0 < reward_1, 0.0, 0.5))
    new_label_1 = 1.0 - new_label_0

    table = dataset.select(rows).flatten_indices().data.table
    old_label_0 = np.asarray(table.column(args.label_0_column).to_pylist(), dtype=np.float64)
    old_label_1 = np.asarray(table.column(args.label_1_column).to_pylist(), dtype=np.float64)
    was_decided = (old_label_0 != old_label_1)
    counts["flipped"] = int((was_decided & (new_label_0 != 0.5) & (new_label_0 != old_label_0)).sum())
    counts["reward_ties"] = int((new_label_0 == 0.5).sum())
    counts["pairs_written"] = len(rows)
    for name, values in ((args.label_0_column, new_label_0), (args.label_1_column, new_label_1)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.float64()))
    for name, values in (("reward_0", reward_0), ("reward_1", reward_1), ("reward_margin", margin)):
        if name in table.column_names:  # relabelling a relabelled dataset: replace the old rewards
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(values, pa.float64()))
    return table, counts


def main(args):
    import pyarrow.parquet as pq
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    # 1. Rows to score: captioned, original ties out unless --keep_ties.
    dataset, indices, counts = load_rows(args)
    # 2. Reward model, then every pair's two scores (each process its share).
    reward = build_reward(args, device=accelerator.device)
    scores, unusable = score_pairs(args, dataset, indices, reward, accelerator)
    for reason in ("missing_image", "undecodable_image"):
        counts[reason] = sum(1 for _, why in unusable if why == reason)
    # 3. New labels, written once by the main process.
    table, counts = relabel_table(args, dataset, scores, counts)
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob("*.parquet"):  # load_dataset would read an earlier run's files too
            stale.unlink()
        pq.write_table(table, output_dir / OUTPUT_FILE)
        record = {"source": args.train_data_dir or args.dataset_name, "split": args.dataset_split_name,
                  "reward": args.reward, "reward_model": args.reward_model, "reward_fn": args.reward_fn,
                  "aesthetic_head": args.aesthetic_head, "min_margin": args.min_margin, "keep_ties": args.keep_ties,
                  "counts": counts}
        (output_dir / "relabel.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"Wrote {counts['pairs_written']} pairs to {output_dir / OUTPUT_FILE}: {counts['flipped']} flipped by "
              f"the reward, {counts['near_ties_dropped']} near-ties dropped (--min_margin {args.min_margin}), "
              f"{counts['ties_dropped']} original ties and {counts['bad_caption']} uncaptioned rows left out, "
              f"{counts['missing_image'] + counts['undecodable_image']} rows with unusable images.")
    accelerator.wait_for_everyone()
    return counts


def build_parser():
    parser = argparse.ArgumentParser(description="Relabel Pick-a-Pic-format preference pairs with a reward model "
                                                 "(Diffusion-DPO section 5.4, AI feedback).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id, or a local parquet folder.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="Local parquet folder; instead of --dataset_name.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the dataset, if any.")
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split to relabel.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column with the prompt.")
    data.add_argument("--image_0_column", type=str, default="jpg_0", help="Column with the first image (bytes).")
    data.add_argument("--image_1_column", type=str, default="jpg_1", help="Column with the second image (bytes).")
    data.add_argument("--label_0_column", type=str, default="label_0", help="Column with the first image's label.")
    data.add_argument("--label_1_column", type=str, default="label_1", help="Column with the second image's label.")
    data.add_argument("--keep_ties", action="store_true",
                      help="Score and relabel the original ties (0.5, 0.5) too, instead of leaving them out.")
    data.add_argument("--max_samples", type=int, default=None, help="Relabel only the first this many usable rows.")
    add_reward_arguments(parser)
    parser.add_argument("--min_margin", type=float, default=0.0,
                        help="Drop (and count) pairs whose reward margin |reward_0 - reward_1| is below this.")
    parser.add_argument("--device", type=str, default=None, choices=["cpu", "cuda"],
                        help="Device for the reward model; default: accelerate's choice (the process's GPU if any).")
    parser.add_argument("--output_dir", type=str, required=True, help="Folder for the relabelled parquet dataset.")
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("Give exactly one of --dataset_name (hub id or parquet folder) and --train_data_dir.")
    if args.min_margin < 0:
        parser.error("--min_margin must be >= 0.")
    if args.reward_batch_size < 2:
        parser.error("--reward_batch_size must be at least 2 (one pair).")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be at least 1 when given.")
    return args


if __name__ == "__main__":
    main(parse_args())

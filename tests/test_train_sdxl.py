"""train_diffusion_dpo_sdxl.py: drift from the SD script, SDXL conditioning, and whole runs on a tiny SDXL."""

import argparse
import ast
import io
import json
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import test_train_sd
import train_diffusion_dpo as sd
import train_diffusion_dpo_sdxl as sdxl
from launch_utils import (REPO_ROOT, all_finite, check_validation_grid, launch, logged_scalars, max_abs_difference,
                          max_movement, run_in_process, summary, trained_weights)
from fixtures.make_preference_data import make_preference_dataset
from fixtures.tiny_models import build_tiny_vae

SCRIPT = "train_diffusion_dpo_sdxl.py"
# Flags of the SD script that this one does not have yet: issue 5's latent cache and streaming.
NOT_YET_IN_SDXL = set()  # every SD flag exists here too
CPU = SimpleNamespace(device=torch.device("cpu"))  # build_models asks the accelerator for its device only


# ---------------------------------------------------------------------------------------------------------------
# Drift between the two scripts
# ---------------------------------------------------------------------------------------------------------------
# diffusers' convention: "# Copied from module.name", optionally "with old->new, ..." (renames of whole names, where
# an underscore separates names: unet->transformer also gives ref_transformer and transformer_module). The source is
# the SD script, or the SD3 script for the flow scripts' shared pieces, or pipeline_dpo.py for the labelled grid (which
# the SD script copies). A script may add renames that every piece it copies from one source applies, in a comment
# block that starts with SCRIPT_RENAMES (with the source's name).
COPIED_FROM = re.compile(
    r"^\s*# Copied from (train_diffusion_dpo(?:_sd3)?|pipeline_dpo)\.([\w.]+)(?: with (.+))?$")
SCRIPT_RENAMES = '# Every "# Copied from {module}.<name>" below also renames '


def renamed(lines, renames):
    text = "\n".join(lines)
    for pair in renames.split(",") if renames else []:
        old, new = pair.strip().split("->")
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(old)}(?![A-Za-z0-9])", new, text)
    return text.splitlines()


def script_renames(lines, module="train_diffusion_dpo"):
    """The renames a script applies to every piece copied from `module` (its SCRIPT_RENAMES block for that module, up
    to the full stop), or None."""
    opening = SCRIPT_RENAMES.format(module=module)
    for i, line in enumerate(lines):
        if line.startswith(opening):
            text = line[len(opening):]
            while not text.endswith("."):
                i += 1
                text += " " + lines[i].lstrip("#").strip()
            return text[:-1]
    return None


def definitions(path):
    """{qualified name: (first line incl. decorators, source lines)} of every function and class, methods too."""
    lines = Path(path).read_text().splitlines()

    def walk(body, prefix):
        found = {}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + node.name
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                found[name] = (start, lines[start - 1:node.end_lineno])
                if isinstance(node, ast.ClassDef):
                    found.update(walk(node.body, name + "."))
        return found

    return walk(ast.parse("\n".join(lines)).body, ""), lines


def copied_pieces(script):
    """{name: "module.source name"} of the script's marked pieces; asserts each equals its source, renamed."""
    defs, lines = definitions(REPO_ROOT / script)
    marked = {}
    for name, (start, source) in defs.items():
        match = COPIED_FROM.match(lines[start - 2]) if start >= 2 else None
        if match:
            marked[name] = match.groups()
    # Every marker sits directly above a definition: none is orphaned by an edit.
    marker_lines = [i for i, line in enumerate(lines, 1) if COPIED_FROM.match(line)]
    assert len(marker_lines) == len(marked)
    drifted = []
    sources = {module: definitions(REPO_ROOT / f"{module}.py")[0] for module in {m for m, _, _ in marked.values()}}
    for name, (module, source_name, renames) in marked.items():
        source_defs = sources[module]
        assert source_name in source_defs, f"{name} is marked as copied from {module}.{source_name}, which is not there"
        source = renamed(source_defs[source_name][1], script_renames(lines, module))
        if defs[name][1] != renamed(source, renames):
            drifted.append(name)
    assert not drifted, f"copied pieces of {script} differ from their sources: {drifted}; copy them again"
    return {name: source if module == "train_diffusion_dpo" else f"{module}.{source}"
            for name, (module, source, _) in marked.items()}


def unmarked_shared_definitions(script):
    """What the script defines under an SD-script name (after its renames) without a "Copied from" mark."""
    sd_defs, _ = definitions(REPO_ROOT / "train_diffusion_dpo.py")
    defs, lines = definitions(REPO_ROOT / script)
    everywhere = script_renames(lines)
    sd_names = {renamed([name], everywhere)[0] for name in sd_defs}
    marked = {name for name, (start, _) in defs.items() if start >= 2 and COPIED_FROM.match(lines[start - 2])}
    covered = {name for name in defs if name in marked or any(name.startswith(m + ".") for m in marked)}
    return {name for name in defs if name in sd_names and name not in covered}, marked


def test_copied_pieces_are_identical_to_the_sd_script():
    marked = copied_pieces(SCRIPT)
    assert len(marked) >= 8, sorted(marked)
    for shared in ("diffusion_dpo_loss", "pair_generator", "preprocess_pair", "load_pil_image",
                   "save_checkpoint", "register_checkpoint_hooks", "log_validation", "hub_upload_patterns"):
        assert shared in marked


def test_the_sd_scripts_grid_is_a_copy_of_pipeline_dpos():
    # One grid code for the validation grids, `pipeline_dpo.py compare`, evaluate.py, the demo and the miniature.
    assert {"label_font", "_wrap", "make_comparison_grid"} <= copied_pieces("train_diffusion_dpo.py").keys()


# What the two scripts define under the same name without a "Copied from" mark: the pieces that are SDXL's own
# (two text encoders and tokenizers, time ids, the float32 VAE, turbo). Everything else is copied and guarded above.
FAMILY_SPECIFIC = {
    "PreferencePairDataset", "PreferencePairDataset.__init__", "PreferencePairDataset.cache_views",
    "PreferencePairDataset.model_inputs", "PreferencePairDataset.prompt_truncated", "build_cache", "build_models",
    "build_parser", "build_pipeline", "collate_pairs", "dpo_step_losses", "generate_images", "safe_validation",
    "save_results", "validate_args", "write_model_card",
}


def test_every_function_both_scripts_define_is_copied_or_known_to_be_sdxl_specific():
    unmarked_in_both, marked = unmarked_shared_definitions(SCRIPT)
    assert unmarked_in_both == FAMILY_SPECIFIC, (
        f"new unmarked: {sorted(unmarked_in_both - FAMILY_SPECIFIC)}; now marked or gone: "
        f"{sorted(FAMILY_SPECIFIC - unmarked_in_both)}")
    for stage in ("main", "micro_batch_step", "optimizer_step", "after_step", "finish_run", "prepare_training"):
        assert stage in marked


@pytest.mark.parametrize("loss_type", sd.LOSS_TYPES)
def test_loss_gives_equal_outputs_in_both_scripts(loss_type):
    generator = torch.Generator().manual_seed(0)
    model_losses = torch.rand(8, generator=generator)
    ref_losses = None if loss_type in sd.REFERENCE_FREE_LOSSES else torch.rand(8, generator=generator)
    if loss_type == "sft":
        model_losses = model_losses[:4]
    for beta in (1.0, 5000.0):
        loss_sd, metrics_sd = sd.diffusion_dpo_loss(model_losses, ref_losses, beta, loss_type)
        loss_xl, metrics_xl = sdxl.diffusion_dpo_loss(model_losses, ref_losses, beta, loss_type)
        assert torch.equal(loss_sd, loss_xl)
        assert metrics_sd.keys() == metrics_xl.keys()
        assert all(torch.equal(metrics_sd[k], metrics_xl[k]) for k in metrics_sd)


def test_flags_have_the_sd_scripts_names_choices_and_meanings(capsys):
    sd_actions = {a.dest: a for a in sd.build_parser()._actions if a.dest not in NOT_YET_IN_SDXL
                  and not a.dest.startswith("diffusers_")}  # diffusers' names: test_defaults_and_flags.py
    sdxl_actions = {a.dest: a for a in sdxl.build_parser()._actions}
    assert sd_actions.keys() <= sdxl_actions.keys(), sd_actions.keys() - sdxl_actions.keys()
    # Defaults that are SDXL's own: 1024 px, the authors' guidance 5.0 for SDXL, and distinct output names.
    own_defaults = {"resolution": 1024, "validation_guidance_scale": 5.0, "output_dir": "diffusion-dpo-sdxl",
                    "tracker_project_name": "diffusion-dpo-sdxl"}
    for dest, action in sd_actions.items():
        other = sdxl_actions[dest]
        assert (other.option_strings, other.type, other.choices, other.nargs) == (
            action.option_strings, action.type, action.choices, action.nargs), dest
        assert other.default == own_defaults.get(dest, action.default), dest
    assert sdxl_actions["beta_dpo"].help == sd_actions["beta_dpo"].help
    with pytest.raises(SystemExit):
        sdxl.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in sdxl.build_parser()._actions:
        if action.dest.startswith("diffusers_"):
            continue  # hidden: diffusers' flag names, each answered with ours
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert action.option_strings[0] in text
    assert "beta_dpo/2" in text and "--pretrained_vae_model_name_or_path" in text and "--is_turbo" in text


# ---------------------------------------------------------------------------------------------------------------
# Bad input: the SD script's bad inputs get the same clear errors here
# ---------------------------------------------------------------------------------------------------------------
def data_args(data_dir, *extra):
    return sdxl.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", str(data_dir), *extra])


SD_BAD_ARGUMENTS = [
    (extra, message)
    for extra, message in next(mark.args[1] for mark in test_train_sd.test_bad_arguments_get_a_clear_error.pytestmark
                               if mark.name == "parametrize")
    if not {flag.lstrip("-") for flag in extra} & NOT_YET_IN_SDXL
]
SDXL_BAD_ARGUMENTS = [
    (["--vae_encode_batch_size", "0"], "--vae_encode_batch_size must be at least 1"),
    (["--turbo_num_steps", "0"], "--turbo_num_steps must be at least 1"),
]


@pytest.mark.parametrize("extra, message", SD_BAD_ARGUMENTS + SDXL_BAD_ARGUMENTS)
def test_bad_arguments_get_a_clear_error(preference_data_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        data_args(preference_data_path, *extra)
    assert message in capsys.readouterr().err


def test_no_dataset_and_unwritable_output_dir_are_clear_errors(preference_data_path, tmp_path, capsys):
    import os

    with pytest.raises(SystemExit):
        sdxl.parse_args(["--pretrained_model_name_or_path", "unused"])
    assert "No dataset given" in capsys.readouterr().err
    if os.geteuid() != 0:  # root can write anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            data_args(preference_data_path, "--output_dir", str(read_only / "out"))
        assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--max_train_samples", "5", "--seed", "3"], ["--caption_column", "prompt",
                                                                                "--chosen_column", "chosen",
                                                                                "--rejected_column", "rejected"]])
def test_data_loading_gives_the_sd_scripts_rows_and_counts(tmp_path_factory, extra):
    layout = "chosen_rejected" if "--chosen_column" in extra else "pickapic"
    path = make_preference_dataset(str(tmp_path_factory.mktemp(layout)), num_pairs=12, num_ties=3, layout=layout)
    args = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", path, *extra]
    dataset_sd, columns_sd, counts_sd = sd.load_preference_dataset(sd.parse_args(args))
    dataset_xl, columns_xl, counts_xl = sdxl.load_preference_dataset(sdxl.parse_args(args))
    assert (columns_xl, counts_xl) == (columns_sd, counts_sd)
    assert dataset_xl[:] == dataset_sd[:]


def test_data_errors_match_the_sd_script(preference_data_path, tmp_path):
    with pytest.raises(ValueError) as error:
        sdxl.load_preference_dataset(data_args(preference_data_path, "--caption_column", "prompt"))
    assert "['prompt']" in str(error.value) and "jpg_0" in str(error.value)
    ties_only = make_preference_dataset(str(tmp_path / "ties"), num_pairs=0, num_ties=3)
    with pytest.raises(ValueError, match="no usable preference pairs.*3 ties"):
        sdxl.load_preference_dataset(data_args(ties_only))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            sdxl.enable_xformers(None)


def test_an_sd_model_is_refused_with_a_pointer_to_the_sd_script(tiny_sd_path, preference_data_path):
    args = data_args(preference_data_path)
    args.pretrained_model_name_or_path = tiny_sd_path
    with pytest.raises(ValueError, match="not an SDXL model.*train_diffusion_dpo.py"):
        sdxl.build_models(args, CPU, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Micro-conditioning: time ids from the real size and the crop applied, winner and loser together
# ---------------------------------------------------------------------------------------------------------------
# (width, height) of winner and loser per row: landscape and portrait winners, losers of another size.
NOISE_PAIR_SIZES = [((72, 40), (36, 20)), ((40, 88), (48, 48)), ((100, 56), (100, 56)), ((56, 64), (80, 40))]
RESOLUTION = 32


def noise_png(size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: the test can redo every step exactly
    return buffer.getvalue()


@pytest.fixture(scope="module")
def noise_pairs_path(tmp_path_factory):
    """Pick-a-Pic-layout parquet of random-noise PNG pairs of different non-square sizes (every crop unique)."""
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i, (winner_size, loser_size) in enumerate(NOISE_PAIR_SIZES):
        winner, loser = noise_png(winner_size, 2 * i), noise_png(loser_size, 2 * i + 1)
        winner_first = i % 2 == 0
        rows["caption"].append(f"a red circle {i}")
        rows["jpg_0"].append(winner if winner_first else loser)
        rows["jpg_1"].append(loser if winner_first else winner)
        rows["label_0"].append(1.0 if winner_first else 0.0)
        rows["label_1"].append(0.0 if winner_first else 1.0)
    path = tmp_path_factory.mktemp("noise-pairs")
    pq.write_table(pa.table(rows), path / "train-00000-of-00001.parquet")
    return str(path)


def find_crop(pixels, image, resized, mirrored=False):
    """(top, left) of the one window of `image` resized to `resized` whose crop equals `pixels` (None if not one)."""
    target = np.rint((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)
    x_scale, y_scale = image.width / resized[0], image.height / resized[1]
    hits = []
    for top in range(resized[1] - RESOLUTION + 1):
        for left in range(resized[0] - RESOLUTION + 1):
            box = (left * x_scale, top * y_scale, (left + RESOLUTION) * x_scale, (top + RESOLUTION) * y_scale)
            crop = image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR, box=box)
            if mirrored:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if np.array_equal(np.asarray(crop), target):
                hits.append((top, left))
    return hits[0] if len(hits) == 1 else None


def test_time_ids_are_the_real_size_and_the_crop_seen_and_both_images_flip_together(noise_pairs_path,
                                                                                     tiny_sdxl_path):
    from transformers import CLIPTokenizer

    args = data_args(noise_pairs_path, "--resolution", str(RESOLUTION), "--random_crop", "--proportion_empty_prompts",
                     "0")
    dataset, columns, _ = sdxl.load_preference_dataset(args)
    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    pairs = sdxl.PreferencePairDataset(dataset, columns, tokenizers, args)
    seen = {"flipped": 0, "unflipped": 0, "crops": set()}
    for epoch in range(4):
        pairs.epoch = epoch
        for index, ((width, height), _) in enumerate(NOISE_PAIR_SIZES):
            example = pairs[index]
            row = dataset[index]
            winner_bytes, loser_bytes = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1 else (row["jpg_1"],
                                                                                                 row["jpg_0"])
            winner, loser = Image.open(io.BytesIO(winner_bytes)), Image.open(io.BytesIO(loser_bytes))
            assert winner.size == (width, height)
            # Redo the crop by hand: a window of the image resized to short side RESOLUTION (the loser as if brought
            # to the winner's size first), resampled from its box in each image's own pixels.
            scale = RESOLUTION / min(width, height)
            resized = (round(width * scale), round(height * scale))
            plain = find_crop(example["pixels_w"], winner, resized)
            flipped = find_crop(example["pixels_w"], winner, resized, mirrored=True)
            assert (plain is None) != (flipped is None), "the winner is one unique window of its resized image"
            top, left = plain if plain is not None else flipped
            assert find_crop(example["pixels_l"], loser, resized, mirrored=plain is None) == (top, left), (
                "the loser got the same crop/flip")
            if plain is None:  # the crop as the model sees it: in the mirrored image when the pair was flipped
                left = resized[0] - RESOLUTION - left
            assert example["time_ids"].tolist() == [height, width, top, left, RESOLUTION, RESOLUTION]
            seen["flipped" if plain is None else "unflipped"] += 1
            seen["crops"].add((index, top, left))
    assert seen["flipped"] and seen["unflipped"] and len(seen["crops"]) > len(NOISE_PAIR_SIZES)


def test_pixels_equal_the_sd_scripts_for_the_same_draws(noise_pairs_path):
    winner = Image.open(io.BytesIO(noise_png((72, 40), 0)))
    loser = Image.open(io.BytesIO(noise_png((36, 20), 1)))
    for seed in range(6):
        for random_crop in (True, False):
            pixels_w, pixels_l, _, _ = sd.preprocess_pair(winner, loser, 32, random_crop, True, random.Random(seed))
            xl_w, xl_l, time_ids = sdxl.preprocess_pair_with_time_ids(winner, loser, 32, random_crop, True,
                                                                      random.Random(seed))
            assert torch.equal(pixels_w, xl_w) and torch.equal(pixels_l, xl_l)
            assert time_ids[:2].tolist() == [40, 72] and time_ids[4:].tolist() == [32, 32]


# ---------------------------------------------------------------------------------------------------------------
# The step: text encoded once per pair, conditions repeated for winner and loser
# ---------------------------------------------------------------------------------------------------------------
def test_encode_prompt_matches_the_sdxl_pipeline(noise_pairs_path, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    args = data_args(noise_pairs_path, "--resolution", str(RESOLUTION), "--proportion_empty_prompts", "0")
    dataset, columns, _ = sdxl.load_preference_dataset(args)
    pairs = sdxl.PreferencePairDataset(dataset, columns, (pipe.tokenizer, pipe.tokenizer_2), args)
    batch = sdxl.collate_pairs([pairs[0], pairs[1]])
    prompt_embeds, pooled = sdxl.encode_prompt((pipe.text_encoder, pipe.text_encoder_2),
                                               [batch["input_ids"], batch["input_ids_2"]])
    expected, _, expected_pooled, _ = pipe.encode_prompt([dataset[0]["caption"], dataset[1]["caption"]],
                                                         device="cpu", do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert torch.equal(prompt_embeds, expected) and torch.equal(pooled, expected_pooled)


class Recorder:
    """Forward pre-hooks that record what each module was called with."""

    def __init__(self):
        self.calls = []
        self.handles = []

    def watch(self, name, module):
        def hook(_, args, kwargs):
            self.calls.append((name, args, kwargs))

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def named(self, name):
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


def step_inputs(model_path, data_path, *extra, weight_dtype=torch.float32):
    args = data_args(data_path, "--pretrained_model_name_or_path", model_path, "--resolution", str(RESOLUTION),
                     "--random_crop", *extra)
    noise_scheduler, tokenizers, text_encoders, vae, unet, ref_unet = sdxl.build_models(args, CPU, weight_dtype)
    dataset, columns, _ = sdxl.load_preference_dataset(args)
    pairs = sdxl.PreferencePairDataset(dataset, columns, tokenizers, args)
    batch = sdxl.collate_pairs([pairs[i] for i in range(3)])
    return args, batch, (unet, ref_unet, vae, text_encoders), noise_scheduler


@pytest.mark.parametrize("mode", ["lora", "full", "sft"])
def test_step_encodes_text_once_per_pair_and_repeats_every_condition(mode, noise_pairs_path, tiny_sdxl_path):
    extra = {"lora": ["--use_lora"], "full": [], "sft": ["--loss_type", "sft"]}[mode]
    args, batch, models, noise_scheduler = step_inputs(tiny_sdxl_path, noise_pairs_path, *extra,
                                                       "--vae_encode_batch_size", "4")
    unet, ref_unet, vae, text_encoders = models
    assert noise_scheduler.training_timesteps is None  # without --is_turbo, t is drawn from all of 0..T-1
    recorder = Recorder()
    recorder.watch("text_encoder", text_encoders[0])
    recorder.watch("text_encoder_2", text_encoders[1])
    recorder.watch("vae", vae.encoder)
    recorder.watch("unet", unet)
    if ref_unet is not None:
        recorder.watch("unet", ref_unet)
    model_losses, ref_losses = sdxl.dpo_step_losses(args, batch, models, noise_scheduler, 0, torch.float32)

    # Each text encoder runs once, on the 3 captions: never once for winners and again for losers.
    for name in ("text_encoder", "text_encoder_2"):
        (call_args, _), = recorder.named(name)
        assert call_args[0].shape[0] == 3
    # The VAE encodes in chunks of --vae_encode_batch_size images: 6 images -> 4 + 2; sft: 3 winners -> 3.
    assert [a[0].shape[0] for a, _ in recorder.named("vae")] == ([3] if mode == "sft" else [4, 2])
    prompt_embeds, pooled = sdxl.encode_prompt(text_encoders, [batch["input_ids"], batch["input_ids_2"]])
    unet_calls = recorder.named("unet")
    assert len(unet_calls) == (1 if mode == "sft" else 2)  # reference then policy, or the policy alone
    pairs_per_call = 1 if mode == "sft" else 2
    for (sample, timesteps, hidden_states), kwargs in unet_calls:
        added = kwargs["added_cond_kwargs"]
        assert sample.shape[0] == 3 * pairs_per_call
        # [winners; losers]: the same timestep, text and micro-conditioning for both images of a pair
        assert torch.equal(timesteps, timesteps[:3].repeat(pairs_per_call))
        assert torch.equal(hidden_states, prompt_embeds.repeat(pairs_per_call, 1, 1))
        assert torch.equal(added["text_embeds"], pooled.repeat(pairs_per_call, 1))
        assert torch.equal(added["time_ids"], batch["time_ids"].float().repeat(pairs_per_call, 1))
        if mode != "sft":  # shared noise: winner and loser inputs differ only by their latents
            assert not torch.equal(sample[:3], sample[3:])
    assert model_losses.shape == (3 * pairs_per_call,) and torch.isfinite(model_losses).all()
    assert (ref_losses is None) == (mode == "sft")
    if mode == "lora":  # the adapters start at zero: the reference pass equals the policy's
        assert torch.allclose(model_losses, ref_losses)


def test_vae_runs_in_float32_unless_a_fixed_vae_is_given(noise_pairs_path, tiny_sdxl_path):
    args, batch, models, noise_scheduler = step_inputs(tiny_sdxl_path, noise_pairs_path, "--use_lora",
                                                       weight_dtype=torch.bfloat16)
    unet, _, vae, text_encoders = models
    assert vae.dtype == torch.float32
    assert text_encoders[0].dtype == text_encoders[1].dtype == torch.bfloat16
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    recorder = Recorder()
    recorder.watch("unet", unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the policy's forward in
        model_losses, ref_losses = sdxl.dpo_step_losses(args, batch, models, noise_scheduler, 0, torch.bfloat16)
    assert recorder.named("unet")[0][0][0].dtype == torch.bfloat16  # latents cast to the weight dtype after the VAE
    assert torch.isfinite(model_losses).all() and torch.isfinite(ref_losses).all()

    fixed = data_args(noise_pairs_path, "--pretrained_model_name_or_path", tiny_sdxl_path, "--use_lora",
                      "--pretrained_vae_model_name_or_path", f"{tiny_sdxl_path}/vae")
    assert sdxl.build_models(fixed, CPU, torch.bfloat16)[3].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny_turbo_path(tiny_sdxl_path, tmp_path_factory):
    """The tiny SDXL with SDXL-Turbo's scheduler: Euler ancestral, "trailing" timestep spacing."""
    from diffusers import EulerAncestralDiscreteScheduler

    path = tmp_path_factory.mktemp("tiny-turbo") / "model"
    shutil.copytree(tiny_sdxl_path, path)
    EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1,
                                    prediction_type="epsilon").save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return str(path)


def test_turbo_trains_on_the_models_few_step_schedule(tiny_turbo_path, tiny_sdxl_path, noise_pairs_path):
    args, batch, models, noise_scheduler = step_inputs(tiny_turbo_path, noise_pairs_path, "--use_lora", "--is_turbo")
    turbo_steps = [999, 749, 499, 249]  # SDXL-Turbo's 4 sampling steps ("trailing" spacing)
    assert noise_scheduler.training_timesteps.tolist() == turbo_steps
    drawn = sdxl.draw_timesteps([sdxl.pair_generator(0, 0, i) for i in range(200)], 1000,
                                noise_scheduler.training_timesteps)
    assert sorted(set(drawn.tolist())) == sorted(turbo_steps)
    recorder = Recorder()
    recorder.watch("unet", models[0])
    for step in range(3):
        sdxl.dpo_step_losses(args, batch, models, noise_scheduler, step, torch.float32)
    assert {t for (_, timesteps, _), _ in recorder.named("unet") for t in timesteps.tolist()} <= set(turbo_steps)
    # Another model's few-step schedule is its own: the tiny SDXL ships "leading" spacing with steps_offset 1.
    base_args = data_args(noise_pairs_path, "--pretrained_model_name_or_path", tiny_sdxl_path, "--is_turbo",
                          "--turbo_num_steps", "2")
    assert sdxl.few_step_timesteps(base_args).tolist() == [501, 1]


# ---------------------------------------------------------------------------------------------------------------
# Whole runs through accelerate launch
# ---------------------------------------------------------------------------------------------------------------
def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--checkpointing_steps", "2", "--lr_warmup_steps", "0", *extra]


@pytest.fixture(scope="module")
def non_square_data_path(tmp_path_factory):
    """Pick-a-Pic-layout parquet of non-square images (96x64, 64x80, ...) whose winner and loser sizes differ."""
    return make_preference_dataset(str(tmp_path_factory.mktemp("non-square")), num_pairs=16, num_ties=2,
                                   non_square=True)


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_path, non_square_data_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sdxl-lora-run")
    launched = launch(SCRIPT, run_args(tiny_sdxl_path, non_square_data_path, output_dir, "--use_lora",
                                       "--max_train_steps", "4", "--random_crop", "--num_validation_images", "1",
                                       "--validation_steps", "2", "--validation_num_inference_steps", "2",
                                       "--validation_prompts", "a red circle", "a blue square"),
                      env={"HF_TOKEN": "hf_SECRETtoken123"})  # the login a run may use: never written anywhere
    (output_dir.parent / f"{output_dir.name}.out").write_text(launched.stdout)  # what the user's terminal showed
    return output_dir


def test_a_launched_run_prints_no_dtype_or_watermarker_noise(lora_run):
    # What the user's terminal shows through `accelerate launch`: frozen models loaded in their dtype (no diffusers
    # "should be kept in float32" warning at each cast), no "add_watermarker" line at each SDXL validation.
    printed = (lora_run.parent / f"{lora_run.name}.out").read_text()
    assert "Validation at step 2" in printed  # the run's own log is there
    assert "should be kept in float32" not in printed and "add_watermarker" not in printed


@pytest.fixture(scope="module")
def full_run(tiny_sdxl_path, preference_data_path, tmp_path_factory):
    # In process (main() as a one-process launch runs it); the LoRA run above goes through accelerate launch
    output_dir = tmp_path_factory.mktemp("sdxl-full-run")
    run_in_process(sdxl, run_args(tiny_sdxl_path, preference_data_path, output_dir, "--max_train_steps", "4",
                                  "--learning_rate", "1e-4", "--num_validation_images", "1", "--validation_steps", "4",
                                  "--validation_num_inference_steps", "2", "--validation_prompts", "a green triangle"))
    return output_dir


def generate(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_lora_run_trains_and_loads_with_diffusers(lora_run, tiny_sdxl_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    weights = trained_weights(lora_run)
    assert weights and all_finite(weights)
    assert all(k.startswith("unet.") for k in weights)  # the UNet's adapters only
    lora_up = [t for k, t in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_up and all(t.abs().max() > 0 for t in lora_up)  # every up-projection left its zero init

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_path)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    base = generate(pipe, "a red circle")
    pipe.load_lora_weights(str(lora_run))
    tuned = generate(pipe, "a red circle")
    assert tuned.shape == (64, 64, 3) and np.isfinite(tuned).all()
    assert np.abs(tuned - base).max() > 0


def test_lora_run_writes_card_grid_checkpoints_and_no_token(lora_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(lora_run / "README.md")
    assert {"diffusion-dpo", "stable-diffusion-xl", "lora"} <= set(card.data.tags) and card.data.base_model is None
    assert card.data.license == "openrail++"
    assert "load_lora_weights" in card.text and "validation_grid.png" in card.text
    check_validation_grid(lora_run / "validation_grid.png", num_prompts=2)
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert summary(lora_run)["ties"] == 2
    saved_args = json.loads((lora_run / "training_args.json").read_text())["args"]
    assert "hub_token" not in saved_args and saved_args["resolution"] == 64 and saved_args["use_lora"]
    for path in lora_run.rglob("*"):
        if path.is_file():
            assert b"hf_SECRETtoken123" not in path.read_bytes(), path


def test_full_run_saves_an_sdxl_pipeline_diffusers_loads(full_run, tiny_sdxl_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import filter_repo_objects
    from safetensors.torch import load_file

    base = load_file(f"{tiny_sdxl_path}/unet/diffusion_pytorch_model.safetensors")
    tuned = trained_weights(full_run)
    assert all_finite(tuned)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > 0.9 * len(base)
    pipe = DiffusionPipeline.from_pretrained(str(full_run))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    image = pipe("a green triangle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    check_validation_grid(full_run / "validation_grid.png", num_prompts=1)
    assert "stable-diffusion-xl" in ModelCard.load(full_run / "README.md").data.tags

    allow, ignore = sdxl.hub_upload_patterns(argparse.Namespace(use_lora=False, save_unet_only=False))
    files = [str(p.relative_to(full_run)) for p in full_run.rglob("*") if p.is_file()]
    uploaded = list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert {"model_index.json", "README.md", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(uploaded)
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "logs", "validation/")) or "args" in f]


def resume_from(run, tmp_path, model, data, *extra):
    """Train steps 3-4 again from the run's own step-2 checkpoint, in a new folder; return (resumed weights,
    uninterrupted weights). One launch instead of two: the first half is the checkpoint the 4-step run wrote."""
    shutil.copytree(run / "checkpoint-2", tmp_path / "checkpoint-2")
    # in process: main() as a one-process launch runs it (the 4-step run it is compared with was launched)
    run_in_process(sdxl, run_args(model, data, tmp_path, *extra) + ["--max_train_steps", "4",
                                                                    "--resume_from_checkpoint", "latest"])
    assert (tmp_path / "checkpoint-4").is_dir()
    return trained_weights(tmp_path), trained_weights(run)


def test_lora_resume_equals_an_uninterrupted_run(lora_run, tiny_sdxl_path, non_square_data_path, tmp_path):
    # lora_run trained 4 steps in one go, with validation in between (which must not change training)
    resumed, uninterrupted = resume_from(lora_run, tmp_path, tiny_sdxl_path, non_square_data_path, "--use_lora",
                                         "--random_crop")
    assert max_abs_difference(resumed, uninterrupted) < 1e-6


def test_full_resume_equals_an_uninterrupted_run(full_run, tiny_sdxl_path, preference_data_path, tmp_path):
    resumed, uninterrupted = resume_from(full_run, tmp_path, tiny_sdxl_path, preference_data_path,
                                         "--learning_rate", "1e-4")
    assert max_abs_difference(resumed, uninterrupted) < 1e-6


# Slow: the DDP path is the SD script's, copied under the drift test (its 2-process test is in the default suite)
@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tiny_sdxl_path, non_square_data_path, tmp_path):
    # As in the SD test: a large Adam epsilon keeps Adam from magnifying float-summation noise in near-zero
    # gradients into lr-sized weight differences.
    common = ["--use_lora", "--max_train_steps", "3", "--checkpointing_steps", "100", "--adam_epsilon", "1e-4",
              "--random_crop"]
    launch(SCRIPT, run_args(tiny_sdxl_path, non_square_data_path, tmp_path / "one", *common))  # 1 process x 2 pairs
    launch(SCRIPT, run_args(tiny_sdxl_path, non_square_data_path, tmp_path / "two", *common, "--train_batch_size", "1"),
           num_processes=2)  # 2 processes x 1 pair
    assert logged_scalars(tmp_path / "one") == pytest.approx(logged_scalars(tmp_path / "two"), rel=1e-3)
    one, two = trained_weights(tmp_path / "one"), trained_weights(tmp_path / "two")
    # 1.4e-3 of the movement apart on torch 2.13's CPU kernels (a 2-process gradient is summed in another order)
    assert max_abs_difference(one, two) < 3e-3 * max_movement(one)


def test_turbo_sft_adafactor_checkpointing_fixed_vae_run(tiny_turbo_path, preference_data_path, tmp_path):
    """The other paths in one run: full fine-tune with the sft loss (validation then reloads the base UNet),
    few-step timesteps, Adafactor, gradient checkpointing, a separate fp16-safe VAE, chunked VAE encoding, and
    a NaN injected at step 2 that must be skipped."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from safetensors.torch import load_file

    fixed_vae = str(tmp_path / "fixed-vae")
    build_tiny_vae(seed=7, scaling_factor=0.13025).save_pretrained(fixed_vae)
    output_dir = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUSION_DPO_TEST_NAN_STEPS", "2")
        run_in_process(sdxl, run_args(tiny_turbo_path, preference_data_path, output_dir, "--max_train_steps", "3",
                                      "--learning_rate", "1e-4", "--loss_type", "sft", "--is_turbo",
                                      "--use_adafactor", "--gradient_checkpointing",
                                      "--pretrained_vae_model_name_or_path", fixed_vae, "--vae_encode_batch_size",
                                      "1", "--num_validation_images", "1", "--validation_num_inference_steps", "4",
                                      "--validation_guidance_scale", "0", "--validation_prompts", "a red circle"))
    assert summary(output_dir)["nonfinite_steps"] == 1
    base = load_file(f"{tiny_turbo_path}/unet/diffusion_pytorch_model.safetensors")
    tuned = trained_weights(output_dir)
    assert all_finite(tuned) and sum(not torch.equal(base[k], tuned[k]) for k in base) > 0.9 * len(base)
    # The saved pipeline carries the VAE the run used.
    saved_vae = AutoencoderKL.from_pretrained(output_dir / "vae").state_dict()
    expected_vae = AutoencoderKL.from_pretrained(fixed_vae).state_dict()
    assert all(torch.equal(saved_vae[k], expected_vae[k]) for k in expected_vae)
    check_validation_grid(output_dir / "validation_grid.png", num_prompts=1)
    assert "num_inference_steps=4" in (output_dir / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(output_dir))
    assert np.isfinite(generate(pipe, "a red circle")).all()


# ---------------------------------------------------------------------------------------------------------------
# The latent cache and streaming, as in the SD script
# ---------------------------------------------------------------------------------------------------------------
def test_cached_views_equal_what_training_would_draw(non_square_data_path, tiny_sdxl_path):
    from transformers import CLIPTokenizer

    args = sdxl.parse_args(["--pretrained_model_name_or_path", tiny_sdxl_path, "--train_data_dir",
                            non_square_data_path, "--resolution", "64"])
    dataset, columns, _ = sdxl.load_preference_dataset(args)
    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder=name)
                  for name in ("tokenizer", "tokenizer_2")]
    pairs = sdxl.PreferencePairDataset(dataset, columns, tokenizers, args)
    seen_flips = set()
    for row in range(6):
        winner, loser = pairs.decode_pair(dataset[row])
        views, extras = pairs.cache_views(winner, loser)
        for seed in range(4):
            pixels_w, pixels_l, time_ids = sdxl.preprocess_pair_with_time_ids(winner, loser, 64, False, True,
                                                                              random.Random(seed))
            flip = int(not torch.equal(pixels_w, views[0, 0]))
            seen_flips.add(flip)
            assert torch.equal(pixels_w, views[flip, 0]) and torch.equal(pixels_l, views[flip, 1])
            assert torch.equal(time_ids, extras["time_ids"][flip])
    assert seen_flips == {0, 1}


@pytest.mark.slow  # tests/test_cache.py runs the same comparison on SD in the default suite
def test_cached_run_trains_like_the_uncached_run(tiny_sdxl_path, non_square_data_path, tmp_path):
    common = ["--use_lora", "--max_train_steps", "3", "--checkpointing_steps", "100", "--adam_epsilon", "1e-4",
              "--latent_cache_dir", tmp_path / "cache", "--proportion_empty_prompts", "0.3"]
    for name, extra in (("uncached", []), ("cached", ["--cache_latents"]), ("reused", ["--cache_latents"])):
        launch(SCRIPT, run_args(tiny_sdxl_path, non_square_data_path, tmp_path / name, *common, *extra))
    assert logged_scalars(tmp_path / "cached") == pytest.approx(logged_scalars(tmp_path / "uncached"), rel=1e-3)
    cached, uncached = trained_weights(tmp_path / "cached"), trained_weights(tmp_path / "uncached")
    assert max_abs_difference(cached, uncached) < 1e-2 * max_movement(uncached)
    stats = json.loads((tmp_path / "reused" / "latent_cache_stats.json").read_text())
    assert stats["reused"] and stats["images_encoded"] == 0 and stats["prompts_encoded"] == 0
    assert max_abs_difference(trained_weights(tmp_path / "reused"), cached) == 0


@pytest.mark.slow
def test_streaming_run_trains(tiny_sdxl_path, non_square_data_path, tmp_path):
    launch(SCRIPT, run_args(tiny_sdxl_path, non_square_data_path, tmp_path, "--use_lora", "--streaming",
                            "--max_train_steps", "3", "--checkpointing_steps", "2"))
    assert json.loads((tmp_path / "checkpoint-2" / "run_state_0.json").read_text())["stream_state"] is not None
    assert max_movement(trained_weights(tmp_path)) > 0

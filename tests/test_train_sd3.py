"""train_diffusion_dpo_sd3.py: drift from the SD script, the Flow-DPO step, and whole runs on a tiny SD3.5."""

import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import test_train_sd
import train_diffusion_dpo as sd
import train_diffusion_dpo_sd3 as sd3
from fixtures.make_preference_data import make_preference_dataset
from fixtures.tiny_models import build_tiny_sd3
from flow_checks import (check_cached_run_trains_like_the_uncached_run, check_resume_equals_an_uninterrupted_run,
                         check_streaming_sft_adafactor_checkpointing_run, check_two_process_ddp_equals_one_process)
from launch_utils import (all_finite, check_validation_grid, launch, logged_scalars, max_abs_difference, summary,
                          trained_weights)
from launch_utils import run_in_process as run_script_in_process
from test_train_sdxl import Recorder, copied_pieces, unmarked_shared_definitions

SCRIPT = "train_diffusion_dpo_sd3.py"
CPU = SimpleNamespace(device=torch.device("cpu"))  # build_models asks the accelerator for its device only
RESOLUTION = 64


@pytest.fixture(scope="module")
def tiny_sd3_path(tmp_path_factory):
    """Folder of a tiny StableDiffusion3Pipeline (SD3.5-medium wiring: dual attention, RMS q/k norm; 64x64)."""
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    """Pick-a-Pic-layout parquet: 12 pairs, 2 ties, images of other sizes than the training resolution."""
    return make_preference_dataset(str(tmp_path_factory.mktemp("sd3-pairs")), num_pairs=12, num_ties=2,
                                   non_square=True)


# ---------------------------------------------------------------------------------------------------------------
# Drift from the SD script
# ---------------------------------------------------------------------------------------------------------------
# What SD3 defines under an SD-script name without a "Copied from" mark: three text encoders, the flow target, the
# float32 buffers and RMS norms of the reference copy, PEFT-format LoRA files, SD3's pipeline, card and upload list.
FAMILY_SPECIFIC = {
    "PreferencePairDataset", "PreferencePairDataset.__init__", "PreferencePairDataset.cache_views",
    "PreferencePairDataset.model_inputs", "PreferencePairDataset.prompt_truncated", "build_cache", "build_models",
    "build_parser", "build_pipeline", "cast_keeping_norms_in_float32", "collate_pairs", "dpo_step_losses",
    "generate_images", "hub_upload_patterns", "register_checkpoint_hooks", "safe_validation", "sampling_scheduler",
    "save_results", "validate_args", "write_model_card",
}


def test_copied_pieces_are_identical_to_the_sd_script():
    marked = copied_pieces(SCRIPT)
    for shared in ("diffusion_dpo_loss", "dpo_implicit_reward", "pair_generator", "preprocess_pair",
                   "load_pil_image", "save_checkpoint", "log_validation", "build_latent_cache", "StreamingPairDataset",
                   "main", "micro_batch_step", "optimizer_step", "after_step", "finish_run", "prepare_training"):
        assert shared in marked.values()


def test_every_function_both_scripts_define_is_copied_or_known_to_be_sd3_specific():
    unmarked_in_both, _ = unmarked_shared_definitions(SCRIPT)
    assert unmarked_in_both == FAMILY_SPECIFIC, (
        f"new unmarked: {sorted(unmarked_in_both - FAMILY_SPECIFIC)}; now marked or gone: "
        f"{sorted(FAMILY_SPECIFIC - unmarked_in_both)}")


# The SD flags SD3 has under another name or not at all (flow matching has no prediction type to choose)
RENAMED_FLAGS = {"save_unet_only": "save_transformer_only"}
ABSENT_FLAGS = {"prediction_type"}
OWN_DEFAULTS = {"resolution": 1024, "validation_guidance_scale": 7.0, "validation_num_inference_steps": 28,
                "output_dir": "diffusion-dpo-sd3", "tracker_project_name": "diffusion-dpo-sd3", "beta_dpo": 500.0,
                "lora_target_modules": sd3.DEFAULT_LORA_TARGETS}


def test_flags_have_the_sd_scripts_names_choices_and_meanings(capsys):
    sd_actions = {a.dest: a for a in sd.build_parser()._actions if a.dest not in ABSENT_FLAGS
                  and not a.dest.startswith("diffusers_")}  # diffusers' names: test_defaults_and_flags.py
    sd3_actions = {a.dest: a for a in sd3.build_parser()._actions}
    for dest, action in sd_actions.items():
        other = sd3_actions[RENAMED_FLAGS.get(dest, dest)]
        names = [name.replace(dest, RENAMED_FLAGS.get(dest, dest)) for name in action.option_strings]
        assert other.option_strings[:len(names)] == names, dest
        assert (other.type, other.choices, other.nargs) == (action.type, action.choices, action.nargs), dest
        assert other.default == OWN_DEFAULTS.get(dest, action.default), dest
    assert sd3_actions["lora_target_modules"].option_strings == ["--lora_target_modules", "--lora_layers"]
    assert sd3_actions["weighting_scheme"].choices == ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
    with pytest.raises(SystemExit):
        sd3.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in sd3.build_parser()._actions:
        if action.dest.startswith("diffusers_"):
            continue  # hidden: diffusers' flag names, each answered with ours
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert action.option_strings[0] in text
    for words in ("beta_dpo/2", "velocity", "--max_sequence_length", "--weighting_scheme", "C*H*W"):
        assert words in text, words


def data_args(data_dir, *extra):
    return sd3.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", str(data_dir), *extra])


SD_BAD_ARGUMENTS = [
    (extra, message)
    for extra, message in next(mark.args[1] for mark in test_train_sd.test_bad_arguments_get_a_clear_error.pytestmark
                               if mark.name == "parametrize")
    if not {flag.lstrip("-") for flag in extra} & ABSENT_FLAGS and "--resolution" not in extra
    and "--beta_dpo" not in extra
]
SD3_BAD_ARGUMENTS = [
    (["--resolution", "72"], "--resolution must be a positive multiple of 16"),
    (["--beta_dpo", "0"], "--beta_dpo must be a finite number > 0"),
    (["--max_sequence_length", "0"], "--max_sequence_length must be between 1 and 512"),
    (["--max_sequence_length", "600"], "--max_sequence_length must be between 1 and 512"),
    (["--logit_std", "0"], "--logit_std must be > 0"),
    (["--weighting_scheme", "sigmoid"], "invalid choice"),
]


@pytest.mark.parametrize("extra, message", SD_BAD_ARGUMENTS + SD3_BAD_ARGUMENTS)
def test_bad_arguments_get_a_clear_error(pairs_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        data_args(pairs_path, *extra)
    assert message in capsys.readouterr().err


def test_an_sd_or_sdxl_model_is_refused_with_a_pointer_to_its_script(tmp_path, pairs_path):
    from fixtures.tiny_models import build_tiny_sd

    base = build_tiny_sd(str(tmp_path / "sd"))
    args = data_args(pairs_path, "--pretrained_model_name_or_path", base)
    with pytest.raises(ValueError, match="StableDiffusionPipeline, not a Stable Diffusion 3 pipeline.*"
                                         "train_diffusion_dpo.py"):
        sd3.build_models(args, CPU, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Text: three encoders, as the pipeline encodes them
# ---------------------------------------------------------------------------------------------------------------
def test_encode_prompt_matches_the_sd3_pipeline_and_long_captions_are_counted(tiny_sd3_path, pairs_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    args = data_args(pairs_path, "--pretrained_model_name_or_path", tiny_sd3_path, "--max_sequence_length", "24")
    tokenizers = sd3.build_models(args, CPU, torch.float32)[1]
    captions = ["a red circle on a blue square", "", " ".join(["circle"] * 100)]
    input_ids = [torch.stack([sd3.tokenize_caption(t, c)[0] for c in captions]) for t in tokenizers]
    prompt_embeds, pooled = sd3.encode_prompt((pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3),
                                              input_ids)
    expected, _, expected_pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                                         do_classifier_free_guidance=False, max_sequence_length=24)
    assert prompt_embeds.shape == (3, 77 + 24, 96) and pooled.shape == (3, 64)
    assert torch.equal(prompt_embeds, expected) and torch.equal(pooled, expected_pooled)
    pairs = sd3.PreferencePairDataset(None, None, tokenizers, args)
    assert [pairs.prompt_truncated(c) for c in captions] == [False, False, True]
    # 30 words: within CLIP's 77 tokens, over T5's 24: counted as truncated all the same
    assert pairs.prompt_truncated(" ".join(["circle"] * 30))


# ---------------------------------------------------------------------------------------------------------------
# The Flow-DPO step
# ---------------------------------------------------------------------------------------------------------------
def step_inputs(model_path, data_path, *extra, weight_dtype=torch.float32, pairs=3):
    args = data_args(data_path, "--pretrained_model_name_or_path", model_path, "--resolution", str(RESOLUTION),
                     *extra)
    noise_scheduler, tokenizers, text_encoders, vae, transformer, ref = sd3.build_models(args, CPU, weight_dtype)
    dataset, columns, _ = sd3.load_preference_dataset(args)
    dataset_pairs = sd3.PreferencePairDataset(dataset, columns, tokenizers, args)
    batch = sd3.collate_pairs([dataset_pairs[i] for i in range(pairs)])
    return args, batch, (transformer, ref, vae, text_encoders), noise_scheduler


def test_the_step_regresses_the_velocity_with_one_sigma_and_one_noise_per_pair(tiny_sd3_path, pairs_path):
    args, batch, models, noise_scheduler = step_inputs(tiny_sd3_path, pairs_path)
    transformer, ref, vae, text_encoders = models
    recorder = Recorder()
    recorder.watch("policy", transformer)
    predictions = []
    transformer.register_forward_hook(lambda module, inputs, output: predictions.append(output[0].detach()))
    model_losses, ref_losses = sd3.dpo_step_losses(args, batch, models, noise_scheduler, 5, torch.float32)

    # The same draws, by hand: sigma first, then each image's posterior sample, then the pair's noise.
    generators = [sd3.pair_generator(args.seed, 5, int(i)) for i in batch["index"]]
    timesteps, sigmas = sd3.draw_flow_timesteps(generators, noise_scheduler, args)
    assert torch.allclose(timesteps, sigmas * 1000) and ((sigmas > 0) & (sigmas <= 1)).all()
    generators += [sd3.pair_generator(args.seed, 5, f"{int(i)}/l") for i in batch["index"]]
    with torch.no_grad():
        params = sd3.encode_posteriors(vae, torch.cat([batch["pixels_w"], batch["pixels_l"]]), 8)
    x0 = (sd3.sample_latents(params, generators, 1.0) - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators[:3]]).repeat(2, 1, 1, 1)
    sigma = sigmas.repeat(2).view(-1, 1, 1, 1)

    (_, kwargs), = recorder.named("policy")  # the policy (the reference is its own frozen copy)
    assert torch.equal(kwargs["timestep"], timesteps.repeat(2))
    assert torch.allclose(kwargs["hidden_states"], (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    expected = (predictions[0] - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(model_losses, expected, atol=1e-6)
    # model = reference: equal errors, so the loss is log 2 and there is no preference yet
    assert torch.equal(model_losses, ref_losses)
    loss, metrics = sd3.diffusion_dpo_loss(model_losses, ref_losses, args.beta_dpo)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["implicit_acc"].item() == 0.5


def test_sigma_weightings_scale_the_errors_of_the_same_draws(tiny_sd3_path, pairs_path):
    losses = {}
    for scheme in ("uniform", "sigma_sqrt", "cosmap"):  # all three draw u uniformly, so the sigmas are the same
        args, batch, models, noise_scheduler = step_inputs(tiny_sd3_path, pairs_path, "--use_lora",
                                                           "--weighting_scheme", scheme)
        losses[scheme] = sd3.dpo_step_losses(args, batch, models, noise_scheduler, 0, torch.float32)[0]
    _, sigmas = sd3.draw_flow_timesteps([sd3.pair_generator(0, 0, int(i)) for i in batch["index"]],
                                        noise_scheduler, args)
    sigmas = sigmas.repeat(2)
    assert torch.allclose(losses["sigma_sqrt"], losses["uniform"] / sigmas ** 2, rtol=1e-5)
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    assert torch.allclose(losses["cosmap"], losses["uniform"] * cosmap, rtol=1e-5)
    # logit_normal (the default) concentrates sigma around the middle; mode too, with its own density
    for scheme in ("logit_normal", "mode"):
        args.weighting_scheme = scheme
        drawn = sd3.draw_flow_timesteps([sd3.pair_generator(0, 0, i) for i in range(400)], noise_scheduler, args)[1]
        assert 0 < drawn.min() and drawn.max() <= 1 and 0.4 < drawn.median() < 0.9


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_one_in_bf16_has_no_preference(mode, tiny_sd3_path, pairs_path):
    # Before the reference copy kept SD3's RMS norms and positional-embedding buffer in float32, the full bf16 step
    # gave 0.672 instead of log 2 = 0.693 (the LoRA reference is the same module, so it always matched).
    args, batch, models, noise_scheduler = step_inputs(tiny_sd3_path, pairs_path,
                                                       *(["--use_lora"] if mode == "lora" else []),
                                                       weight_dtype=torch.bfloat16, pairs=4)
    transformer, ref, vae, text_encoders = models
    assert vae.dtype == text_encoders[2].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in transformer.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the policy's forward in
        model_losses, ref_losses = sd3.dpo_step_losses(args, batch, models, noise_scheduler, 0, torch.bfloat16)
    loss, _ = sd3.diffusion_dpo_loss(model_losses, ref_losses, args.beta_dpo)
    assert torch.equal(model_losses, ref_losses) and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    upcast = data_args(pairs_path, "--pretrained_model_name_or_path", tiny_sd3_path, "--use_lora", "--upcast_vae")
    assert sd3.build_models(upcast, CPU, torch.bfloat16)[3].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Whole runs: LoRA and full through accelerate launch, as users run them; the rest in process
# ---------------------------------------------------------------------------------------------------------------
def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", str(RESOLUTION), "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--checkpointing_steps", "2", "--lr_warmup_steps", "0", *extra]


def run_in_process(*flags):
    run_script_in_process(sd3, flags)


@pytest.fixture(scope="module")
def lora_run(tiny_sd3_path, pairs_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sd3-lora-run")
    launch(SCRIPT, run_args(tiny_sd3_path, pairs_path, output_dir, "--use_lora", "--max_train_steps", "4",
                            "--random_crop", "--num_validation_images", "1", "--validation_steps", "2",
                            "--validation_num_inference_steps", "2", "--validation_prompts", "a red circle",
                            "a blue square"),
           env={"HF_TOKEN": "hf_SECRETtoken123"})  # the login a run may use: never written anywhere
    return output_dir


@pytest.fixture(scope="module")
def full_run(tiny_sd3_path, pairs_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sd3-full-run")
    launch(SCRIPT, run_args(tiny_sd3_path, pairs_path, output_dir, "--max_train_steps", "4", "--learning_rate",
                            "1e-4", "--num_validation_images", "1", "--validation_steps", "4",
                            "--validation_num_inference_steps", "2", "--validation_prompts", "a green triangle",
                            "--mixed_precision", "bf16"))
    return output_dir


def generate(pipe, prompt="a red circle"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                height=RESOLUTION, width=RESOLUTION).images[0]


def lora_modules(transformer):
    return {name for name, module in transformer.named_modules() if isinstance(getattr(module, "scaling", None), dict)}


def test_lora_result_and_its_checkpoints_load_in_stock_diffusers_with_every_adapter(lora_run, tiny_sd3_path):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    weights = trained_weights(lora_run)
    assert weights and all_finite(weights) and all(k.startswith("transformer.") for k in weights)
    # Every up-projection left its zero init, but one: the last block's text-stream query, which only makes text
    # outputs that the last block (context_pre_only) discards, so it never gets a gradient.
    still_zero = {k for k, t in weights.items() if "lora_B" in k and t.abs().max() == 0}
    assert still_zero == {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"}

    pipe = DiffusionPipeline.from_pretrained(tiny_sd3_path)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    base = generate(pipe)
    targets = {name for name, _ in pipe.transformer.named_modules()
               if any(name.endswith("." + t) for t in sd3.DEFAULT_LORA_TARGETS.split(","))}
    for source in (lora_run, lora_run / "checkpoint-4"):
        pipe.load_lora_weights(str(source))
        # Every targeted projection, image and text stream alike, got its adapter: a file in the SD scripts'
        # converted key format loses the image stream's (to_q/k/v/out) here without an error.
        assert lora_modules(pipe.transformer) == targets
        tuned = generate(pipe)
        assert tuned.shape == (64, 64, 3) and np.isfinite(tuned).all() and np.abs(tuned - base).max() > 0
        pipe.unload_lora_weights()
    assert max_abs_difference(trained_weights(lora_run / "checkpoint-4"), weights) == 0


def test_lora_run_writes_card_grid_checkpoints_and_no_token(lora_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(lora_run / "README.md")
    assert {"diffusion-dpo", "flow-dpo", "sd3", "lora"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.license == "other" and card.data.license_name
    assert "StableDiffusion3Pipeline" in card.text and "load_lora_weights" in card.text
    assert "max_sequence_length=77" in card.text  # the T5 length it was trained with, not the pipeline's 256
    check_validation_grid(lora_run / "validation_grid.png", num_prompts=2)
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert summary(lora_run)["ties"] == 2
    saved_args = json.loads((lora_run / "training_args.json").read_text())["args"]
    assert "hub_token" not in saved_args and saved_args["beta_dpo"] == 500.0
    for path in lora_run.rglob("*"):
        if path.is_file():
            assert b"hf_SECRETtoken123" not in path.read_bytes(), path


def test_full_bf16_run_saves_an_sd3_pipeline_with_the_base_frozen_parts(full_run, tiny_sd3_path):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    from huggingface_hub.utils import filter_repo_objects
    from safetensors.torch import load_file

    base = load_file(f"{tiny_sd3_path}/transformer/diffusion_pytorch_model.safetensors")
    tuned = trained_weights(full_run)
    assert all_finite(tuned) and sum(not torch.equal(base[k], tuned[k]) for k in base) > 0.9 * len(base)
    assert logged_scalars(full_run, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)  # bf16 step 1
    pipe = DiffusionPipeline.from_pretrained(str(full_run))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert np.isfinite(generate(pipe, "a green triangle")).all()
    # The frozen parts are the base's as stored, not the bf16 copies training used
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        saved = dict(getattr(pipe, part).state_dict())
        stored = dict(getattr(StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path), part).state_dict())
        assert all(torch.equal(saved[k], stored[k]) and saved[k].dtype == stored[k].dtype for k in stored), part
    check_validation_grid(full_run / "validation_grid.png", num_prompts=1)

    allow, ignore = sd3.hub_upload_patterns(argparse.Namespace(use_lora=False, save_transformer_only=False))
    files = [str(p.relative_to(full_run)) for p in full_run.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert {"model_index.json", "README.md", "text_encoder_3/model.safetensors", "tokenizer_3/tokenizer.json",
            "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= uploaded
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "logs", "validation/")) or "args" in f]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_an_uninterrupted_run(mode, lora_run, full_run, tiny_sd3_path, pairs_path, tmp_path):
    run, extra = {"lora": (lora_run, ["--use_lora", "--random_crop"]),
                  "full": (full_run, ["--learning_rate", "1e-4", "--mixed_precision", "bf16"])}[mode]
    check_resume_equals_an_uninterrupted_run(sd3, run_args, tiny_sd3_path, pairs_path, run, extra, tmp_path)


def test_two_process_ddp_equals_one_process(tiny_sd3_path, pairs_path, tmp_path):
    check_two_process_ddp_equals_one_process(sd3, run_args, tiny_sd3_path, pairs_path, tmp_path)


def test_cached_run_trains_like_the_uncached_run_and_reuses_its_cache(tiny_sd3_path, pairs_path, tmp_path):
    check_cached_run_trains_like_the_uncached_run(sd3, run_args, tiny_sd3_path, pairs_path, tmp_path,
                                                  {"prompt_embeds": (154, 96), "pooled_prompt_embeds": (64,)})


def test_streaming_sft_adafactor_checkpointing_run(tiny_sd3_path, pairs_path, tmp_path):
    check_streaming_sft_adafactor_checkpointing_run(sd3, run_args, tiny_sd3_path, pairs_path, tmp_path,
                                                    "SD3Transformer2DModel")


def test_sigma_sqrt_weights_stay_finite_in_fp16(tiny_sd3_path, pairs_path):
    # sigma_sqrt weights an error by sigma^-2: for SD3's smallest sigmas (~0.003) that is ~1e5, past fp16's 65504.
    # The weighting is taken from the float32 sigmas; before, it was computed in fp16 and the loss came out inf.
    args, batch, models, noise_scheduler = step_inputs(tiny_sd3_path, pairs_path, "--use_lora", "--weighting_scheme",
                                                       "sigma_sqrt", weight_dtype=torch.float16, pairs=1)
    step = next(step for step in range(100000) if flux_or_sd3_sigma(args, noise_scheduler, step) < 0.0039)
    with torch.autocast("cpu", dtype=torch.float16):
        model_losses, ref_losses = sd3.dpo_step_losses(args, batch, models, noise_scheduler, step, torch.float16)
    assert torch.isfinite(model_losses).all() and torch.isfinite(ref_losses).all()


def flux_or_sd3_sigma(args, noise_scheduler, step, *image_seq_len):
    """The sigma pair 0 draws at `step` (SD3's draw; FLUX's takes the packed image length too)."""
    script = sd3 if not image_seq_len else __import__("train_diffusion_dpo_flux")
    return script.draw_flow_timesteps([script.pair_generator(args.seed, step, 0)], noise_scheduler, args,
                                      *image_seq_len)[1].item()


def test_the_latent_cache_key_follows_the_t5_length_and_the_vae_dtype(tiny_sd3_path, pairs_path):
    # The cached text arrays are --max_sequence_length long and the posteriors come from the VAE in its dtype: a run
    # that changes either must not reuse another's cache (before, both were missing from the key)
    keys = set()
    for extra, dtype in (([], torch.float32), (["--max_sequence_length", "32"], torch.float32),
                         (["--upcast_vae"], torch.bfloat16), ([], torch.bfloat16)):
        args = data_args(pairs_path, "--pretrained_model_name_or_path", tiny_sd3_path, *extra)
        _, _, text_encoders, vae, _, _ = sd3.build_models(args, CPU, dtype)
        dataset, columns, _ = sd3.load_preference_dataset(args)
        keys.add(sd3.latent_cache_path(args, dataset, columns, vae, text_encoders, np.float32))
    assert len(keys) == 4

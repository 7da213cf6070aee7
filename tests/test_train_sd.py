"""train_diffusion_dpo.py: the loss, the data path, and whole runs through `accelerate launch` on a tiny SD."""

import argparse
import logging
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import train_diffusion_dpo as sd
from launch_utils import (all_finite, check_validation_grid, launch, logged_scalars, max_abs_difference, max_movement,
                          run_in_process, summary, trained_weights)
from fixtures.make_preference_data import make_preference_dataset

SCRIPT = "train_diffusion_dpo.py"


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------
def errors(winner, loser):
    return torch.tensor([winner, loser], dtype=torch.float32)


def test_sigmoid_loss_matches_hand_computation():
    model, ref = errors(0.30, 0.50), errors(0.40, 0.45)
    beta = 10.0
    inside = -(beta / 2) * ((0.30 - 0.50) - (0.40 - 0.45))  # = 0.75
    loss, metrics = sd.diffusion_dpo_loss(model, ref, beta, "sigmoid")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-inside)), rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx(inside, rel=1e-5)
    assert metrics["implicit_acc"].item() == 1.0
    assert metrics["model_mse_w"].item() == pytest.approx(0.30)
    assert metrics["ref_mse_l"].item() == pytest.approx(0.45)


def test_hinge_ipo_and_sft_match_hand_computation():
    model, ref = errors(0.30, 0.50), errors(0.40, 0.45)
    beta = 10.0
    logits = -0.5 * ((0.30 - 0.50) - (0.40 - 0.45))  # 0.075
    hinge, _ = sd.diffusion_dpo_loss(model, ref, beta, "hinge")
    assert hinge.item() == pytest.approx(max(0.0, 1 - beta * logits), rel=1e-5)
    ipo, _ = sd.diffusion_dpo_loss(model, ref, beta, "ipo")
    assert ipo.item() == pytest.approx((logits - 1 / (2 * beta)) ** 2, rel=1e-5)
    sft, metrics = sd.diffusion_dpo_loss(torch.tensor([0.2, 0.4]), None, beta, "sft")
    assert sft.item() == pytest.approx(0.3)
    assert metrics["model_mse_w"].item() == pytest.approx(0.3)


def test_batch_loss_is_the_mean_over_pairs():
    model = torch.tensor([0.1, 0.2, 0.3, 0.1])  # winners [0.1, 0.2], losers [0.3, 0.1]
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2])
    loss, metrics = sd.diffusion_dpo_loss(model, ref, 2.0)
    insides = [-(0.1 - 0.3), -(0.2 - 0.1)]  # beta/2 = 1
    assert loss.item() == pytest.approx(np.mean([math.log1p(math.exp(-x)) for x in insides]), rel=1e-5)
    assert metrics["implicit_acc"].item() == 0.5


def test_lowering_the_winner_error_relative_to_reference_lowers_the_loss():
    ref = errors(0.4, 0.4)
    worse, _ = sd.diffusion_dpo_loss(errors(0.41, 0.4), ref, 100.0)
    same, _ = sd.diffusion_dpo_loss(errors(0.40, 0.4), ref, 100.0)
    better, _ = sd.diffusion_dpo_loss(errors(0.39, 0.4), ref, 100.0)
    assert better < same < worse
    # and the gradient pushes the winner's error down and the loser's up
    model = errors(0.4, 0.4).requires_grad_(True)
    loss, _ = sd.diffusion_dpo_loss(model, ref, 100.0)
    loss.backward()
    assert model.grad[0] > 0 > model.grad[1]


def test_beta_to_zero_gives_log_two():
    loss, _ = sd.diffusion_dpo_loss(errors(0.1, 0.9), errors(0.9, 0.1), 1e-9)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_implicit_accuracy_on_obvious_cases():
    ref = torch.full((6,), 0.5)
    prefers_winners = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])
    prefers_losers = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    assert sd.diffusion_dpo_loss(prefers_winners, ref, 1.0)[1]["implicit_acc"].item() == 1.0
    assert sd.diffusion_dpo_loss(prefers_losers, ref, 1.0)[1]["implicit_acc"].item() == 0.0
    # the reference itself has no preference beyond the reference: inside == 0 is a tie, counted half (as
    # tools/evaluate.py counts it, through the same pair_implicit_accuracy)
    assert sd.diffusion_dpo_loss(ref, ref, 1.0)[1]["implicit_acc"].item() == 0.5
    half_tied = torch.tensor([0.1, 0.5, 0.9, 0.5])  # pair 1 prefers the winner, pair 2 ties
    assert sd.diffusion_dpo_loss(half_tied, torch.full((4,), 0.5), 1.0)[1]["implicit_acc"].item() == 0.75


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, sft"):
        sd.diffusion_dpo_loss(errors(0.1, 0.2), errors(0.1, 0.2), 1.0, "kto")
    with pytest.raises(ValueError, match="reference"):
        sd.diffusion_dpo_loss(errors(0.1, 0.2), None, 1.0, "sigmoid")


def test_lora_reference_context_reenables_adapters_on_error(tiny_sd_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights="gaussian"))
    with pytest.raises(RuntimeError):
        with sd.lora_adapters_disabled(unet):
            raise RuntimeError("reference pass failed")
    lora_layer = next(m for m in unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
    assert not lora_layer.disable_adapters


def test_pair_noise_depends_on_seed_step_and_pair_only():
    first = torch.randn(4, generator=sd.pair_generator(0, 3, 7))
    assert torch.equal(first, torch.randn(4, generator=sd.pair_generator(0, 3, 7)))
    assert not torch.equal(first, torch.randn(4, generator=sd.pair_generator(0, 4, 7)))
    assert not torch.equal(first, torch.randn(4, generator=sd.pair_generator(0, 3, 8)))
    assert not torch.equal(first, torch.randn(4, generator=sd.pair_generator(1, 3, 7)))


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def data_args(data_dir, *extra):
    return sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", str(data_dir), *extra])


def test_ties_are_dropped_and_counted(preference_data_path):
    dataset, _, counts = sd.load_preference_dataset(data_args(preference_data_path))
    assert counts == {"rows": 36, "ties": 4, "invalid_labels": 0, "bad_caption": 0, "pairs": 32}
    assert len(dataset) == 32
    labels = set(zip(dataset["label_0"], dataset["label_1"]))
    assert labels <= {(1.0, 0.0), (0.0, 1.0)}


def test_winner_is_the_image_labelled_one(tmp_path, tiny_sd_path):
    from transformers import CLIPTokenizer

    path = make_preference_dataset(str(tmp_path / "data"), num_pairs=8, num_ties=0)
    args = data_args(path, "--proportion_empty_prompts", "0", "--no_hflip", "--resolution", "64")
    dataset, columns, _ = sd.load_preference_dataset(args)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    pairs = sd.PreferencePairDataset(dataset, columns, tokenizer, args)
    for index in range(len(dataset)):
        row = dataset[index]
        winner_bytes = row["jpg_0"] if row["label_0"] == 1.0 else row["jpg_1"]
        expected = sd.preprocess_pair(sd.load_pil_image(winner_bytes), sd.load_pil_image(winner_bytes), 64, False,
                                      False, random.Random(0))[0]
        assert torch.equal(pairs[index]["pixels_w"], expected)


def test_chosen_rejected_layout_and_renamed_columns(tmp_path):
    path = make_preference_dataset(str(tmp_path / "cr"), num_pairs=6, layout="chosen_rejected")
    args = data_args(path, "--caption_column", "prompt", "--chosen_column", "chosen", "--rejected_column", "rejected")
    dataset, columns, counts = sd.load_preference_dataset(args)
    assert counts["pairs"] == 6 and counts["ties"] == 0
    assert columns == {"caption": "prompt", "winner": "chosen", "loser": "rejected"}


def test_missing_column_error_lists_the_dataset_columns(preference_data_path):
    with pytest.raises(ValueError) as error:
        sd.load_preference_dataset(data_args(preference_data_path, "--caption_column", "prompt"))
    message = str(error.value)
    assert "['prompt']" in message and "jpg_0" in message and "--caption_column" in message


def test_dataset_with_only_ties_is_a_clear_error(tmp_path):
    path = make_preference_dataset(str(tmp_path / "ties"), num_pairs=0, num_ties=5)
    with pytest.raises(ValueError, match="no usable preference pairs.*5 ties"):
        sd.load_preference_dataset(data_args(path))


def test_undecodable_rows_are_skipped_and_reported(tmp_path, tiny_sd_path):
    from transformers import CLIPTokenizer

    path = make_preference_dataset(str(tmp_path / "bad"), num_pairs=4, num_ties=0, num_undecodable=2)
    args = data_args(path, "--resolution", "64")
    dataset, columns, _ = sd.load_preference_dataset(args)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    pairs = sd.PreferencePairDataset(dataset, columns, tokenizer, args)
    batch = sd.collate_pairs([pairs[i] for i in range(len(pairs))])
    assert len(set(batch["skipped"])) == 2
    assert batch["pixels_w"].shape == (6, 3, 64, 64)


def asymmetric_image(size=(96, 64), color=(200, 30, 30)):
    image = Image.new("RGB", size, (20, 20, 20))
    # a block left of centre in the top half: every crop sees it, and a flip moves it to the right
    image.paste(color, (size[0] // 4, 0, size[0] // 2 - 4, size[1] // 2))
    return image


def test_winner_and_loser_get_the_same_crop_and_flip():
    winner = asymmetric_image(color=(200, 30, 30))
    loser = asymmetric_image(color=(30, 200, 30))
    block_sides = set()
    for seed in range(20):
        for random_crop in (True, False):
            pixels_w, pixels_l, _, _ = sd.preprocess_pair(winner, loser, 48, random_crop, True, random.Random(seed))
            # The block sits in the same place in both: where the winner is red, the loser is green.
            mask_w = pixels_w[0] > 0.5
            mask_l = pixels_l[1] > 0.5
            assert torch.equal(mask_w, mask_l) and mask_w.any()
            if not random_crop:
                columns = torch.nonzero(mask_w)[:, 1].float()
                block_sides.add("right" if columns.mean() > 24 else "left")
    assert block_sides == {"left", "right"}  # some pairs flipped, some not


def test_loser_of_another_size_is_brought_to_the_winners_size():
    winner = asymmetric_image((96, 64))
    loser = asymmetric_image((48, 32))
    pixels_w, pixels_l, original_size, crop = sd.preprocess_pair(winner, loser, 32, False, False, random.Random(0))
    assert pixels_w.shape == pixels_l.shape == (3, 32, 32)
    assert original_size == (64, 96) and crop == (0, 8)
    assert (pixels_w - pixels_l).abs().mean() < 0.1


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any model is loaded
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--beta_dpo", "0"], "--beta_dpo must be a finite number > 0"),
    (["--beta_dpo", "-5"], "--beta_dpo must be a finite number > 0"),
    (["--resolution", "100"], "multiple of 8"),
    (["--loss_type", "kto"], "invalid choice: 'kto'"),
    (["--lr_scheduler", "warmup_stable"], "invalid choice: 'warmup_stable'"),
    (["--prediction_type", "sample"], "invalid choice: 'sample'"),
    (["--use_8bit_adam", "--use_adafactor"], "Choose one optimizer"),
    (["--chosen_column", "chosen"], "go together"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "does not exist"),
])
def test_bad_arguments_get_a_clear_error(preference_data_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        data_args(preference_data_path, *extra)
    assert message in capsys.readouterr().err


def test_no_dataset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        sd.parse_args(["--pretrained_model_name_or_path", "unused"])
    assert "No dataset given" in capsys.readouterr().err


def test_unwritable_output_dir_is_a_clear_error(preference_data_path, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")  # pragma: no cover
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
        data_args(preference_data_path, "--output_dir", str(read_only / "out"))
    assert "not writable" in capsys.readouterr().err


def test_xformers_without_cuda_is_a_clear_error(tiny_sd_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        sd.enable_xformers(None)


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        sd.parse_args(["--help"])
    text = capsys.readouterr().out
    parser = sd.build_parser()
    for action in parser._actions:
        if action.dest.startswith("diffusers_"):
            continue  # hidden: diffusers' flag names, each answered with ours (test_defaults_and_flags.py)
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert action.option_strings[0] in text
    assert "beta_dpo/2" in text


# ---------------------------------------------------------------------------------------------------------------
# Whole runs through accelerate launch
# ---------------------------------------------------------------------------------------------------------------
def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--checkpointing_steps", "2", "--lr_warmup_steps", "0", *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_sd_path, preference_data_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lora-run")
    launch(SCRIPT, run_args(tiny_sd_path, preference_data_path, output_dir, "--use_lora", "--max_train_steps", "4",
                            "--rank", "4", "--lora_alpha", "8",
                            "--num_validation_images", "1", "--validation_steps", "2",
                            "--validation_num_inference_steps", "2", "--validation_prompts", "a red circle",
                            "a blue square"),
           env={"HF_TOKEN": "hf_SECRETtoken123"})  # the login a run may use: never written anywhere
    return output_dir


@pytest.fixture(scope="module")
def full_run(tiny_sd_path, preference_data_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("full-run")
    launch(SCRIPT, run_args(tiny_sd_path, preference_data_path, output_dir, "--max_train_steps", "4",
                            "--learning_rate", "1e-4", "--num_validation_images", "1", "--validation_steps", "4",
                            "--validation_num_inference_steps", "2", "--validation_prompts", "a green triangle"))
    return output_dir


def test_lora_run_trains_and_loads_with_diffusers(lora_run, tiny_sd_path):
    from diffusers import DiffusionPipeline

    weights = trained_weights(lora_run)
    assert weights and all_finite(weights)
    # gaussian init starts lora_B at zero: every B matrix must have moved
    lora_b = [t for k, t in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)

    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    generator = torch.Generator().manual_seed(0)
    base = pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images[0]
    pipe.load_lora_weights(str(lora_run))
    # alpha 8 at rank 4 travels with the weights: the loaded adapter scales by alpha / rank = 2
    scalings = {v for m in pipe.unet.modules() if isinstance(getattr(m, "scaling", None), dict)
                for v in m.scaling.values()}
    assert scalings == {2.0}
    generator = torch.Generator().manual_seed(0)
    tuned = pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images[0]
    assert tuned.shape == (64, 64, 3) and np.isfinite(tuned).all()
    assert np.abs(tuned - base).max() > 0


def test_lora_run_writes_card_grid_checkpoints_and_no_token(lora_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(lora_run / "README.md")
    assert "diffusion-dpo" in card.data.tags and card.data.base_model is None  # a local base is no hub id
    assert card.data.license == "creativeml-openrail-m"  # SD1.5's, where the base's own card does not say
    assert "load_lora_weights" in card.text and "validation_grid.png" in card.text
    check_validation_grid(lora_run / "validation_grid.png", num_prompts=2)  # base | trained, a row per prompt
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert summary(lora_run)["ties"] == 4
    for path in lora_run.rglob("*"):
        if path.is_file():
            assert b"hf_SECRETtoken123" not in path.read_bytes(), path


def test_hub_push_selects_final_artifacts_only(lora_run, full_run):
    from huggingface_hub.utils import filter_repo_objects

    for run, use_lora in ((lora_run, True), (full_run, False)):
        args = argparse.Namespace(use_lora=use_lora, save_unet_only=False)
        allow, ignore = sd.hub_upload_patterns(args)
        files = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()]
        uploaded = list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
        assert "README.md" in uploaded and "validation_grid.png" in uploaded
        assert not [f for f in uploaded if f.startswith(("checkpoint-", "logs", "validation/")) or "args" in f]
        if use_lora:
            assert "pytorch_lora_weights.safetensors" in uploaded
        else:
            assert "unet/diffusion_pytorch_model.safetensors" in uploaded and "model_index.json" in uploaded


def test_full_run_saves_a_pipeline_diffusers_loads(full_run, tiny_sd_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    base = load_file(f"{tiny_sd_path}/unet/diffusion_pytorch_model.safetensors")
    tuned = trained_weights(full_run)
    assert all_finite(tuned)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > 0.9 * len(base)
    pipe = DiffusionPipeline.from_pretrained(str(full_run))
    image = pipe("a green triangle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    check_validation_grid(full_run / "validation_grid.png", num_prompts=1)


def test_lora_resume_equals_an_uninterrupted_run(lora_run, tiny_sd_path, preference_data_path, tmp_path, caplog):
    # lora_run trained 4 steps in one go, launched (with validation in between, which must not change training); the
    # two halves here run in process, main() as a one-process launch runs it
    half = run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora", "--rank", "4", "--lora_alpha", "8")
    run_in_process(sd, half + ["--max_train_steps", "2"])
    with caplog.at_level(logging.INFO):
        run_in_process(sd, half + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in caplog.text
    assert max_abs_difference(trained_weights(tmp_path), trained_weights(lora_run)) < 1e-6


def test_full_resume_equals_an_uninterrupted_run(full_run, tiny_sd_path, preference_data_path, tmp_path):
    # Steps 3-4 again from the 4-step run's own step-2 checkpoint (the LoRA test above runs a real 2-step first half)
    import shutil

    shutil.copytree(full_run / "checkpoint-2", tmp_path / "checkpoint-2")
    half = run_args(tiny_sd_path, preference_data_path, tmp_path, "--learning_rate", "1e-4")
    run_in_process(sd, half + ["--max_train_steps", "4", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")])
    assert max_abs_difference(trained_weights(tmp_path), trained_weights(full_run)) < 1e-6


# Slow: the SD3 script's test shows 2-process DDP equal to 1 process through the same copied loop in the default
# suite, and the SD script's own 2-process runs are there too (test_configs.py, test_reliability_two.py).
@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tiny_sd_path, preference_data_path, tmp_path):
    # A large Adam epsilon keeps Adam from magnifying float-summation noise in near-zero gradients into
    # lr-sized weight differences (its first step is lr * sign(g) otherwise).
    common = ["--use_lora", "--max_train_steps", "3", "--checkpointing_steps", "100", "--adam_epsilon", "1e-4"]
    one = run_args(tiny_sd_path, preference_data_path, tmp_path / "one", *common)
    run_in_process(sd, one)  # 1 process x 2 pairs (main() as a one-process launch runs it)
    two = run_args(tiny_sd_path, preference_data_path, tmp_path / "two", *common) + ["--train_batch_size", "1"]
    launch(SCRIPT, two, num_processes=2)  # 2 processes x 1 pair
    # Same pairs, noise and timesteps: the same losses and weights up to float32 summation order (which
    # beta_dpo = 5000 magnifies: a 1e-7 relative change in an error moves the loss by ~1e-4).
    assert logged_scalars(tmp_path / "one") == pytest.approx(logged_scalars(tmp_path / "two"), rel=1e-3)
    one, two = trained_weights(tmp_path / "one"), trained_weights(tmp_path / "two")
    print("max difference", max_abs_difference(one, two), "movement", max_movement(one))
    assert max_abs_difference(one, two) < 1e-2 * max_movement(one)


@pytest.mark.slow
def test_batch_equals_gradient_accumulation(tiny_sd_path, preference_data_path, tmp_path):
    # A large Adam epsilon, as in the DDP test: Adam magnifies float-summation noise in near-zero gradients into
    # lr-sized weight differences (with the default 1e-8 the two differed by 1.9e-4).
    common = ["--use_lora", "--max_train_steps", "2", "--checkpointing_steps", "100", "--max_grad_norm", "1e9",
              "--adam_epsilon", "1e-4"]
    launch(SCRIPT, run_args(tiny_sd_path, preference_data_path, tmp_path / "batch", *common,
                            "--train_batch_size", "4"))
    launch(SCRIPT, run_args(tiny_sd_path, preference_data_path, tmp_path / "accum", *common,
                            "--train_batch_size", "1", "--gradient_accumulation_steps", "4"))
    assert max_abs_difference(trained_weights(tmp_path / "batch"), trained_weights(tmp_path / "accum")) < 1e-4


# Slow: repeats of what the default suite covers (v-prediction runs in test_users_path.py; each loss type's math above)
@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "sft"])
def test_other_loss_types_train_v_prediction(loss_type, tiny_sd_vpred_path, preference_data_path, tmp_path):
    launch(SCRIPT, run_args(tiny_sd_vpred_path, preference_data_path, tmp_path, "--use_lora", "--loss_type",
                            loss_type, "--max_train_steps", "2", "--beta_dpo", "50"))
    weights = trained_weights(tmp_path)
    assert all_finite(weights) and max_movement(weights) > 0


def test_injected_nan_skips_exactly_that_step(lora_run, tiny_sd_path, preference_data_path, tmp_path):
    # Step 3 of 3 is poisoned: the result must equal a clean 2-step run (constant learning rate), and no checkpoint
    # is written at a non-finite step.
    from safetensors.torch import load_file

    args = run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora", "--max_train_steps", "3",
                    "--checkpointing_steps", "3", "--rank", "4", "--lora_alpha", "8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUSION_DPO_TEST_NAN_STEPS", "3")
        run_in_process(sd, args)
    assert summary(tmp_path)["nonfinite_steps"] == 1
    assert not (tmp_path / "checkpoint-3").exists()
    two_clean_steps = load_file(lora_run / "checkpoint-2" / sd.LORA_WEIGHTS_NAME)
    assert max_abs_difference(trained_weights(tmp_path), two_clean_steps) < 1e-6


def test_repeated_nans_stop_the_run_with_a_message(tiny_sd_path, preference_data_path, tmp_path):
    args = run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora", "--max_train_steps", "8",
                    "--max_nonfinite_steps", "2", "--checkpointing_steps", "1")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError) as stopped:
        patch.setenv("DIFFUSION_DPO_TEST_NAN_STEPS", "2,3,4,5,6")
        run_in_process(sd, args)
    assert "in a row had a NaN/Inf loss" in str(stopped.value) and "fp16 VAE" in str(stopped.value)
    # the checkpoints written before and during the NaN streak hold finite weights
    from safetensors.torch import load_file

    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert all_finite(load_file(checkpoint / sd.CHECKPOINT_LORA_NAME))


@pytest.mark.parametrize("extra", [
    pytest.param(["--use_lora", "--use_adafactor", "--gradient_checkpointing"], id="lora-adafactor-checkpointing"),
    pytest.param(["--use_8bit_adam", "--dataloader_num_workers", "1"], id="full-8bit-adam-workers",
                 marks=pytest.mark.slow),
])
def test_bf16_runs_with_each_optimizer(extra, tiny_sd_path, preference_data_path, tmp_path):
    # bf16 autocast runs on CPU: frozen models in bf16, trained parameters kept in float32, validation in autocast
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path, "--mixed_precision", "bf16",
                            "--max_train_steps", "2", "--num_validation_images", "1", "--validation_steps", "2",
                            "--validation_num_inference_steps", "2", "--validation_prompts", "a red circle", *extra))
    weights = trained_weights(tmp_path)
    assert all_finite(weights)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert (tmp_path / "validation_grid.png").exists()

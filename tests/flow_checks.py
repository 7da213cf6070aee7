"""What the SD3 and FLUX scripts share, checked once: whole runs through their copied stages (resume, 2-process DDP,
the cache, a stream with the sft loss), called by tests/test_train_sd3.py and tests/test_train_flux.py with their own
script, base model and run flags."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launch_utils import (all_finite, check_validation_grid, launch, logged_scalars, max_abs_difference, max_movement,
                          run_in_process, summary, trained_weights)


def check_resume_equals_an_uninterrupted_run(script, run_args, base, data, run, extra, tmp_path):
    """Steps 3-4 again from a 4-step run's own step-2 checkpoint, in process, in a new folder."""
    shutil.copytree(run / "checkpoint-2", tmp_path / "checkpoint-2")
    run_in_process(script, run_args(base, data, tmp_path, *extra, "--max_train_steps", "4",
                                    "--resume_from_checkpoint", "latest"))
    assert (tmp_path / "checkpoint-4").is_dir()
    assert max_abs_difference(trained_weights(tmp_path), trained_weights(run)) < 1e-6


def check_two_process_ddp_equals_one_process(script, run_args, base, data, tmp_path):
    # As in the SD test: a large Adam epsilon keeps Adam from magnifying float-summation noise in near-zero
    # gradients into lr-sized weight differences.
    common = ["--use_lora", "--max_train_steps", "2", "--checkpointing_steps", "100", "--adam_epsilon", "1e-4"]
    run_in_process(script, run_args(base, data, tmp_path / "one", *common))  # 1 process x 2 pairs
    launch(Path(script.__file__).name, run_args(base, data, tmp_path / "two", *common, "--train_batch_size", "1"),
           num_processes=2)  # 2 processes x 1 pair
    assert logged_scalars(tmp_path / "one") == pytest.approx(logged_scalars(tmp_path / "two"), rel=1e-3)
    one, two = trained_weights(tmp_path / "one"), trained_weights(tmp_path / "two")
    assert max_abs_difference(one, two) < 1e-3 * max_movement(one)


def check_cached_run_trains_like_the_uncached_run(script, run_args, base, data, tmp_path, text_shapes):
    """`text_shapes`: {cached text array: its shape per prompt} (what the encoders give each unique prompt)."""
    common = ["--use_lora", "--max_train_steps", "2", "--checkpointing_steps", "100", "--adam_epsilon", "1e-4",
              "--latent_cache_dir", tmp_path / "cache", "--proportion_empty_prompts", "0.3"]
    for name, extra in (("uncached", []), ("cached", ["--cache_latents"]), ("reused", ["--cache_latents"])):
        run_in_process(script, run_args(base, data, tmp_path / name, *common, *extra))
    assert logged_scalars(tmp_path / "cached") == pytest.approx(logged_scalars(tmp_path / "uncached"), rel=1e-4)
    cached, uncached = trained_weights(tmp_path / "cached"), trained_weights(tmp_path / "uncached")
    assert max_abs_difference(cached, uncached) < 1e-2 * max_movement(uncached)
    cache_dir = Path(json.loads((tmp_path / "cached" / "latent_cache_stats.json").read_text())["cache_dir"])
    for name, shape in text_shapes.items():
        assert np.load(cache_dir / f"text_{name}.npy", mmap_mode="r").shape[1:] == shape, name
    reused = json.loads((tmp_path / "reused" / "latent_cache_stats.json").read_text())
    assert reused["reused"] and reused["images_encoded"] == 0 and reused["prompts_encoded"] == 0
    assert max_abs_difference(trained_weights(tmp_path / "reused"), cached) == 0


def check_streaming_sft_adafactor_checkpointing_run(script, run_args, base, data, tmp_path, transformer_class):
    """The other paths in one run: a stream, the sft loss with a full fine-tune (validation then reloads the base
    transformer), Adafactor, gradient checkpointing, the mode density, --save_transformer_only, and a NaN injected at
    step 3 (after checkpoint-2, which holds the stream's position)."""
    os.environ["DIFFUSION_DPO_TEST_NAN_STEPS"] = "3"
    try:
        run_in_process(script, run_args(base, data, tmp_path, "--streaming", "--max_train_steps", "3", "--loss_type",
                                        "sft", "--use_adafactor", "--gradient_checkpointing", "--learning_rate",
                                        "1e-4", "--weighting_scheme", "mode", "--save_transformer_only",
                                        "--num_validation_images", "1", "--validation_num_inference_steps", "2",
                                        "--validation_prompts", "a red circle"))
    finally:
        del os.environ["DIFFUSION_DPO_TEST_NAN_STEPS"]
    assert json.loads((tmp_path / "checkpoint-2" / "run_state_0.json").read_text())["stream_state"][1] > 0
    assert summary(tmp_path)["nonfinite_steps"] == 1
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir()
                     and not p.name.startswith(("checkpoint", "logs", "validation", "images")))
    assert folders == ["transformer"]
    stored = load_file(f"{base}/transformer/diffusion_pytorch_model.safetensors")
    tuned = trained_weights(tmp_path)
    assert all_finite(tuned) and sum(not torch.equal(stored[k], tuned[k]) for k in stored) > 0.9 * len(stored)
    check_validation_grid(tmp_path / "validation_grid.png", num_prompts=1)
    assert f"{transformer_class}.from_pretrained" in (tmp_path / "README.md").read_text()

"""Hostile data, kills, crashes mid-save, SIGTERM, failing validation: each costs a row or minutes, never the run."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_diffusion_dpo as sd
from launch_utils import (REPO_ROOT, launch, launch_command, max_abs_difference, run_in_process, summary,
                          trained_weights)
from fixtures.make_hostile_data import ODD_KINDS, make_hostile_dataset

SCRIPT = "train_diffusion_dpo.py"
STEPS = 6


def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--use_lora", "--max_train_steps", str(STEPS), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd_path, preference_data_path, tmp_path_factory):
    """The reference result: STEPS optimizer steps in one go, never checkpointing (main() in this process, as a
    one-process launch runs it; the interrupted runs below are real launched processes)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, output_dir, "--checkpointing_steps", "1000"))
    return trained_weights(output_dir)


# ---------------------------------------------------------------------------------------------------------------
# Hostile data
# ---------------------------------------------------------------------------------------------------------------
def test_hostile_dataset_trains_to_the_end_with_exact_counts(tiny_sd_path, tmp_path):
    data, planted, usable_rows = make_hostile_dataset(str(tmp_path / "hostile"))
    output_dir = tmp_path / "run"
    # 19 rows pass the caption/label checks; 2 epochs of batch 4 decode every one of them
    run_in_process(sd, run_args(tiny_sd_path, data, output_dir, "--max_train_steps", "10", "--train_batch_size", "4",
                                "--checkpointing_steps", "1000"))
    counts = summary(output_dir)
    for reason, planted_count in planted.items():
        assert counts[reason] == planted_count, reason
    assert counts["pairs"] == usable_rows
    assert torch.isfinite(torch.cat([t.flatten() for t in trained_weights(output_dir).values()])).all()


def test_odd_but_usable_images_are_repaired(tiny_sd_path, tmp_path):
    from transformers import CLIPTokenizer

    data, _, _ = make_hostile_dataset(str(tmp_path / "hostile"))
    args = sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", data,
                          "--resolution", "64", "--proportion_empty_prompts", "0"])
    dataset, columns, _ = sd.load_preference_dataset(args)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    pairs = sd.PreferencePairDataset(dataset, columns, tokenizer, args)
    used_modes = set()
    for index in range(len(dataset)):
        example = pairs[index]
        if example["skipped"]:
            continue  # the planted missing/undecodable rows
        for column in ("jpg_0", "jpg_1"):
            from PIL import Image
            import io

            used_modes.add(Image.open(io.BytesIO(dataset[index][column])).mode)
        for pixels in (example["pixels_w"], example["pixels_l"]):
            assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
            # 16-bit images scaled, not clipped to white; every image keeps some contrast
            assert pixels.mean() < 0.95 and pixels.std() > 0.01
    assert {"L", "RGBA", "P", "CMYK", "I;16"} <= used_modes
    assert len(ODD_KINDS) == 8


# ---------------------------------------------------------------------------------------------------------------
# Kills and resumes
# ---------------------------------------------------------------------------------------------------------------
def start(args, env=None):
    command, run_env = launch_command(SCRIPT, args, env=env)
    return subprocess.Popen(command, cwd=REPO_ROOT, env=run_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before reaching the planned kill point"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


# kill_after 4: the same path at another step (slow: a repeat of 1)
@pytest.mark.parametrize("kill_after", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_sigkill_then_resume_equals_an_uninterrupted_run(kill_after, uninterrupted, tiny_sd_path,
                                                         preference_data_path, tmp_path):
    args = run_args(tiny_sd_path, preference_data_path, tmp_path, "--checkpointing_steps", "1")
    process = start(args)
    wait_for(tmp_path / f"checkpoint-{kill_after}", process)
    time.sleep(random.Random(kill_after).uniform(0.0, 0.3))  # somewhere inside a later step, or a save
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_in_process(sd, args + ["--resume_from_checkpoint", "latest"])
    # checkpointing every step (and the kill) leave the weights exactly as a never-checkpointing run
    assert max_abs_difference(trained_weights(tmp_path), uninterrupted) < 1e-6


def test_crash_during_a_save_leaves_the_previous_checkpoint_for_latest(uninterrupted, tiny_sd_path,
                                                                       preference_data_path, tmp_path, caplog):
    # with a total limit of 1: checkpoint-2 is pruned only once checkpoint-3 exists, so the crash leaves it
    args = run_args(tiny_sd_path, preference_data_path, tmp_path, "--checkpointing_steps", "1",
                    "--checkpoints_total_limit", "1")
    # the hub login in the job's environment, as the README says to pass it: a failed launch prints its command
    # line and its output, and neither may show the token
    crashed = launch(SCRIPT, args, env={"DIFFUSION_DPO_TEST_CRASH_IN_SAVE": "3", "HF_TOKEN": "hf_NEVERprinted"},
                     check=False)
    assert crashed.returncode != 0 and "CalledProcessError" in crashed.stdout
    assert "hf_NEVERprinted" not in crashed.stdout
    assert (tmp_path / ".tmp-checkpoint-3").exists() and not (tmp_path / "checkpoint-3").exists()
    assert sd.checkpoint_dirs(str(tmp_path)) == ["checkpoint-2"]
    assert sd.resolve_resume_dir(argparse_namespace(tmp_path)).endswith("checkpoint-2")
    with caplog.at_level(logging.INFO):
        run_in_process(sd, args + ["--resume_from_checkpoint", "latest"])
    assert "Resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert max_abs_difference(trained_weights(tmp_path), uninterrupted) < 1e-6


def argparse_namespace(output_dir):
    import argparse

    return argparse.Namespace(resume_from_checkpoint="latest", output_dir=str(output_dir))


# The script run directly, as a cloud job's entry point: slow, a repeat of the launched SIGTERM tests
# (test_reliability_two.py), which go through `accelerate launch` as users do.
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(uninterrupted, tiny_sd_path, preference_data_path,
                                                                tmp_path):
    # The script run directly (as a cloud job's entry point would be): SIGTERM reaches the training process.
    args = run_args(tiny_sd_path, preference_data_path, tmp_path, "--checkpointing_steps", "1000")
    # one thread, as `accelerate launch` sets it, so float summation order matches the launched runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFUSION_DPO_TEST_STEP_DELAY": "0.5"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / SCRIPT)] + [str(a) for a in args], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "logs", process)  # trackers start right before the first step
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    saved = sd.checkpoint_dirs(str(tmp_path))
    assert len(saved) == 1 and int(saved[0].split("-")[1]) < STEPS, output[-3000:]
    assert "SIGTERM: stopped" in output
    run_in_process(sd, args + ["--resume_from_checkpoint", "latest"])
    assert max_abs_difference(trained_weights(tmp_path), uninterrupted) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Validation failures, saved arguments
# ---------------------------------------------------------------------------------------------------------------
def test_failing_validation_is_logged_and_training_goes_on(tiny_sd_path, preference_data_path, tmp_path, caplog,
                                                          monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NEVERwrittenANYWHERE")  # the login a run may use
    # 5000 sampling steps on a 1000-step scheduler: diffusers refuses, validation fails for real
    args = run_args(tiny_sd_path, preference_data_path, tmp_path, "--max_train_steps", "2", "--num_validation_images",
                    "1", "--validation_steps", "1", "--validation_num_inference_steps", "5000",
                    "--validation_prompts", "a red circle")
    with caplog.at_level(logging.WARNING):
        run_in_process(sd, args)
    assert caplog.text.count("failed and was skipped") == 2  # at step 1 and at the end
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists() and (tmp_path / "README.md").exists()
    run_info = json.loads((tmp_path / "training_args.json").read_text())
    assert run_info["versions"]["torch"] == torch.__version__.split("+")[0] or run_info["versions"]["torch"]
    assert "hub_token" not in run_info["args"] and run_info["args"]["beta_dpo"] == 5000.0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"hf_NEVERwrittenANYWHERE" not in path.read_bytes(), path

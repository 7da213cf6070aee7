"""Run the training scripts the way users do (`accelerate launch ...`) in a subprocess, and read their results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def launch_command(script, args, num_processes=1, env=None):
    """The `accelerate launch` command line of a training script on CPU, and its environment.

    Two processes use DDP over gloo. `accelerate launch --cpu --num_processes 2` would silently run one
    process, hence --multi_gpu with ACCELERATE_USE_CPU.
    """
    command = ACCELERATE + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes)]
        # One thread each: two processes on two cores would otherwise oversubscribe the CPU.
        run_env.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    else:
        command += ["--num_processes", "1"]
    run_env.update(env or {})
    return command + [str(REPO_ROOT / script)] + [str(a) for a in args], run_env


def launch(script, args, num_processes=1, env=None, check=True, timeout=600):
    """`accelerate launch` a training script on CPU (launch_command); returns the CompletedProcess (stdout and
    stderr merged)."""
    command, run_env = launch_command(script, args, num_processes, env)
    result = subprocess.run(command, cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def run_in_process(script, args):
    """main() of a training script module as `accelerate launch` runs it on one process, in this process: the same
    stages without the launcher's ~12 s start-up. accelerate's state is a process-wide singleton that each run
    configures anew, so it is reset around the run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        script.main(script.parse_args([str(a) for a in args]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def trained_weights(output_dir):
    """The trained tensors of a result: the LoRA file if there is one, else the saved UNet (SD3, FLUX: transformer)."""
    output_dir = Path(output_dir)
    lora = output_dir / "pytorch_lora_weights.safetensors"
    if lora.exists():
        return load_file(lora)
    denoiser = "unet" if (output_dir / "unet").is_dir() else "transformer"
    return load_file(output_dir / denoiser / "diffusion_pytorch_model.safetensors")


def max_abs_difference(first, second):
    assert first.keys() == second.keys()
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def summary(output_dir):
    return json.loads((Path(output_dir) / "data_summary.json").read_text())


def all_finite(weights):
    return all(torch.isfinite(t).all() for t in weights.values())


def logged_scalars(output_dir, tag="train/loss"):
    """The values a run logged to tensorboard under `tag`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in Path(output_dir, "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return [values[step] for step in sorted(values)]


def max_movement(weights):
    """Largest absolute LoRA up-projection value: they start at zero, so this is how far training moved them."""
    return max(t.abs().max().item() for k, t in weights.items() if "lora_B" in k or "lora.up" in k)


def check_validation_grid(path, num_prompts, images_per_prompt=1, cell=64):
    """A run's labelled grid: base | trained, each `images_per_prompt` cells of `cell` px wide with a gap between;
    the labels in a header; a row per prompt with the prompt written under it."""
    import numpy as np
    from PIL import Image

    grid = Image.open(path).convert("L")
    gap = max(4, cell // 32)
    assert grid.width == 2 * images_per_prompt * cell + gap, grid.size
    pixels = np.asarray(grid)
    header = pixels[: pixels.shape[0] - num_prompts * cell]
    assert header.min() < 128  # dark label text on white
    assert grid.height > num_prompts * cell + 16, grid.size  # room for the header and the prompts

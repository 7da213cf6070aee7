"""The offline demo: a whole Diffusion-DPO round trip on a tiny model, in about a minute on a laptop CPU.

    make demo            # = python tools/demo.py --output_dir demo-output

1. builds a tiny Stable Diffusion pipeline and a small Pick-a-Pic-format preference dataset (no downloads),
2. runs `accelerate launch train_diffusion_dpo.py --use_lora ...` on them, exactly as on SD1.5,
3. loads the result back with stock diffusers (`DiffusionPipeline.from_pretrained` + `load_lora_weights`),
4. writes a before/after grid from the same seeds, and prints where everything is.

The tiny model starts from random weights, so its pictures are noise-like; the point is that every stage a real
run goes through runs here, and that the result loads where users load it.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Offline Diffusion-DPO demo on a tiny model.")
    parser.add_argument("--output_dir", default="demo-output", help="Where the model, data, run and grid go.")
    parser.add_argument("--max_train_steps", type=int, default=40, help="DPO optimizer steps.")
    parser.add_argument("--num_pairs", type=int, default=64, help="Preference pairs in the demo dataset.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the model, the data, training and sampling.")
    return parser.parse_args(input_args)


def main(args):
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import make_image_grid

    from tools.make_preference_data import make_preference_dataset
    from tools.tiny_models import build_tiny_sd

    started = time.time()
    output_dir = Path(args.output_dir).resolve()
    base_dir = output_dir / "tiny-sd"
    data_dir = output_dir / "pairs"
    run_dir = output_dir / "dpo-lora"

    print(f"[1/4] Tiny SD pipeline -> {base_dir}; {args.num_pairs} preference pairs -> {data_dir}")
    build_tiny_sd(str(base_dir), seed=args.seed)
    make_preference_dataset(str(data_dir), num_pairs=args.num_pairs, num_ties=8, seed=args.seed)

    print(f"[2/4] accelerate launch train_diffusion_dpo.py --use_lora ... -> {run_dir}")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_diffusion_dpo.py"),
        "--pretrained_model_name_or_path", str(base_dir), "--train_data_dir", str(data_dir),
        "--output_dir", str(run_dir), "--use_lora", "--rank", "8", "--resolution", "64",
        "--train_batch_size", "4", "--learning_rate", "1e-3", "--beta_dpo", "5000",
        "--max_train_steps", str(args.max_train_steps), "--checkpointing_steps", str(args.max_train_steps),
        "--seed", str(args.seed), "--validation_steps", str(args.max_train_steps), "--num_validation_images", "2",
        "--validation_num_inference_steps", "10", "--validation_prompts", "a red circle on a blue background",
        "a yellow square on a green background",
    ]
    subprocess.run(command, check=True, cwd=REPO_ROOT)

    print("[3/4] Loading the result with diffusers: from_pretrained(base) + load_lora_weights(result)")
    prompts = ["a red circle on a blue background", "a yellow square on a green background",
               "a white triangle on a black background"]
    pipe = DiffusionPipeline.from_pretrained(str(base_dir))
    pipe.set_progress_bar_config(disable=True)

    def sample(prompt, seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe(prompt, num_inference_steps=10, generator=generator).images[0]

    before = [sample(p, args.seed + i) for p in prompts for i in range(2)]
    pipe.load_lora_weights(str(run_dir))
    after = [sample(p, args.seed + i) for p in prompts for i in range(2)]

    print("[4/4] Before/after grid (left two: base, right two: DPO, same seeds; a row per prompt)")
    rows = []
    for p in range(len(prompts)):
        rows += before[2 * p:2 * p + 2] + after[2 * p:2 * p + 2]
    grid_path = output_dir / "before_after.png"
    make_image_grid(rows, rows=len(prompts), cols=4).resize((4 * 128, len(prompts) * 128)).save(grid_path)

    print(f"\nDone in {time.time() - started:.0f} s.")
    print(f"  base model        {base_dir}")
    print(f"  preference data   {data_dir}")
    print(f"  DPO LoRA          {run_dir / 'pytorch_lora_weights.safetensors'}")
    print(f"  model card        {run_dir / 'README.md'}")
    print(f"  training logs     tensorboard --logdir {run_dir / 'logs'}")
    print(f"  before/after grid {grid_path}")


if __name__ == "__main__":
    main(parse_args())

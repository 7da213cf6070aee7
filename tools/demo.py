"""The offline demo: a whole Diffusion-DPO round trip on the toy base model, in about two minutes on 2 CPU cores.

    make demo            # = python tools/demo.py --output_dir demo-output

1. samples preference pairs from the committed toy base (toy/base, a small text-to-image model trained on a world
   of coloured shapes by toy/toy_base.py) and labels them with a programmatic reward (centredness: the shape
   closer to the middle wins) through tools/relabel_pairs.py,
2. runs `accelerate launch train_diffusion_dpo.py ...` on them (a full fine-tune, as in the paper), exactly as on SD1.5,
3. loads the result back with stock diffusers (`DiffusionPipeline.from_pretrained(output_dir)`),
4. writes a before/after grid from the same seeds, and prints where everything is.

After DPO the shapes drift toward the centre while still matching their captions; the demo prints the mean
reward of base and DPO images from the same seeds. `make toy` is the full
miniature replication (DPO against SFT, win rates, implicit accuracy, a report).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Offline Diffusion-DPO demo on the toy base model.")
    parser.add_argument("--output_dir", default="demo-output", help="Where the pairs, the DPO run and the grid go.")
    parser.add_argument("--max_train_steps", type=int, default=300, help="DPO optimizer steps.")
    parser.add_argument("--pairs_per_caption", type=int, default=8,
                        help="Preference pairs sampled from the base per caption (24 captions).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled pairs, training and the grid.")
    return parser.parse_args(input_args)


def main(args):
    import numpy as np
    from diffusers import DiffusionPipeline
    from diffusers.utils import make_image_grid

    from toy import toy_replication, toy_world

    started = time.time()
    output_dir = Path(args.output_dir).resolve()
    base_dir = toy_replication.COMMITTED_BASE
    data_dir = output_dir / "pairs"
    run_dir = output_dir / "dpo"

    print(f"[1/4] {args.pairs_per_caption * len(toy_world.CAPTIONS)} pairs sampled from {base_dir}, labelled by "
          f"the centredness reward -> {data_dir}")
    base = toy_replication.load_pipeline(base_dir)
    toy_replication.write_unlabelled_pairs(base, output_dir / "unlabelled", args.seed, args.pairs_per_caption,
                                           batch_size=96)
    toy_replication.label_pairs(output_dir / "unlabelled", data_dir, min_margin=0.02)
    del base

    print(f"[2/4] accelerate launch train_diffusion_dpo.py ... -> {run_dir}")
    prompts = ["a red circle on a black background", "a yellow square on a black background",
               "a blue triangle on a white background"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_diffusion_dpo.py"),
        "--pretrained_model_name_or_path", str(base_dir), "--train_data_dir", str(data_dir),
        "--output_dir", str(run_dir), "--resolution", str(toy_world.IMAGE_SIZE),
        "--train_batch_size", "16", "--learning_rate", "3e-5", "--beta_dpo", "2000", "--cache_latents",
        "--max_train_steps", str(args.max_train_steps), "--checkpointing_steps", str(args.max_train_steps),
        "--seed", str(args.seed), "--validation_steps", str(args.max_train_steps), "--num_validation_images", "2",
        "--validation_num_inference_steps", "20", "--validation_guidance_scale", "5.0",
        "--validation_prompts", *prompts,
    ]
    subprocess.run(command, check=True, cwd=REPO_ROOT)

    print("[3/4] Loading the base and the result with diffusers: DiffusionPipeline.from_pretrained")
    # Seeds no training pair was sampled from (pairs use seed .. seed + 2 * pairs_per_caption - 1); every caption
    # of the world, two seeds each, from the same starting noise for both models.
    captions, seed = list(toy_world.CAPTIONS), args.seed + 10_000
    images = {}
    for name, folder in (("base", base_dir), ("dpo", run_dir)):
        pipe = DiffusionPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        images[name] = toy_replication.sample(pipe, captions, seed, images_per_caption=2, batch_size=48)
    rewards = {name: toy_world.centredness_reward(pictures, None) for name, pictures in images.items()}
    wins = sum(d > b for d, b in zip(rewards["dpo"], rewards["base"], strict=True))

    print("[4/4] Before/after grid (left two: base, right two: DPO, same seeds; a row per prompt)")
    cells = []
    for prompt in prompts:
        index = 2 * captions.index(prompt)
        cells += images["base"][index : index + 2] + images["dpo"][index : index + 2]
    grid_path = output_dir / "before_after.png"
    make_image_grid([cell.resize((128, 128), 0) for cell in cells], rows=len(prompts), cols=4).save(grid_path)

    print(f"\nDone in {time.time() - started:.0f} s. Centredness reward over {len(captions) * 2} images, same seeds: "
          f"base {np.mean(rewards['base']):.3f}, DPO {np.mean(rewards['dpo']):.3f}; DPO's image is more centred in "
          f"{wins} of {len(captions) * 2}.")
    print(f"  base model        {base_dir} (the toy world's base, committed)")
    print(f"  preference data   {data_dir}")
    print(f"  DPO pipeline      {run_dir}")
    print(f"  model card        {run_dir / 'README.md'}")
    print(f"  training logs     tensorboard --logdir {run_dir / 'logs'}")
    print(f"  before/after grid {grid_path}")


if __name__ == "__main__":
    main(parse_args())

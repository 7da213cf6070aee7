"""The offline demo: a whole Diffusion-DPO round trip on the toy base model, in a few minutes on 2 CPU cores.

    make demo            # = python tools/demo.py --output_dir demo-output

1. samples preference pairs from the committed toy base (toy/base, a small text-to-image model trained on a world
   of coloured shapes by toy/toy_base.py) and labels them with a programmatic reward (centredness: the shape
   closer to the middle wins) through tools/relabel_pairs.py,
2. runs `accelerate launch train_diffusion_dpo.py ...` on them (a full fine-tune, as in the paper), exactly as on SD1.5,
3. loads the result back with stock diffusers (`DiffusionPipeline.from_pretrained(output_dir)`),
4. scores base and DPO images from the same seeds (every caption of the world, seeds no pair was sampled from) for
   the reward and for caption fidelity (does the picture still show the caption's shape, colour and background),
   prints one line with both, before and after, and writes a labelled grid of fixed prompts and seeds.

After DPO the shapes sit nearer the centre and still match their captions. `make toy` is the full miniature
replication (DPO against SFT, win rates with intervals, implicit accuracy, a report).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# The grid's rows: fixed before any training (one prompt per shape, both backgrounds), never picked from results.
GRID_PROMPTS = ("a red circle on a black background", "a yellow square on a black background",
                "a blue triangle on a white background", "a green circle on a white background")
GRID_SEEDS_SHOWN = 3
EVAL_IMAGES_PER_CAPTION = 4


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Offline Diffusion-DPO demo on the toy base model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="demo-output", help="Where the pairs, the DPO run and the grid go.")
    parser.add_argument("--max_train_steps", type=int, default=300, help="DPO optimizer steps.")
    parser.add_argument("--pairs_per_caption", type=int, default=8,
                        help="Preference pairs sampled from the base per caption (24 captions).")
    parser.add_argument("--beta_dpo", type=float, default=5000.0,
                        help="DPO's KL weight: at this one the shapes move to the centre and keep their captions.")
    parser.add_argument("--learning_rate", type=float, default=3e-5, help="Learning rate of the full fine-tune.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled pairs, training and the grid.")
    return parser.parse_args(input_args)


def sample_and_score(folder, captions, seed):
    """Images of every caption from seeds seed .. seed + EVAL_IMAGES_PER_CAPTION - 1, their rewards and fidelity."""
    from diffusers import DiffusionPipeline

    from toy import toy_replication

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    images = toy_replication.sample(pipe, captions, seed, EVAL_IMAGES_PER_CAPTION, batch_size=48)
    rewards, fidelity = toy_replication.score(images, [c for c in captions for _ in range(EVAL_IMAGES_PER_CAPTION)])
    return images, rewards, fidelity


def main(args):
    import numpy as np

    import pipeline_dpo
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
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_diffusion_dpo.py"),
        "--pretrained_model_name_or_path", str(base_dir), "--train_data_dir", str(data_dir),
        "--output_dir", str(run_dir), "--resolution", str(toy_world.IMAGE_SIZE),
        "--train_batch_size", "16", "--learning_rate", str(args.learning_rate), "--beta_dpo", str(args.beta_dpo),
        "--cache_latents", "--max_train_steps", str(args.max_train_steps),
        "--checkpointing_steps", str(args.max_train_steps), "--seed", str(args.seed),
        "--validation_steps", str(args.max_train_steps), "--num_validation_images", "2",
        "--validation_num_inference_steps", "20", "--validation_guidance_scale", "5.0",
        "--validation_prompts", *GRID_PROMPTS,
    ]
    subprocess.run(command, check=True, cwd=REPO_ROOT)

    print("[3/4] Loading the base and the result with diffusers (DiffusionPipeline.from_pretrained); sampling every "
          "caption from the same seeds")
    # Seeds no training pair was sampled from (pairs use seed .. seed + 2 * pairs_per_caption - 1).
    captions, seed = list(toy_world.CAPTIONS), args.seed + 10_000
    scored = {name: sample_and_score(folder, captions, seed) for name, folder in (("base", base_dir),
                                                                                    ("DPO", run_dir))}
    n = EVAL_IMAGES_PER_CAPTION
    rewards = {name: result[1] for name, result in scored.items()}
    fidelity = {name: toy_world.fidelity_rates(result[2])["all"] for name, result in scored.items()}
    wins = int(np.sum(rewards["DPO"] > rewards["base"]))

    print("[4/4] The grid: base and DPO from the same seeds, a row per fixed prompt, the reward under each image")
    rows = [captions.index(prompt) for prompt in GRID_PROMPTS]
    groups = {name: [result[0][row * n + j] for row in rows for j in range(GRID_SEEDS_SHOWN)]
              for name, result in scored.items()}
    scores = {name: [float(rewards[name][row * n + j]) for row in rows for j in range(GRID_SEEDS_SHOWN)]
              for name in scored}
    grid, _ = pipeline_dpo.make_comparison_grid(list(GRID_PROMPTS), groups, GRID_SEEDS_SHOWN, scores=scores,
                                                cell_scale=4)
    grid_path = output_dir / "before_after.png"
    grid.save(grid_path)

    total = len(captions) * n
    print(f"\nDone in {time.time() - started:.0f} s. Over {total} images ({len(captions)} captions x {n} seeds, the "
          f"same for both): centredness reward base {rewards['base'].mean():.3f} -> DPO {rewards['DPO'].mean():.3f} "
          f"(DPO's image more centred in {wins} of {total}); caption fidelity base {fidelity['base']:.0%} -> DPO "
          f"{fidelity['DPO']:.0%}.")
    print(f"  base model        {base_dir} (the toy world's base, committed)")
    print(f"  preference data   {data_dir}")
    print(f"  DPO pipeline      {run_dir}")
    print(f"  model card        {run_dir / 'README.md'}")
    print(f"  training logs     tensorboard --logdir {run_dir / 'logs'}")
    print(f"  before/after grid {grid_path}")
    return {"reward": {name: float(value.mean()) for name, value in rewards.items()}, "fidelity": fidelity,
            "wins": wins, "images": total}


if __name__ == "__main__":
    main(parse_args())

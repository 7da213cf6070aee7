"""A miniature replication of Diffusion-DPO on the CPU: `make toy` (= python toy/toy_replication.py).

    python toy/toy_replication.py --output_dir toy-output                  # ~10 minutes on 2 CPU cores
    python toy/toy_replication.py --output_dir toy-output --retrain_base   # + ~30 minutes: the base too
    python toy/toy_replication.py --family sd3 --output_dir toy-output-sd3 # Flow-DPO: the SD3 script on toy/base_sd3

The paper's pipeline, shrunk to a world of coloured shapes (toy/toy_world.py) so that every stage runs here:
1. Base model: the committed toy/base pipeline (or one trained now by toy/toy_base.py with --retrain_base).
2. Preference data: two samples of the base per prompt and seed pair, written as unlabelled Pick-a-Pic pairs,
   then labelled by a programmatic reward with tools/relabel_pairs.py (AI feedback, the paper's section 5.4).
   The reward is centredness (1 - distance of the shape from the centre / half diagonal): something the
   captions leave open and the base does at random. Held-out pairs come from other seeds.
3. DPO (--loss_type sigmoid) and SFT on the winners (--loss_type sft), both full fine-tunes from the base with
   the same learning rate, batch and steps, run with `accelerate launch train_diffusion_dpo.py`, as users run it
   (--family sd3: toy/base_sd3, an SD3 pipeline, with `accelerate launch train_diffusion_dpo_sd3.py`: Flow-DPO).
4. Evaluation at every checkpoint, on prompts x seeds no pair was sampled from, base and model from the same
   seeds: reward win rate against the base (95% Wilson interval), mean reward, and caption fidelity (does the
   picture still show the caption's shape, colour and background, checked programmatically). Implicit reward
   accuracy of the final models on the held-out pairs, by tools/evaluate.py.
5. report.md: the table, a plot of win rate against steps for DPO and SFT, a grid of samples (base | SFT | DPO,
   same seeds), and the targets met or missed. results.json holds every figure.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from toy import toy_base, toy_world  # noqa: E402


COMMITTED_BASE = REPO_ROOT / "toy" / "base"
# What the loop runs per model family: its name in the report, the training script, the committed base, the
# script's extra flags, and the learning rate and DPO beta of `make toy` on that base (Flow-DPO's were found by a
# sweep on toy/base_sd3: README).
FAMILIES = {
    "sd": {"title": "Diffusion-DPO", "script": "train_diffusion_dpo.py", "base": COMMITTED_BASE, "flags": [],
           "learning_rate": 3e-5, "beta_dpo": 2000.0},
    "sd3": {"title": "Flow-DPO (SD3)", "script": "train_diffusion_dpo_sd3.py", "base": REPO_ROOT / "toy" / "base_sd3",
            "flags": ["--max_sequence_length", str(toy_base.SD3_TEXT_LENGTH)], "learning_rate": 3e-5,
            "beta_dpo": 100.0},
}
REWARD_FN = "toy.toy_world:centredness_reward"
# The objectives the miniature compares: the script's --loss_type of each, and its beta's flag and default here
# (DPO's 2000 from the authors' SD1.5 range; IPO's target margin 1/beta of the error gap needs about 1000 for
# this world's error gaps of ~1e-3; MaPO's authors' 0.1).
METHODS = {"dpo": ("sigmoid", "--beta_dpo", 2000.0), "ipo": ("ipo", "--beta_dpo", 1000.0),
           "hinge": ("hinge", "--beta_dpo", 2000.0), "mapo": ("mapo", "--beta_mapo", 0.1),
           "sdpo": ("sdpo", "--beta_dpo", 2000.0), "sft": ("sft", None, None)}
# Seed ranges, far apart so no evaluation image shares its starting noise with a training or held-out pair.
TRAIN_SEED, HELDOUT_SEED, EVAL_SEED, GRID_SEED, SWEEP_SEED = 0, 100_000, 200_000, 300_000, 400_000
# The targets of the miniature (issue 7).
TARGETS = {"win_rate": 0.70, "fidelity_drop": 0.05, "implicit_accuracy": 0.60, "minutes": 30}


def family_defaults(setting):
    """'sd 3e-05, sd3 ...': a setting's default per family, for the help."""
    return ", ".join(f"{family} {values[setting]:g}" for family, values in FAMILIES.items())


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Miniature Diffusion-DPO replication on a synthetic shapes world.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="toy-output", help="Where the data, runs, evaluation and report go.")
    parser.add_argument("--family", default="sd", choices=list(FAMILIES),
                        help="sd: Diffusion-DPO with train_diffusion_dpo.py on the UNet base toy/base; sd3: Flow-DPO "
                             "with train_diffusion_dpo_sd3.py on the MMDiT, rectified-flow base toy/base_sd3.")
    parser.add_argument("--base", default=None,
                        help="The base pipeline folder (default: the family's committed toy/base or toy/base_sd3).")
    parser.add_argument("--retrain_base", action="store_true",
                        help="Train the family's base from scratch with toy/toy_base.py into OUTPUT_DIR/base first.")
    parser.add_argument("--pairs_per_caption", type=int, default=32, help="Training pairs sampled per caption.")
    parser.add_argument("--heldout_pairs_per_caption", type=int, default=8, help="Held-out pairs per caption.")
    parser.add_argument("--min_margin", type=float, default=0.02,
                        help="Pairs whose reward margin is below this are dropped as near-ties.")
    parser.add_argument("--max_train_steps", type=int, default=400, help="Optimizer steps of every method.")
    parser.add_argument("--num_evaluations", type=int, default=8,
                        help="Checkpoints evaluated per run, evenly spaced (the last is the final model).")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Pairs per optimizer step.")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="Learning rate of every method (default: the family's, "
                             f"{family_defaults('learning_rate')}).")
    parser.add_argument("--beta_dpo", type=float, default=None,
                        help=f"DPO's KL weight beta (default: the family's, {family_defaults('beta_dpo')}).")
    parser.add_argument("--betas", nargs="+", default=[], metavar="METHOD=BETA",
                        help="Another beta for a method, e.g. ipo=1 mapo=0.05 (defaults: "
                             f"{', '.join(f'{m} {b:g}' for m, (_, flag, b) in METHODS.items() if flag and m != 'dpo')}"
                             "; dpo: --beta_dpo).")
    parser.add_argument("--beta_sweep", nargs="+", type=float, default=[], metavar="FACTOR",
                        help="Before the comparison, train each method (but SFT) for a quarter of the steps at its "
                             "beta times each factor (e.g. 0.1 1 10), and keep the beta with the best reward win rate "
                             "among those that keep caption fidelity within 5 points of the base's, on seeds of the "
                             "sweep's own; the report shows the sweep.")
    parser.add_argument("--lr_sweep", nargs="+", type=float, default=[], metavar="FACTOR",
                        help="With --beta_sweep and DPO among --methods: DPO's sweep is a grid of its beta times the "
                             "--beta_sweep factors and the learning rate times these (e.g. 0.3 1 3), and the rate "
                             "kept for DPO becomes every method's (DPO is swept first), so the comparison stays at one "
                             "learning rate.")
    parser.add_argument("--reward_fn", type=str, default=REWARD_FN,
                        help="The reward that labels the pairs and scores every image: module:function or "
                             "path/to/file.py:function, called as fn(images, captions) -> one float per image, higher "
                             "is better. Default: the toy world's centredness.")
    parser.add_argument("--eval_images_per_caption", type=int, default=16, help="Evaluation seeds per caption.")
    parser.add_argument("--implicit_accuracy_draws", type=int, default=8,
                        help="(timestep, noise) draws per held-out pair for implicit accuracy.")
    parser.add_argument("--sample_batch_size", type=int, default=96, help="Images per pipeline call.")
    parser.add_argument("--methods", nargs="+", default=["dpo", "sft"], choices=list(METHODS),
                        help="Which fine-tunes to run and compare (`make toy-compare`: all of them).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed of every method's run.")
    args = parser.parse_args(input_args)
    family = FAMILIES[args.family]
    args.base = str(family["base"]) if args.base is None else args.base
    args.learning_rate = family["learning_rate"] if args.learning_rate is None else args.learning_rate
    args.beta_dpo = family["beta_dpo"] if args.beta_dpo is None else args.beta_dpo
    if args.lr_sweep and (not args.beta_sweep or "dpo" not in args.methods):
        parser.error("--lr_sweep extends DPO's beta sweep: give --beta_sweep too, with dpo among --methods.")
    if any(factor <= 0 for factor in args.beta_sweep + args.lr_sweep):
        parser.error("--beta_sweep and --lr_sweep factors must be > 0.")
    for item in args.betas:
        method, _, beta = item.partition("=")
        if method not in METHODS or METHODS[method][1] is None or not beta:
            parser.error(f"--betas {item!r}: give METHOD=BETA for one of "
                         f"{', '.join(m for m, (_, flag, _) in METHODS.items() if flag)}.")
        try:
            float(beta)
        except ValueError:
            parser.error(f"--betas {item!r}: {beta!r} is not a number.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------------------------
def load_pipeline(base, unet_dir=None):
    """The toy pipeline, with the UNet (or transformer) of a training checkpoint or result when `unet_dir` is
    given."""
    import pipeline_dpo

    pipe = pipeline_dpo.load_dpo_pipeline(str(base), None if unet_dir is None else str(unet_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, captions, seed, images_per_caption, batch_size):
    """Images in caption-major order; image j of each caption starts from seed + j."""
    import pipeline_dpo

    return pipeline_dpo.generate_images(pipe, captions, seed=seed, num_images_per_prompt=images_per_caption,
                                        batch_size=batch_size, label="toy", **toy_base.sampling(pipe))


def png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the relabeller scores exactly the pixels that were sampled
    return buffer.getvalue()


def write_unlabelled_pairs(pipe, output_dir, seed, pairs_per_caption, batch_size):
    """Two samples per (caption, pair) from the base, as Pick-a-Pic rows labelled 0.5/0.5 (no preference yet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = list(toy_world.CAPTIONS)
    # Pair k of a caption is the images of seeds seed + 2k and seed + 2k + 1.
    images = sample(pipe, captions, seed, 2 * pairs_per_caption, batch_size)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for index in range(0, len(images), 2):
        rows["caption"].append(captions[index // (2 * pairs_per_caption)])
        rows["jpg_0"].append(png_bytes(images[index]))
        rows["jpg_1"].append(png_bytes(images[index + 1]))
        rows["label_0"].append(0.5)
        rows["label_1"].append(0.5)
    output_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), output_dir / "pairs.parquet")
    return len(rows["caption"])


def label_pairs(unlabelled_dir, output_dir, min_margin, reward_fn=REWARD_FN):
    """AI feedback: tools/relabel_pairs.py with the reward as its callable."""
    from tools import relabel_pairs

    return relabel_pairs.main(relabel_pairs.parse_args([
        "--train_data_dir", str(unlabelled_dir), "--keep_ties", "--reward", "callable", "--reward_fn", reward_fn,
        "--reward_batch_size", "256", "--min_margin", str(min_margin), "--device", "cpu",
        "--output_dir", str(output_dir)]))


def score(images, captions, reward_fn=REWARD_FN):
    """Reward (of `reward_fn`, module:function or file.py:function) and caption fidelity of every image."""
    from tools.relabel_pairs import load_callable

    rewards = np.asarray(load_callable(reward_fn)(images, captions), dtype=np.float64)
    if rewards.shape != (len(images),) or not np.isfinite(rewards).all():
        raise SystemExit(f"--reward_fn {reward_fn} must return one finite number per image; it returned "
                         f"{rewards.shape[0] if rewards.ndim else 'a scalar'} values for {len(images)} images.")
    fidelity = [toy_world.caption_fidelity(image, caption) for image, caption in zip(images, captions, strict=True)]
    return rewards, fidelity


# ----------------------------------------------------------------------------------------------------------------
# Training: the real script, launched as users launch it
# ----------------------------------------------------------------------------------------------------------------
def method_beta(args, method):
    """The beta a method trains with: --betas, then --beta_dpo for DPO, then METHODS' default; None for SFT."""
    loss_type, flag, default = METHODS[method]
    if flag is None:
        return None
    given = dict(item.split("=", 1) for item in args.betas)
    return float(given.get(method, args.beta_dpo if method == "dpo" else default))


def chosen_beta(points, base_fidelity):
    """The sweep's pick (a beta, or a beta and a learning rate): the best win rate among the points that keep the
    captions (fidelity within the target's drop of the base's); if none does, the point that keeps them best. A win
    rate bought with the captions is reward hacking, not alignment."""
    keeping = [point for point in points if base_fidelity - point["fidelity"]["all"] <= TARGETS["fidelity_drop"]]
    if keeping:
        return max(keeping, key=lambda point: point["win_rate"])
    return max(points, key=lambda point: point["fidelity"]["all"])


def train(args, method, base, data_dir, run_dir, checkpointing_steps, beta=None, max_train_steps=None,
          learning_rate=None):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / FAMILIES[args.family]["script"]),
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data_dir),
        "--output_dir", str(run_dir), "--resolution", str(toy_world.IMAGE_SIZE), "--cache_latents",
        "--train_batch_size", str(args.train_batch_size), "--learning_rate",
        str(args.learning_rate if learning_rate is None else learning_rate),
        "--lr_scheduler", "constant", "--loss_type", METHODS[method][0],
        "--max_train_steps", str(max_train_steps or args.max_train_steps),
        "--checkpointing_steps", str(checkpointing_steps), "--seed", str(args.seed),
        "--num_validation_images", "0",  # the toy evaluates its checkpoints itself, on many more images
        "--report_to", "tensorboard", *FAMILIES[args.family]["flags"],
    ]
    loss_type, flag, _ = METHODS[method]
    if flag is not None:
        command += [flag, str(method_beta(args, method) if beta is None else beta)]
    started = time.time()
    launcher = subprocess.Popen(command, cwd=REPO_ROOT)
    # wait4's usage covers the launcher and the training process it waited for: the peak is the trainer's
    _, status, usage = os.wait4(launcher.pid, 0)
    launcher.returncode = os.waitstatus_to_exitcode(status)
    if launcher.returncode != 0:
        raise subprocess.CalledProcessError(launcher.returncode, command)
    return {"seconds": time.time() - started, "seconds_per_step": seconds_per_step(run_dir),
            "peak_memory_mb": usage.ru_maxrss / 1024}


def seconds_per_step(run_dir):
    """Wall time per optimizer step, from the run's tensorboard log (first to last logged step: no start-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in Path(run_dir, "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            events += accumulator.Scalars("train/loss")
    events.sort(key=lambda event: event.step)
    if len(events) < 2:
        return float("nan")
    return (events[-1].wall_time - events[0].wall_time) / (events[-1].step - events[0].step)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
def evaluate_model(args, unet_dir, captions, base_rewards, seed=EVAL_SEED):
    from tools import evaluate

    pipe = load_pipeline(args.base, unet_dir)
    images = sample(pipe, list(toy_world.CAPTIONS), seed, len(captions) // len(toy_world.CAPTIONS),
                    args.sample_batch_size)
    rewards, fidelity = score(images, captions, args.reward_fn)
    wins = evaluate.outcome_summary(rewards - base_rewards)
    return {"win_rate": wins["rate"], "win_ci95": [wins["ci95_low"], wins["ci95_high"]], "wins": wins["wins"],
            "ties": wins["ties"], "losses": wins["losses"], "mean_reward": float(rewards.mean()),
            "fidelity": toy_world.fidelity_rates(fidelity)}


def implicit_accuracy(args, result_dir, heldout_dir, output_dir):
    from tools import evaluate

    record = evaluate.implicit_accuracy(evaluate.parse_args([
        "implicit-accuracy", "--base", str(args.base), "--dpo", str(result_dir), "--train_data_dir",
        str(heldout_dir), "--resolution", str(toy_world.IMAGE_SIZE), "--num_draws",
        str(args.implicit_accuracy_draws), "--batch_size", "32", "--device", "cpu", "--seed", str(args.seed),
        "--beta_dpo", str(args.beta_dpo), "--output_dir", str(output_dir)]))
    return {"implicit_accuracy": record["accuracy"], "implicit_ci95": [record["ci95_low"], record["ci95_high"]],
            "heldout_pairs": record["n"]}


def sample_grid(args, run_dirs, path, captions_shown=6, seeds_shown=3):
    """A row per caption (written under it), a column group per model (base, then each method) from the same seeds,
    each image's reward under it: pipeline_dpo's labelled grid."""
    import pipeline_dpo

    captions = list(toy_world.CAPTIONS)[:: len(toy_world.CAPTIONS) // captions_shown][:captions_shown]
    groups, rewards = {}, {}
    for name, run_dir in [("base", None)] + [(method.upper(), run_dir) for method, run_dir in run_dirs.items()]:
        images = sample(load_pipeline(args.base, run_dir), captions, GRID_SEED, seeds_shown, args.sample_batch_size)
        groups[name] = images
        rewards[name] = score(images, [caption for caption in captions for _ in range(seeds_shown)],
                              args.reward_fn)[0].tolist()
    grid, _ = pipeline_dpo.make_comparison_grid(captions, groups, seeds_shown, scores=rewards, cell_scale=3)
    grid.save(path)
    return {"captions": captions, "columns": list(groups), "seeds_per_model": seeds_shown}


def plot_win_rates(curves, path, title="Diffusion-DPO"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for method, points in curves.items():
        steps = [point["step"] for point in points]
        axis.plot(steps, [point["win_rate"] for point in points], marker="o", label=method.upper())
        axis.fill_between(steps, [point["win_ci95"][0] for point in points],
                          [point["win_ci95"][1] for point in points], alpha=0.15)
    axis.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    axis.axhline(TARGETS["win_rate"], color="gray", linewidth=0.8, linestyle="--", label="target 70%")
    axis.set_xlabel("optimizer steps")
    axis.set_ylabel("reward win rate vs base")
    axis.set_ylim(0, 1)
    axis.legend(loc="lower right")
    axis.set_title(f"Miniature {title}: win rate against the base")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def percent(value):
    return f"{100 * value:.1f}%"


def results_table(results):
    lines = ["| model | beta | steps | win rate vs base (95% CI) | mean reward | caption fidelity | shape | colour | "
             "background | implicit accuracy (95% CI) | s / step | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = results["base"]
    lines.append(f"| base | - | 0 | - | {base['mean_reward']:.3f} | {percent(base['fidelity']['all'])} | "
                 f"{percent(base['fidelity']['shape'])} | {percent(base['fidelity']['color'])} | "
                 f"{percent(base['fidelity']['background'])} | 50% by construction | - | - |")
    for method in results["methods"]:
        beta = results.get("betas", {}).get(method)
        cost = results.get("costs", {}).get(method, {})
        for point in results["curves"][method]:
            if point["step"] == 0:
                continue
            accuracy, seconds, memory = "-", "", ""
            if "implicit_accuracy" in point:  # the final model's row: its accuracy and the run's costs
                accuracy = (f"{percent(point['implicit_accuracy'])} ({percent(point['implicit_ci95'][0])}-"
                            f"{percent(point['implicit_ci95'][1])})")
                seconds = f"{cost['seconds_per_step']:.2f}" if cost else ""
                memory = f"{cost['peak_memory_mb']:.0f} MB" if cost else ""
            fidelity = point["fidelity"]
            lines.append(f"| {method.upper()} | {'-' if beta is None else f'{beta:g}'} | {point['step']} | "
                         f"{percent(point['win_rate'])} ({percent(point['win_ci95'][0])}-"
                         f"{percent(point['win_ci95'][1])}) | {point['mean_reward']:.3f} | {percent(fidelity['all'])} "
                         f"| {percent(fidelity['shape'])} | {percent(fidelity['color'])} | "
                         f"{percent(fidelity['background'])} | {accuracy} | {seconds} | {memory} |")
    return "\n".join(lines)


def sweep_table(results):
    """The beta sweep, one row per method and beta (and learning rate, --lr_sweep); empty without --beta_sweep."""
    rows = [(method, point) for method, points in results.get("beta_sweep", {}).items() for point in points]
    if not rows:
        return ""
    lines = ["| method | beta | learning rate | steps | win rate vs base (95% CI) | mean reward | caption fidelity | "
             "kept |", "|---|---|---|---|---|---|---|---|"]
    for method, point in rows:
        learning_rate = point.get("learning_rate", results.get("learning_rate"))
        kept = ("yes" if results["betas"].get(method) == point["beta"]
                and learning_rate == results.get("learning_rate", learning_rate) else "")
        lines.append(f"| {method.upper()} | {point['beta']:g} | {learning_rate:g} | {point['steps']} | "
                     f"{percent(point['win_rate'])} "
                     f"({percent(point['win_ci95'][0])}-{percent(point['win_ci95'][1])}) | "
                     f"{point['mean_reward']:.3f} | {percent(point['fidelity']['all'])} | {kept} |")
    return ("\n## The beta sweep\nEach method but SFT at its beta times each factor, for a quarter of the steps "
            "(DPO's also at the learning rate times each --lr_sweep factor, the kept rate then every method's), "
            "scored on seeds of their own (not the comparison's); kept: the best win rate among the betas whose caption "
            f"fidelity is within {100 * TARGETS['fidelity_drop']:.0f} points of the base's on those seeds (if none, the "
            "best fidelity)." + (f" The base on those seeds: mean reward {results['sweep_base']['mean_reward']:.3f}, "
                                 f"caption fidelity {percent(results['sweep_base']['fidelity'])}."
                                 if results.get("sweep_base") else "") + "\n\n"
            + "\n".join(lines) + "\n")


def target_lines(results):
    final = {method: results["curves"][method][-1] for method in results["methods"]}
    checks = []
    if "dpo" in final:
        dpo = final["dpo"]
        drop = results["base"]["fidelity"]["all"] - dpo["fidelity"]["all"]
        checks.append((f"DPO win rate vs base >= {percent(TARGETS['win_rate'])}", dpo["win_rate"] >= TARGETS["win_rate"],
                       percent(dpo["win_rate"])))
        checks.append((f"DPO caption fidelity within {100 * TARGETS['fidelity_drop']:.0f} points of the base's",
                       drop <= TARGETS["fidelity_drop"], f"{-100 * drop:+.1f} points"))
        checks.append((f"DPO implicit accuracy on held-out pairs > {percent(TARGETS['implicit_accuracy'])}",
                       dpo["implicit_accuracy"] > TARGETS["implicit_accuracy"], percent(dpo["implicit_accuracy"])))
    if "dpo" in final and "sft" in final:
        ahead = [d["win_rate"] > s["win_rate"] for d, s in zip(results["curves"]["dpo"][1:],
                                                                results["curves"]["sft"][1:], strict=True)]
        checks.append(("DPO ahead of SFT at equal steps", all(ahead),
                       f"ahead at {sum(ahead)} of {len(ahead)} checkpoints"))
    checks.append((f"whole run under {TARGETS['minutes']} minutes", results["minutes"] < TARGETS["minutes"],
                   f"{results['minutes']:.1f} min"))
    return "\n".join(f"- [{'x' if met else ' '}] {name}: **{figure}**" for name, met, figure in checks)


def write_report(args, results, output_dir):
    base_record = json.loads((Path(results["base_dir"]) / "toy_base.json").read_text())
    counts = results["pair_counts"]
    reward_line = ("centredness, `1 - d / d_max`, where d is the distance from the picture's centre to the "
                   "centroid of the foreground pixels and d_max half the diagonal (no shape: 0)."
                   if results.get("reward_fn", REWARD_FN) == REWARD_FN else f"`{results['reward_fn']}` (--reward_fn).")
    method_lines = "; ".join(
        f"{method.upper()} `--loss_type {METHODS[method][0]}"
        + (f" {METHODS[method][1]} {results['betas'][method]:g}`" if results.get("betas", {}).get(method) else "`")
        for method in results["methods"])
    sampling = base_record.get("sampling", toy_base.TOY_SAMPLING)
    steps = base_record["args"]["unet_steps"]
    if args.family == "sd3":
        base_line = (f"an SD3 pipeline (MMDiT transformer, CLIP-L, CLIP-G and T5, 16-channel VAE) trained from scratch "
                     f"on the world by rectified flow ({steps} transformer steps); sampled with flow-matching Euler, "
                     f"{sampling['num_inference_steps']} steps, guidance {sampling['guidance_scale']}.")
    else:
        base_line = (f"a latent diffusion model trained from scratch on the world ({steps} UNet steps); sampled "
                     f"with DDIM, {sampling['num_inference_steps']} steps, guidance {sampling['guidance_scale']}.")
    flags = "".join(f" {flag}" for flag in FAMILIES[args.family]["flags"])
    text = f"""# Miniature {FAMILIES[args.family]['title']} replication

Generated by `make toy` (`python toy/toy_replication.py {' '.join(results['argv'])}`) in {results['minutes']:.1f}
minutes on this machine ({results['cpu_threads']} CPU threads). Every figure below is in `results.json`.

## Setup
- **World** (toy/toy_world.py): one circle, square or triangle in red, green, blue or yellow on a white or black
  background, {toy_world.IMAGE_SIZE} x {toy_world.IMAGE_SIZE} pixels; 24 captions such as "a red circle on a black
  background". The captions do not say where the shape is; the training pictures put it anywhere.
- **Base** (`{results['base_dir']}`, made by toy/toy_base.py): {base_line}
- **Reward** (the stand-in for human raters): {reward_line}
- **Preference pairs**: {counts['sampled']} pairs sampled from the base ({args.pairs_per_caption} per caption, two seeds
  each), labelled by the reward with tools/relabel_pairs.py; {counts['near_ties_dropped']} near-ties (margin <
  {args.min_margin}) dropped, {counts['pairs_written']} kept. Held-out: {counts['heldout_written']} pairs from other seeds.
- **Training**: `accelerate launch {FAMILIES[args.family]['script']}{flags}`, full fine-tune from the base,
  {args.max_train_steps} steps,
  {args.train_batch_size} pairs per step, AdamW at {args.learning_rate:g} (constant), latents cached, the same pairs
  for every method: {method_lines}.
- **Evaluation**: {results['eval_images']} images per model ({args.eval_images_per_caption} seeds per caption, seeds no pair
  used), base and model from the same starting noise. Win rate: the model's image has the higher reward (ties
  count half), with a 95% Wilson interval. Caption fidelity: the picture's background colour, shape colour and
  shape class (bounding-box fill) all match the caption. Implicit accuracy: tools/evaluate.py on the held-out
  pairs, {args.implicit_accuracy_draws} (timestep, noise) draws per pair.

## Results
{results_table(results)}

Seconds per step: the run's own log, first to last step (no start-up; its checkpoint writes, alike for every method,
included); peak memory: the training process's maximum resident set. MaPO runs no reference forward and builds no
reference copy; SFT runs the winners only.
{sweep_table(results)}
![win rate against steps](win_rate_vs_steps.png)

Samples, same seeds in every column group (left to right: {', '.join(results['grid']['columns'])}; {results['grid']['seeds_per_model']}
seeds each), the caption under each row and the reward under each image:

![samples](samples.png)

## Targets
{target_lines(results)}
"""
    (output_dir / "report.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------------------------------------
def main(args, argv=None):
    import torch

    started = time.time()
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(f"[toy {time.time() - started:6.0f} s] {message}", flush=True)

    # 1. The base model.
    if args.retrain_base:
        args.base = str(output_dir / "base")
        log(f"training the base from scratch -> {args.base}")
        toy_base.main(toy_base.parse_args(["--family", args.family, "--output_dir", args.base]))
    if not (Path(args.base) / "model_index.json").is_file():
        raise SystemExit(f"No toy base pipeline at {args.base}; run with --retrain_base, or "
                         f"python toy/toy_base.py --family {args.family} --output_dir {args.base}.")

    # 2. Preference pairs from the base, labelled by the reward.
    pipe = load_pipeline(args.base)
    data_dir, heldout_dir = output_dir / "pairs", output_dir / "heldout-pairs"
    sampled = write_unlabelled_pairs(pipe, output_dir / "unlabelled", TRAIN_SEED, args.pairs_per_caption,
                                     args.sample_batch_size)
    heldout = write_unlabelled_pairs(pipe, output_dir / "unlabelled-heldout", HELDOUT_SEED,
                                     args.heldout_pairs_per_caption, args.sample_batch_size)
    pair_counts = label_pairs(output_dir / "unlabelled", data_dir, args.min_margin, args.reward_fn)
    heldout_counts = label_pairs(output_dir / "unlabelled-heldout", heldout_dir, args.min_margin, args.reward_fn)
    pair_counts.update(sampled=sampled, heldout_sampled=heldout, heldout_written=heldout_counts["pairs_written"])
    log(f"{pair_counts['pairs_written']} training and {heldout_counts['pairs_written']} held-out pairs labelled")

    # 3. The base's evaluation images (the reference every model is compared with, image by image).
    captions = [c for c in toy_world.CAPTIONS for _ in range(args.eval_images_per_caption)]
    base_images = sample(pipe, list(toy_world.CAPTIONS), EVAL_SEED, args.eval_images_per_caption,
                         args.sample_batch_size)
    base_rewards, base_fidelity = score(base_images, captions, args.reward_fn)
    base = {"mean_reward": float(base_rewards.mean()), "fidelity": toy_world.fidelity_rates(base_fidelity)}
    log(f"base: mean reward {base['mean_reward']:.3f}, caption fidelity {base['fidelity']['all']:.3f}")
    sweep, sweep_base_point = {}, None
    if args.beta_sweep:  # on seeds of their own, so the beta is not chosen on the comparison's images
        sweep_captions = [c for c in toy_world.CAPTIONS for _ in range(max(1, args.eval_images_per_caption // 2))]
        sweep_base = sample(pipe, list(toy_world.CAPTIONS), SWEEP_SEED, len(sweep_captions) // len(toy_world.CAPTIONS),
                            args.sample_batch_size)
        sweep_base_rewards, sweep_base_fidelity = score(sweep_base, sweep_captions, args.reward_fn)
        sweep_base_fidelity = toy_world.fidelity_rates(sweep_base_fidelity)["all"]
        sweep_base_point = {"mean_reward": float(sweep_base_rewards.mean()), "fidelity": sweep_base_fidelity}
    del pipe

    # 4a. The beta sweep: each method at its beta times each factor, for a quarter of the steps (DPO first, and with
    #     --lr_sweep on a grid of betas and learning rates, whose kept rate every method then trains with).
    for method in sorted(args.methods, key=lambda name: name != "dpo") if args.beta_sweep else ():
        if METHODS[method][1] is None:
            continue
        sweep[method] = []
        lr_factors = args.lr_sweep if method == "dpo" and args.lr_sweep else [1.0]
        for factor in args.beta_sweep:
            for lr_factor in lr_factors:
                beta, learning_rate = method_beta(args, method) * factor, args.learning_rate * lr_factor
                sweep_dir = output_dir / "sweep" / f"{method}-{beta:g}-{learning_rate:g}"
                shutil.rmtree(sweep_dir, ignore_errors=True)
                steps = max(1, args.max_train_steps // 4)
                train(args, method, args.base, data_dir, sweep_dir, steps, beta=beta, max_train_steps=steps,
                      learning_rate=learning_rate)
                point = evaluate_model(args, sweep_dir / f"checkpoint-{steps}", sweep_captions, sweep_base_rewards,
                                       seed=SWEEP_SEED)
                sweep[method].append({"beta": beta, "learning_rate": learning_rate, "steps": steps, **point})
                log(f"sweep {method.upper()} beta {beta:g}, learning rate {learning_rate:g}: win rate "
                    f"{point['win_rate']:.3f}, caption fidelity {point['fidelity']['all']:.3f}")
                shutil.rmtree(sweep_dir / f"checkpoint-{steps}", ignore_errors=True)
        best = chosen_beta(sweep[method], sweep_base_fidelity)
        args.betas = [item for item in args.betas if not item.startswith(f"{method}=")] + [f"{method}={best['beta']}"]
        args.learning_rate = best["learning_rate"]

    # 4. DPO and SFT, then every checkpoint against the base.
    checkpointing_steps = max(1, args.max_train_steps // args.num_evaluations)
    curves, run_dirs, train_seconds, costs, betas = {}, {}, {}, {}, {}
    for method in args.methods:
        run_dir = output_dir / method
        # A run left by an earlier `make toy` would leave checkpoints of other steps to be evaluated with this one's.
        shutil.rmtree(run_dir, ignore_errors=True)
        log(f"training {method.upper()} -> {run_dir}")
        costs[method] = train(args, method, args.base, data_dir, run_dir, checkpointing_steps)
        train_seconds[method] = costs[method]["seconds"]
        betas[method] = method_beta(args, method)
        base_point = {"step": 0, "win_rate": 0.5, "win_ci95": [0.5, 0.5], "mean_reward": base["mean_reward"],
                      "fidelity": base["fidelity"]}
        curves[method] = [base_point]
        steps = sorted(int(path.name.split("-")[1]) for path in run_dir.glob("checkpoint-*"))
        for step in steps:
            point = {"step": step, **evaluate_model(args, run_dir / f"checkpoint-{step}", captions, base_rewards)}
            curves[method].append(point)
            log(f"{method.upper()} step {step}: win rate {point['win_rate']:.3f}, mean reward "
                f"{point['mean_reward']:.3f}, caption fidelity {point['fidelity']['all']:.3f}")
        curves[method][-1].update(implicit_accuracy(args, run_dir, heldout_dir, output_dir / f"{method}-implicit"))
        log(f"{method.upper()} implicit accuracy on held-out pairs {curves[method][-1]['implicit_accuracy']:.3f}")
        run_dirs[method] = run_dir

    # 5. Plot, grid, report.
    plot_win_rates(curves, output_dir / "win_rate_vs_steps.png", FAMILIES[args.family]["title"])
    grid = sample_grid(args, run_dirs, output_dir / "samples.png")
    results = {"argv": argv if argv is not None else sys.argv[1:], "base_dir": str(args.base), "base": base,
               "methods": list(args.methods), "curves": curves, "pair_counts": pair_counts,
               "eval_images": len(captions), "train_seconds": train_seconds, "costs": costs, "betas": betas,
               "beta_sweep": sweep, "sweep_base": sweep_base_point, "learning_rate": args.learning_rate,
               "reward_fn": args.reward_fn, "grid": grid,
               "cpu_threads": torch.get_num_threads(), "minutes": (time.time() - started) / 60}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = write_report(args, results, output_dir)
    log(f"wrote {output_dir / 'report.md'}")
    print(report)
    return results


if __name__ == "__main__":
    main(parse_args())

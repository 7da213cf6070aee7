"""The miniature replication (issue 7): the world's checker and reward, the base trainer, and a reduced `make toy`."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from toy import toy_base, toy_replication, toy_world


def test_caption_checker_reads_every_caption_of_rendered_scenes():
    rng = np.random.default_rng(0)
    for caption, (shape, color, background) in toy_world.CAPTIONS.items():
        for _ in range(10):
            radius = rng.uniform(*toy_world.RADIUS_RANGE)
            center = rng.uniform(radius + 1, toy_world.IMAGE_SIZE - radius - 1, size=2)
            image = toy_world.render(shape, color, background, center, radius)
            assert toy_world.caption_fidelity(image, caption) == {"background": True, "color": True, "shape": True,
                                                                  "all": True}, (caption, center, radius)


def test_caption_checker_catches_each_wrong_attribute():
    image = toy_world.render("circle", "red", "black", (12, 20), 6)
    assert toy_world.caption_fidelity(image, "a red circle on a black background")["all"]
    assert toy_world.caption_fidelity(image, "a red square on a black background") == {
        "background": True, "color": True, "shape": False, "all": False}
    assert toy_world.caption_fidelity(image, "a blue circle on a black background")["color"] is False
    assert toy_world.caption_fidelity(image, "a red circle on a white background")["background"] is False
    blank = Image.new("RGB", (32, 32), toy_world.COLORS["white"])
    assert toy_world.caption_fidelity(blank, "a red circle on a white background") == {
        "background": True, "color": False, "shape": False, "all": False}
    with pytest.raises(ValueError, match="not a caption of the toy world"):
        toy_world.caption_fidelity(image, "a purple star")


def test_reward_is_centredness():
    centred = toy_world.render("square", "blue", "white", (16, 16), 6)
    off_centre = toy_world.render("square", "blue", "white", (9, 9), 6)
    corner = toy_world.render("square", "blue", "white", (6, 6), 5)
    rewards = toy_world.centredness_reward([centred, off_centre, corner], ["a blue square on a white background"] * 3)
    assert rewards[0] == pytest.approx(1.0, abs=1e-6)
    # 7 pixels off in x and y: 1 - 7 * sqrt(2) / (16 * sqrt(2))
    assert rewards[1] == pytest.approx(1 - 7 / 16, abs=0.02)
    assert rewards[0] > rewards[1] > rewards[2]
    assert toy_world.centredness(Image.new("RGB", (32, 32), (20, 20, 20))) == 0.0  # no shape at all


# The committed bases' caption fidelity (their toy_base.json, 96 samples) is at least this: the flow base draws
# backgrounds and colours as captioned, but rounds many squares (shape 55%).
MIN_BASE_FIDELITY = {"sd": 0.8, "sd3": 0.45}
# What each family's base trainer writes: its weights files, and how its pipeline samples.
BASE_WEIGHTS = {
    "sd": ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors"],
    "sd3": ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors"],
}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_toy_base_trainer_is_deterministic_and_loads(tmp_path, family):
    """Two short runs of the base trainer write bit-identical weights, so the committed bases are reproducible; the
    result loads in stock diffusers as its family's pipeline and draws a toy-sized picture."""
    from diffusers import DiffusionPipeline

    settings = ["--family", family, "--num_images", "64", "--vae_steps", "2", "--vae_batch_size", "8",
                "--unet_steps", "3", "--unet_batch_size", "8", "--check_images_per_caption", "0", "--threads", "1"]
    for name in ("a", "b"):
        toy_base.main(toy_base.parse_args(["--output_dir", str(tmp_path / name), *settings]))
    for weights in BASE_WEIGHTS[family]:
        first, second = (load_file(tmp_path / name / weights) for name in ("a", "b"))
        assert all((first[key] == second[key]).all() for key in first), weights
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "a")
    assert type(pipe).__name__ == {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    image = pipe("a red circle on a black background", output_type="pil", **toy_base.sampling(pipe)).images[0]
    assert image.size == (toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)
    if family == "sd3":  # SD3's VAE: 16 channels, a shift factor, no quant convolutions
        assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None
        assert not pipe.vae.config.use_quant_conv


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_committed_base_draws_what_the_captions_say(family):
    base = toy_replication.FAMILIES[family]["base"]
    record = json.loads((base / "toy_base.json").read_text())
    assert record["caption_fidelity"]["all"] >= MIN_BASE_FIDELITY[family]
    pipe = toy_replication.load_pipeline(base)
    captions = list(toy_world.CAPTIONS)
    images = toy_replication.sample(pipe, captions, seed=7, images_per_caption=1, batch_size=24)
    fidelity = [toy_world.caption_fidelity(image, caption)["all"] for image, caption in zip(images, captions)]
    assert np.mean(fidelity) >= MIN_BASE_FIDELITY[family] - 0.1


# The reduced miniature's figures at its sizes (96 pairs sampled, 40 steps of 16 at 1e-4, 72 evaluation images), one
# run each: the rate is 3x make toy's to move in 40 steps, and costs the captions here.
REDUCED_FIGURES = {
    "sd": "base reward 1.737 -> DPO 1.795, win rate 0.72, caption fidelity 42% -> 35%, implicit accuracy 0.76",
    "sd3": "base reward 1.757 -> DPO 1.834, win rate 0.92, caption fidelity 61% -> 51%, implicit accuracy 0.90",
}


# The default suite runs the flow family (Flow-DPO through train_diffusion_dpo_sd3.py); the SD family, whose script
# every other test file trains, runs in `make test-all`.
@pytest.mark.parametrize("family", [pytest.param("sd", marks=pytest.mark.slow), "sd3"])
def test_reduced_miniature_with_a_users_reward_moves_it_the_right_way(tmp_path, family):
    """`make toy` (FAMILY=sd3: Flow-DPO) at a fraction of its size, same code, with the user's own reward
    (`--reward_fn file.py:function`, here the centredness plus one: the same preferences and margins, and figures
    that show it was the one used): DPO from the committed base raises it. REDUCED_FIGURES has what one run gave."""
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("from toy import toy_world\n\n\ndef plus_one(images, captions):\n"
                           "    return [1 + r for r in toy_world.centredness_reward(images, captions)]\n")
    output_dir = tmp_path / "toy"
    args = toy_replication.parse_args([
        "--family", family, "--output_dir", str(output_dir), "--pairs_per_caption", "4",
        "--heldout_pairs_per_caption", "1", "--max_train_steps", "40", "--learning_rate", "1e-4",
        "--num_evaluations", "1", "--eval_images_per_caption", "3", "--implicit_accuracy_draws", "2",
        "--methods", "dpo", "--reward_fn", f"{reward_file}:plus_one"])
    results = toy_replication.main(args, argv=["(test)"])
    assert results["base"]["mean_reward"] > 1.0 and results["reward_fn"] == f"{reward_file}:plus_one"

    counts = results["pair_counts"]
    assert counts["sampled"] == 4 * len(toy_world.CAPTIONS)
    assert counts["pairs_written"] + counts["near_ties_dropped"] + counts["reward_ties"] <= counts["sampled"]
    dpo = results["curves"]["dpo"][-1]
    assert dpo["step"] == 40
    figures = (f"base reward {results['base']['mean_reward']:.3f}, DPO reward {dpo['mean_reward']:.3f}, "
               f"win rate {dpo['win_rate']:.3f}, caption fidelity {results['base']['fidelity']['all']:.3f} -> "
               f"{dpo['fidelity']['all']:.3f}, implicit accuracy {dpo['implicit_accuracy']:.3f}")
    print(figures)
    assert dpo["mean_reward"] > results["base"]["mean_reward"], figures
    assert dpo["win_rate"] > 0.5, figures
    assert 0.0 <= dpo["implicit_accuracy"] <= 1.0
    for name in ("report.md", "results.json", "win_rate_vs_steps.png", "samples.png"):
        assert (output_dir / name).is_file(), name
    report = (output_dir / "report.md").read_text()
    assert f"`{reward_file}:plus_one` (--reward_fn)" in report
    assert f"| DPO | {toy_replication.FAMILIES[family]['beta_dpo']:g} | 40 |" in report and "## Targets" in report
    assert f"accelerate launch {toy_replication.FAMILIES[family]['script']}" in report
    if family == "sd3":  # the SD3 script trained and saved a transformer, sampled through the SD3 pipeline
        assert "# Miniature Flow-DPO (SD3) replication" in report
        assert (output_dir / "dpo" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        assert json.loads((output_dir / "dpo" / "training_args.json").read_text())["args"]["max_sequence_length"] == 16


def test_the_beta_sweep_keeps_the_best_win_rate_that_keeps_the_captions():
    def point(beta, win_rate, fidelity):
        return {"beta": beta, "win_rate": win_rate, "fidelity": {"all": fidelity}}

    hacking, keeping, timid = point(200, 0.90, 0.50), point(2000, 0.80, 0.62), point(20000, 0.60, 0.64)
    assert toy_replication.chosen_beta([hacking, keeping, timid], base_fidelity=0.64) is keeping
    # none keeps the captions: the one that loses the fewest
    assert toy_replication.chosen_beta([hacking, point(2000, 0.8, 0.55)], base_fidelity=0.64)["beta"] == 2000


def test_the_family_picks_its_script_base_and_defaults_and_the_lr_sweep_needs_dpos_beta_sweep():
    sd3 = toy_replication.parse_args(["--family", "sd3"])
    assert sd3.base == str(toy_replication.FAMILIES["sd3"]["base"])
    assert (sd3.learning_rate, sd3.beta_dpo) == (toy_replication.FAMILIES["sd3"]["learning_rate"],
                                                 toy_replication.FAMILIES["sd3"]["beta_dpo"])
    assert toy_replication.parse_args(["--family", "sd3", "--beta_dpo", "7"]).beta_dpo == 7.0
    assert toy_replication.parse_args([]).base == str(toy_replication.COMMITTED_BASE)
    for refused in (["--lr_sweep", "0.3", "1"], ["--beta_sweep", "1", "--lr_sweep", "2", "--methods", "sft"],
                    ["--beta_sweep", "0", "1"]):
        with pytest.raises(SystemExit):
            toy_replication.parse_args(refused)


def test_the_sweep_table_shows_each_beta_and_learning_rate_and_marks_the_kept_point():
    def point(beta, learning_rate, win_rate):
        return {"beta": beta, "learning_rate": learning_rate, "steps": 100, "win_rate": win_rate,
                "win_ci95": [win_rate - 0.05, win_rate + 0.05], "mean_reward": 0.8, "fidelity": {"all": 0.6}}

    results = {"beta_sweep": {"dpo": [point(100, 1e-5, 0.7), point(100, 3e-5, 0.8), point(500, 3e-5, 0.75)]},
               "betas": {"dpo": 100.0}, "learning_rate": 3e-5,
               "sweep_base": {"mean_reward": 0.75, "fidelity": 0.57}}
    rows = [line for line in toy_replication.sweep_table(results).splitlines() if line.startswith("| DPO")]
    assert rows == ["| DPO | 100 | 1e-05 | 100 | 70.0% (65.0%-75.0%) | 0.800 | 60.0% |  |",
                    "| DPO | 100 | 3e-05 | 100 | 80.0% (75.0%-85.0%) | 0.800 | 60.0% | yes |",
                    "| DPO | 500 | 3e-05 | 100 | 75.0% (70.0%-80.0%) | 0.800 | 60.0% |  |"]
    assert "The base on those seeds: mean reward 0.750, caption fidelity 57.0%." in toy_replication.sweep_table(results)

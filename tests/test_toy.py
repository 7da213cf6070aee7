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


def test_toy_base_trainer_is_deterministic_and_loads(tmp_path):
    """Two short runs of the base trainer write bit-identical weights, so the committed base is reproducible."""
    from diffusers import DiffusionPipeline

    settings = ["--num_images", "64", "--vae_steps", "2", "--vae_batch_size", "8", "--unet_steps", "3",
                "--unet_batch_size", "8", "--check_images_per_caption", "0", "--threads", "1"]
    for name in ("a", "b"):
        toy_base.main(toy_base.parse_args(["--output_dir", str(tmp_path / name), *settings]))
    for component in ("unet", "vae", "text_encoder"):
        suffix = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
        first, second = (load_file(tmp_path / name / component / suffix) for name in ("a", "b"))
        assert all((first[key] == second[key]).all() for key in first), component
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "a")
    image = pipe("a red circle on a black background", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)


def test_committed_base_draws_what_the_captions_say():
    record = json.loads((toy_replication.COMMITTED_BASE / "toy_base.json").read_text())
    assert record["caption_fidelity"]["all"] >= 0.8
    pipe = toy_replication.load_pipeline(toy_replication.COMMITTED_BASE)
    captions = list(toy_world.CAPTIONS)
    images = toy_replication.sample(pipe, captions, seed=7, images_per_caption=1, batch_size=24)
    fidelity = [toy_world.caption_fidelity(image, caption)["all"] for image, caption in zip(images, captions)]
    assert np.mean(fidelity) >= 0.7


def test_reduced_miniature_with_a_users_reward_moves_it_the_right_way(tmp_path):
    """`make toy` at a fraction of its size (same code), with the user's own reward (`--reward_fn file.py:function`,
    here twice the centredness, so its figures show it was the one used): DPO from the committed base raises it.
    At these sizes (96 pairs, 40 steps of 16) one run gave: base reward 0.737, DPO 0.795, win rate 0.72 (halved)."""
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("from toy import toy_world\n\n\ndef doubled(images, captions):\n"
                           "    return [2 * r for r in toy_world.centredness_reward(images, captions)]\n")
    output_dir = tmp_path / "toy"
    args = toy_replication.parse_args([
        "--output_dir", str(output_dir), "--pairs_per_caption", "4", "--heldout_pairs_per_caption", "1",
        "--max_train_steps", "40", "--learning_rate", "1e-4", "--num_evaluations", "1",
        "--eval_images_per_caption", "3", "--implicit_accuracy_draws", "2", "--methods", "dpo",
        "--reward_fn", f"{reward_file}:doubled"])
    results = toy_replication.main(args, argv=["(test)"])
    assert results["base"]["mean_reward"] > 1.0 and results["reward_fn"] == f"{reward_file}:doubled"

    counts = results["pair_counts"]
    assert counts["sampled"] == 4 * len(toy_world.CAPTIONS)
    assert counts["pairs_written"] + counts["near_ties_dropped"] + counts["reward_ties"] <= counts["sampled"]
    dpo = results["curves"]["dpo"][-1]
    assert dpo["step"] == 40
    figures = (f"base reward {results['base']['mean_reward']:.3f}, DPO reward {dpo['mean_reward']:.3f}, "
               f"win rate {dpo['win_rate']:.3f}, implicit accuracy {dpo['implicit_accuracy']:.3f}")
    print(figures)
    assert dpo["mean_reward"] > results["base"]["mean_reward"], figures
    assert dpo["win_rate"] > 0.5, figures
    assert 0.0 <= dpo["implicit_accuracy"] <= 1.0
    for name in ("report.md", "results.json", "win_rate_vs_steps.png", "samples.png"):
        assert (output_dir / name).is_file(), name
    report = (output_dir / "report.md").read_text()
    assert f"`{reward_file}:doubled` (--reward_fn)" in report
    assert "| DPO | 2000 | 40 |" in report and "## Targets" in report


def test_the_beta_sweep_keeps_the_best_win_rate_that_keeps_the_captions():
    def point(beta, win_rate, fidelity):
        return {"beta": beta, "win_rate": win_rate, "fidelity": {"all": fidelity}}

    hacking, keeping, timid = point(200, 0.90, 0.50), point(2000, 0.80, 0.62), point(20000, 0.60, 0.64)
    assert toy_replication.chosen_beta([hacking, keeping, timid], base_fidelity=0.64) is keeping
    # none keeps the captions: the one that loses the fewest
    assert toy_replication.chosen_beta([hacking, point(2000, 0.8, 0.55)], base_fidelity=0.64)["beta"] == 2000

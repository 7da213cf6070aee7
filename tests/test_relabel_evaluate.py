"""Tests of tools/relabel_pairs.py (AI-feedback relabelling) and tools/evaluate.py (implicit accuracy, win rate).

python -m pytest tests/test_relabel_evaluate.py -q
"""

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import load_dataset
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import train_diffusion_dpo as sd
from tools import evaluate, relabel_pairs
from fixtures.tiny_models import build_tiny_clip_tokenizer


BRIGHTNESS_REWARD = """
import numpy as np

def brightness(images, captions):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]
"""


def brightness(images):
    return np.array([np.asarray(image, dtype=np.float64).mean() for image in images])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a shared, loaded CPU spin-wait ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory):
    """A tiny CLIPModel (random weights, seed 0) with a CLIPProcessor (32x32 images), saved like a hub model."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def brightness_reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "my_rewards.py"
    path.write_text(BRIGHTNESS_REWARD)
    return str(path)


def save_random_lora(pipeline_class, model_path, path):
    """A LoRA result for a tiny pipeline with random (non-zero) updates, saved as the training scripts save one."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # B starts at zero (an exact no-op); make the adapter change the UNet
            torch.nn.init.normal_(parameter, std=0.5)
    pipeline_class.save_lora_weights(
        path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return str(path)


@pytest.fixture(scope="module")
def random_lora_path(tmp_path_factory, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    return save_random_lora(StableDiffusionPipeline, tiny_sd_path, tmp_path_factory.mktemp("random-lora"))


@pytest.fixture(scope="module")
def random_sdxl_lora_path(tmp_path_factory, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    return save_random_lora(StableDiffusionXLPipeline, tiny_sdxl_path, tmp_path_factory.mktemp("random-sdxl-lora"))


def decided_rows(data_path):
    """The original non-tie rows, in order, with their images decoded."""
    rows = [row for row in load_dataset(data_path, split="train") if row["label_0"] != 0.5]
    for row in rows:
        row["image_0"], row["image_1"] = sd.load_pil_image(row["jpg_0"]), sd.load_pil_image(row["jpg_1"])
    return rows


def training_view(data_path):
    """What the training script makes of a dataset folder (its own loader and defaults)."""
    args = sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", data_path])
    return sd.load_preference_dataset(args)


def check_relabelled(output_dir, original_rows, reward_0, reward_1, min_margin=0.0):
    """Labels follow the reward, exactly the disagreeing pairs flipped, near-ties dropped, trainable format."""
    margin = np.abs(reward_0 - reward_1)
    kept = margin >= min_margin
    out = load_dataset(str(output_dir), split="train")
    assert len(out) == int(kept.sum())
    np.testing.assert_allclose(out["reward_0"], reward_0[kept], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["reward_1"], reward_1[kept], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["reward_margin"], margin[kept], rtol=1e-4, atol=1e-5)
    expected_label_0 = (reward_0 > reward_1).astype(float)[kept]
    assert out["label_0"] == expected_label_0.tolist()
    assert out["label_1"] == (1 - expected_label_0).tolist()
    kept_rows = [row for row, keep in zip(original_rows, kept, strict=True) if keep]
    assert out["caption"] == [row["caption"] for row in kept_rows]
    assert out["jpg_0"] == [row["jpg_0"] for row in kept_rows]  # images untouched, in their slots
    disagree = [row["label_0"] != label for row, label in zip(kept_rows, expected_label_0, strict=True)]
    flipped = [old["label_0"] != new for old, new in zip(kept_rows, out["label_0"], strict=True)]
    assert flipped == disagree and 0 < sum(flipped) < len(flipped)  # the data exercises both cases

    record = json.loads((output_dir / "relabel.json").read_text())
    assert record["counts"]["flipped"] == sum(flipped)
    assert record["counts"]["near_ties_dropped"] == int((~kept).sum())
    dataset, _, counts = training_view(str(output_dir))
    assert counts["pairs"] == len(out) and counts["ties"] == 0 and counts["invalid_labels"] == 0
    return out


def test_relabel_with_tiny_clip_matches_direct_pickscore(tmp_path, tiny_clip_path, preference_data_path):
    output_dir = tmp_path / "relabelled"
    counts = relabel_pairs.main(relabel_pairs.parse_args([
        "--train_data_dir", preference_data_path, "--reward", "pickscore", "--reward_model", tiny_clip_path,
        "--reward_batch_size", "8", "--device", "cpu", "--output_dir", str(output_dir)]))
    assert counts["rows"] == 36 and counts["ties_dropped"] == 4

    # Direct computation through CLIPModel.forward: logits_per_image = logit_scale * cos(image, text).
    rows = decided_rows(preference_data_path)
    model, processor = CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPProcessor.from_pretrained(tiny_clip_path)
    scores = []
    with torch.no_grad():
        for row in rows:
            inputs = processor(images=[row["image_0"], row["image_1"]], text=[row["caption"]], padding="max_length",
                               max_length=77, return_tensors="pt")
            scores.append(model(**inputs).logits_per_image[:, 0].tolist())
    scores = np.array(scores)
    out = check_relabelled(output_dir, rows, scores[:, 0], scores[:, 1])

    # The training loader's winner is the image the reward prefers.
    dataset, columns, _ = training_view(str(output_dir))
    pairs = sd.PreferencePairDataset(dataset, columns, build_tiny_clip_tokenizer(), SimpleNamespace(
        resolution=64, random_crop=False, no_hflip=True, proportion_empty_prompts=0.0, seed=0))
    winner, _ = pairs.decode_pair(dataset[0])
    preferred = "jpg_0" if out[0]["reward_0"] > out[0]["reward_1"] else "jpg_1"
    assert np.array_equal(np.asarray(winner), np.asarray(sd.load_pil_image(out[0][preferred])))


def test_relabel_with_callable_min_margin_and_ties(tmp_path, brightness_reward_file, preference_data_path):
    rows = decided_rows(preference_data_path)
    reward_0, reward_1 = brightness([r["image_0"] for r in rows]), brightness([r["image_1"] for r in rows])
    min_margin = float(np.median(np.abs(reward_0 - reward_1)))  # drops about half the pairs as near-ties
    output_dir = tmp_path / "relabelled"
    relabel_pairs.main(relabel_pairs.parse_args([
        "--train_data_dir", preference_data_path, "--reward", "callable", "--reward_fn",
        f"{brightness_reward_file}:brightness", "--min_margin", str(min_margin), "--reward_batch_size", "6",
        "--device", "cpu", "--output_dir", str(output_dir)]))
    check_relabelled(output_dir, rows, reward_0, reward_1, min_margin=min_margin)

    # --keep_ties scores the original ties too; every row then has a label from the reward.
    relabel_pairs.main(relabel_pairs.parse_args([
        "--train_data_dir", preference_data_path, "--reward", "callable", "--reward_fn",
        f"{brightness_reward_file}:brightness", "--keep_ties", "--device", "cpu", "--output_dir", str(output_dir)]))
    out = load_dataset(str(output_dir), split="train")
    assert len(out) == 36 and set(out["label_0"]) == {0.0, 1.0}


def test_aesthetic_reward_reads_laion_head(tmp_path, tiny_clip_path):
    # A LAION improved-aesthetic-predictor head (the layout of sac+logos+ava1-l14-linearMSE.pth), input width 16.
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 8),
                              torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    head_path = tmp_path / "head.pth"
    torch.save({f"layers.{name}": value for name, value in mlp.state_dict().items()}, head_path)
    args = relabel_pairs.parse_args(["--train_data_dir", str(tmp_path), "--reward", "aesthetic", "--reward_model",
                                     tiny_clip_path, "--aesthetic_head", str(head_path), "--output_dir", "unused"])
    reward = relabel_pairs.build_reward(args)
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "navy", "white")]
    model, processor = CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPProcessor.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected = mlp.eval()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    np.testing.assert_allclose(reward(images, ["unused"] * 3), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_hpsv2_without_package_says_what_to_do():
    try:
        import hpsv2  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install hpsv2"):
            relabel_pairs.HpsV2Reward("missing.pt")
    else:
        pytest.skip("hpsv2 is installed here")


def test_wilson_interval_planted_case():
    # 7 wins of 10, by hand: p = 0.7, z = 1.96, center = (p + z^2/20) / (1 + z^2/10),
    # half = z * sqrt(p(1-p)/10 + z^2/400) / (1 + z^2/10).
    z = 1.959963984540054
    center = (0.7 + z**2 / 20) / (1 + z**2 / 10)
    half = z * math.sqrt(0.7 * 0.3 / 10 + z**2 / 400) / (1 + z**2 / 10)
    summary = evaluate.outcome_summary([1.0] * 7 + [-0.5] * 3)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["rate"]) == (7, 0, 3, 0.7)
    assert summary["ci95_low"] == pytest.approx(center - half) and summary["ci95_high"] == pytest.approx(center + half)
    assert (round(summary["ci95_low"], 4), round(summary["ci95_high"], 4)) == (0.3968, 0.8922)  # published value
    # Ties count half: 6 wins, 2 ties, 2 losses is the same 0.7.
    tied = evaluate.outcome_summary([2.0] * 6 + [0.0] * 2 + [-1.0] * 2)
    assert tied["rate"] == 0.7 and tied["ties"] == 2 and tied["ci95_low"] == pytest.approx(summary["ci95_low"])


def test_implicit_accuracy_is_one_for_a_model_that_prefers_winners():
    torch.manual_seed(0)
    draws, pairs = 3, 20
    ref_losses = torch.rand(draws, 2 * pairs)
    # Lower error than the reference on every winner, higher on every loser, on every draw:
    # inside = -(5000 / 2) * ((-0.01 - 0.01) - 0) = 50.
    shift = torch.cat([-torch.full((pairs,), 0.01), torch.full((pairs,), 0.01)])
    margins = evaluate.implicit_reward_margins(ref_losses + shift, ref_losses, beta_dpo=5000)
    assert margins.shape == (pairs,) and torch.allclose(margins, torch.full((pairs,), 50.0, dtype=torch.float64))
    assert evaluate.outcome_summary(margins)["rate"] == 1.0
    # The mirror image is always wrong; the reference itself is all ties (0.5).
    assert evaluate.outcome_summary(evaluate.implicit_reward_margins(ref_losses - shift, ref_losses, 5000))["rate"] == 0
    assert evaluate.outcome_summary(evaluate.implicit_reward_margins(ref_losses, ref_losses, 5000))["rate"] == 0.5


def test_implicit_accuracy_of_the_reference_is_one_half(tmp_path, tiny_sd_path, preference_data_path):
    output_dir = tmp_path / "eval"
    record = evaluate.main(evaluate.parse_args([
        "implicit-accuracy", "--base", tiny_sd_path, "--dpo", tiny_sd_path, "--train_data_dir", preference_data_path,
        "--resolution", "64", "--num_draws", "2", "--batch_size", "16", "--device", "cpu",
        "--output_dir", str(output_dir)]))
    # The same weights give exactly the same errors: inside == 0 for every pair, a coin flip, counted half.
    assert (record["wins"], record["ties"], record["losses"], record["accuracy"]) == (0, 32, 0, 0.5)
    assert record["ci95_low"] < 0.5 < record["ci95_high"]
    with open(output_dir / "implicit_accuracy.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 32 and {row["outcome"] for row in rows} == {"tie"}


def test_win_rate_cli_writes_csv_and_grid(tmp_path, tiny_sd_path, brightness_reward_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n# a comment\na green square, top left\n")
    output_dir = tmp_path / "win"
    record = evaluate.main(evaluate.parse_args([
        "win-rate", "--base", tiny_sd_path, "--dpo", tiny_sd_path, "--prompts", str(prompts),
        "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--reward", "callable",
        "--reward_fn", f"{brightness_reward_file}:brightness", "--device", "cpu", "--grid_rows", "1",
        "--output_dir", str(output_dir)]))
    # DPO == base: the same seeds give the same images, so every comparison is a tie and the rate is 0.5.
    assert (record["n"], record["ties"], record["win_rate"]) == (4, 4, 0.5)
    with open(output_dir / "win_rate.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["prompt"], row["seed"]) for row in rows] == [
        ("a red circle on a blue background", "0"), ("a red circle on a blue background", "1"),
        ("a green square, top left", "0"), ("a green square, top left", "1")]
    assert all(float(row["base_reward"]) == float(row["dpo_reward"]) for row in rows)
    with Image.open(output_dir / "grid.png") as grid:
        assert grid.width >= 2 * 64 and grid.height > 2 * 64  # two rows (largest win, largest loss), base | DPO


def test_implicit_accuracy_of_a_lora_result_is_reproducible(tmp_path, tiny_sd_path, random_lora_path,
                                                           preference_data_path):
    def run(output_dir):
        return evaluate.main(evaluate.parse_args([
            "implicit-accuracy", "--base", tiny_sd_path, "--dpo", random_lora_path, "--train_data_dir",
            preference_data_path, "--resolution", "64", "--num_draws", "2", "--batch_size", "16", "--device", "cpu",
            "--output_dir", str(output_dir)]))

    first = run(tmp_path / "first")
    # The reference is the same UNet with its adapters off: the random adapter moves every pair off zero.
    assert first["lora"] and first["n"] == 32 and first["ties"] == 0 and first["wins"] + first["losses"] == 32
    # Fixed draws: a second run gives the same per-pair values.
    second = run(tmp_path / "second")
    assert (tmp_path / "first" / "implicit_accuracy.csv").read_text() == (
        tmp_path / "second" / "implicit_accuracy.csv").read_text()
    assert second["accuracy"] == first["accuracy"]


def test_win_rate_of_a_changed_model_has_wins_and_losses_in_the_grid(tmp_path, tiny_sd_path, random_lora_path,
                                                                      brightness_reward_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na white star\n")
    record = evaluate.main(evaluate.parse_args([
        "win-rate", "--base", tiny_sd_path, "--dpo", random_lora_path, "--prompts", str(prompts),
        "--num_inference_steps", "2", "--reward", "callable", "--reward_fn", f"{brightness_reward_file}:brightness",
        "--device", "cpu", "--grid_rows", "2", "--output_dir", str(tmp_path / "win")]))
    with open(tmp_path / "win" / "win_rate.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    margins = [float(row["dpo_reward"]) - float(row["base_reward"]) for row in rows]
    assert record["ties"] == 0 and record["wins"] == sum(m > 0 for m in margins)
    assert record["win_rate"] == pytest.approx(record["wins"] / 4)
    assert record["ci95_low"] <= record["win_rate"] <= record["ci95_high"]
    with Image.open(tmp_path / "win" / "grid.png") as grid:
        assert grid.height > 4 * 64  # 2 largest wins + 2 largest losses (4 distinct rows of 64 px images)


def implicit_accuracy_args(base, dpo, data_path, output_dir, *extra):
    return evaluate.parse_args([
        "implicit-accuracy", "--base", base, "--dpo", dpo, "--train_data_dir", data_path, "--resolution", "64",
        "--num_draws", "2", "--batch_size", "16", "--device", "cpu", "--output_dir", str(output_dir), *extra])


def read_outcomes(output_dir):
    with open(output_dir / "implicit_accuracy.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_sdxl_implicit_accuracy_of_the_reference_is_one_half(tmp_path, tiny_sdxl_path, preference_data_path):
    record = evaluate.main(implicit_accuracy_args(tiny_sdxl_path, tiny_sdxl_path, preference_data_path, tmp_path))
    # The same weights give exactly the same errors through both encoders, the time ids and the VAE: all ties.
    assert (record["wins"], record["ties"], record["losses"], record["accuracy"]) == (0, 32, 0, 0.5)
    assert not record["lora"] and record["resolution"] == 64
    assert {row["outcome"] for row in read_outcomes(tmp_path)} == {"tie"}


class UnetWorseOnOneHalf(torch.nn.Module):
    """The UNet with its prediction pushed off by a constant on one half of the batch. dpo_step_losses stacks
    [winners; losers], so pushing the losers' half off raises only the losers' errors: m_w == r_w and m_l > r_l,
    a model that prefers every winner (inside > 0); pushing the winners' half off prefers every loser."""

    def __init__(self, unet, worse_half):
        super().__init__()
        self.unet, self.worse_half = unet, worse_half

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        prediction = self.unet(sample, timestep, encoder_hidden_states, **kwargs).sample.clone()
        half = prediction.shape[0] // 2
        worse = slice(half, None) if self.worse_half == "losers" else slice(None, half)
        # 10 is far above the spread of a per-sample error of unit-variance noise over 8x8 latents.
        prediction[worse] += 10.0
        return SimpleNamespace(sample=prediction)


@pytest.mark.parametrize("worse_half, accuracy", [("losers", 1.0), ("winners", 0.0)])
def test_sdxl_implicit_accuracy_of_a_model_that_prefers_one_side(tmp_path, tiny_sdxl_path, preference_data_path,
                                                                  monkeypatch, worse_half, accuracy):
    load_accuracy_models = evaluate.load_accuracy_models

    def load_with_pushed_off_unet(*args, **kwargs):
        unet, *others = load_accuracy_models(*args, **kwargs)
        return (UnetWorseOnOneHalf(unet, worse_half), *others)

    monkeypatch.setattr(evaluate, "load_accuracy_models", load_with_pushed_off_unet)
    record = evaluate.main(implicit_accuracy_args(tiny_sdxl_path, tiny_sdxl_path, preference_data_path, tmp_path,
                                                  "--max_pairs", "8", "--batch_size", "3"))
    assert record["n"] == 8 and record["ties"] == 0 and record["accuracy"] == accuracy
    assert {row["outcome"] for row in read_outcomes(tmp_path)} == {"correct" if accuracy else "wrong"}


def test_sdxl_models_load_in_the_dtypes_sdxl_training_uses(tiny_sdxl_path, preference_data_path):
    args = implicit_accuracy_args(tiny_sdxl_path, tiny_sdxl_path, preference_data_path, "unused", "--dtype",
                                  "bfloat16")
    unet, ref_unet, vae, text_encoders, tokenizers, noise_scheduler, is_lora = evaluate.load_accuracy_models(
        args, evaluate.sdxl, torch.device("cpu"), torch.bfloat16)
    assert evaluate.family_script(tiny_sdxl_path) is evaluate.sdxl
    assert vae.dtype == torch.float32  # SDXL's own VAE overflows in fp16: training keeps it in float32
    assert unet.dtype == ref_unet.dtype == text_encoders[0].dtype == text_encoders[1].dtype == torch.bfloat16
    assert len(tokenizers) == 2 and noise_scheduler.training_timesteps is None and not is_lora


def test_sdxl_implicit_accuracy_of_a_lora_result_does_not_depend_on_the_batch(tmp_path, tiny_sdxl_path,
                                                                              random_sdxl_lora_path,
                                                                              preference_data_path):
    first = evaluate.main(implicit_accuracy_args(tiny_sdxl_path, random_sdxl_lora_path, preference_data_path,
                                                 tmp_path / "first"))
    # The reference is the same UNet with its adapters off: the random adapter moves every pair off zero.
    assert first["lora"] and first["n"] == 32 and first["ties"] == 0 and 0 < first["wins"] < 32
    # Each pair's draws depend on (seed, draw, row) only: other batches give the same values, up to float32
    # rounding of the errors (a few 1e-7) times beta_dpo / 2 = 2500.
    second = evaluate.main(implicit_accuracy_args(tiny_sdxl_path, random_sdxl_lora_path, preference_data_path,
                                                  tmp_path / "second", "--batch_size", "5"))
    first_rows, second_rows = read_outcomes(tmp_path / "first"), read_outcomes(tmp_path / "second")
    assert [row["outcome"] for row in first_rows] == [row["outcome"] for row in second_rows]
    np.testing.assert_allclose([float(row["mean_inside"]) for row in second_rows],
                               [float(row["mean_inside"]) for row in first_rows], rtol=0, atol=2e-3)
    assert second["accuracy"] == first["accuracy"]


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3: train_diffusion_dpo_sd3.py's velocity errors, through its own data pipeline
# ---------------------------------------------------------------------------------------------------------------
SD3_LORA_SETTINGS = {"max_sequence_length": 32, "weighting_scheme": "mode"}  # not the defaults (77, logit_normal)


@pytest.fixture(scope="module")
def tiny_sd3_path(tmp_path_factory):
    from fixtures.tiny_models import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="module")
def sd3_lora_path(tmp_path_factory, tiny_sd3_path, preference_data_path):
    """A 2-step train_diffusion_dpo_sd3.py --use_lora result (in this process), with non-default T5 length and sigma
    density, which its training_args.json records and evaluation must take up."""
    from accelerate.state import AcceleratorState, GradientState

    import train_diffusion_dpo_sd3 as sd3

    output_dir = str(tmp_path_factory.mktemp("sd3-lora"))
    AcceleratorState._reset_state(True)  # accelerate's state is a process-wide singleton each run configures anew
    GradientState._reset_state()
    try:
        sd3.main(sd3.parse_args([
            "--pretrained_model_name_or_path", tiny_sd3_path, "--train_data_dir", preference_data_path,
            "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--max_train_steps", "2", "--num_validation_images", "0", "--use_lora",
            *(item for name, value in SD3_LORA_SETTINGS.items() for item in (f"--{name}", str(value)))]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return output_dir


def test_sd3_implicit_accuracy_of_the_reference_is_one_half(tmp_path, tiny_sd3_path, preference_data_path):
    assert evaluate.family_script(tiny_sd3_path) is evaluate.sd3
    record = evaluate.main(implicit_accuracy_args(tiny_sd3_path, tiny_sd3_path, preference_data_path, tmp_path))
    # The same weights give exactly the same velocity errors through the three text encoders and the VAE: all ties.
    assert (record["wins"], record["ties"], record["losses"], record["accuracy"]) == (0, 32, 0, 0.5)
    assert not record["lora"] and record["resolution"] == 64
    assert record["beta_dpo"] == evaluate.sd3.build_parser().get_default("beta_dpo") == 500
    assert {row["outcome"] for row in read_outcomes(tmp_path)} == {"tie"}


def check_lora_implicit_accuracy_is_reproducible(base, lora, data, tmp_path, trained_settings):
    """A flow LoRA result's implicit accuracy: every pair decided, the error settings it was trained with (its T5
    length, sigma density and, for FLUX, guidance), and fixed draws (a second run gives the same per-pair values,
    other batches the same up to float32 rounding)."""
    first = evaluate.main(implicit_accuracy_args(base, lora, data, tmp_path / "first"))
    # The reference is the same transformer with its adapters off: the trained adapter moves every pair off zero.
    assert first["lora"] and first["n"] == 32 and first["ties"] == 0 and first["wins"] + first["losses"] == 32
    assert {name: first["training_settings"][name] for name in trained_settings} == trained_settings
    second = evaluate.main(implicit_accuracy_args(base, lora, data, tmp_path / "second"))
    assert (tmp_path / "first" / "implicit_accuracy.csv").read_text() == (
        tmp_path / "second" / "implicit_accuracy.csv").read_text()
    assert second["accuracy"] == first["accuracy"]
    rebatched = evaluate.main(implicit_accuracy_args(base, lora, data, tmp_path / "rebatched", "--batch_size", "5"))
    first_rows, rebatched_rows = read_outcomes(tmp_path / "first"), read_outcomes(tmp_path / "rebatched")
    assert [row["outcome"] for row in first_rows] == [row["outcome"] for row in rebatched_rows]
    np.testing.assert_allclose([float(row["mean_inside"]) for row in rebatched_rows],
                               [float(row["mean_inside"]) for row in first_rows], rtol=0, atol=1e-3)
    assert rebatched["accuracy"] == first["accuracy"]


def test_sd3_implicit_accuracy_of_a_lora_result_is_reproducible(tmp_path, tiny_sd3_path, sd3_lora_path,
                                                               preference_data_path):
    check_lora_implicit_accuracy_is_reproducible(tiny_sd3_path, sd3_lora_path, preference_data_path, tmp_path,
                                                 SD3_LORA_SETTINGS)


def test_sd3_win_rate_samples_with_sd3_defaults_and_the_trained_t5_length(tmp_path, tiny_sd3_path, sd3_lora_path,
                                                                          brightness_reward_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    record = evaluate.main(evaluate.parse_args([
        "win-rate", "--base", tiny_sd3_path, "--dpo", sd3_lora_path, "--prompts", str(prompts),
        "--num_inference_steps", "2", "--reward", "callable", "--reward_fn", f"{brightness_reward_file}:brightness",
        "--device", "cpu", "--grid_rows", "1", "--output_dir", str(tmp_path / "win")]))
    assert (record["guidance_scale"], record["max_sequence_length"]) == (7.0, SD3_LORA_SETTINGS["max_sequence_length"])
    with open(tmp_path / "win" / "win_rate.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # The LoRA changes every image: no tie, and the record counts what the CSV holds.
    margins = [float(row["dpo_reward"]) - float(row["base_reward"]) for row in rows]
    assert record["n"] == 2 and record["ties"] == 0 and record["wins"] == sum(m > 0 for m in margins)
    assert (tmp_path / "win" / "grid.png").exists()


def test_max_sequence_length_is_refused_for_a_base_without_t5(tmp_path, tiny_sd_path, preference_data_path):
    with pytest.raises(SystemExit, match="no T5 encoder"):
        evaluate.main(implicit_accuracy_args(tiny_sd_path, tiny_sd_path, preference_data_path, tmp_path,
                                             "--max_sequence_length", "32"))


def test_sd3_models_load_as_sd3_training_builds_them(tiny_sd3_path, sd3_lora_path, preference_data_path):
    from transformers import AutoTokenizer

    args = implicit_accuracy_args(tiny_sd3_path, sd3_lora_path, preference_data_path, "unused", "--dtype", "bfloat16")
    transformer, ref_transformer, vae, text_encoders, tokenizers, noise_scheduler, is_lora = (
        evaluate.load_accuracy_models(args, evaluate.sd3, torch.device("cpu"), torch.bfloat16))
    # LoRA: the reference is the same transformer with its adapters off; everything in the run's dtype, as training
    # without --upcast_vae keeps the frozen models.
    assert is_lora and ref_transformer is None and type(transformer).__name__ == "SD3Transformer2DModel"
    assert len(text_encoders) == len(tokenizers) == 3
    assert transformer.dtype == vae.dtype == torch.bfloat16 and {e.dtype for e in text_encoders} == {torch.bfloat16}
    # T5 prompts padded to the trained length, not to the base tokenizer's own limit.
    base_t5_length = AutoTokenizer.from_pretrained(tiny_sd3_path, subfolder="tokenizer_3").model_max_length
    assert tokenizers[2].model_max_length == SD3_LORA_SETTINGS["max_sequence_length"] != base_t5_length
    # The training script's own flow-matching schedule: the base's training sigmas, shift included.
    training = evaluate.sd3.load_noise_scheduler(SimpleNamespace(pretrained_model_name_or_path=tiny_sd3_path,
                                                                 revision=None, cache_dir=None))
    assert torch.equal(noise_scheduler.sigmas, training.sigmas) and noise_scheduler.config.shift == 3.0


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1: train_diffusion_dpo_flux.py's velocity errors of packed latents, through its own data pipeline
# ---------------------------------------------------------------------------------------------------------------
# Not the defaults (512, 3.5, logit_normal): evaluation must take them from the run's training_args.json.
FLUX_LORA_SETTINGS = {"max_sequence_length": 32, "guidance_scale": 2.0, "weighting_scheme": "mode"}


@pytest.fixture(scope="module")
def tiny_flux_path(tmp_path_factory):
    from fixtures.tiny_models import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="module")
def flux_lora_path(tmp_path_factory, tiny_flux_path, preference_data_path):
    """A 2-step train_diffusion_dpo_flux.py --use_lora result (in this process) with non-default T5 length, distilled
    guidance and sigma density, which its training_args.json records."""
    import train_diffusion_dpo_flux as flux
    from launch_utils import run_in_process

    output_dir = str(tmp_path_factory.mktemp("flux-lora"))
    run_in_process(flux, [
        "--pretrained_model_name_or_path", tiny_flux_path, "--train_data_dir", preference_data_path,
        "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--num_validation_images", "0", "--use_lora",
        *(item for name, value in FLUX_LORA_SETTINGS.items() for item in (f"--{name}", str(value)))])
    return output_dir


def test_flux_implicit_accuracy_of_the_reference_is_one_half(tmp_path, tiny_flux_path, preference_data_path):
    assert evaluate.family_script(tiny_flux_path) is evaluate.flux
    record = evaluate.main(implicit_accuracy_args(tiny_flux_path, tiny_flux_path, preference_data_path, tmp_path,
                                                  "--max_pairs", "8"))
    # The same weights give exactly the same velocity errors through CLIP-L, T5 and the VAE: all ties.
    assert (record["wins"], record["ties"], record["losses"], record["accuracy"]) == (0, 8, 0, 0.5)
    assert not record["lora"] and record["resolution"] == 64
    assert record["beta_dpo"] == evaluate.flux.build_parser().get_default("beta_dpo") == 500
    # A base records no training run: the script's own defaults.
    defaults = evaluate.flux.build_parser()
    assert record["training_settings"] == {name: defaults.get_default(name) for name in evaluate.FLUX_ERROR_FLAGS}
    assert {row["outcome"] for row in read_outcomes(tmp_path)} == {"tie"}


def test_flux_implicit_accuracy_of_a_lora_result_is_reproducible(tmp_path, tiny_flux_path, flux_lora_path,
                                                                preference_data_path):
    check_lora_implicit_accuracy_is_reproducible(tiny_flux_path, flux_lora_path, preference_data_path, tmp_path,
                                                 FLUX_LORA_SETTINGS)


def test_flux_implicit_accuracy_follows_the_guidance_the_run_recorded(tmp_path, tiny_flux_path, flux_lora_path,
                                                                      preference_data_path):
    """The distilled guidance strength in training_args.json reaches the errors: the same LoRA, its record saying
    another guidance, gives other values."""
    import shutil

    other = tmp_path / "other-guidance"
    shutil.copytree(flux_lora_path, other, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    record = json.loads((other / "training_args.json").read_text())
    record["args"]["guidance_scale"] = 3.5
    (other / "training_args.json").write_text(json.dumps(record))
    as_trained = evaluate.main(implicit_accuracy_args(tiny_flux_path, flux_lora_path, preference_data_path,
                                                      tmp_path / "as-trained", "--max_pairs", "4"))
    edited = evaluate.main(implicit_accuracy_args(tiny_flux_path, str(other), preference_data_path,
                                                  tmp_path / "edited", "--max_pairs", "4"))
    assert (as_trained["training_settings"]["guidance_scale"], edited["training_settings"]["guidance_scale"]) == (
        FLUX_LORA_SETTINGS["guidance_scale"], 3.5)
    as_trained_rows, edited_rows = read_outcomes(tmp_path / "as-trained"), read_outcomes(tmp_path / "edited")
    assert [row["row"] for row in as_trained_rows] == [row["row"] for row in edited_rows]  # the same pairs and draws
    assert all(float(a["mean_inside"]) != float(b["mean_inside"]) for a, b in zip(as_trained_rows, edited_rows,
                                                                                  strict=True))


def test_flux_win_rate_samples_with_flux_defaults_and_the_trained_t5_length(tmp_path, tiny_flux_path, flux_lora_path,
                                                                            brightness_reward_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    record = evaluate.main(evaluate.parse_args([
        "win-rate", "--base", tiny_flux_path, "--dpo", flux_lora_path, "--prompts", str(prompts),
        "--num_inference_steps", "2", "--height", "64", "--width", "64", "--reward", "callable",
        "--reward_fn", f"{brightness_reward_file}:brightness", "--device", "cpu", "--grid_rows", "1",
        "--output_dir", str(tmp_path / "win")]))
    # Sampling uses FLUX.1-dev's distilled guidance 3.5 (what the pipeline samples with, not the training input the
    # run was given) and the T5 length the run trained with.
    assert (record["guidance_scale"], record["max_sequence_length"]) == (3.5, FLUX_LORA_SETTINGS["max_sequence_length"])
    with open(tmp_path / "win" / "win_rate.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    margins = [float(row["dpo_reward"]) - float(row["base_reward"]) for row in rows]
    assert record["n"] == 2 and record["ties"] == 0 and record["wins"] == sum(m > 0 for m in margins)
    assert (tmp_path / "win" / "grid.png").exists()


def test_flux_models_load_as_flux_training_builds_them(tiny_flux_path, flux_lora_path, preference_data_path):
    from transformers import AutoTokenizer

    args = implicit_accuracy_args(tiny_flux_path, flux_lora_path, preference_data_path, "unused", "--dtype",
                                  "bfloat16")
    transformer, ref_transformer, vae, text_encoders, tokenizers, noise_scheduler, is_lora = (
        evaluate.load_accuracy_models(args, evaluate.flux, torch.device("cpu"), torch.bfloat16))
    assert is_lora and ref_transformer is None and type(transformer).__name__ == "FluxTransformer2DModel"
    # CLIP-L and T5, in the run's dtype, as training without --upcast_vae keeps the frozen models.
    assert [type(e).__name__ for e in text_encoders] == ["CLIPTextModel", "T5EncoderModel"] and len(tokenizers) == 2
    assert transformer.dtype == vae.dtype == torch.bfloat16 and {e.dtype for e in text_encoders} == {torch.bfloat16}
    # T5 prompts padded to the trained length, not to the base tokenizer's own limit.
    base_t5_length = AutoTokenizer.from_pretrained(tiny_flux_path, subfolder="tokenizer_2").model_max_length
    assert tokenizers[1].model_max_length == FLUX_LORA_SETTINGS["max_sequence_length"] != base_t5_length
    # The training script's own flow-matching schedule: the base's training sigmas, with its dynamic shift.
    training = evaluate.flux.load_noise_scheduler(SimpleNamespace(pretrained_model_name_or_path=tiny_flux_path,
                                                                  revision=None, cache_dir=None))
    assert torch.equal(noise_scheduler.sigmas, training.sigmas) and noise_scheduler.config.use_dynamic_shifting

"""Tests of the offline helpers in tools/: tiny pipelines and synthetic preference data.

python -m pytest tests/test_tools.py -q
"""

import glob
import io
import os
import random

import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_dataset
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from fixtures import make_preference_data, tiny_models
from fixtures.make_preference_data import ATTRIBUTES, corrupt_scene, make_preference_dataset, random_scene
from fixtures.tiny_models import build_tiny_sd, build_tiny_sdxl


def generate(pipeline_path, expected_class):
    pipeline = DiffusionPipeline.from_pretrained(pipeline_path)
    assert isinstance(pipeline, expected_class)
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(
        "a red circle on a blue background, top left",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    return pipeline, output.images[0]


def decodes(jpeg_bytes):
    try:
        with Image.open(io.BytesIO(jpeg_bytes)) as image:
            image.load()
        return True
    except Exception:
        return False


def image_size_of(jpeg_bytes):
    with Image.open(io.BytesIO(jpeg_bytes)) as image:
        return image.size


def load_weights(pipeline_path):
    """{component/tensor_name: tensor} over every safetensors file of a saved pipeline."""
    weights = {}
    for weights_file in sorted(glob.glob(os.path.join(pipeline_path, "*", "*.safetensors"))):
        component = os.path.basename(os.path.dirname(weights_file))
        for name, tensor in load_file(weights_file).items():
            weights[f"{component}/{name}"] = tensor
    return weights


# Tiny pipelines


def test_tiny_sd_loads_and_generates_64px(tiny_sd_path):
    pipeline, image = generate(tiny_sd_path, StableDiffusionPipeline)
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert pipeline.vae_scale_factor == 8
    # The explicit class loads the same folder too.
    assert isinstance(StableDiffusionPipeline.from_pretrained(tiny_sd_path), StableDiffusionPipeline)


def test_tiny_sd_vpred_sets_prediction_type(tiny_sd_vpred_path):
    pipeline, image = generate(tiny_sd_vpred_path, StableDiffusionPipeline)
    assert image.size == (64, 64)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


def test_tiny_sdxl_loads_and_generates_64px(tiny_sdxl_path):
    pipeline, image = generate(tiny_sdxl_path, StableDiffusionXLPipeline)
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert pipeline.config.force_zeros_for_empty_prompt
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert pipeline.tokenizer_2.pad_token == "!"
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path), StableDiffusionXLPipeline)


@pytest.mark.parametrize("build", [build_tiny_sd, build_tiny_sdxl], ids=["sd", "sdxl"])
def test_same_seed_gives_identical_weights(build, tmp_path):
    first = load_weights(build(str(tmp_path / "first"), seed=0))
    second = load_weights(build(str(tmp_path / "second"), seed=0))
    other_seed = load_weights(build(str(tmp_path / "other_seed"), seed=1))

    assert first.keys() == second.keys() and len(first) > 0
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # ... and the seed matters: some weight of every model differs under another seed.
    for component in ("unet", "vae", "text_encoder"):
        assert any(
            not torch.equal(first[name], other_seed[name]) for name in first if name.startswith(component + "/")
        ), component


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
def test_tokenizer_splits_caption_into_words(tiny_sdxl_path, subfolder):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder=subfolder)
    input_ids = tokenizer("a red circle").input_ids
    # Word tokens between the start and end tokens, none of them unknown (a 3-token tokenizer would
    # give start, unk, end).
    assert len(input_ids) > 3
    assert input_ids[0] == tokenizer.bos_token_id and input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(input_ids[1:-1]) == ["a</w>", "red</w>", "circle</w>"]
    assert tokenizer.model_max_length == 77
    # Text outside the merged words still tokenizes (into characters), without unknowns.
    odd_ids = tokenizer("zebra #42 ü").input_ids[1:-1]
    assert len(odd_ids) > 3 and tokenizer.unk_token_id not in odd_ids


def test_every_caption_word_is_one_token(tiny_sd_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    words = set(tiny_models.CAPTION_WORDS) | set(make_preference_data.COLORS) | set(make_preference_data.SHAPES)
    split_words = [word for word in sorted(words) if len(tokenizer(word).input_ids) != 3]
    assert split_words == []


def test_bpe_files_give_the_same_tokenizer(tiny_sd_path, tmp_path):
    # vocab.json + merges.txt alone (what transformers 4's slow tokenizer reads) tokenize like tokenizer.json.
    tokenizer_dir = os.path.join(tiny_sd_path, "tokenizer")
    slow_files_dir = tmp_path / "bpe-files-only"
    slow_files_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (slow_files_dir / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    caption = "a photo of an orange triangle on a black background, bottom right!"
    assert (
        CLIPTokenizer.from_pretrained(str(slow_files_dir))(caption).input_ids
        == CLIPTokenizer.from_pretrained(tokenizer_dir)(caption).input_ids
    )


def test_text_encoder_matches_tokenizer(tiny_sd_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    config = pipeline.text_encoder.config
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id  # CLIP pools at this id
    assert config.max_position_embeddings == tokenizer.model_max_length


# Preference data


def test_pickapic_layout_loads_with_ties_and_broken_rows(tmp_path):
    output_dir = make_preference_dataset(
        str(tmp_path / "data"), num_pairs=8, num_ties=3, num_undecodable=2, num_rows_per_file=5
    )
    parquet_files = sorted(glob.glob(os.path.join(output_dir, "*.parquet")))
    assert len(parquet_files) == 3  # 13 rows, 5 per file

    dataset = load_dataset(output_dir, split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    assert len(dataset) == 8 + 3 + 2
    same_via_parquet_builder = load_dataset(
        "parquet", data_files=parquet_files, split="train", cache_dir=str(tmp_path / "cache")
    )
    assert len(same_via_parquet_builder) == len(dataset)

    ties = [row for row in dataset if row["label_0"] == 0.5]
    assert len(ties) == 3 and all(row["label_1"] == 0.5 for row in ties)
    decided = [row for row in dataset if row["label_0"] != 0.5]
    assert all({row["label_0"], row["label_1"]} == {0.0, 1.0} for row in decided)
    assert {row["label_0"] for row in decided} == {0.0, 1.0}  # the winner sits in both slots
    assert all(isinstance(row["caption"], str) and row["caption"] for row in dataset)

    broken_rows = [row for row in dataset if not (decodes(row["jpg_0"]) and decodes(row["jpg_1"]))]
    assert len(broken_rows) == 2
    assert all(row["label_0"] != 0.5 for row in broken_rows)  # labels stay valid on broken rows
    good_image = next(row["jpg_0"] for row in dataset if decodes(row["jpg_0"]))
    assert image_size_of(good_image) == (64, 64) and good_image[:2] == b"\xff\xd8"  # JPEG magic


def test_shared_fixture_dataset(preference_data_path, tmp_path):
    dataset = load_dataset(preference_data_path, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 36
    assert sum(row["label_0"] == 0.5 for row in dataset) == 4


def test_chosen_rejected_layout(tmp_path):
    output_dir = make_preference_dataset(str(tmp_path / "data"), num_pairs=6, layout="chosen_rejected")
    dataset = load_dataset(output_dir, split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert len(dataset) == 6  # ties have no meaning without labels, so none are written
    assert all(decodes(row["chosen"]) and decodes(row["rejected"]) for row in dataset)


def test_non_square_images_vary_in_size(tmp_path):
    output_dir = make_preference_dataset(str(tmp_path / "data"), num_pairs=12, num_ties=0, non_square=True)
    dataset = load_dataset(output_dir, split="train", cache_dir=str(tmp_path / "cache"))
    size_pairs = [(image_size_of(row["jpg_0"]), image_size_of(row["jpg_1"])) for row in dataset]
    sizes = {size for pair in size_pairs for size in pair}
    assert all(width != height for width, height in sizes)
    assert len(sizes) > 1
    assert any(size_0 != size_1 for size_0, size_1 in size_pairs)  # winner and loser may differ in size


def test_same_seed_gives_identical_dataset(tmp_path):
    first = make_preference_dataset(str(tmp_path / "first"), num_pairs=4, num_ties=1, seed=3)
    second = make_preference_dataset(str(tmp_path / "second"), num_pairs=4, num_ties=1, seed=3)
    other = make_preference_dataset(str(tmp_path / "other"), num_pairs=4, num_ties=1, seed=4)
    assert pq.read_table(first).equals(pq.read_table(second))
    assert not pq.read_table(first).equals(pq.read_table(other))


def test_rerun_replaces_old_shards(tmp_path):
    output_dir = str(tmp_path / "data")
    make_preference_dataset(output_dir, num_pairs=6, num_ties=0, num_rows_per_file=2)
    make_preference_dataset(output_dir, num_pairs=4, num_ties=0)
    assert len(glob.glob(os.path.join(output_dir, "*.parquet"))) == 1
    assert pq.read_table(output_dir).num_rows == 4


def test_loser_differs_from_caption_in_one_attribute():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        wrong = corrupt_scene(scene, rng)
        assert sum(scene[attribute] != wrong[attribute] for attribute in ATTRIBUTES) == 1
        assert wrong["shape_color"] != wrong["background_color"]  # the shape stays visible


# Command lines


@pytest.mark.parametrize("module", [tiny_models, make_preference_data], ids=["tiny_models", "make_preference_data"])
def test_cli_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--output_dir" in capsys.readouterr().out


def test_cli_builds(tmp_path):
    tiny_models.main(tiny_models.parse_args(["--family", "sd", "--output_dir", str(tmp_path / "sd"), "--seed", "1"]))
    assert os.path.isfile(tmp_path / "sd" / "model_index.json")
    make_preference_data.main(
        make_preference_data.parse_args(
            ["--output_dir", str(tmp_path / "data"), "--num_pairs", "3", "--num_ties", "1", "--non_square"]
        )
    )
    assert pq.read_table(str(tmp_path / "data")).num_rows == 4


def test_cli_rejects_vpred_sdxl():
    with pytest.raises(SystemExit) as exit_info:
        tiny_models.parse_args(["--family", "sdxl", "--output_dir", "unused", "--prediction_type", "v_prediction"])
    assert exit_info.value.code == 2

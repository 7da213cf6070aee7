"""--streaming: the same pairs as the map-style dataset, disjoint shards per process, exact mid-stream resume."""

import hashlib
import itertools

import datasets
import pytest
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import CLIPTokenizer

import train_diffusion_dpo as sd
from launch_utils import launch, max_abs_difference, trained_weights
from fixtures.make_preference_data import make_preference_dataset

# datasets sleeps 5 s whenever a multi-shard stream ends (a grace period for arrow's threads); these in-process
# tests end streams a dozen times, so the grace period is skipped here.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


@pytest.fixture(scope="module")
def sharded_data(tmp_path_factory):
    """24 pairs, 3 ties and 1 undecodable row over 4 parquet files (the stream's shards)."""
    path = tmp_path_factory.mktemp("sharded")
    return make_preference_dataset(str(path), num_pairs=24, num_ties=3, num_undecodable=1, num_rows_per_file=7)


def args_for(data, *extra):
    return sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", data, "--resolution", "64",
                          "--proportion_empty_prompts", "0", "--no_hflip", "--max_train_steps", "1", *extra])


def fingerprint(example):
    """What makes a pair a pair: its caption tokens and both images' pixels."""
    digest = hashlib.sha256(example["input_ids"].numpy().tobytes())
    digest.update(example["pixels_w"].numpy().tobytes())
    digest.update(example["pixels_l"].numpy().tobytes())
    return digest.hexdigest()


def stream_for(data, tokenizer, rank=0, world=1, **extra):
    args = args_for(data, "--streaming", "--shuffle_buffer_size", "5")
    stream, columns, _ = sd.load_preference_dataset(args)
    stream = split_dataset_by_node(stream, rank=rank, world_size=world).shuffle(seed=0, buffer_size=5)
    return sd.StreamingPairDataset(stream, columns, tokenizer, args, rank)


def one_epoch(streaming_dataset):
    return list(itertools.takewhile(lambda e: e["stream_state"][0] == 0, iter(streaming_dataset)))


@pytest.fixture(scope="module")
def tokenizer(tiny_sd_path):
    return CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")


def test_streaming_yields_the_same_pairs_as_the_map_style_dataset(sharded_data, tokenizer):
    args = args_for(sharded_data)
    dataset, columns, counts = sd.load_preference_dataset(args)
    pairs = sd.PreferencePairDataset(dataset, columns, tokenizer, args)
    usable = [pairs[i] for i in range(len(pairs))]
    expected = {fingerprint(e) for e in usable if not e["skipped"]}
    streamed = one_epoch(stream_for(sharded_data, tokenizer))
    assert len(streamed) == len(expected) == 24
    assert {fingerprint(e) for e in streamed} == expected
    reasons = sorted(reason for e in streamed for _, reason in e["skipped"])
    assert reasons == ["ties"] * 3 + ["undecodable_image"]


def test_two_processes_read_disjoint_shards(sharded_data, tokenizer):
    first = {fingerprint(e) for e in one_epoch(stream_for(sharded_data, tokenizer, rank=0, world=2))}
    second = {fingerprint(e) for e in one_epoch(stream_for(sharded_data, tokenizer, rank=1, world=2))}
    assert first and second and not first & second
    assert len(first | second) == 24


def test_resume_mid_stream_continues_at_the_right_pair(sharded_data, tokenizer):
    uninterrupted = list(itertools.islice(iter(stream_for(sharded_data, tokenizer)), 30))  # crosses an epoch
    for stop_after in (5, 23, 26):
        resumed = stream_for(sharded_data, tokenizer)
        resumed.start_state = uninterrupted[stop_after - 1]["stream_state"]
        following = list(itertools.islice(iter(resumed), 3))
        assert [fingerprint(e) for e in following] == [fingerprint(e) for e in
                                                      uninterrupted[stop_after:stop_after + 3]]
        assert [e["index"] for e in following] == [e["index"] for e in uninterrupted[stop_after:stop_after + 3]]


@pytest.mark.slow  # the in-process resume test above covers the default suite
def test_streaming_run_resumes_exactly(tiny_sd_path, sharded_data, tmp_path):
    def run(output_dir, steps, *extra):
        launch("train_diffusion_dpo.py", [
            "--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", sharded_data, "--streaming",
            "--shuffle_buffer_size", "8", "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--use_lora", "--num_validation_images", "0", "--checkpointing_steps", "3",
            "--max_train_steps", str(steps), *extra])

    run(tmp_path / "whole", 6)
    run(tmp_path / "halves", 3)
    run(tmp_path / "halves", 6, "--resume_from_checkpoint", "latest")
    assert (tmp_path / "halves" / "checkpoint-3" / "stream_state_0.json").exists()
    assert max_abs_difference(trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "halves")) < 1e-6


def test_streaming_needs_max_train_steps_and_no_cache(sharded_data, capsys):
    base = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", sharded_data, "--streaming"]
    with pytest.raises(SystemExit):
        sd.parse_args(base)
    assert "give --max_train_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sd.parse_args(base + ["--max_train_steps", "5", "--cache_latents"])
    assert "does not combine with --streaming" in capsys.readouterr().err
    assert load_dataset(sharded_data, split="train", streaming=True).n_shards == 4

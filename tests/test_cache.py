"""--cache_latents: the same training as without it, encoders run once, and a stale cache is never reused."""

import json

import numpy as np
import pytest
import torch

import train_diffusion_dpo as sd
from launch_utils import logged_scalars, max_abs_difference, max_movement, run_in_process, trained_weights
from fixtures.tiny_models import build_tiny_sd

def run_args(model, data, output_dir, cache_dir, *extra):
    # prompt dropout and flips stay on: the cache must reproduce both
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--checkpointing_steps", "100", "--max_train_steps", "4",
            "--use_lora", "--adam_epsilon", "1e-4", "--proportion_empty_prompts", "0.3",
            "--latent_cache_dir", cache_dir, "--vae_encode_batch_size", "5", *extra]


def cache_stats(output_dir):
    return json.loads((output_dir / "latent_cache_stats.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_sd_path, preference_data_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-runs")
    cache_dir = root / "cache"
    # In process: main() as a one-process launch runs it (the launched path is covered by the other run tests)
    for name, extra in (("uncached", []), ("cached", ["--cache_latents"]), ("reused", ["--cache_latents"])):
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, root / name, cache_dir, *extra))
    return root


def test_cached_run_trains_like_the_uncached_run(runs):
    # The same pairs, flips, dropped prompts, noise and timesteps; only float summation order differs.
    assert logged_scalars(runs / "cached") == pytest.approx(logged_scalars(runs / "uncached"), rel=1e-3)
    for metric in ("train/model_mse_w", "train/ref_mse_l"):
        assert logged_scalars(runs / "cached", metric) == pytest.approx(logged_scalars(runs / "uncached", metric),
                                                                       rel=1e-5)
    cached, uncached = trained_weights(runs / "cached"), trained_weights(runs / "uncached")
    assert max_abs_difference(cached, uncached) < 1e-2 * max_movement(uncached)  # 4 steps of beta-5000 noise


def test_second_run_reuses_the_cache_without_running_the_encoders(runs):
    first, second = cache_stats(runs / "cached"), cache_stats(runs / "reused")
    assert not first["reused"] and first["images_encoded"] == 32 * 2 * 2  # pairs x (w, l) x (flip or not)
    assert second["reused"] and second["images_encoded"] == 0 and second["prompts_encoded"] == 0
    assert second["cache_dir"] == first["cache_dir"]
    assert max_abs_difference(trained_weights(runs / "reused"), trained_weights(runs / "cached")) == 0


def test_text_embeddings_are_stored_once_per_unique_prompt(runs, preference_data_path):
    import datasets

    stats = cache_stats(runs / "cached")
    kept = datasets.load_dataset(preference_data_path, split="train").filter(lambda row: row["label_0"] != 0.5)
    unique_prompts = len(set(kept["caption"]) | {""})  # plus the empty prompt of prompt dropout
    assert stats["prompts_encoded"] == unique_prompts
    embeddings = np.load(f"{stats['cache_dir']}/text_text_embeddings.npy", mmap_mode="r")
    assert embeddings.shape[0] == unique_prompts
    assert np.load(f"{stats['cache_dir']}/row_prompt.npy").shape == (32,)


def test_changed_resolution_model_or_data_gives_a_new_cache(tiny_sd_path, preference_data_path, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    def key(model_path, *extra):
        args = sd.parse_args(["--pretrained_model_name_or_path", model_path, "--train_data_dir",
                              preference_data_path, "--latent_cache_dir", str(tmp_path), "--cache_latents", *extra])
        dataset, columns, _ = sd.load_preference_dataset(args)
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder")
        return sd.latent_cache_path(args, dataset, columns, vae, [text_encoder], np.float32)

    base = key(tiny_sd_path, "--resolution", "64")
    assert key(tiny_sd_path, "--resolution", "64") == base
    assert key(tiny_sd_path, "--resolution", "128") != base
    assert key(tiny_sd_path, "--resolution", "64", "--no_hflip") != base
    assert key(tiny_sd_path, "--resolution", "64", "--max_train_samples", "10") != base
    # the same folder name with other weights in it: the weights decide, not the path
    other = build_tiny_sd(str(tmp_path / "model"), seed=1)
    same_path_first = key(other, "--resolution", "64")
    build_tiny_sd(str(tmp_path / "model"), seed=2)
    assert key(other, "--resolution", "64") != same_path_first


def test_cache_refuses_random_crop(preference_data_path, capsys):
    with pytest.raises(SystemExit):
        sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
                       "--cache_latents", "--random_crop"])
    assert "drop --random_crop" in capsys.readouterr().err


def test_cached_posteriors_match_fresh_encoding(runs, tiny_sd_path, preference_data_path):
    from diffusers import AutoencoderKL

    cache = sd.LatentCache(__import__("pathlib").Path(cache_stats(runs / "cached")["cache_dir"]))
    args = sd.parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
                          "--resolution", "64"])
    dataset, columns, _ = sd.load_preference_dataset(args)
    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    winner, loser = sd.PreferencePairDataset(dataset, columns, None, args).decode_pair(dataset[3])
    pixels_w, _, _, _ = sd.preprocess_pair(winner, loser, 64, False, False, None)
    with torch.no_grad():
        fresh = vae.encode(torch.stack([pixels_w, torch.flip(pixels_w, dims=[-1])])).latent_dist.parameters
    assert torch.allclose(torch.from_numpy(np.array(cache.posteriors[3, 0])), fresh, atol=1e-5)

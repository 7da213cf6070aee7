"""Session-wide fixtures: tiny pipelines and a preference dataset, built once per test run from configs.

Build the same things by hand with fixtures/tiny_models.py and fixtures/make_preference_data.py.
"""

import os

# Nothing in the default suite may reach the Hub; with this set, an accidental download fails at once
# instead of hanging. Set HF_HUB_OFFLINE=0 yourself to run tests marked `hub`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread, as `accelerate launch` gives each training process: with two test workers on two cores, more threads
# only oversubscribe the CPU (tiny ops become hundreds of times slower), and in-process numbers match launched runs.
torch.set_num_threads(1)

from fixtures.make_preference_data import make_preference_dataset  # noqa: E402
from fixtures.tiny_models import build_tiny_sd, build_tiny_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """Folder of a tiny StableDiffusionPipeline (epsilon prediction, 64x64 images)."""
    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sd_vpred_path(tmp_path_factory):
    """Folder of a tiny StableDiffusionPipeline whose scheduler says prediction_type v_prediction."""
    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd-vpred")), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """Folder of a tiny StableDiffusionXLPipeline (two text encoders, 64x64 images)."""
    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def preference_data_path(tmp_path_factory):
    """Pick-a-Pic-layout parquet folder: 32 usable pairs plus 4 ties (0.5/0.5), 64x64 JPEGs, no broken rows."""
    return make_preference_dataset(str(tmp_path_factory.mktemp("preference-data")), num_pairs=32, num_ties=4)


# The longest files first. `make test` runs two workers with `--dist loadfile`: each takes the next whole file when
# it is free, in collection order, so a long file collected last would run alone at the end while the other worker
# idles. Longest first, the two end within a short file of each other. Seconds of work on 2 cores, measured
# (`--durations=0`, summed per file); files not listed run last.
LONGEST_FIRST = ("test_toy.py",  # ~115
                 "test_configs.py", "test_reliability_two.py",  # ~100
                 "test_train_sd3.py", "test_reference_errors.py", "test_bench.py",  # ~75-85
                 "test_pipeline_dpo.py",  # ~60
                 "test_train_sd.py", "test_relabel_evaluate.py", "test_reliability.py", "test_train_flux.py",
                 "test_train_sdxl.py", "test_gpu_check.py", "test_users_path.py",  # ~30-45
                 "test_defaults_and_flags.py", "test_objectives.py", "test_cache.py", "test_tools.py",
                 "test_streaming.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept

"""Reliability, round two: shared caches, requeued jobs, preemption under `accelerate launch`, runs that go bad,
hostile inputs. Each test reproduces a failure that a cluster user hit (issue "Reliability, round two")."""

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import train_diffusion_dpo as sd
from fixtures.make_hostile_data import make_hostile_dataset
from fixtures.make_preference_data import make_preference_dataset
from launch_utils import REPO_ROOT, launch_command, max_abs_difference, run_in_process, summary, trained_weights

SCRIPT = "train_diffusion_dpo.py"


def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "4", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--use_lora", "--max_train_steps", "3", "--checkpointing_steps", "1",
            *extra]


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory):
    return make_hostile_dataset(str(tmp_path_factory.mktemp("hostile")))[0]


@pytest.fixture(scope="module")
def finished_run(tiny_sd_path, hostile_data, tmp_path_factory):
    """A finished 3-step LoRA run on the hostile data with checkpoints 1, 2 and 3 (bad rows found in steps 1-2)."""
    output_dir = tmp_path_factory.mktemp("finished")
    run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir))
    return output_dir


def copy_run(finished_run, tmp_path, *keep):
    """A copy of the finished run's folder holding only `keep` (all when empty)."""
    target = tmp_path / "run"
    shutil.copytree(finished_run, target, symlinks=True)
    if keep:
        for path in list(target.iterdir()):
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return target


# ---------------------------------------------------------------------------------------------------------------
# 1-2. The latent cache: concurrent jobs, damaged folders, content keys
# ---------------------------------------------------------------------------------------------------------------
def cache_args(model, data, output_dir, cache_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--seed", "0", "--num_validation_images", "0",
            "--use_lora", "--learning_rate", "1e-4", "--max_train_steps", "1", "--cache_latents",
            "--latent_cache_dir", cache_dir, "--vae_encode_batch_size", "4", *extra]


def cache_stats(output_dir):
    return json.loads((Path(output_dir) / "latent_cache_stats.json").read_text())


def test_a_second_job_waits_for_the_cache_the_first_is_building_and_reuses_it(tiny_sd_path, preference_data_path,
                                                                               tmp_path):
    cache_dir = tmp_path / "cache"
    first = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / SCRIPT)] + cache_args(tiny_sd_path, preference_data_path, tmp_path / "a",
                                                               cache_dir),
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFUSION_DPO_TEST_CACHE_PAUSE": "6"})
    deadline = time.time() + 120
    while not (cache_dir.exists() and [p for p in cache_dir.iterdir() if p.is_dir()]):
        assert first.poll() is None and time.time() < deadline, "the first job never started its cache"
        time.sleep(0.1)
    building = [p.name for p in cache_dir.iterdir() if p.is_dir()]
    # mid-build, nothing sits at a cache's final path: a partial cache can never be found and reused
    assert all(name.startswith(".building-") for name in building), building
    run_in_process(sd, cache_args(tiny_sd_path, preference_data_path, tmp_path / "b", cache_dir))
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 0, output[-3000:]
    assert not cache_stats(tmp_path / "a")["reused"]
    second = cache_stats(tmp_path / "b")
    assert second["reused"] and second["images_encoded"] == 0  # it waited for the first job, then reused its cache
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [Path(second["cache_dir"]).name]


def test_a_damaged_cache_is_rebuilt_with_the_reason_logged(tiny_sd_path, preference_data_path, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    run_in_process(sd, cache_args(tiny_sd_path, preference_data_path, tmp_path / "a", cache_dir))
    built = Path(cache_stats(tmp_path / "a")["cache_dir"])
    posteriors = built / "posteriors.npy"
    with open(posteriors, "r+b") as f:  # a cache cut short (a full disk, a killed copy)
        f.truncate(posteriors.stat().st_size // 2)
    with caplog.at_level(logging.INFO):
        run_in_process(sd, cache_args(tiny_sd_path, preference_data_path, tmp_path / "b", cache_dir))
    stats = cache_stats(tmp_path / "b")
    assert not stats["reused"] and stats["images_encoded"] > 0
    assert "rebuilding" in caplog.text.lower() and "posteriors.npy" in caplog.text


def test_the_cache_key_follows_the_data_not_its_path_and_mtime(tiny_sd_path, tmp_path):
    # Two machines share ~/.cache/diffusion-dpo, each with its own data at the same path and mtime: `datasets`
    # gives both the same fingerprint, but not the same images.
    data = Path(make_preference_dataset(str(tmp_path / "data"), num_pairs=8, num_ties=0, seed=0))
    cache_dir = tmp_path / "cache"
    run_in_process(sd, cache_args(tiny_sd_path, data, tmp_path / "a", cache_dir, "--cache_dir", tmp_path / "hf-a"))
    parquet = next(data.glob("*.parquet"))
    stat = parquet.stat()
    other = Path(make_preference_dataset(str(tmp_path / "other"), num_pairs=8, num_ties=0, seed=1))
    shutil.copyfile(next(other.glob("*.parquet")), parquet)
    os.utime(parquet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    run_in_process(sd, cache_args(tiny_sd_path, data, tmp_path / "b", cache_dir, "--cache_dir", tmp_path / "hf-b"))
    assert not cache_stats(tmp_path / "b")["reused"]
    assert cache_stats(tmp_path / "a")["cache_dir"] != cache_stats(tmp_path / "b")["cache_dir"]


def test_images_stored_as_paths_enter_the_key_by_their_files_content(tmp_path):
    from datasets import Dataset

    image = tmp_path / "winner.jpg"
    image.write_bytes(jpeg("red"))
    dataset = Dataset.from_dict({"caption": ["c"], "jpg_0": [str(image)], "jpg_1": [str(image)], "label_0": [1.0],
                                 "label_1": [0.0]})
    columns = {"caption": "caption", "image_0": "jpg_0", "image_1": "jpg_1", "label_0": "label_0",
               "label_1": "label_1"}
    before = sd.dataset_content_digest(dataset, columns)
    image.write_bytes(jpeg("blue"))  # the same path, another image
    assert sd.dataset_content_digest(dataset, columns) != before


# ---------------------------------------------------------------------------------------------------------------
# 3-4. Which checkpoint `latest` resumes, and from which step
# ---------------------------------------------------------------------------------------------------------------
def test_latest_skips_damaged_checkpoints_and_says_so(finished_run, tmp_path, caplog):
    output_dir = copy_run(finished_run, tmp_path)
    adapter = output_dir / "checkpoint-3" / sd.CHECKPOINT_LORA_NAME
    with open(adapter, "r+b") as f:
        f.truncate(adapter.stat().st_size // 2)
    (output_dir / "checkpoint-4").mkdir()  # an empty folder (a copy that never happened)
    from accelerate import PartialState

    PartialState()  # the scripts' logger needs accelerate's state
    args = sd.parse_args([str(a) for a in run_args("unused", finished_run, output_dir, "--resume_from_checkpoint",
                                                   "latest")])
    with caplog.at_level(logging.WARNING):
        assert Path(sd.resolve_resume_dir(args)).name == "checkpoint-2"
    assert "checkpoint-3" in caplog.text and "checkpoint-4" in caplog.text


def test_requeueing_a_finished_run_is_a_no_op(finished_run, tiny_sd_path, hostile_data, tmp_path, caplog):
    output_dir = copy_run(finished_run, tmp_path)
    result = output_dir / sd.LORA_WEIGHTS_NAME
    before = (result.read_bytes(), result.stat().st_mtime_ns, sorted(p.name for p in output_dir.iterdir()))
    with caplog.at_level(logging.INFO):
        run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir, "--resume_from_checkpoint", "latest"))
    assert (result.read_bytes(), result.stat().st_mtime_ns, sorted(p.name for p in output_dir.iterdir())) == before
    assert "already finished" in caplog.text


def test_the_step_comes_from_the_checkpoint_and_bad_row_counts_carry_across_a_resume(finished_run, tiny_sd_path,
                                                                                    hostile_data, tmp_path):
    output_dir = tmp_path / "requeued"
    output_dir.mkdir()
    shutil.copytree(finished_run / "checkpoint-2", tmp_path / "saved-step-2")
    os.symlink(tmp_path / "saved-step-2", output_dir / "checkpoint-999")  # a folder name that lies about its step
    run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir, "--resume_from_checkpoint", "latest"))
    assert max_abs_difference(trained_weights(output_dir), trained_weights(finished_run)) < 1e-6
    finished_counts = summary(finished_run)
    assert finished_counts["missing_image"] + finished_counts["undecodable_image"] > 0  # the test has teeth
    assert summary(output_dir) == finished_counts


def test_a_checkpoint_of_the_version_before_records_still_resumes(finished_run, tiny_sd_path, hostile_data, tmp_path,
                                                                   caplog):
    # A run under way when the scripts gained checkpoint records: its checkpoints have none, and must still resume.
    output_dir = copy_run(finished_run, tmp_path, "checkpoint-2")
    for name in (sd.CHECKPOINT_RECORD, "run_state_0.json"):
        (output_dir / "checkpoint-2" / name).unlink()
    with caplog.at_level(logging.WARNING):
        run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir, "--resume_from_checkpoint", "latest"))
    assert "earlier version" in caplog.text
    assert max_abs_difference(trained_weights(output_dir), trained_weights(finished_run)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# 5-6. Non-finite streaks, the output folder
# ---------------------------------------------------------------------------------------------------------------
def test_no_checkpoint_in_a_nonfinite_streak_and_an_unfinished_run_is_not_loaded_as_finished(
        finished_run, tiny_sd_path, hostile_data, tmp_path, monkeypatch):
    from pipeline_dpo import DpoResultError, load_dpo_pipeline

    # A second, fresh run into the finished run's folder, which diverges from step 2 on.
    output_dir = copy_run(finished_run, tmp_path)
    (output_dir / "checkpoint-best-1").mkdir()  # the user's own folder
    monkeypatch.setenv("DIFFUSION_DPO_TEST_NAN_STEPS", "2,3,4,5,6")
    with pytest.raises(RuntimeError) as stopped:
        run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir, "--max_train_steps", "6",
                                    "--max_nonfinite_steps", "2", "--checkpoints_total_limit", "1"))
    message = str(stopped.value)
    assert "checkpoint-1" in message and "intact" not in message, message
    # nothing written during the streak; the limit kept the last good checkpoint; the user's folder is untouched
    assert sd.checkpoint_dirs(str(output_dir)) == ["checkpoint-1"]
    assert (output_dir / "checkpoint-best-1").is_dir()
    # The folder still holds the first run's weights beside the second run's record: refused, not loaded silently.
    with pytest.raises(DpoResultError, match="did not finish"):
        load_dpo_pipeline(tiny_sd_path, str(output_dir))


def test_the_output_dir_may_not_be_the_base_model(tiny_sd_path, preference_data_path, capsys):
    with pytest.raises(SystemExit):
        sd.parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
                       "--output_dir", str(Path(tiny_sd_path) / ".")])
    assert "base model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 7. SIGTERM through `accelerate launch`, with an optimizer step slower than the launcher's grace period
# ---------------------------------------------------------------------------------------------------------------
def start_launch(args, log_path, num_processes, env):
    command, run_env = launch_command(SCRIPT, args, num_processes, {"OMP_NUM_THREADS": "1", **env})
    log = open(log_path, "w")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_text(log_path, pattern, process, timeout=180):
    deadline = time.time() + timeout
    while not re.search(pattern, Path(log_path).read_text()):
        assert process.poll() is None, Path(log_path).read_text()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {pattern!r}"
        time.sleep(0.05)


def wait_for_launch_to_end(launcher, timeout=120):
    """Until every process of the launch (the launcher, reaped here, and its trainers) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        launcher.poll()
        try:
            os.killpg(launcher.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGKILL)
    raise AssertionError("the launch's processes were still running")


def sigterm_args(model, data, output_dir, accumulation, steps):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "1", "--gradient_accumulation_steps", str(accumulation),
            "--learning_rate", "1e-3", "--seed", "0", "--num_validation_images", "0", "--use_lora",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1000"]


def test_sigterm_to_a_one_process_launcher_checkpoints_mid_step_and_resume_finishes(tiny_sd_path,
                                                                                    preference_data_path, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    run_in_process(sd, sigterm_args(tiny_sd_path, preference_data_path, uninterrupted, 4, 3))
    output_dir, log_path = tmp_path / "run", tmp_path / "run.log"
    args = sigterm_args(tiny_sd_path, preference_data_path, output_dir, 4, 3)
    launcher = start_launch(args, log_path, 1, {"DIFFUSION_DPO_TEST_STEP_DELAY": "0.6"})
    wait_for_text(log_path, r"\b1/3\b", launcher)  # step 1 done; step 2 (4 micro-batches, 2.4 s) under way
    time.sleep(0.6)
    launcher.send_signal(signal.SIGTERM)  # to the launcher alone, as a scheduler's kill of the job's main process
    wait_for_launch_to_end(launcher)
    log = log_path.read_text()
    assert "SIGTERM" in log and not (output_dir / sd.LORA_WEIGHTS_NAME).exists(), log[-3000:]
    assert sd.checkpoint_dirs(str(output_dir)) == ["checkpoint-1"], log[-3000:]
    run_in_process(sd, args + ["--resume_from_checkpoint", "latest"])
    assert max_abs_difference(trained_weights(output_dir), trained_weights(uninterrupted)) < 1e-6


def test_sigterm_to_a_two_process_launcher_checkpoints_within_its_grace_period(tiny_sd_path, preference_data_path,
                                                                               tmp_path):
    output_dir, log_path = tmp_path / "run", tmp_path / "run.log"
    args = sigterm_args(tiny_sd_path, preference_data_path, output_dir, 8, 3)
    # torch elastic SIGKILLs the workers this many seconds after forwarding SIGTERM; a step takes 8 x 0.5 s
    launcher = start_launch(args, log_path, 2, {"DIFFUSION_DPO_TEST_STEP_DELAY": "0.5",
                                                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"})
    wait_for_text(log_path, r"\b1/3\b", launcher)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    wait_for_launch_to_end(launcher)
    log = log_path.read_text()
    assert sd.checkpoint_dirs(str(output_dir)) == ["checkpoint-1"], log[-4000:]
    assert sd.checkpoint_problem(output_dir / "checkpoint-1") is None
    assert "SIGTERM" in log
    # each process's run state beside accelerate's, and the process count a resume is checked against
    assert {p.name for p in (output_dir / "checkpoint-1").glob("run_state_*.json")} == {"run_state_0.json",
                                                                                         "run_state_1.json"}
    record = json.loads((output_dir / "checkpoint-1" / sd.CHECKPOINT_RECORD).read_text())
    assert record["settings"]["num_processes"] == 2 and record["global_step"] == 1


# ---------------------------------------------------------------------------------------------------------------
# 8. Resume with other settings
# ---------------------------------------------------------------------------------------------------------------
def test_a_new_learning_rate_on_resume_is_applied_and_recorded(finished_run, tiny_sd_path, hostile_data, tmp_path,
                                                               caplog):
    from launch_utils import logged_scalars

    output_dir = copy_run(finished_run, tmp_path, "checkpoint-1", "checkpoint-2")
    with caplog.at_level(logging.INFO):
        run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir, "--resume_from_checkpoint", "latest",
                                    "--learning_rate", "2e-4"))
    assert re.search(r"learning rate changed.*0\.001 when saved, now 0\.0002", caplog.text), caplog.text[-2000:]
    assert logged_scalars(output_dir, "train/lr")[-1] == pytest.approx(2e-4)
    record = json.loads((output_dir / "training_args.json").read_text())["run"]
    assert record["learning_rate"] == 2e-4 and record["learning_rate_changes"] == [[2, 2e-4]]
    assert max_abs_difference(trained_weights(output_dir), trained_weights(finished_run)) > 0


@pytest.mark.parametrize("flag, value, saved", [("--train_batch_size", "2", "4"), ("--rank", "4", "8")])
def test_resume_with_a_setting_the_run_depends_on_is_refused_naming_both_values(finished_run, tiny_sd_path,
                                                                                hostile_data, tmp_path, flag, value,
                                                                                saved):
    output_dir = copy_run(finished_run, tmp_path, "checkpoint-1", "checkpoint-2")
    with pytest.raises(ValueError) as refused:
        run_in_process(sd, run_args(tiny_sd_path, hostile_data, output_dir, "--resume_from_checkpoint", "latest",
                                    flag, value))
    message = str(refused.value)
    assert flag.lstrip("-") in message and f"saved {saved}" in message and f"now {value}" in message, message


# ---------------------------------------------------------------------------------------------------------------
# 9-12. Hostile data, the hub token, small items
# ---------------------------------------------------------------------------------------------------------------
def test_an_extreme_aspect_ratio_costs_no_more_than_a_square_image():
    # A 1 x 100000 PNG is a few hundred bytes; scaled before the crop it became 64 x 6.4M pixels (1.2 GB each).
    # Measured in a forked child: its peak memory starts at this process's size, and only the pair adds to it.
    import random
    import resource

    thin = Image.new("RGB", (1, 100000), (200, 30, 30))
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        winner, _, _, _ = sd.preprocess_pair(thin, thin.copy(), 64, False, True, random.Random(0))
        added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        os.write(write_end, f"{tuple(winner.shape)} {added}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        shape, added_mb = pipe.read().rsplit(" ", 1)
    os.waitpid(child, 0)
    assert shape == "(3, 64, 64)"
    assert int(added_mb) < 100  # MB of peak memory the pair added


def write_rows(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: [row[name] for row in rows] for name in rows[0]})
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    return str(folder)


def jpeg(color):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_block_of_bad_rows_does_not_make_one_pair_fill_the_epoch(tiny_sd_path, tmp_path):
    from transformers import CLIPTokenizer

    bad = [{"caption": "x", "jpg_0": b"\x00broken", "jpg_1": jpeg("red"), "label_0": 1.0, "label_1": 0.0}] * 40
    good = [{"caption": f"pair {i}", "jpg_0": jpeg((i * 20, 0, 0)), "jpg_1": jpeg("blue"), "label_0": 1.0,
             "label_1": 0.0} for i in range(10)]
    data = write_rows(tmp_path / "data", bad + good)
    args = sd.parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", data,
                          "--resolution", "64", "--output_dir", str(tmp_path / "out"),
                          "--proportion_empty_prompts", "0"])
    dataset, columns, _ = sd.load_preference_dataset(args)
    pairs = sd.PreferencePairDataset(dataset, columns, CLIPTokenizer.from_pretrained(tiny_sd_path,
                                                                                     subfolder="tokenizer"), args)
    used = {}
    for index in range(len(pairs)):
        example = pairs[index]
        row = tuple(example["input_ids"].tolist())  # each usable row has its own caption
        used[row] = used.get(row, 0) + 1
        assert all(reason == "undecodable_image" for _, reason in example["skipped"])
    assert sum(used.values()) == 50 and len(used) == 10
    assert max(used.values()) <= 12, used  # replacements spread over the usable rows (41 draws on one before)
    # after the random draws, every row in turn: a dataset with a usable row always yields one
    assert list(sd.replacement_rows(0, 0, 1, 3))[sd.MAX_REPLACEMENT_DRAWS:] == [2, 0, 1]


def test_the_hub_token_flag_is_refused_with_how_to_log_in(preference_data_path, capsys):
    with pytest.raises(SystemExit):
        sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
                       "--hub_token", "hf_SECRETnotPrinted"])
    error = capsys.readouterr().err
    assert "huggingface-cli login" in error and "HF_TOKEN" in error and "hf_SECRETnotPrinted" not in error


def test_a_fifo_given_as_an_image_is_skipped_not_waited_on(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            sd.load_pil_image(str(fifo))
        except sd.UnusableImage as error:
            outcome["reason"] = error.reason

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked in open(): release it, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("load_pil_image blocked on a FIFO")
    assert outcome.get("reason") == "undecodable_image"


def test_string_labels_mean_the_same_streamed_and_map_style(tmp_path):
    rows = [{"caption": f"c{i}", "jpg_0": jpeg("red"), "jpg_1": jpeg("blue"), "label_0": label_0, "label_1": label_1}
            for i, (label_0, label_1) in enumerate([("1", "0"), ("0", "1"), ("0.5", "0.5"), ("2", "0")])]
    data = write_rows(tmp_path / "data", rows)
    args = sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", data,
                          "--output_dir", str(tmp_path / "out")])
    dataset, columns, counts = sd.load_preference_dataset(args)
    assert counts["pairs"] == 2 and counts["ties"] == 1 and counts["invalid_labels"] == 1
    assert [sd.row_label_problem(row, columns) for row in rows] == [None, None, "ties", "invalid_labels"]


def test_an_all_bad_dataset_with_the_cache_says_so(tiny_sd_path, tmp_path):
    rows = [{"caption": "x", "jpg_0": b"\x00broken", "jpg_1": jpeg("red"), "label_0": 1.0, "label_1": 0.0}] * 4
    data = write_rows(tmp_path / "data", rows)
    with pytest.raises(ValueError, match="usable images"):
        run_in_process(sd, cache_args(tiny_sd_path, data, tmp_path / "out", tmp_path / "cache"))


def test_a_full_disk_is_named_before_the_cache_is_written(tiny_sd_path, preference_data_path, tmp_path,
                                                          monkeypatch):
    cache_dir = tmp_path / "cache"
    real_usage = shutil.disk_usage

    def nearly_full(path):
        usage = real_usage(path)
        return usage._replace(free=1000) if Path(path).resolve().is_relative_to(cache_dir.resolve()) else usage

    monkeypatch.setattr(sd.shutil, "disk_usage", nearly_full)
    with pytest.raises(OSError, match=re.escape(str(cache_dir))):
        run_in_process(sd, cache_args(tiny_sd_path, preference_data_path, tmp_path / "out", cache_dir))
    assert not [p for p in cache_dir.iterdir() if p.is_dir()]  # nothing half-written left behind


def test_a_failed_checkpoint_write_names_the_folder_and_its_free_space(tiny_sd_path, preference_data_path,
                                                                      tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / ".tmp-checkpoint-1").write_text("a file where the checkpoint's folder goes")
    with pytest.raises(OSError) as failed:
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, output_dir, "--max_train_steps", "1",
                                    "--train_batch_size", "2"))
    message = str(failed.value)
    assert str(output_dir) in message and "free" in message, message

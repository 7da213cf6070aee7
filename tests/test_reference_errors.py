"""--reference_errors: the reference's errors computed once in a pre-pass, stored, and reused by every run that draws
the same inputs; the training step never runs the reference, and a full fine-tune keeps no copy of it."""

import json
import logging
import shutil

import pytest
import torch
from accelerate.utils import DistributedType

import train_diffusion_dpo as sd
from launch_utils import launch, logged_scalars, max_abs_difference, max_movement, run_in_process, trained_weights

SCRIPT = "train_diffusion_dpo.py"
# build_models asks the accelerator for its device only; the key, whether the weights are sharded
CPU = type("CPU", (), {"device": torch.device("cpu"), "distributed_type": DistributedType.NO})()


def run_args(model, data, output_dir, *extra):
    return [str(a) for a in ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--learning_rate", "1e-3", "--seed", "0", "--num_validation_images", "0", "--checkpointing_steps", "2",
            "--max_train_steps", "4", "--reference_batch_size", "3", *extra]]


@pytest.fixture(scope="module")
def live(tiny_sd_path, preference_data_path, tmp_path_factory):
    """Runs with the live reference in every step: LoRA (beta 5000 and 1000) and the full fine-tune."""
    root = tmp_path_factory.mktemp("live")
    runs = {"lora": ["--use_lora"], "lora-beta1000": ["--use_lora", "--beta_dpo", "1000", "--loss_type", "ipo"],
            "full": ["--learning_rate", "1e-4"]}
    for name, extra in runs.items():
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, root / name, *extra))
    return root


@pytest.fixture(scope="module")
def precomputed(live, tiny_sd_path, preference_data_path, tmp_path_factory):
    """The LoRA run again with --reference_errors: the pre-pass computes and stores, then the run trains."""
    root = tmp_path_factory.mktemp("precomputed")
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, root / "lora", "--use_lora",
                                "--reference_errors", root / "errors"))
    return root


def test_precomputed_errors_train_the_weights_of_the_live_reference(live, precomputed):
    # The same reference errors (batched differently in the pre-pass: float noise only) give the same run
    assert logged_scalars(precomputed / "lora") == pytest.approx(logged_scalars(live / "lora"), rel=1e-4)
    difference = max_abs_difference(trained_weights(precomputed / "lora"), trained_weights(live / "lora"))
    assert difference < 1e-3 * max_movement(trained_weights(live / "lora")), difference
    key = json.loads((precomputed / "errors" / "key.json").read_text())
    assert key["first_step"] == 0 and key["key"]["num_processes"] == 1
    stored = __import__("numpy").load(precomputed / "errors" / "errors_rank0.npz")
    # 4 steps x 2 micro-batches x 2 pairs, a winner and a loser error each
    assert stored["errors"].shape == (16, 2) and sorted(set(stored["steps"].tolist())) == [0, 1, 2, 3]


def test_a_sweep_over_beta_and_loss_type_reuses_them_without_recomputing(live, precomputed, tiny_sd_path,
                                                                         preference_data_path, tmp_path, caplog):
    errors = precomputed / "errors"
    written = {path.name: path.stat().st_mtime_ns for path in errors.iterdir()}
    with caplog.at_level(logging.INFO):
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora", "--beta_dpo", "1000",
                                    "--loss_type", "ipo", "--reference_errors", errors))
    assert "Reading the reference errors" in caplog.text and "computed in" not in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in errors.iterdir()} == written
    difference = max_abs_difference(trained_weights(tmp_path), trained_weights(live / "lora-beta1000"))
    assert difference < 1e-3 * max_movement(trained_weights(live / "lora-beta1000")), difference


def test_a_full_fine_tune_keeps_no_reference_copy_and_trains_the_same(live, tiny_sd_path, preference_data_path,
                                                                      tmp_path):
    args = sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path / "unused", "--reference_errors",
                                  tmp_path / "errors"))
    models = sd.build_models(args, CPU, torch.float32)
    assert models[-1] is None  # no frozen reference module in memory
    assert sd.build_models(sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path / "unused")), CPU,
                           torch.float32)[-1] is not None
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "full", "--learning_rate", "1e-4",
                                "--reference_errors", tmp_path / "errors"))
    assert logged_scalars(tmp_path / "full") == pytest.approx(logged_scalars(live / "full"), rel=1e-4)
    from safetensors.torch import load_file

    base = load_file(f"{tiny_sd_path}/unet/diffusion_pytorch_model.safetensors")
    tuned, reference_run = trained_weights(tmp_path / "full"), trained_weights(live / "full")
    assert max_abs_difference(tuned, reference_run) < 1e-2 * max_abs_difference(reference_run, base)


def test_with_the_latent_cache_too(tiny_sd_path, preference_data_path, tmp_path):
    cache = ["--use_lora", "--cache_latents", "--latent_cache_dir", tmp_path / "cache"]
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "live", *cache))
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "pre", *cache, "--reference_errors",
                                tmp_path / "errors"))
    assert logged_scalars(tmp_path / "pre") == pytest.approx(logged_scalars(tmp_path / "live"), rel=1e-4)
    live_weights = trained_weights(tmp_path / "live")
    assert max_abs_difference(trained_weights(tmp_path / "pre"), live_weights) < 1e-3 * max_movement(live_weights)


def test_a_resumed_run_reads_the_rows_of_its_remaining_steps(precomputed, tiny_sd_path, preference_data_path,
                                                             tmp_path, caplog):
    shutil.copytree(precomputed / "lora" / "checkpoint-2", tmp_path / "checkpoint-2")
    with caplog.at_level(logging.INFO):
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora", "--reference_errors",
                                    precomputed / "errors", "--resume_from_checkpoint", "latest"))
    assert "Reading the reference errors" in caplog.text
    assert max_abs_difference(trained_weights(tmp_path), trained_weights(precomputed / "lora")) < 1e-6
    # a resumed full fine-tune whose folder has no errors cannot compute them any more, and says so
    full = run_args(tiny_sd_path, preference_data_path, tmp_path / "full", "--learning_rate", "1e-4")
    run_in_process(sd, full + ["--max_train_steps", "2"])
    with pytest.raises(ValueError, match="resumed full fine-tune can no longer compute them"):
        run_in_process(sd, full + ["--reference_errors", tmp_path / "none", "--resume_from_checkpoint", "latest"])


def test_a_resumed_full_fine_tune_reads_the_folder_it_started_with(live, tiny_sd_path, preference_data_path,
                                                                   tmp_path, caplog):
    # The key is taken before the checkpoint's (trained) weights are loaded, so the resumed run matches its folder.
    # Before that fix the resumed policy's fingerprint never matched and the run refused to start.
    full = ["--learning_rate", "1e-4", "--reference_errors", tmp_path / "errors"]
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "first", *full))
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    with caplog.at_level(logging.INFO):
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "resumed", *full,
                                    "--resume_from_checkpoint", "latest"))
    assert "Reading the reference errors" in caplog.text
    assert max_abs_difference(trained_weights(tmp_path / "resumed"), trained_weights(tmp_path / "first")) < 1e-6
    # resumed at the very end, with a folder of another run: nothing is left to compute, and nothing crashes
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "lora", "--use_lora"))
    (tmp_path / "lora" / sd.RUN_RESULT).unlink()  # killed after its last checkpoint: not finished, so it resumes
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "lora", "--use_lora",
                                "--reference_errors", tmp_path / "fresh", "--resume_from_checkpoint", "latest"))
    assert json.loads((tmp_path / "fresh" / "key.json").read_text())["first_step"] == 4


KEY_CHANGES = [["--seed", "1"], ["--resolution", "32"], ["--proportion_empty_prompts", "0.5"], ["--no_hflip"],
               ["--random_crop"], ["--train_batch_size", "1"], ["--gradient_accumulation_steps", "1"],
               ["--max_train_steps", "6"], ["--max_train_samples", "10"], ["--use_lora"], ["--prediction_type",
                                                                                         "v_prediction"]]


def key_of(args, models, dataset, run_settings=None):
    args.reference_errors = args.reference_errors or "the folder"  # a key exists only with the flag
    run = type("Run", (), {"num_processes": 1, "mixed_precision": "no", "max_train_steps": args.max_train_steps or 4,
                           "train_dataset": dataset, **(run_settings or {})})()
    return sd.reference_errors_key(args, CPU, run, models, dataset)


@pytest.mark.parametrize("change", KEY_CHANGES, ids=lambda change: change[0])
def test_every_setting_that_changes_the_inputs_changes_the_key(change, tiny_sd_path, preference_data_path, tmp_path):
    base_args = sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path))
    changed_args = sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path) + change)
    models = sd.build_models(base_args, CPU, torch.float32)
    bundle = (models[4], models[5], models[3], models[2])
    dataset = sd.load_preference_dataset(base_args)[0]
    assert key_of(base_args, bundle, dataset) != key_of(changed_args, bundle, dataset)


def test_launch_data_and_weights_change_the_key_and_sweep_flags_do_not(tiny_sd_path, tiny_sd_vpred_path,
                                                                        preference_data_path, tmp_path):
    args = sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path))
    models = sd.build_models(args, CPU, torch.float32)
    bundle = (models[4], models[5], models[3], models[2])
    dataset = sd.load_preference_dataset(args)[0]
    key = key_of(args, bundle, dataset)
    assert key_of(args, bundle, dataset, {"num_processes": 2}) != key
    assert key_of(args, bundle, dataset, {"mixed_precision": "bf16"}) != key
    other = sd.build_models(sd.parse_args(run_args(tiny_sd_vpred_path, preference_data_path, tmp_path)), CPU,
                            torch.float32)
    with torch.no_grad():  # other reference weights, same everything else
        next(bundle[0].parameters()).add_(1.0)
    assert key_of(args, bundle, dataset) != key
    assert other is not None
    for flag in (["--beta_dpo", "100"], ["--loss_type", "hinge"], ["--learning_rate", "5e-4"], ["--rank", "16"],
                 ["--use_adafactor"], ["--output_dir", str(tmp_path / "elsewhere")]):
        swept = sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path) + flag)
        assert key_of(swept, bundle, dataset) == key_of(args, bundle, dataset), flag


def test_lora_targets_rank_and_alpha_leave_the_key_alone(tiny_sd_path, preference_data_path, tmp_path):
    keys = []
    for flags in ([], ["--lora_target_modules", "to_q,to_v", "--rank", "4", "--lora_alpha", "16"]):
        args = sd.parse_args(run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora", *flags))
        models = sd.build_models(args, CPU, torch.float32)
        keys.append(key_of(args, (models[4], models[5], models[3], models[2]), sd.load_preference_dataset(args)[0]))
    assert keys[0] == keys[1]


def test_a_mismatched_key_is_named_then_recomputed_or_refused(precomputed, tiny_sd_path, preference_data_path,
                                                             tmp_path, caplog):
    errors = tmp_path / "errors"
    shutil.copytree(precomputed / "errors", errors)
    with pytest.raises(ValueError, match=r"holds the errors of another run \(differs in args.seed\).*refuse|"
                                         r"differs in args.seed"):
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "refused", "--use_lora",
                                    "--seed", "1", "--reference_errors", errors,
                                    "--reference_errors_on_mismatch", "refuse"))
    with caplog.at_level(logging.WARNING):
        run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "recomputed", "--use_lora",
                                    "--seed", "1", "--reference_errors", errors))
    assert "differs in args.seed" in caplog.text
    assert json.loads((errors / "key.json").read_text())["key"]["args"]["seed"] == 1


def test_sft_and_streaming_refuse_it(preference_data_path, capsys):
    for extra, message in ((["--loss_type", "sft"], "has no reference"),
                           (["--streaming", "--max_train_steps", "2"], "a stream cannot")):
        with pytest.raises(SystemExit):
            sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
                           "--reference_errors", "somewhere", *extra])
        assert message in capsys.readouterr().err


def test_two_processes_each_read_their_own_pairs(live, tiny_sd_path, preference_data_path, tmp_path):
    # 2 processes x 1 pair x 2 accumulation = the live run's 2 pairs x 2 per step; a large Adam epsilon, as in the
    # DDP test, keeps float-summation noise from becoming lr-sized steps
    common = ["--use_lora", "--adam_epsilon", "1e-4", "--checkpointing_steps", "100"]
    run_in_process(sd, run_args(tiny_sd_path, preference_data_path, tmp_path / "one", *common))
    launch(SCRIPT, run_args(tiny_sd_path, preference_data_path, tmp_path / "two", *common, "--train_batch_size", "1",
                            "--reference_errors", tmp_path / "errors"), num_processes=2)
    assert sorted(p.name for p in (tmp_path / "errors").iterdir()) == ["errors_rank0.npz", "errors_rank1.npz",
                                                                       "key.json"]
    assert logged_scalars(tmp_path / "two") == pytest.approx(logged_scalars(tmp_path / "one"), rel=1e-3)
    one, two = trained_weights(tmp_path / "one"), trained_weights(tmp_path / "two")
    assert max_abs_difference(one, two) < 1e-2 * max_movement(one)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_other_scripts_train_the_same_weights_with_precomputed_errors(family, tiny_sdxl_path,
                                                                          preference_data_path, tmp_path):
    """The pre-pass and the reference-free step are copied pieces; each script's own per-pair function takes the
    passes: the same run with and without --reference_errors, LoRA and full."""
    import importlib

    from fixtures.tiny_models import build_tiny_flux, build_tiny_sd3

    script = importlib.import_module({"sdxl": "train_diffusion_dpo_sdxl", "sd3": "train_diffusion_dpo_sd3",
                                      "flux": "train_diffusion_dpo_flux"}[family])
    base = {"sdxl": lambda: tiny_sdxl_path, "sd3": lambda: build_tiny_sd3(str(tmp_path / "base")),
            "flux": lambda: build_tiny_flux(str(tmp_path / "base"))}[family]()
    extra = ["--max_sequence_length", "32"] if family != "sdxl" else []
    # The pre-pass forwards the training micro-batches as they are (2 pairs): the same kernels, so the same errors
    # to the bit. Joined into larger forwards they differ by float noise, which Adam's first steps (lr * sign(g) for
    # near-zero gradients) turn into lr-sized weight differences (the other tests compare with that in mind).
    extra += ["--reference_batch_size", "2"]
    for mode, flags in (("lora", ["--use_lora"]), ("full", ["--learning_rate", "1e-4"])):
        common = run_args(base, preference_data_path, tmp_path / f"{mode}-live", *flags, *extra,
                          "--max_train_steps", "2")
        run_in_process(script, common)
        run_in_process(script, [a.replace(f"{mode}-live", f"{mode}-pre") for a in common] + [
            "--reference_errors", str(tmp_path / f"{mode}-errors")])
        if mode == "lora":
            live_weights = trained_weights(tmp_path / f"{mode}-live")
            pre_weights = trained_weights(tmp_path / f"{mode}-pre")
        else:
            from safetensors.torch import load_file

            folder = "unet" if family == "sdxl" else "transformer"
            live_weights, pre_weights = (load_file(tmp_path / f"{mode}-{kind}" / folder /
                                                   "diffusion_pytorch_model.safetensors") for kind in ("live", "pre"))
        assert max_abs_difference(pre_weights, live_weights) < 1e-6, (family, mode)

"""Defaults and flags a diffusers user expects (issue "Defaults, flags, model cards and pictures"): the parts done so
far. A LoRA run trains at its own default rate, `--report_to none`, no silent flag abbreviations, a prompts file,
the schedule's cycles and power."""

import logging
import re
from types import SimpleNamespace

import pytest
import torch

import train_diffusion_dpo as sd
import train_diffusion_dpo_flux as flux
import train_diffusion_dpo_sd3 as sd3
import train_diffusion_dpo_sdxl as sdxl
from launch_utils import max_abs_difference, max_movement, run_in_process, trained_weights

SCRIPTS = (sd, sdxl, sd3, flux)


def test_a_lora_run_without_a_learning_rate_trains_and_report_to_none_writes_no_logs(tiny_sd_path,
                                                                                     preference_data_path, tmp_path,
                                                                                     caplog):
    with caplog.at_level(logging.INFO):
        run_in_process(sd, ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
                            "--output_dir", tmp_path, "--resolution", "64", "--train_batch_size", "2", "--use_lora",
                            "--max_train_steps", "3", "--num_validation_images", "0", "--report_to", "none"])
    assert max_movement(trained_weights(tmp_path)) > 1e-5  # at the full fine-tune's 1e-8 it moved by ~3e-8
    assert f"Learning rate = {sd.DEFAULT_LORA_LEARNING_RATE:g} (the LoRA default" in caplog.text
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_the_default_rate_follows_the_mode_and_report_to_takes_every_accelerate_tracker(script, preference_data_path):
    from accelerate.utils import LoggerType

    base = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path]
    assert script.parse_args(base).learning_rate == script.DEFAULT_FULL_LEARNING_RATE == 1e-8
    assert script.parse_args(base + ["--use_lora"]).learning_rate == script.DEFAULT_LORA_LEARNING_RATE
    assert script.parse_args(base + ["--use_lora", "--learning_rate", "1e-4"]).learning_rate == 1e-4
    assert set(script.REPORT_TO) == {tracker.value for tracker in LoggerType} | {"none"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_no_flag_is_silently_abbreviated(script, preference_data_path, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
                           "--validation_prom", "a red circle"])
    assert "unrecognized arguments: --validation_prom" in capsys.readouterr().err


# Every flag of diffusers' examples/text_to_image/train_text_to_image{,_sdxl,_lora,_lora_sdxl}.py (diffusers main,
# December 2026), and --tracker_name of its DPO research example; switches are marked True.
DIFFUSERS_TEXT_TO_IMAGE_FLAGS = {
    "input_perturbation": False, "pretrained_model_name_or_path": False, "revision": False, "variant": False,
    "dataset_name": False, "dataset_config_name": False, "train_data_dir": False, "image_column": False,
    "caption_column": False, "max_train_samples": False, "validation_prompts": False, "output_dir": False,
    "cache_dir": False, "seed": False, "resolution": False, "center_crop": True, "random_flip": True,
    "train_batch_size": False, "num_train_epochs": False, "max_train_steps": False,
    "gradient_accumulation_steps": False, "gradient_checkpointing": True, "learning_rate": False, "scale_lr": True,
    "lr_scheduler": False, "lr_warmup_steps": False, "snr_gamma": False, "dream_training": True,
    "dream_detail_preservation": False, "use_8bit_adam": True, "allow_tf32": True, "use_ema": True,
    "offload_ema": True, "foreach_ema": True, "non_ema_revision": False, "dataloader_num_workers": False,
    "adam_beta1": False, "adam_beta2": False, "adam_weight_decay": False, "adam_epsilon": False,
    "max_grad_norm": False, "push_to_hub": True, "hub_token": False, "prediction_type": False,
    "hub_model_id": False, "logging_dir": False, "mixed_precision": False, "report_to": False, "local_rank": False,
    "checkpointing_steps": False, "checkpoints_total_limit": False, "resume_from_checkpoint": False,
    "enable_xformers_memory_efficient_attention": True, "noise_offset": False, "validation_epochs": False,
    "tracker_project_name": False, "image_interpolation_mode": False, "pretrained_vae_model_name_or_path": False,
    "validation_prompt": False, "num_validation_images": False, "proportion_empty_prompts": False,
    "timestep_bias_strategy": False, "timestep_bias_multiplier": False, "timestep_bias_begin": False,
    "timestep_bias_end": False, "timestep_bias_portion": False, "enable_npu_flash_attention": True, "rank": False,
    "train_text_encoder": True, "debug_loss": True, "tracker_name": False,
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_every_diffusers_text_to_image_flag_is_ours_or_answered_with_ours(script, preference_data_path, capsys):
    ours = {option for action in script.build_parser()._actions for option in action.option_strings
            if not action.dest.startswith("diffusers_")}
    base = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path]
    for flag, switch in DIFFUSERS_TEXT_TO_IMAGE_FLAGS.items():
        if f"--{flag}" in ours:
            continue
        given = [f"--{flag}"] if switch else [f"--{flag}", "1"]
        if script.DIFFUSERS_FLAGS[flag] is None:  # accepted with the diffusers meaning
            script.parse_args(base + given)
            continue
        with pytest.raises(SystemExit):
            script.parse_args(base + given)
        error = capsys.readouterr().err
        assert f"--{flag} (from diffusers' training examples)" in error, flag
        assert "not supported" in error or re.search(r"use --\w+", error), (flag, error)
    # the accepted ones mean what they mean in diffusers
    assert script.parse_args(base + ["--tracker_name", "my-runs"]).tracker_project_name == "my-runs"
    assert not script.parse_args(base + ["--center_crop", "--random_flip"]).random_crop
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--center_crop", "--random_crop"])
    assert not any(name.startswith("diffusers_") for name in vars(script.parse_args(base)))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_validation_prompts_come_from_a_file(script, preference_data_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    base = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
            "--validation_prompts_file"]
    assert script.parse_args(base + [str(prompts)]).validation_prompts == ["a red circle", "a blue square"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit):
        script.parse_args(base + [str(tmp_path / "empty.txt")])
    assert "holds no prompt" in capsys.readouterr().err


@pytest.mark.parametrize("schedule, flags, expected_keyword", [
    ("cosine_with_restarts", ["--lr_num_cycles", "2"], "num_cycles"),
    ("polynomial", ["--lr_power", "2.0"], "power"),
])
def test_the_schedule_takes_its_cycles_and_power(schedule, flags, expected_keyword, preference_data_path):
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
                          "--learning_rate", "1e-3", "--lr_scheduler", schedule, "--max_train_steps", "8", *flags])
    model = torch.nn.Linear(2, 2)
    dataset = list(range(16))
    run = sd.prepare_training(args, Accelerator(cpu=True), model, dataset, torch.utils.data.DataLoader(dataset))
    by_hand = get_scheduler(schedule, optimizer=torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3),
                            num_warmup_steps=0, num_training_steps=8,
                            **{expected_keyword: float(flags[1]) if expected_keyword == "power" else int(flags[1])})
    default = get_scheduler(schedule, optimizer=torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3),
                            num_warmup_steps=0, num_training_steps=8)
    ours, hand, plain = [], [], []
    for _ in range(8):
        ours.append(run.lr_scheduler.get_last_lr()[0])
        hand.append(by_hand.get_last_lr()[0])
        plain.append(default.get_last_lr()[0])
        run.optimizer.step()
        run.lr_scheduler.step()
        by_hand.step()
        default.step()
    assert ours == pytest.approx(hand) and ours != pytest.approx(plain)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_the_hub_repo_is_created_before_any_model_loads_and_named_in_the_card(tiny_sd_path, preference_data_path,
                                                                              tmp_path, monkeypatch):
    import huggingface_hub

    args = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
            "--resolution", "64", "--train_batch_size", "2", "--use_lora", "--max_train_steps", "1",
            "--num_validation_images", "0", "--push_to_hub", "--hub_model_id", "sd-dpo"]

    def refused(repo_id, exist_ok):
        raise ValueError(f"401: not logged in, cannot create {repo_id}")

    monkeypatch.setattr(huggingface_hub, "create_repo", refused)
    with pytest.raises(ValueError, match="not logged in"):
        run_in_process(sd, args + ["--output_dir", tmp_path / "refused"])
    assert not (tmp_path / "refused" / "data_summary.json").exists()  # failed before the data, let alone a model

    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, exist_ok: huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    run_in_process(sd, args + ["--output_dir", tmp_path / "pushed"])
    assert [upload["repo_id"] for upload in uploads] == ["someone/sd-dpo"]
    assert 'pipe.load_lora_weights("someone/sd-dpo")' in (tmp_path / "pushed" / "README.md").read_text()


def test_the_card_inherits_the_base_cards_license_and_names_no_local_base(tiny_sd_path, preference_data_path,
                                                                         tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    shutil.copytree(tiny_sd_path, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base with its own card\n")
    run_in_process(sd, ["--pretrained_model_name_or_path", base, "--train_data_dir", preference_data_path,
                        "--output_dir", tmp_path / "run", "--resolution", "64", "--train_batch_size", "2",
                        "--use_lora", "--max_train_steps", "1", "--num_validation_images", "1",
                        "--validation_num_inference_steps", "2", "--validation_prompts", "a red circle"])
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.license == "mit" and card.data.base_model is None
    assert "![" in card.text and (tmp_path / "run" / "validation_grid.png").is_file()
    # diffusers' training-card template, every section filled; the widget is the final validation image
    for heading in ("## Intended uses & limitations", "#### How to use", "#### Limitations and bias",
                    "## Training details"):
        assert heading in card.text, heading
    assert "TODO" not in card.text and 'pipe.load_lora_weights("run")' in card.text
    assert card.data.widget == [{"text": "a red circle", "output": {"url": "images/validation_0.png"}}]
    assert card.data.inference is True and (tmp_path / "run" / "images" / "validation_0.png").is_file()
    assert {"diffusion-dpo", "lora", "diffusers-training"} <= set(card.data.tags)
    allow, _ = sd.hub_upload_patterns(sd.parse_args(["--pretrained_model_name_or_path", str(base),
                                                     "--train_data_dir", preference_data_path, "--use_lora"]))
    assert "images/*" in allow


def test_use_ema_saves_the_average_of_the_trained_weights_and_resumes_it_exactly(tiny_sd_path, preference_data_path,
                                                                                 tmp_path):
    import shutil

    from safetensors.torch import load_file

    args = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", preference_data_path,
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--max_train_steps", "4",
            "--checkpointing_steps", "1", "--num_validation_images", "0", "--seed", "0", "--use_ema",
            "--ema_decay", "0.5"]
    run_in_process(sd, args + ["--output_dir", tmp_path / "whole"])
    trained = [load_file(tmp_path / "whole" / f"checkpoint-{step}" / "unet" / "diffusion_pytorch_model.safetensors")
               for step in range(1, 5)]
    # EMAModel by hand: the first update copies the weights (decay 0), then decay min(0.5, (1 + s) / (10 + s)).
    average = dict(trained[0])
    for s, weights in enumerate(trained[1:], start=1):
        decay = min(0.5, (1 + s) / (10 + s))
        average = {name: decay * average[name] + (1 - decay) * weights[name] for name in weights}
    result = trained_weights(tmp_path / "whole")
    assert max_abs_difference(result, average) < 1e-6
    assert max_abs_difference(result, trained[-1]) > 1e-5  # the result is the average, not the last step
    assert "EMA of the weights (decay 0.5)" in (tmp_path / "whole" / "README.md").read_text()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    run_in_process(sd, args + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert max_abs_difference(trained_weights(resumed), result) < 1e-6


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda module: module.__name__)
def test_ema_flags_are_refused_where_they_cannot_apply(script, preference_data_path, capsys):
    base = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path]
    for extra, message in ((["--use_ema", "--use_lora"], "LoRA adapters are not averaged"),
                           (["--offload_ema"], "add --use_ema"), (["--use_ema", "--ema_decay", "1"], "between 0 and 1")):
        with pytest.raises(SystemExit):
            script.parse_args(base + extra)
        assert message in capsys.readouterr().err
    assert script.parse_args(base + ["--use_ema", "--offload_ema"]).use_ema


def test_the_ema_averages_in_float32_over_half_precision_weights(preference_data_path):
    # DeepSpeed's half-precision engine trains bf16 weights: an average kept in bf16 would round every update away.
    from accelerate.utils import DistributedType

    registered = []
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  register_for_checkpointing=registered.append,
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)),
                                  device=torch.device("cpu"))
    args = sd.parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", preference_data_path,
                          "--use_ema", "--ema_decay", "0.999"])
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = sd.build_ema(args, accelerator, [weight])
    assert registered == [ema] and ema.shadow_params[0].dtype == torch.float32
    run = SimpleNamespace(ema=ema, params=[weight])
    ema.optimization_step = 10**6  # past the warm-up: decay 0.999
    with torch.no_grad():
        weight.fill_(1.0078125)  # one bf16 step above the average's 1.0
    for _ in range(100):  # each update adds 1e-3 of the gap, 8e-6: below bf16's resolution near 1 (8e-3)
        sd.update_ema(args, accelerator, run)
    assert ema.shadow_params[0][0].item() == pytest.approx(1 + 0.0078125 * (1 - 0.999 ** 100), rel=1e-5)

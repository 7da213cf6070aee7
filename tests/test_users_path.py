"""Paths real users take that a green suite once missed: fp16 with a real GradScaler, LoRA strength and checkpoints in
stock diffusers, --prediction_type in what is saved, exact frozen parts, the step-1 reference under bf16, turbo's
schedule, one implicit accuracy, and the base's safety checker. Both scripts, LoRA and full, on the tiny models."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pipeline_dpo
import train_diffusion_dpo as sd
import train_diffusion_dpo_sdxl as sdxl
from launch_utils import logged_scalars, summary, trained_weights
from tools import evaluate
from fixtures.make_preference_data import make_preference_dataset
from fixtures.tiny_models import build_tiny_sd, build_tiny_sdxl

SCRIPTS = {"sd": sd, "sdxl": sdxl}


def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir",
            str(output_dir), "--resolution", "64", "--train_batch_size", "4", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--checkpointing_steps", "100", "--lr_warmup_steps", "0", *extra]


def with_trained_norms(path):
    """Give the UNet's normalization layers weights other than 1 and 0, as in any trained model (a freshly built
    tiny UNet has exactly 1 and 0, which every precision holds exactly, so it would hide a rounded copy)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    for module in unet.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
            module.weight.data = 1 + 0.3 * torch.randn(module.weight.shape, generator=generator)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
    unet.save_pretrained(Path(path, "unet"))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny epsilon-prediction bases like real releases: trained-looking norms; SD with its safety checker."""
    root = tmp_path_factory.mktemp("bases")
    return {"sd": with_trained_norms(build_tiny_sd(str(root / "sd"), safety_checker=True)),
            "sdxl": with_trained_norms(build_tiny_sdxl(str(root / "sdxl")))}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_preference_dataset(str(tmp_path_factory.mktemp("pairs")), num_pairs=8, num_ties=0)


@pytest.fixture
def fresh_accelerate_state():
    """In-process runs: accelerate's state is a process-wide singleton that each run configures anew."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def sample(pipe, prompt="a red circle", seed=0):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np",
                height=64, width=64).images[0]


def lora_scalings(unet):
    return {value for module in unet.modules() if isinstance(getattr(module, "scaling", None), dict)
            for value in module.scaling.values()}


# ---------------------------------------------------------------------------------------------------------------
# 1. fp16 with a real GradScaler (emulated on the CPU as CUDA runs it) trains through an overflow
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_fp16_grad_scaler_trains_through_an_overflow(family, mode, bases, pairs, tmp_path, monkeypatch,
                                                     fresh_accelerate_state):
    # Failed before the fix at step 2: "unscale_() has already been called on this optimizer since the last update()".
    from accelerate import Accelerator

    script = SCRIPTS[family]
    made = {}

    def fp16_accelerator(*args, **kwargs):
        # What `--mixed_precision fp16` gives on CUDA: accelerate's state says fp16 (forwards under fp16 autocast,
        # frozen models in fp16) and a GradScaler at its default first scale, 2^16, scales every backward.
        accelerator = Accelerator(*args, **kwargs)
        accelerator.state._mixed_precision = "fp16"
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        made["accelerator"] = accelerator
        return accelerator

    monkeypatch.setattr(script, "Accelerator", fp16_accelerator)
    # The scripts' own fault: step 1's loss times 1e35 stays finite, but its scaled gradients overflow, the
    # overflow only the scaler sees.
    monkeypatch.setenv("DIFFUSION_DPO_TEST_OVERFLOW_STEPS", "1")
    # beta_dpo 50: with 8x8 latents (256 values per error, against 16384 at 512 px) the authors' 5000 overflows
    # 2^16 in fp16 on every step until the scaler has halved it ten times; here only the injected step overflows.
    extra = ["--max_train_steps", "3", "--beta_dpo", "50"] + (["--use_lora"] if mode == "lora" else [])
    script.main(script.parse_args(run_args(bases[family], pairs, tmp_path, *extra)))

    assert made["accelerator"].scaler.get_scale() == 2.0**15  # halved once, by the one overflow
    assert summary(tmp_path)["nonfinite_steps"] == 1
    weights = trained_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())
    if mode == "lora":
        assert max(t.abs().max().item() for k, t in weights.items() if "lora_B" in k or "lora.up" in k) > 0
    else:
        base = load_file(Path(bases[family], "unet", "diffusion_pytorch_model.safetensors"))
        assert sum(not torch.equal(base[k], weights[k]) for k in base) > 0.9 * len(base)


# ---------------------------------------------------------------------------------------------------------------
# Runs shared by items 2-6 and 9: bf16, --prediction_type v_prediction on epsilon bases, LoRA at alpha = 2 * rank
# ---------------------------------------------------------------------------------------------------------------
RUN_FLAGS = ["--mixed_precision", "bf16", "--prediction_type", "v_prediction", "--max_train_steps", "2",
             "--checkpointing_steps", "2"]
LORA_FLAGS = ["--use_lora", "--rank", "4", "--lora_alpha", "8"]


@pytest.fixture(scope="module")
def runs(bases, pairs, tmp_path_factory):
    """The four runs, in this process (main() as `accelerate launch` runs it on one process, without the start-up)."""
    from accelerate.state import AcceleratorState, GradientState

    done = {}
    for family in ("sd", "sdxl"):
        for mode in ("lora", "full"):
            output_dir = tmp_path_factory.mktemp(f"{family}-{mode}")
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            script = SCRIPTS[family]
            script.main(script.parse_args(run_args(bases[family], pairs, output_dir, *RUN_FLAGS,
                                                   *(LORA_FLAGS if mode == "lora" else []))))
            done[family, mode] = output_dir
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return done


# 6. The reference is the policy at step 1, under mixed precision too
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_step_one_in_bf16_has_no_preference(family, mode, runs):
    # Before the fix (full, bf16): SD loss 0.515 / implicit accuracy 0.75, SDXL 0.601 / 0.75. The tolerance is
    # float32 rounding of log 2: on the CPU the two copies compute the same numbers exactly.
    output_dir = runs[family, mode]
    assert logged_scalars(output_dir, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert logged_scalars(output_dir, "train/reward_margin")[0] == pytest.approx(0.0, abs=1e-6)
    assert logged_scalars(output_dir, "train/implicit_acc")[0] == 0.5
    assert logged_scalars(output_dir, "train/model_mse_w")[0] == logged_scalars(output_dir, "train/ref_mse_w")[0]


# 5. Saved frozen parts are the base's, bit for bit; 9. the base's safety checker is kept
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_saved_pipeline_holds_the_base_frozen_weights_exactly(family, runs, bases):
    # Before the fix: the bf16-cast text encoders and VAE were saved back (max relative error 3.4e-3).
    output_dir, base = runs[family, "full"], Path(bases[family])
    frozen = ["text_encoder", "vae"] + (["text_encoder_2"] if family == "sdxl" else ["safety_checker"])
    for component in frozen:
        [saved_file] = Path(output_dir, component).glob("*.safetensors")
        saved, original = load_file(saved_file), load_file(base / component / saved_file.name)
        assert saved.keys() == original.keys(), component
        assert all(saved[k].dtype == original[k].dtype and torch.equal(saved[k], original[k]) for k in saved), component
    unet = trained_weights(output_dir)
    assert all(t.dtype == torch.float32 for t in unet.values())


def test_saved_sd_pipeline_keeps_the_base_safety_checker(runs):
    # Before the fix: model_index.json said safety_checker [null, null] and the folder had none.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(runs["sd", "full"]))
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert pipe.feature_extractor is not None and pipe.config.requires_safety_checker
    assert (Path(runs["sd", "full"]) / "feature_extractor" / "preprocessor_config.json").exists()


# 4. --prediction_type reaches the saved scheduler, validation, pipeline_dpo and evaluate
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_prediction_type_travels_with_the_result(family, mode, runs, bases, pairs):
    # Before the fix: every one of these samples as the base's epsilon.
    from diffusers import DiffusionPipeline

    output_dir, base = runs[family, mode], str(bases[family])
    pipe = pipeline_dpo.load_dpo_pipeline(base, output_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    if mode == "full":
        assert DiffusionPipeline.from_pretrained(str(output_dir)).scheduler.config.prediction_type == "v_prediction"
    else:  # the card's snippet: base, LoRA, then the result's scheduler
        card = (Path(output_dir) / "README.md").read_text()
        assert 'subfolder="scheduler"' in card
    script = SCRIPTS[family]
    args = script.parse_args(run_args(base, pairs, output_dir, "--prediction_type", "v_prediction"))
    assert script.sampling_scheduler(args).config.prediction_type == "v_prediction"  # what validation samples with
    accuracy_args = evaluate.parse_args(["implicit-accuracy", "--base", base, "--dpo", str(output_dir),
                                         "--train_data_dir", str(pairs), "--output_dir", str(output_dir)])
    noise_scheduler = evaluate.load_accuracy_models(accuracy_args, script, torch.device("cpu"), torch.float32)[5]
    assert noise_scheduler.config.prediction_type == "v_prediction"


# 2. load_dpo_pipeline applies a LoRA at the strength it was trained with; 3. checkpoints load in stock diffusers
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_load_dpo_pipeline_gives_the_stock_lora_image(family, runs, bases):
    # Before the fix: scale 1.0 instead of alpha / rank = 2.0, images up to 0.019 apart.
    from diffusers import DiffusionPipeline

    output_dir, base = runs[family, "lora"], str(bases[family])
    ours = pipeline_dpo.load_dpo_pipeline(base, output_dir)
    assert lora_scalings(ours.unet) == {2.0}
    stock = DiffusionPipeline.from_pretrained(base)
    stock.load_lora_weights(str(output_dir))
    stock.scheduler = stock.scheduler.from_pretrained(str(output_dir), subfolder="scheduler")  # as the card says
    assert lora_scalings(stock.unet) == {2.0}
    assert np.array_equal(sample(ours), sample(stock))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_stock_diffusers_loads_a_lora_checkpoint(family, runs, bases):
    # Before the fix: "No LoRA keys" and the base's image.
    from diffusers import DiffusionPipeline

    checkpoint, base = runs[family, "lora"] / "checkpoint-2", str(bases[family])
    pipe = DiffusionPipeline.from_pretrained(base)
    before = sample(pipe)
    pipe.load_lora_weights(str(checkpoint))
    assert lora_scalings(pipe.unet) == {2.0}
    assert np.abs(sample(pipe) - before).max() > 0
    # the checkpoint's adapter equals the result's (the run ended at step 2)
    final = load_file(runs[family, "lora"] / "pytorch_lora_weights.safetensors")
    saved = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_a_resumable_adapter_file_alone_is_refused_with_the_folder_to_load(runs, bases):
    checkpoint = runs["sd", "lora"] / "checkpoint-2"
    with pytest.raises(pipeline_dpo.DpoResultError, match="checkpoint folder"):
        pipeline_dpo.load_dpo_pipeline(str(bases["sd"]), checkpoint / sd.CHECKPOINT_LORA_NAME)
    assert pipeline_dpo.resolve_dpo_result(checkpoint).weight_name == "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# 7. --is_turbo trains on a zero-terminal-SNR schedule, as the references do
# ---------------------------------------------------------------------------------------------------------------
def test_turbo_schedule_has_zero_terminal_snr(bases, pairs, tmp_path):
    # Before the fix: sqrt(alpha_bar) at t=999 was 0.068 with --is_turbo too.
    plain = sdxl.load_noise_scheduler(sdxl.parse_args(run_args(bases["sdxl"], pairs, tmp_path)))
    turbo = sdxl.load_noise_scheduler(sdxl.parse_args(run_args(bases["sdxl"], pairs, tmp_path, "--is_turbo")))
    assert plain.alphas_cumprod[999].sqrt().item() == pytest.approx(0.068, abs=1e-3)
    assert plain.training_timesteps is None
    assert turbo.alphas_cumprod[999].item() == 0.0 and turbo.config.rescale_betas_zero_snr
    assert len(turbo.training_timesteps) == 4  # the model's own 4-step sampling schedule (tiny base: DDPM spacing)


# ---------------------------------------------------------------------------------------------------------------
# 8. One implicit accuracy: training's metric and evaluate.py's are the same per-pair function
# ---------------------------------------------------------------------------------------------------------------
def test_training_and_evaluate_count_implicit_accuracy_alike(monkeypatch):
    # Before the fix: training counted a tie as wrong (0.25 here), evaluate as half (0.5).
    ref = torch.full((8,), 0.5)
    model = torch.tensor([0.4, 0.5, 0.5, 0.6, 0.5, 0.5, 0.5, 0.5])  # pair 0 right, 1 and 2 tied, 3 wrong
    training = sd.diffusion_dpo_loss(model, ref, 10.0)[1]["implicit_acc"].item()
    assert training == sdxl.diffusion_dpo_loss(model, ref, 10.0)[1]["implicit_acc"].item() == 0.5
    calls = []
    real = sd.dpo_implicit_reward
    monkeypatch.setattr(sd, "dpo_implicit_reward", lambda *args: calls.append(1) or real(*args))
    margins = evaluate.implicit_reward_margins(model[None], ref[None], 10.0)
    assert calls  # evaluate computes the DPO term with the training script's function
    assert evaluate.outcome_summary(margins)["rate"] == training

"""The step benchmark runs and writes the figures it promises (not a timed test: no speed is asserted).

python -m pytest tests/test_bench.py -q
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_dpo_step  # noqa: E402


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """The tiny SD, SDXL, SD3 and FLUX presets, 1 warm-up + 1 timed step, run as `make bench` runs the script."""
    json_path = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_dpo_step.py"), "--preset", "tiny",
               "--preset", "tiny-sdxl", "--preset", "tiny-sd3", "--preset", "tiny-flux", "--modes", "full,lora",
               "--steps", "1", "--warmup", "1", "--threads", "1", "--no_estimate",
               "--json", str(json_path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:]
    return json.loads(json_path.read_text()), completed.stdout


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_rows_for_every_mode_and_cache_setting(tiny_report, preset):
    report, _ = tiny_report
    rows = {(row["mode"], row["cache"]): row for row in report["rows"] if row["preset"] == preset}
    assert set(rows) == {("full", False), ("full", True), ("lora", False), ("lora", True)}
    for (mode, cached), row in rows.items():
        assert row["pairs_per_s"] > 0 and row["step_ms"] > 0 and row["floor_ms"] > 0
        assert math.isfinite(row["step_over_floor"]) and row["step_over_floor"] > 0
        assert len(row["step_ms_all"]) == 1 and len(row["floor_ms_all"]) == 1
        assert row["peak_mem_gib"] > 0
        assert row["flops_step"] > 0 and row["tflops"] > 0
        if cached:
            assert math.isfinite(row["cache_speedup"]) and row["cache_speedup"] > 0
            # With the cache the step computes exactly what the floor does; without it, the encoders come on top.
            assert row["flops_step"] == row["flops_floor"]
        else:
            assert row["cache_speedup"] is None
            assert row["flops_step"] > row["flops_floor"]
    assert rows[("lora", True)]["trained_params"] < rows[("full", True)]["trained_params"]
    assert rows[("full", True)]["trained_params"] == rows[("full", True)]["unet_params"]


def test_table_is_printed(tiny_report):
    _, output = tiny_report
    assert "step/floor" in output and "cache x" in output
    assert output.count("tiny-sdxl") >= 4  # one table row per mode and cache setting, and the phase lines
    assert output.count("tiny-sd3") >= 4 and output.count("tiny-flux") >= 4


def test_sd3_meta_activation_memory_counts_activations_not_weights():
    """The SD3.5 estimate's activation pass on the tiny SD3.5 config: checkpointing keeps less, and a full pass
    holds at least the float32 grads of every parameter."""
    import torch
    from diffusers import SD3Transformer2DModel

    config, _, _ = bench_dpo_step.tiny_configs("sd3")
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    measure = lambda lora, checkpointing: bench_dpo_step.meta_transformer_activation_memory(  # noqa: E731
        config, 8, 1, lora, checkpointing, text_tokens=154, lora_targets=targets)
    assert 0 < measure(True, True) < measure(True, False)
    with torch.device("meta"):
        params = sum(p.numel() for p in SD3Transformer2DModel(**config).parameters())
    assert measure(False, True) >= 4 * params


def test_meta_activation_memory_counts_activations_not_weights():
    """The SDXL estimate's activation pass: checkpointing keeps less, weights are not counted as activations."""
    unet_config, _, _ = bench_dpo_step.tiny_configs("sdxl")
    without_checkpointing, _ = bench_dpo_step.meta_activation_memory(unet_config, 8, 1, lora=True,
                                                                     gradient_checkpointing=False, text_embeds_dim=32)
    with_checkpointing, _ = bench_dpo_step.meta_activation_memory(unet_config, 8, 1, lora=True,
                                                                  gradient_checkpointing=True, text_embeds_dim=32)
    assert 0 < with_checkpointing < without_checkpointing
    full_peak, _ = bench_dpo_step.meta_activation_memory(unet_config, 8, 1, lora=False,
                                                         gradient_checkpointing=True, text_embeds_dim=32)
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        params = sum(p.numel() for p in UNet2DConditionModel(**unet_config).parameters())
    assert full_peak >= 4 * params  # float32 grads of every parameter are live at the end of backward


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-sd3", "tiny-flux"])
def test_the_benchmark_step_is_the_scripts_step(preset_name, tmp_path, monkeypatch):
    """A benchmark step and the script's loop body (micro_batch_step then optimizer_step, as main runs them), from the
    same weights on the same batch, give the same loss and the same weights: the benchmark times the code that
    ships. A retyped step in the benchmark that drifts from the script fails here."""
    import torch

    args = bench_dpo_step.parse_args(["--preset", preset_name, "--threads", "1", "--no_estimate"])
    preset = bench_dpo_step.PRESETS[preset_name]
    settings = bench_dpo_step.preset_settings(preset, args)
    for mode in ("lora", "full"):
        vae, text_encoders = bench_dpo_step.build_frozen_models(preset, torch.device("cpu"), torch.float32)
        bench, by_hand = (bench_dpo_step.StepRunner(preset, mode, settings, tmp_path, vae, text_encoders)
                          for _ in range(2))
        script = bench.script
        losses = []
        real_micro_batch_step = script.micro_batch_step

        def recording(*step_args, **kwargs):
            losses.append(real_micro_batch_step(*step_args, **kwargs).item())
            return losses[-1]

        monkeypatch.setattr(script, "micro_batch_step", recording)
        bench.step("uncached")
        monkeypatch.setattr(script, "micro_batch_step", real_micro_batch_step)
        with by_hand.accelerator.accumulate(by_hand.unet):
            loss = script.micro_batch_step(by_hand.args, by_hand.accelerator, by_hand.training_run,
                                           by_hand.uncached_batch, by_hand.models, by_hand.noise_scheduler,
                                           by_hand.weight_dtype)
            script.optimizer_step(by_hand.args, by_hand.accelerator, by_hand.training_run)
        assert losses == [loss.item()]
        for (name, ours), (_, theirs) in zip(bench.unet.named_parameters(), by_hand.unet.named_parameters()):
            assert torch.equal(ours, theirs), name
        assert bench.training_run.global_step == by_hand.training_run.global_step == 1
        bench.close()
        by_hand.close()


def test_the_precomputed_reference_and_mapo_modes_keep_no_reference_and_skip_its_forward(tmp_path):
    """full-precomputed / lora-precomputed: the script's --reference_errors path (ReferenceErrors from the reference
    pass alone; micro_batch_step then runs the policy only), with no reference copy for the full fine-tune; full-mapo:
    --loss_type mapo, which builds no copy and runs no reference forward at all."""
    import torch

    args = bench_dpo_step.parse_args(["--preset", "tiny", "--threads", "1", "--no_estimate", "--steps", "1",
                                      "--warmup", "1"])
    preset = bench_dpo_step.PRESETS["tiny"]
    settings = bench_dpo_step.preset_settings(preset, args)
    vae, text_encoders = bench_dpo_step.build_frozen_models(preset, torch.device("cpu"), torch.float32)
    live = bench_dpo_step.StepRunner(preset, "full", settings, tmp_path, vae, text_encoders)
    live_floor = bench_dpo_step.count_flops(live.floor)
    live_step = bench_dpo_step.count_flops(lambda: live.step("cached"))
    live.close()
    for mode in ("full-precomputed", "lora-precomputed", "full-mapo"):
        runner = bench_dpo_step.StepRunner(preset, mode, settings, tmp_path, vae, text_encoders)
        if mode == "full-mapo":  # MaPO's reference-free loss: the script's own REFERENCE_FREE_LOSSES path
            assert runner.args.loss_type == "mapo" and runner.args.reference_errors is None
        else:
            assert runner.args.reference_errors and runner.training_run.reference_errors is not None
            assert runner.reference_pairs_per_s > 0
        if mode in ("full-precomputed", "full-mapo"):
            assert runner.ref_unet is None  # no frozen copy in memory
            # the floor and the cached step lose exactly the reference forward
            assert bench_dpo_step.count_flops(runner.floor) < live_floor
            assert bench_dpo_step.count_flops(lambda: runner.step("cached")) < live_step
        runner.step("cached")
        assert math.isfinite(runner.last_logs["loss"])
        runner.close()

"""One prepared device check: every GPU-only path the project ships, measured in one command (`make gpu-check`).

On a bare CUDA machine, from the repository root (a few minutes; a CUDA torch already installed is reused):
    python3 -m venv --system-site-packages .venv-gpu
    .venv-gpu/bin/pip install -r requirements-dev.txt       # on Linux, PyPI's torch wheel is the CUDA build
    .venv-gpu/bin/pip install xformers                      # optional: the xformers row (skipped without it)
    .venv-gpu/bin/python benchmarks/gpu_check.py --json gpu-check/gpu_check.json    # sized for 8 minutes (untimed yet)

The CPU form runs in the default test suite, so the check cannot rot before a GPU runs it:
    python benchmarks/gpu_check.py --device cpu --preset tiny --json gpu-check/cpu.json

Each row builds real-config models with random weights (no download) and trains through the training script's own
stages (micro_batch_step + optimizer_step, via the step benchmark's StepRunner; never a copy): warm-up steps, then
timed steps, then the floor (policy forward+backward + reference forward on the same batch). It records pairs/s,
step/floor, peak memory (torch.cuda.max_memory_allocated; process RSS on a CPU), TFLOP/s and MFU against the card's
peak, whether the loss stayed finite and whether the trained weights changed. A row that fails records its error
and the others still run.

Rows (real presets on CUDA: SD 1.5 at 512 px, SDXL, SD3.5 medium and FLUX.1-dev at 1024 px; the tiny ones in the
CPU form):
    sd15 lora fp16        a real GradScaler (emulated on a CPU), one injected overflow it must survive
    sd15 full bf16        8-bit AdamW
    sdxl lora bf16        gradient checkpointing
    sdxl full bf16        8-bit AdamW, gradient checkpointing, the latent cache
    sdxl full bf16        Adafactor, gradient checkpointing, the latent cache
    sd15 lora bf16        xformers attention (where it imports and CUDA is there), else recorded as skipped
    sd15 lora bf16        torch.compile of the UNet (CUDA only; recorded as skipped on a CPU)
    sd35 lora bf16        gradient checkpointing, the latent cache (train_diffusion_dpo_sd3.py's step)
    sd35 lora fp16        a real GradScaler and one injected overflow, on the SD3 script's step
    flux lora bf16        gradient checkpointing, the latent cache (train_diffusion_dpo_flux.py's step)
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo_step as bench  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    family: str  # "sd", "sdxl", "sd3" or "flux"
    mode: str  # "lora" or "full"
    dtype: str  # "fp16", "bf16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    cached: bool = False
    overflow: bool = False  # inject one fp16 overflow at the first step (the GradScaler must skip it and go on)
    attention: str = "sdpa"  # "sdpa" or "xformers"
    compile: bool = False


ROWS = (
    Row("sd15 lora fp16 + overflow", "sd", "lora", "fp16", overflow=True),
    Row("sd15 full bf16 8-bit AdamW", "sd", "full", "bf16", optimizer="adamw8bit"),
    Row("sdxl lora bf16 checkpointing", "sdxl", "lora", "bf16", gradient_checkpointing=True),
    Row("sdxl full bf16 8-bit AdamW ckpt cache", "sdxl", "full", "bf16", optimizer="adamw8bit",
        gradient_checkpointing=True, cached=True),
    Row("sdxl full bf16 Adafactor ckpt cache", "sdxl", "full", "bf16", optimizer="adafactor",
        gradient_checkpointing=True, cached=True),
    Row("sd15 lora bf16 xformers", "sd", "lora", "bf16", attention="xformers"),
    Row("sd15 lora bf16 torch.compile", "sd", "lora", "bf16", compile=True),
    Row("sd35 lora bf16 checkpointing cache", "sd3", "lora", "bf16", gradient_checkpointing=True, cached=True),
    Row("sd35 lora fp16 + overflow", "sd3", "lora", "fp16", gradient_checkpointing=True, cached=True, overflow=True),
    Row("flux lora bf16 checkpointing cache", "flux", "lora", "bf16", gradient_checkpointing=True, cached=True),
)
PRESETS = {"real": {"sd": "sd15-512", "sdxl": "sdxl-1024", "sd3": "sd35-medium-1024", "flux": "flux-dev-1024"},
           "tiny": {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}}


def skip_reason(row, device):
    if row.attention == "xformers":
        if device.type != "cuda":
            return "xformers needs CUDA"
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "xformers is not installed (pip install xformers)"
    if row.compile and device.type != "cuda":
        return "torch.compile is checked on CUDA only (on a CPU it compiles for minutes)"
    return None


def settings_for(row, preset, args):
    """The step benchmark's settings for one row: the preset's sizes with the row's precision and options."""
    bench_args = bench.parse_args(["--preset", preset.name, "--device", args.device, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--no_estimate"])
    settings = bench.preset_settings(preset, bench_args)
    # fp16 on a CPU too (the step benchmark refuses it there: without a scaler it measures nothing useful)
    settings.dtype, settings.optimizer = row.dtype, row.optimizer
    settings.gradient_checkpointing = row.gradient_checkpointing
    return settings


def measure_row(row, args, workdir):
    device = torch.device(args.device)
    preset = bench.PRESETS[PRESETS[args.preset][row.family]]
    settings = settings_for(row, preset, args)
    vae, text_encoders = bench.build_frozen_models(preset, device, bench.DTYPES[settings.dtype])
    # fp16 on a CPU as CUDA runs it: accelerate's state says fp16 there too (frozen parts in fp16), and a real
    # GradScaler at its first scale, 2^16, scales every backward (accelerate makes none on a CPU).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if device.type == "cpu" and row.dtype == "fp16" else None
    runner = bench.StepRunner(preset, row.mode, settings, workdir, vae, text_encoders, grad_scaler=scaler)
    if row.attention == "xformers":
        runner.unet.enable_xformers_memory_efficient_attention()
    if row.compile:
        runner.unet.compile()
    if row.overflow:
        runner.faults = runner.script.InjectedFaults(overflow_steps=frozenset({1}))
    if args.preset == "tiny":
        # 8x8 latents average each error over 256 values (16384 at 512 px), so beta_dpo 5000's gradients are 64x
        # those of a real run: fp16 would overflow 2^16 until the scaler had halved it ten times. 50 keeps the
        # tiny rows' gradients at a real run's size.
        runner.args.beta_dpo = 50.0
    kind = "cached" if row.cached else "uncached"
    runner.place_encoders(kind)
    before = {name: p.detach().float().cpu().clone() for name, p in bench.sd_script.unet_module(
        runner.unet).named_parameters() if p.requires_grad}
    first_scale = runner.accelerator.scaler.get_scale() if runner.accelerator.scaler is not None else None
    started = time.perf_counter()
    flops = bench.count_flops(lambda: runner.step(kind))  # warm-up 1 (the injected overflow, where there is one)
    for _ in range(args.warmup - 1):
        runner.step(kind)
    warmup_s = time.perf_counter() - started
    with bench.PeakMemory(device) as memory:
        steps = [runner.step(kind)["total"] for _ in range(args.steps)]
    floors = [runner.floor()["total"] for _ in range(args.steps)]
    step_s, floor_s = sorted(steps)[len(steps) // 2], sorted(floors)[len(floors) // 2]
    after = {name: p.detach().float().cpu() for name, p in bench.sd_script.unet_module(
        runner.unet).named_parameters() if p.requires_grad}
    logs = runner.last_logs
    peak_tflops = args.peak_tflops or bench.default_peak_tflops(device, row.dtype)
    tflops = flops / step_s / 1e12
    result = {
        "pairs_per_s": settings.batch_pairs / step_s, "step_ms": step_s * 1e3, "floor_ms": floor_s * 1e3,
        "step_over_floor": step_s / floor_s, "peak_mem_gib": memory.peak / bench.GIB,
        "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "tflops": tflops, "peak_tflops": peak_tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
        "loss": logs["loss"], "loss_finite": bool(torch.isfinite(torch.tensor(logs["loss"]))),
        "weights_changed": any(not torch.equal(before[name], after[name]) for name in before),
        "nonfinite_steps": runner.training_run.nonfinite_steps, "warmup_s": warmup_s,
        "preset": preset.name, "resolution": settings.resolution, "batch_pairs": settings.batch_pairs,
        "step_source": runner.step_sources[kind],
    }
    if runner.accelerator.scaler is not None:
        result.update(first_scale=first_scale, scale=runner.accelerator.scaler.get_scale())
    runner.close()
    return result


def run_check(args):
    from accelerate.state import AcceleratorState, GradientState

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for row in ROWS:
            record = {"row": row.name, **dataclasses.asdict(row)}
            reason = skip_reason(row, torch.device(args.device))
            # Each row sets its own precision: accelerate's process-wide state starts afresh
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            if reason is not None:
                record.update(status="skipped", reason=reason)
            else:
                try:
                    record.update(status="ok", **measure_row(row, args, workdir))
                    survived = record.get("nonfinite_steps", 0) >= 1 and record.get("scale", 0) < record.get(
                        "first_scale", 0)
                    if row.overflow and not survived:
                        record.update(status="failed", reason="the injected overflow did not lower the scale")
                    elif not (record["loss_finite"] and record["weights_changed"]):
                        record.update(status="failed", reason="the loss is not finite or no weight changed")
                except Exception as error:  # noqa: BLE001 - one failing row must not cost the others
                    record.update(status="failed", reason=f"{type(error).__name__}: {error}",
                                  traceback=traceback.format_exc(limit=8))
            rows.append(record)
            bench.release_memory()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            print(f"{row.name}: {record['status']}" + (f" ({record['reason']})" if "reason" in record else ""),
                  file=sys.stderr, flush=True)
    return rows


def print_table(rows, device_name):
    print(f"\nDiffusion-DPO device check on {device_name}, torch {torch.__version__}")
    header = f"{'row':<38} {'status':>7} {'pairs/s':>8} {'ms/step':>8} {'step/floor':>10} {'peak GiB':>8} " \
             f"{'TFLOP/s':>8} {'MFU':>6} {'finite':>6} {'moved':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] == "skipped" or "step_ms" not in r:
            print(f"{r['row']:<38} {r['status']:>7}  {r.get('reason', '')[:70]}")
            continue
        mfu = f"{r['mfu']:.0%}" if r["mfu"] is not None else "-"
        print(f"{r['row']:<38} {r['status']:>7} {r['pairs_per_s']:8.2f} {r['step_ms']:8.0f} "
              f"{r['step_over_floor']:10.2f} "
              f"{r['peak_mem_gib']:8.2f} {r['tflops']:8.3f} {mfu:>6} {str(r['loss_finite']):>6} "
              f"{str(r['weights_changed']):>5}" + (f"  scale {r['first_scale']:g}->{r['scale']:g}" if "scale" in r
                                                   else ""))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="The prepared device check: every GPU-only training path, measured "
                                                 "through the scripts' own stages; one JSON and one table.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="Where to run; default: cuda when available, else cpu.")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="real: SD 1.5 at 512 px and SDXL at 1024 px (real configs, random weights; for a GPU); "
                             "tiny: the tiny models (the CPU form). Default: real on cuda, tiny on cpu.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per row (default: 5 real, 2 tiny).")
    parser.add_argument("--warmup", type=int, default=2,
                        help="Untimed steps per row first (>= 1; the first counts FLOPs and takes any overflow).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The card's peak TFLOP/s for MFU; default: its dense half-precision peak when known.")
    parser.add_argument("--json", type=str, default=None, help="Write every row to this JSON file.")
    args = parser.parse_args(input_args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this torch; use --device cpu --preset tiny.")
    args.preset = args.preset or ("real" if args.device == "cuda" else "tiny")
    args.steps = args.steps or (5 if args.preset == "real" else 2)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1.")
    return args


def main(args):
    bench.warnings.filterwarnings("ignore")
    bench.transformers_logging.set_verbosity_error()
    bench.register_cpu_attention_flops()
    started = time.perf_counter()
    rows = run_check(args)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    sizes = "SD 1.5 at 512 px, SDXL at 1024 px" if args.preset == "real" else "the tiny models (the rows' code paths)"
    print_table(rows, f"{device_name}, {sizes}")
    wall_s = time.perf_counter() - started
    print(f"\ndevice check wall time {wall_s:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "preset": args.preset,
                                               "wall_s": wall_s, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    failed = [r["row"] for r in rows if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))

"""The prepared device check (benchmarks/gpu_check.py) in its CPU form: every row runs (or says why not), through
the scripts' own stages, so the check cannot rot before a GPU runs it. Not a timed test: no speed is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_cpu_form_runs_every_row_and_the_fp16_row_survives_its_overflow(tmp_path):
    json_path = tmp_path / "cpu.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny",
         "--warmup", "1", "--steps", "1", "--json", str(json_path)],
        cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert "step/floor" in completed.stdout and "MFU" in completed.stdout
    rows = {row["row"]: row for row in json.loads(json_path.read_text())["rows"]}
    assert set(rows) == {row.name for row in gpu_check.ROWS}
    ran = [row for row in rows.values() if row["status"] == "ok"]
    assert len(ran) == 8, {name: row.get("reason") for name, row in rows.items()}
    for row in ran:
        assert row["pairs_per_s"] > 0 and row["peak_mem_gib"] > 0 and row["tflops"] > 0
        assert math.isfinite(row["step_over_floor"]) and row["step_over_floor"] > 0
        assert row["loss_finite"] and row["weights_changed"]
        assert row["step_source"].endswith("micro_batch_step + optimizer_step")
    for name in ("sd15 lora fp16 + overflow", "sd35 lora fp16 + overflow"):
        fp16 = rows[name]
        assert (fp16["first_scale"], fp16["scale"], fp16["nonfinite_steps"]) == (2.0**16, 2.0**15, 1), name
    for name in ("sd15 lora bf16 xformers", "sd15 lora bf16 torch.compile"):
        assert rows[name]["status"] == "skipped" and rows[name]["reason"]

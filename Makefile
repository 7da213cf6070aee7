# make demo | make test | make bench: each installs what it needs into .venv first.
# torch is pinned to 2.13.0 in the same pip command as the rest: that takes the CPU build (a few hundred MB)
# instead of a several-GB CUDA build. On a GPU machine, install your CUDA torch into the venv yourself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo toy toy-base toy-compare test test-all bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -r requirements-dev.txt
	touch $@

demo: install
	$(PY) tools/demo.py --output_dir demo-output

# The miniature replication (toy/toy_replication.py): pairs from the committed toy base, labelled by a programmatic
# reward, DPO vs SFT, evaluation and toy-output/report.md. `make toy-base` retrains that base from scratch first.
# FAMILY=sd3: Flow-DPO, train_diffusion_dpo_sd3.py on the SD3-architecture base toy/base_sd3 (toy-output-sd3/).
FAMILY ?= sd
TOY_OUTPUT := toy-output$(if $(filter-out sd,$(FAMILY)),-$(FAMILY))
toy: install
	$(PY) toy/toy_replication.py --family $(FAMILY) --output_dir $(TOY_OUTPUT)

toy-base: install
	$(PY) toy/toy_replication.py --family $(FAMILY) --output_dir $(TOY_OUTPUT) --retrain_base

# The objectives side by side on the same pairs, steps and learning rate: DPO, IPO, hinge, MaPO, SDPO and SFT, each
# beta chosen by a sweep (x0.1, x1, x10 of its default, a quarter of the steps, on seeds of its own); 4 evaluations
# per run. About an hour on 2 cores.
toy-compare: install
	$(PY) toy/toy_replication.py --output_dir toy-compare-output --methods dpo ipo hinge mapo sdpo sft \
		--beta_sweep 0.1 1 10 --num_evaluations 4

# Two workers, a test file each at a time: most tests launch training subprocesses that use one core.
# `make test` skips the tests marked slow (more runs of what the default suite already covers); `make test-all` runs all.
test: install
	$(PY) -m pytest -q -p no:warnings -n 2 --dist loadfile -m "not slow and not gpu and not hub"

test-all: install
	$(PY) -m pytest -q -p no:warnings -n 2 --dist loadfile -m "not gpu and not hub"

# Step time, memory and step/floor ratios of the real training step (tiny SD, SD3 and FLUX and SD 1.5-size models on
# the CPU; a few minutes on 2 cores), and memory estimates for SDXL, SD3.5 and FLUX.1-dev. On a GPU:
# $(PY) benchmarks/bench_dpo_step.py --preset sd15-512 --preset sdxl-1024 --preset sd35-medium-1024 --device cuda
bench: install
	$(PY) benchmarks/bench_dpo_step.py --preset tiny --preset tiny-sd3 --preset tiny-flux --preset sd15 \
		--json bench-output/bench.json

clean:
	rm -rf demo-output bench-output toy-output toy-output-sd3 toy-compare-output gpu-check .pytest_cache

# The prepared device check (benchmarks/gpu_check.py): every GPU-only training path through the scripts' own stages,
# one JSON and one table, at most ~8 minutes on one CUDA GPU. Without CUDA it runs its CPU form on the tiny models
# (the default suite runs that form too). On a bare GPU machine, see the install lines at the top of the script.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --json gpu-check/gpu_check.json

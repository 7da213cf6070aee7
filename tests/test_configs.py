"""configs/: every accelerate config is read by `accelerate launch`, and the ones a CPU can run train the tiny SD.

What runs here and what cannot (see docs/multi_gpu.md, "What was tested"):
- single_gpu.yaml, multi_gpu_ddp.yaml, multi_node_2x8.yaml: real launches on CPU (gloo), with process counts
  overridden on the command line. multi_node_2x8.yaml runs as two "machines" of one process each on localhost.
- fsdp.yaml: accelerate never applies FSDP on CPU (ACCELERATE_USE_CPU turns the run into plain DDP), so the
  test runs the script through a small wrapper that lets accelerate's FSDP2 path run on gloo.
- deepspeed_zero2.yaml: validated through accelerate's own launch code; a real 2-process run needs
  `pip install deepspeed` (CPU accelerator, gloo) and is skipped without it.
"""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from launch_utils import ACCELERATE, REPO_ROOT, all_finite, logged_scalars, max_abs_difference, max_movement, \
    trained_weights

SCRIPT = "train_diffusion_dpo.py"
CONFIGS = REPO_ROOT / "configs"
EXPECTED_DISTRIBUTED_TYPE = {
    "single_gpu.yaml": "NO",
    "multi_gpu_ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "fsdp_sd3.yaml": "FSDP",
    "fsdp_flux.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "multi_node_2x8.yaml": "MULTI_GPU",
}
LAUNCH_TIMEOUT = 300

# accelerate 1.x maps every CPU run to DistributedType.MULTI_CPU (DDP over gloo) and applies FSDP only on
# accelerators. torch's FSDP2 itself runs on CPU with gloo; this wrapper switches accelerate's state to FSDP
# after it was built, so the script's real FSDP code path (wrapping, clipping, sharded checkpoints, gathering
# the state dict) runs. It changes nothing else.
FSDP_ON_CPU = '''
import runpy, sys
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState re-reads it on every construction
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''

# Without CUDA, accelerate finds no backend for a DeepSpeed launch and makes every process a world of one,
# while DeepSpeed (CPU accelerator) sees all of them; this gives accelerate the gloo backend DeepSpeed uses.
DEEPSPEED_ON_CPU = '''
import os, runpy, sys
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _prepare_backend_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return backend, distributed_type


PartialState._prepare_backend = _prepare_backend_gloo
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def free_port():
    """A free TCP port: tests must not share accelerate's default 29500 with other runs on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(config, launcher_args=(), wrapper=None, script=SCRIPT):
    command = ACCELERATE + ["--config_file", str(CONFIGS / config), "--dynamo_backend", "no", *launcher_args]
    return command + ([str(wrapper)] if wrapper else []) + [str(REPO_ROOT / script)]


def launch_env(cpu=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if cpu:  # the GPU configs on a CPU: DDP over gloo (without it, no CUDA means one world per process)
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def launch_with_config(config, script_args, launcher_args=(), wrapper=None, cpu=True, script=SCRIPT):
    """`accelerate launch --config_file configs/<config> [launcher_args] <script> script_args`."""
    result = subprocess.run(launch_command(config, launcher_args, wrapper, script) + [str(a) for a in script_args],
                            cwd=REPO_ROOT, env=launch_env(cpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=LAUNCH_TIMEOUT)
    if result.returncode != 0:
        raise AssertionError(f"launch with {config} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def run_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--train_batch_size", "1", "--learning_rate", "1e-3", "--seed", "0",
            "--num_validation_images", "0", "--checkpointing_steps", "2", "--lr_warmup_steps", "0", *extra]


# Comparisons between engines: float32, and a large Adam epsilon so that Adam does not turn float-summation noise
# in near-zero gradients into lr-sized weight differences (see test_train_sd.test_two_process_ddp_equals_one_process).
COMPARABLE = ["--mixed_precision", "no"]
LORA_4_STEPS = ["--use_lora", "--max_train_steps", "4", "--adam_epsilon", "1e-4"]


def two_processes(port):
    return ["--num_processes", "2", "--main_process_port", str(port)] + COMPARABLE


def training_args(output_dir):
    """The run's saved flags and what it derived from the launch (num_processes, mixed_precision from the Accelerator)."""
    saved = json.loads((Path(output_dir) / "training_args.json").read_text())
    return {**saved["args"], **saved["run"]}


# ---------------------------------------------------------------------------------------------------------------
# Every config is read by accelerate's own launch code
# ---------------------------------------------------------------------------------------------------------------
def test_configs_folder_holds_exactly_the_tested_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_DISTRIBUTED_TYPE)
    assert (CONFIGS / "slurm_2nodes.sh").exists()


@pytest.mark.parametrize("name", sorted(EXPECTED_DISTRIBUTED_TYPE))
def test_config_loads_into_accelerate_and_names_only_known_options(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(CONFIGS / name))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == EXPECTED_DISTRIBUTED_TYPE[name]
    assert config.mixed_precision in ("no", "fp16", "bf16")
    assert config.num_processes >= config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0
    # `accelerate launch` copies fsdp_config/deepspeed_config keys onto its options without checking them, so a
    # misspelled key would be ignored in silence: each must be one of its options.
    options = {action.dest for action in launch_command_parser()._actions}
    for key in list(config.fsdp_config) + list(config.deepspeed_config):
        assert key in options, f"{name}: {key} is not an `accelerate launch` option"
    if name != "multi_node_2x8.yaml":
        assert config.num_machines == 1


def validated_launch_args(name, *launcher_args):
    """`accelerate launch --config_file configs/<name> ...` arguments after accelerate's own validation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *launcher_args, SCRIPT])
    return _validate_launch_command(args)


def launcher_environment(name, *launcher_args):
    """The environment `accelerate launch --config_file configs/<name>` gives its processes (accelerate's code)."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mixed_precision_from_config = validated_launch_args(name, *launcher_args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_fsdp_config_full_shard_wraps_each_transformer_and_resnet_block(tiny_sd_path, tiny_sdxl_path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import UNet2DConditionModel

    environment = launcher_environment("fsdp.yaml")
    for key, value in environment.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what the script's Accelerator builds from that environment
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    for path in (tiny_sd_path, tiny_sdxl_path):
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        plugin.set_auto_wrap_policy(unet)  # raises if a class to wrap is missing from the model
        policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
        units = [module for module in unet.modules() if policy(module)]
        assert {type(module).__name__ for module in units} == {"BasicTransformerBlock", "ResnetBlock2D"}
        assert len(units) == sum(type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D") for m in unet.modules())
        # The units hold most of the weights; the rest (conv_in/out, embeddings, samplers) is the root unit.
        in_units = sum(p.numel() for module in units for p in module.parameters())
        assert in_units > 0.6 * sum(p.numel() for p in unet.parameters())


def fsdp_plugin_of(config, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    environment = launcher_environment(config)
    for key, value in environment.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    return FullyShardedDataParallelPlugin()  # what the script's Accelerator builds from that environment


def test_fsdp_sd3_config_wraps_each_joint_transformer_block(tmp_path, monkeypatch):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import SD3Transformer2DModel

    from fixtures.tiny_models import build_tiny_sd3

    plugin = fsdp_plugin_of("fsdp_sd3.yaml", monkeypatch)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    transformer = SD3Transformer2DModel.from_pretrained(build_tiny_sd3(str(tmp_path / "sd3")), subfolder="transformer")
    plugin.set_auto_wrap_policy(transformer)  # raises if a class to wrap is missing from the model
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    units = [module for module in transformer.modules() if policy(module)]
    assert [type(module).__name__ for module in units] == ["JointTransformerBlock"] * len(
        transformer.transformer_blocks)
    in_units = sum(p.numel() for module in units for p in module.parameters())
    assert in_units > 0.6 * sum(p.numel() for p in transformer.parameters())
    # fsdp.yaml's UNet blocks are not in an SD3 transformer: accelerate would refuse it at prepare
    with pytest.raises(Exception, match="BasicTransformerBlock"):
        fsdp_plugin_of("fsdp.yaml", monkeypatch).set_auto_wrap_policy(transformer)


def test_fsdp_flux_config_wraps_each_double_and_single_stream_block(tmp_path, monkeypatch):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import FluxTransformer2DModel

    from fixtures.tiny_models import build_tiny_flux

    plugin = fsdp_plugin_of("fsdp_flux.yaml", monkeypatch)
    transformer = FluxTransformer2DModel.from_pretrained(build_tiny_flux(str(tmp_path / "flux")),
                                                         subfolder="transformer")
    plugin.set_auto_wrap_policy(transformer)  # raises if a class to wrap is missing from the model
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    units = [type(module).__name__ for module in transformer.modules() if policy(module)]
    assert units == (["FluxTransformerBlock"] * len(transformer.transformer_blocks)
                     + ["FluxSingleTransformerBlock"] * len(transformer.single_transformer_blocks))


@pytest.mark.slow  # the FSDP path is the SD script's, copied under the drift test; its own run is in the default suite
def test_fsdp_sd3_config_full_fine_tune_on_cpu_saves_the_gathered_transformer(preference_data_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from fixtures.tiny_models import build_tiny_sd3

    base = build_tiny_sd3(str(tmp_path / "sd3"))
    wrapper = tmp_path / "fsdp_on_cpu.py"
    wrapper.write_text(FSDP_ON_CPU)
    launch_with_config("fsdp_sd3.yaml", run_args(base, preference_data_path, tmp_path / "fsdp", "--max_train_steps",
                                                 "2", "--learning_rate", "1e-4"),
                       two_processes(free_port()), wrapper=wrapper, script="train_diffusion_dpo_sd3.py")
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded engine state: FSDP really ran
    tuned = load_file(tmp_path / "fsdp" / "transformer" / "diffusion_pytorch_model.safetensors")
    stored = load_file(f"{base}/transformer/diffusion_pytorch_model.safetensors")
    assert all_finite(tuned) and sum(not torch_equal(tuned[k], stored[k]) for k in stored) > 0.9 * len(stored)
    gathered = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    assert max_abs_difference(gathered, tuned) == 0
    assert isinstance(StableDiffusion3Pipeline.from_pretrained(tmp_path / "fsdp"), StableDiffusion3Pipeline)


def torch_equal(first, second):
    import torch

    return torch.equal(first, second)


def test_deepspeed_config_is_zero2_and_leaves_accumulation_to_the_script(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    environment = launcher_environment("deepspeed_zero2.yaml")
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in environment.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # what the script's Accelerator builds from that environment
    config = plugin.deepspeed_config
    assert plugin.zero_stage == 2 and config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_param"]["device"] == "none"
    # "auto": accelerate fills it from Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    assert config["gradient_accumulation_steps"] == "auto"
    assert config["gradient_clipping"] == 1.0  # the scripts' --max_grad_norm default; DeepSpeed clips inside step


def test_multi_node_config_starts_eight_processes_on_each_of_two_machines():
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = validated_launch_args("multi_node_2x8.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    prepare_multi_gpu_env(args)  # fills in torchrun's arguments, as `accelerate launch` does on machine 1
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    # node 0's address and port, as torchrun's master address or static rendezvous endpoint
    endpoint = f"{args.master_addr}:{args.master_port}" if hasattr(args, "master_addr") else args.rdzv_endpoint
    assert endpoint == "10.1.2.3:29500"


# ---------------------------------------------------------------------------------------------------------------
# Dry starts and whole runs on CPU
# ---------------------------------------------------------------------------------------------------------------
def test_single_gpu_config_trains_as_written(tiny_sd_path, preference_data_path, tmp_path):
    # The file as it is (bf16 autocast runs on CPU), one optimizer step
    launch_with_config("single_gpu.yaml", run_args(tiny_sd_path, preference_data_path, tmp_path, "--use_lora",
                                                   "--max_train_steps", "1"), cpu=False)
    assert all_finite(trained_weights(tmp_path))
    assert training_args(tmp_path)["num_processes"] == 1 and training_args(tmp_path)["mixed_precision"] == "bf16"


@pytest.fixture(scope="module")
def ddp_lora_run(tiny_sd_path, preference_data_path, tmp_path_factory):
    """multi_gpu_ddp.yaml on 2 CPU processes: 4 LoRA steps of 1 pair per process, checkpoints at 2 and 4."""
    output_dir = tmp_path_factory.mktemp("ddp-lora")
    launch_with_config("multi_gpu_ddp.yaml", run_args(tiny_sd_path, preference_data_path, output_dir, *LORA_4_STEPS),
                       two_processes(free_port()))
    return output_dir


def test_ddp_config_trains_on_two_processes(ddp_lora_run):
    assert training_args(ddp_lora_run)["num_processes"] == 2
    weights = trained_weights(ddp_lora_run)
    assert all_finite(weights) and max_movement(weights) > 0
    assert len(logged_scalars(ddp_lora_run)) == 4
    assert sorted(p.name for p in ddp_lora_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


# Slow: resume equal to an uninterrupted run (test_reliability*.py) times DDP equal to 1 process (test_train_sd3.py);
# a 2-process checkpoint with each process's run state is checked in the default suite by the 2-process SIGTERM test.
@pytest.mark.slow
def test_two_process_save_and_resume_equals_an_uninterrupted_two_process_run(ddp_lora_run, tiny_sd_path,
                                                                          preference_data_path, tmp_path):
    half = run_args(tiny_sd_path, preference_data_path, tmp_path, *LORA_4_STEPS)
    launch_with_config("multi_gpu_ddp.yaml", half + ["--max_train_steps", "2"], two_processes(free_port()))
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-4").exists()
    result = launch_with_config("multi_gpu_ddp.yaml", half + ["--resume_from_checkpoint", "latest"],
                                two_processes(free_port()))
    assert "Resuming from" in result.stdout
    assert max_abs_difference(trained_weights(tmp_path), trained_weights(ddp_lora_run)) < 1e-6
    assert logged_scalars(tmp_path) == pytest.approx(logged_scalars(ddp_lora_run), rel=1e-6)


# Slow: the same gloo DDP path as the 2-process tests above; the config's machine layout is checked without a run
# (test_multi_node_config_starts_eight_processes_on_each_of_two_machines).
@pytest.mark.slow
def test_multi_node_config_two_machines_equal_one_machine(ddp_lora_run, tiny_sd_path, preference_data_path, tmp_path):
    # multi_node_2x8.yaml as two "machines" with one process each on localhost: the same 2-process world as
    # ddp_lora_run, wired through the multi-node launch path (node ranks, main process address and port).
    port = free_port()
    script_args = [str(a) for a in run_args(tiny_sd_path, preference_data_path, tmp_path, *LORA_4_STEPS)]
    machines = []
    for machine_rank in (0, 1):
        launcher_args = ["--num_processes", "2", "--machine_rank", str(machine_rank), "--main_process_ip",
                         "127.0.0.1", "--main_process_port", str(port)] + COMPARABLE
        machines.append(subprocess.Popen(launch_command("multi_node_2x8.yaml", launcher_args) + script_args,
                                         cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [machine.communicate(timeout=LAUNCH_TIMEOUT)[0] for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-6000:]
    assert training_args(tmp_path)["num_processes"] == 2
    assert logged_scalars(tmp_path) == pytest.approx(logged_scalars(ddp_lora_run), rel=1e-6)
    assert max_abs_difference(trained_weights(tmp_path), trained_weights(ddp_lora_run)) < 1e-6


def test_fsdp_config_full_fine_tune_on_cpu_equals_ddp(tiny_sd_path, preference_data_path, tmp_path):
    wrapper = tmp_path / "fsdp_on_cpu.py"
    wrapper.write_text(FSDP_ON_CPU)
    full = ["--max_train_steps", "2", "--learning_rate", "1e-4", "--adam_epsilon", "1e-4"]
    launch_with_config("fsdp.yaml", run_args(tiny_sd_path, preference_data_path, tmp_path / "fsdp", *full),
                       two_processes(free_port()), wrapper=wrapper)
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded engine state: FSDP really ran
    launch_with_config("multi_gpu_ddp.yaml", run_args(tiny_sd_path, preference_data_path, tmp_path / "ddp", *full),
                       two_processes(free_port()))
    assert logged_scalars(tmp_path / "fsdp") == pytest.approx(logged_scalars(tmp_path / "ddp"), rel=1e-3)
    assert logged_scalars(tmp_path / "fsdp", "train/grad_norm") == pytest.approx(
        logged_scalars(tmp_path / "ddp", "train/grad_norm"), rel=1e-3)
    fsdp, ddp = trained_weights(tmp_path / "fsdp"), trained_weights(tmp_path / "ddp")
    from safetensors.torch import load_file

    base = load_file(f"{tiny_sd_path}/unet/diffusion_pytorch_model.safetensors")
    assert max_abs_difference(fsdp, ddp) < 1e-2 * max_abs_difference(ddp, base)  # float noise, fused AdamW
    # the checkpoint's unet/ (gathered from the shards) is the same UNet as the final result
    gathered = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_abs_difference(gathered, fsdp) == 0


def test_deepspeed_zero2_config_on_cpu_equals_ddp(ddp_lora_run, tiny_sd_path, preference_data_path, tmp_path):
    pytest.importorskip("deepspeed")  # not a requirement; its CPU accelerator JIT-builds a comm op on first use
    wrapper = tmp_path / "deepspeed_on_cpu.py"
    wrapper.write_text(DEEPSPEED_ON_CPU)
    output_dir = tmp_path / "zero2"
    launch_with_config("deepspeed_zero2.yaml", run_args(tiny_sd_path, preference_data_path, output_dir, *LORA_4_STEPS),
                       two_processes(free_port()), wrapper=wrapper, cpu=False)
    assert (output_dir / "checkpoint-2" / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint: it really ran
    assert logged_scalars(output_dir) == pytest.approx(logged_scalars(ddp_lora_run), rel=1e-3)
    zero2, ddp = trained_weights(output_dir), trained_weights(ddp_lora_run)
    assert max_abs_difference(zero2, ddp) < 1e-2 * max_movement(ddp)

"""pipeline_dpo.py: every kind of DPO result loads into a stock pipeline and samples what its trained denoiser samples.

The results come from real 2-step runs of train_diffusion_dpo.py and train_diffusion_dpo_sdxl.py on tiny models:
full pipeline, --save_unet_only and --use_lora, as users get them; and of train_diffusion_dpo_sd3.py and
train_diffusion_dpo_flux.py (in this process, no launcher start-up): full pipeline, --save_transformer_only and
--use_lora.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline_dpo
from launch_utils import REPO_ROOT, run_in_process
from pipeline_dpo import DpoResultError, load_dpo_pipeline, resolve_dpo_result

PROMPT = "a red circle on a blue background"
STEPS = 2  # sampling steps for every image here: enough to run the whole pipeline, fast on a CPU


def train_args(model, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--resolution", "64", "--max_train_steps", "2", "--num_validation_images", "0", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--seed", "0", "--lr_warmup_steps", "0", "--checkpointing_steps", "100", *extra]


def sample(pipe, prompt=PROMPT, seed=0, **kwargs):
    """One image (uint8 array, as a user saves it) from `seed` on a CPU generator, as pipeline_dpo samples."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt, num_inference_steps=STEPS, generator=generator, **kwargs).images[0]
    return np.asarray(image)


def sample_float(pipe):
    """The same image before 8-bit quantisation, for tolerance comparisons."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0),
                output_type="np").images[0]


def has_lora_layers(module):
    return any("lora" in name for name, _ in module.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Results to load
# ---------------------------------------------------------------------------------------------------------------
def copy_unet_alone(pipeline_folder, destination):
    """A folder holding only unet/, as --save_unet_only writes it and the authors released theirs."""
    shutil.copytree(pipeline_folder / "unet", destination / "unet")
    return destination


@pytest.fixture(scope="module")
def results(tiny_sd_path, tiny_sdxl_path, preference_data_path, tmp_path_factory):
    """{"sd": {...}, "sdxl": {...}}: the base and its "full", "unet-only" and "lora" results, per family."""
    sd, sdxl = tmp_path_factory.mktemp("sd-results"), tmp_path_factory.mktemp("sdxl-results")
    runs = [
        ("train_diffusion_dpo.py", train_args(tiny_sd_path, preference_data_path, sd / "full")),
        ("train_diffusion_dpo.py", train_args(tiny_sd_path, preference_data_path, sd / "unet-only",
                                              "--save_unet_only")),
        # Checkpoint at the last step: checkpoint-2 holds the same adapter as the result, in the result's format too.
        ("train_diffusion_dpo.py", train_args(tiny_sd_path, preference_data_path, sd / "lora", "--use_lora",
                                              "--checkpointing_steps", "2")),
        ("train_diffusion_dpo_sdxl.py", train_args(tiny_sdxl_path, preference_data_path, sdxl / "full")),
        ("train_diffusion_dpo_sdxl.py", train_args(tiny_sdxl_path, preference_data_path, sdxl / "lora",
                                                   "--use_lora")),
    ]
    # In process, one after the other: main() as a one-process launch runs it, without five launchers' start-up
    # (the launched path is tested with the scripts)
    for script, args in runs:
        run_in_process(importlib.import_module(script.removesuffix(".py")), args)
    # SD covers the script's --save_unet_only layout; for SDXL the same layout is cut from the full result.
    copy_unet_alone(sdxl / "full", sdxl / "unet-only")
    return {family: {"base": base, **{kind: root / kind for kind in ("full", "unet-only", "lora")}}
            for family, base, root in (("sd", tiny_sd_path, sd), ("sdxl", tiny_sdxl_path, sdxl))}


@pytest.fixture(scope="module")
def sd_results(results):
    return results["sd"]


@pytest.fixture(scope="module")
def sdxl_results(results):
    return results["sdxl"]


@pytest.fixture(scope="module")
def base_images(results):
    """What each base samples (PROMPT, seed 0) with no DPO result."""
    return {family: sample(load_dpo_pipeline(paths["base"])) for family, paths in results.items()}


def by_hand(family_results, kind):
    """The trained result put into a stock pipeline with diffusers' own calls, as a user would without us."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    pipe = DiffusionPipeline.from_pretrained(family_results["base"])
    if kind == "lora":
        pipe.load_lora_weights(family_results["lora"])
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(family_results[kind], subfolder="unet")
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Loading every kind of result
# ---------------------------------------------------------------------------------------------------------------
# (what `dpo` is given as, which result it is, what resolve_dpo_result must call it)
DPO_FORMS = [
    ("full pipeline folder", "full", lambda r: r["full"], "pipeline"),
    ("folder holding only unet/", "unet-only", lambda r: r["unet-only"], "unet"),
    ("the UNet folder itself", "unet-only", lambda r: r["unet-only"] / "unet", "unet"),
    ("LoRA folder", "lora", lambda r: r["lora"], "lora"),
    ("LoRA .safetensors file", "lora", lambda r: r["lora"] / "pytorch_lora_weights.safetensors", "lora"),
]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("form, result_kind, dpo_path, expected_kind", DPO_FORMS, ids=[f[0] for f in DPO_FORMS])
def test_every_kind_of_result_samples_what_its_trained_unet_samples(family, form, result_kind, dpo_path,
                                                                     expected_kind, results, base_images):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dpo = dpo_path(results[family])
    assert resolve_dpo_result(dpo).kind == expected_kind
    pipe = load_dpo_pipeline(results[family]["base"], dpo)
    assert type(pipe) is {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[family]

    image = sample(pipe)
    np.testing.assert_array_equal(image, sample(by_hand(results[family], result_kind)))
    assert not np.array_equal(image, base_images[family]), "the DPO result should change the image"


def test_lora_training_checkpoint_loads_like_the_final_lora(sd_results):
    checkpoint = sd_results["lora"] / "checkpoint-2"
    assert resolve_dpo_result(checkpoint).weight_name == "pytorch_lora_weights.safetensors"
    image = sample(load_dpo_pipeline(sd_results["base"], checkpoint))
    np.testing.assert_array_equal(image, sample(by_hand(sd_results, "lora")))


def test_a_hub_id_in_the_local_cache_loads_offline(sd_results, tmp_path, monkeypatch):
    """A hub id (here shaped like the authors' unet/-only release) resolves from the cache when the hub is off."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo_cache = tmp_path / "models--someone--dpo-sd-unet"
    copy_unet_alone(sd_results["unet-only"], repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    result = resolve_dpo_result("someone/dpo-sd-unet")
    assert (result.kind, result.subfolder) == ("unet", "unet")
    image = sample(load_dpo_pipeline(sd_results["base"], "someone/dpo-sd-unet"))
    np.testing.assert_array_equal(image, sample(by_hand(sd_results, "unet-only")))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_scale_zero_is_exactly_the_base(family, results, base_images):
    pipe = load_dpo_pipeline(results[family]["base"], results[family]["lora"], lora_scale=0.0)
    np.testing.assert_array_equal(sample(pipe), base_images[family])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_fused_lora_samples_like_the_unfused_lora_and_drops_the_adapter(family, results):
    # A scale other than 1 also catches a scale applied twice (set_adapters and then fuse_lora's own).
    base, lora = results[family]["base"], results[family]["lora"]
    unfused = load_dpo_pipeline(base, lora, lora_scale=0.5)
    fused = load_dpo_pipeline(base, lora, lora_scale=0.5, fuse_lora=True)
    assert has_lora_layers(unfused.unet) and not has_lora_layers(fused.unet)
    fused_image = sample_float(fused)
    np.testing.assert_allclose(fused_image, sample_float(unfused), atol=1e-4)
    assert np.abs(fused_image - sample_float(load_dpo_pipeline(base, lora))).max() > 1e-3, "the scale took effect"


# ---------------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------------
def test_a_folder_with_nothing_usable_names_what_was_looked_for_and_found(sd_results, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(DpoResultError) as error:
        load_dpo_pipeline(sd_results["base"], tmp_path)
    message = str(error.value)
    for looked_for in ("model_index.json", "pytorch_lora_weights.safetensors", "unet/config.json", "config.json"):
        assert looked_for in message
    assert "notes.txt" in message and "checkpoint-N" in message


def test_other_unusable_inputs_get_clear_errors(sd_results, sdxl_results, tmp_path):
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "weights.safetensors")
    with pytest.raises(DpoResultError, match="holds no LoRA weights"):
        load_dpo_pipeline(sd_results["base"], tmp_path / "weights.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(DpoResultError, match="must be .safetensors"):
        load_dpo_pipeline(sd_results["base"], tmp_path / "model.ckpt")
    with pytest.raises(DpoResultError, match="Hugging Face Hub"):  # tests run with HF_HUB_OFFLINE=1
        load_dpo_pipeline(sd_results["base"], "someone/no-such-dpo-result")
    with pytest.raises(DpoResultError, match="does not exist"):
        load_dpo_pipeline(sd_results["base"], str(tmp_path / "missing" / "result"))
    with pytest.raises(DpoResultError, match="does not fit the base.*cross_attention_dim"):
        load_dpo_pipeline(sd_results["base"], sdxl_results["full"])
    # a LoRA made for another base: named as the UNet path is, not diffusers' raw "size mismatch"
    with pytest.raises(DpoResultError, match=r"does not fit the base .*in_features LoRA 64, base 32.*or SDXL"):
        load_dpo_pipeline(sd_results["base"], sdxl_results["lora"])
    with pytest.raises(DpoResultError, match="model_index.json of the base"):
        load_dpo_pipeline(sd_results["full"] / "unet", sd_results["lora"])
    with pytest.raises(ValueError, match="apply to LoRA results"):
        load_dpo_pipeline(sd_results["base"], sd_results["full"], lora_scale=0.5)


def test_unet_weights_must_be_safetensors(sd_results, tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    shutil.copy(sd_results["full"] / "unet" / "config.json", unet / "config.json")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(DpoResultError, match="safetensors only"):
        resolve_dpo_result(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def grid_cell(grid, layout, column_x, row_top):
    return np.asarray(grid.crop((column_x, row_top, column_x + layout["cell_width"],
                                 row_top + layout["cell_height"])))


def check_grid(out, prompts, seeds, base_pipe, dpo_pipe):
    """Grid size, the JSON, and every cell equal to the image the pipelines sample for that prompt and seed."""
    record = json.loads(out.with_suffix(".json").read_text())
    layout = record["layout"]
    grid = Image.open(out)
    n = len(seeds)
    assert grid.size == (2 * n * layout["cell_width"] + layout["gap"],
                         layout["header_height"] + len(prompts) * (layout["cell_height"] + layout["caption_height"]))
    assert list(layout["columns"]) == ["base", "DPO"] and layout["score_height"] == 0
    assert (layout["cell_width"], layout["cell_height"]) == (record["width"], record["height"]) == (64, 64)
    assert layout["caption_height"] > 0 and layout["gap"] > 0
    assert record["prompts"] == prompts and record["seeds"] == seeds
    for p, prompt in enumerate(prompts):
        top = layout["row_tops"][p]
        for j, seed in enumerate(seeds):
            # the recorded size: FluxPipeline's own default is 1024 px whatever the model
            settings = {"guidance_scale": record["guidance_scale"], "height": record["height"],
                        "width": record["width"]}
            if "max_sequence_length" in record:  # SD3, FLUX: the T5 length both halves were sampled with
                settings["max_sequence_length"] = record["max_sequence_length"]
            # at most one level of 255 apart: rounding to uint8 after float sums in another process
            for columns, pipe in ((layout["columns"]["base"], base_pipe), (layout["columns"]["DPO"], dpo_pipe)):
                cell = grid_cell(grid, layout, columns[j], top).astype(int)
                assert np.abs(cell - sample(pipe, prompt, seed, **settings).astype(int)).max() <= 1
        caption = np.asarray(grid.crop((0, top + layout["cell_height"], grid.width,
                                        top + layout["cell_height"] + layout["caption_height"])).convert("L"))
        assert caption.min() < 128, "the prompt is written under its row"
    return record


def test_compare_command_writes_a_grid_of_base_and_dpo_rows_and_its_json(sd_results, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# prompts for the grid\na red circle\n\na blue square on a green background\n")
    out = tmp_path / "grid" / "compare.png"
    command = [sys.executable, str(REPO_ROOT / "pipeline_dpo.py"), "compare", "--base", str(sd_results["base"]),
               "--dpo", str(sd_results["full"]), "--prompts", str(prompts_file), "--out", str(out), "--seed", "3",
               "--num_images_per_prompt", "2", "--num_inference_steps", str(STEPS)]
    # one thread, like the in-process pipelines it is compared with (conftest), so the float sums agree
    completed = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stdout[-4000:]

    prompts = ["a red circle", "a blue square on a green background"]
    record = check_grid(out, prompts, [3, 4], load_dpo_pipeline(sd_results["base"]),
                        load_dpo_pipeline(sd_results["base"], sd_results["full"]))
    assert record["command"] == "compare" and record["pipeline"] == "StableDiffusionPipeline"
    assert record["dpo_kind"] == "pipeline" and record["dpo"] == str(sd_results["full"])
    assert record["base"] == str(sd_results["base"])
    assert (record["num_inference_steps"], record["guidance_scale"]) == (STEPS, 7.5)  # SD's default guidance
    assert (record["dtype"], record["device"]) == ("float32", "cpu")


def test_compare_with_an_sdxl_lora_uses_sdxl_guidance(sdxl_results, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n")
    out = tmp_path / "grid.png"
    pipeline_dpo.main(pipeline_dpo.parse_args([
        "compare", "--base", str(sdxl_results["base"]), "--dpo", str(sdxl_results["lora"]), "--prompts",
        str(prompts_file), "--out", str(out), "--num_inference_steps", str(STEPS)]))
    record = check_grid(out, ["a red circle"], [0], load_dpo_pipeline(sdxl_results["base"]),
                        load_dpo_pipeline(sdxl_results["base"], sdxl_results["lora"]))
    assert record["guidance_scale"] == 5.0 and record["pipeline"] == "StableDiffusionXLPipeline"
    assert record["dpo_kind"] == "lora"


def test_generate_command_writes_images_and_their_json(sd_results, tmp_path):
    out = tmp_path / "images"
    pipeline_dpo.main(pipeline_dpo.parse_args([
        "generate", "--base", str(sd_results["base"]), "--dpo", str(sd_results["lora"]), "--prompt", PROMPT,
        "--prompt", "a blue square", "--seed", "5", "--num_inference_steps", str(STEPS), "--out", str(out)]))
    record = json.loads((out / "generate.json").read_text())
    assert [(image["prompt"], image["seed"]) for image in record["images"]] == [(PROMPT, 5), ("a blue square", 5)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(image["file"] for image in record["images"])
    first = np.asarray(Image.open(out / record["images"][0]["file"]))
    np.testing.assert_array_equal(first, sample(load_dpo_pipeline(sd_results["base"], sd_results["lora"]), seed=5))
    assert record["dpo_kind"] == "lora" and record["guidance_scale"] == 7.5


def test_command_line_rejects_bad_options():
    with pytest.raises(SystemExit):
        pipeline_dpo.parse_args(["compare", "--base", "b", "--dpo", "d", "--prompts", "p", "--out", "o",
                                 "--dtype", "float8"])
    with pytest.raises(SystemExit):
        pipeline_dpo.parse_args(["generate", "--base", "b", "--prompt", "p", "--out", "o", "--height", "60"])
    parser = pipeline_dpo.build_parser()
    for subparser in parser._subparsers._group_actions[0].choices.values():
        assert all(action.help for action in subparser._actions), "every flag has help"


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3: the same kinds of result, with a transformer for the UNet
# ---------------------------------------------------------------------------------------------------------------
SD3_LORA_T5_LENGTH = 32  # the LoRA run's --max_sequence_length: not the default (77), so sampling must read it


def train_sd3_in_process(base, data, output_dir, *extra):
    """A 2-step train_diffusion_dpo_sd3.py run in this process (about a second on the tiny model)."""
    import train_diffusion_dpo_sd3 as sd3

    run_in_process(sd3, train_args(base, data, str(output_dir), *extra))
    return output_dir


@pytest.fixture(scope="module")
def sd3_results(preference_data_path, tmp_path_factory):
    """The tiny SD3 base and its "full", "transformer-only" and "lora" results (the LoRA with checkpoint-2)."""
    from fixtures.tiny_models import build_tiny_sd3

    root = tmp_path_factory.mktemp("sd3-results")
    results = {"base": build_tiny_sd3(str(root / "base"))}
    runs = {"full": (), "transformer-only": ("--save_transformer_only",),
            "lora": ("--use_lora", "--checkpointing_steps", "2", "--max_sequence_length", str(SD3_LORA_T5_LENGTH))}
    for kind, extra in runs.items():
        results[kind] = train_sd3_in_process(results["base"], preference_data_path, root / kind, *extra)
    return results


def sample_sd3(pipe, prompt=PROMPT, seed=0, max_sequence_length=77, **kwargs):
    """sample() with the T5 length given: the SD3 pipeline's own default (256) is not what the results trained on."""
    return sample(pipe, prompt, seed, max_sequence_length=max_sequence_length, **kwargs)


@pytest.fixture(scope="module")
def sd3_stock_images(sd3_results):
    """What stock diffusers samples from the base and from each SD3 result, loaded as a user would without us."""
    from diffusers import SD3Transformer2DModel

    return {kind: sample_sd3(pipe) for kind, pipe in stock_pipelines(sd3_results, SD3Transformer2DModel).items()}


def stock_pipelines(results, transformer_class):
    """The base and each transformer result (SD3, FLUX) loaded with diffusers' own calls, as a user would without us."""
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(results["base"])
    lora = DiffusionPipeline.from_pretrained(results["base"])
    lora.load_lora_weights(str(results["lora"]))
    transformer_only = DiffusionPipeline.from_pretrained(results["base"])
    transformer_only.transformer = transformer_class.from_pretrained(results["transformer-only"],
                                                                     subfolder="transformer")
    full = DiffusionPipeline.from_pretrained(results["full"])  # the saved pipeline folder, as it is
    return {"base": base, "lora": lora, "transformer-only": transformer_only, "full": full}


SD3_FORMS = [
    ("full pipeline folder", "full", lambda r: r["full"], "pipeline"),
    ("folder holding only transformer/", "transformer-only", lambda r: r["transformer-only"], "transformer"),
    ("the transformer folder itself", "transformer-only", lambda r: r["transformer-only"] / "transformer",
     "transformer"),
    ("LoRA folder", "lora", lambda r: r["lora"], "lora"),
    ("LoRA .safetensors file", "lora", lambda r: r["lora"] / "pytorch_lora_weights.safetensors", "lora"),
    ("LoRA training checkpoint", "lora", lambda r: r["lora"] / "checkpoint-2", "lora"),
]


@pytest.mark.parametrize("form, result_kind, dpo_path, expected_kind", SD3_FORMS, ids=[f[0] for f in SD3_FORMS])
def test_every_kind_of_sd3_result_samples_what_stock_diffusers_samples(form, result_kind, dpo_path, expected_kind,
                                                                       sd3_results, sd3_stock_images):
    from diffusers import StableDiffusion3Pipeline

    dpo = dpo_path(sd3_results)
    assert resolve_dpo_result(dpo).kind == expected_kind
    pipe = load_dpo_pipeline(sd3_results["base"], dpo)
    assert type(pipe) is StableDiffusion3Pipeline

    image = sample_sd3(pipe)
    np.testing.assert_array_equal(image, sd3_stock_images[result_kind])
    assert not np.array_equal(image, sd3_stock_images["base"]), "the DPO result should change the image"


def test_sd3_lora_scale_zero_is_the_base_and_fusing_keeps_the_image(sd3_results, sd3_stock_images):
    base, lora = sd3_results["base"], sd3_results["lora"]
    np.testing.assert_array_equal(sample_sd3(load_dpo_pipeline(base, lora, lora_scale=0.0)), sd3_stock_images["base"])
    fused = load_dpo_pipeline(base, lora, fuse_lora=True)
    assert not has_lora_layers(fused.transformer)
    # one level of 255 apart at most: the fused weights round differently from base + B @ A
    assert np.abs(sample_sd3(fused).astype(int) - sd3_stock_images["lora"].astype(int)).max() <= 1


def test_sd3_defaults_and_the_trained_t5_length(sd3_results):
    import train_diffusion_dpo_sd3 as sd3

    pipe = load_dpo_pipeline(sd3_results["base"])
    assert pipeline_dpo.sampling_settings(pipe) == {"num_inference_steps": 28, "guidance_scale": 7.0,
                                                    "max_sequence_length": sd3.build_parser().get_default(
                                                        "max_sequence_length")}
    # A LoRA, its file and its checkpoint all find the run's training_args.json, which says what T5 length it had.
    for dpo in (sd3_results["lora"], sd3_results["lora"] / "pytorch_lora_weights.safetensors",
                sd3_results["lora"] / "checkpoint-2"):
        settings = pipeline_dpo.sampling_settings(pipe, result=resolve_dpo_result(dpo))
        assert settings["max_sequence_length"] == SD3_LORA_T5_LENGTH
    asked = pipeline_dpo.sampling_settings(pipe, max_sequence_length=64, result=resolve_dpo_result(sd3_results["lora"]))
    assert asked["max_sequence_length"] == 64


def test_compare_with_an_sd3_lora_uses_sd3_guidance_and_its_t5_length(sd3_results, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\na blue square on a green background\n")
    out = tmp_path / "grid.png"
    pipeline_dpo.main(pipeline_dpo.parse_args([
        "compare", "--base", str(sd3_results["base"]), "--dpo", str(sd3_results["lora"]), "--prompts",
        str(prompts_file), "--out", str(out), "--num_inference_steps", str(STEPS), "--seed", "3"]))
    record = check_grid(out, ["a red circle", "a blue square on a green background"], [3],
                        load_dpo_pipeline(sd3_results["base"]),
                        load_dpo_pipeline(sd3_results["base"], sd3_results["lora"]))
    assert record["pipeline"] == "StableDiffusion3Pipeline" and record["dpo_kind"] == "lora"
    assert (record["guidance_scale"], record["max_sequence_length"]) == (7.0, SD3_LORA_T5_LENGTH)


def test_generate_with_an_sd3_transformer_uses_sd3_defaults(sd3_results, tmp_path):
    out = tmp_path / "images"
    pipeline_dpo.main(pipeline_dpo.parse_args([
        "generate", "--base", str(sd3_results["base"]), "--dpo", str(sd3_results["transformer-only"]),
        "--prompt", PROMPT, "--seed", "5", "--out", str(out)]))
    record = json.loads((out / "generate.json").read_text())
    assert record["dpo_kind"] == "transformer" and record["pipeline"] == "StableDiffusion3Pipeline"
    assert (record["num_inference_steps"], record["guidance_scale"], record["max_sequence_length"]) == (28, 7.0, 77)
    image = np.asarray(Image.open(out / record["images"][0]["file"]))
    pipe = load_dpo_pipeline(sd3_results["base"], sd3_results["transformer-only"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=28, guidance_scale=7.0, max_sequence_length=77,
                    generator=torch.Generator("cpu").manual_seed(5)).images[0]
    np.testing.assert_array_equal(image, np.asarray(expected))


def test_sd3_and_unet_results_do_not_mix(sd3_results, tiny_sd_path, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DpoResultError, match=r"transformer weights \(Stable Diffusion 3 / 3.5\).*Pass the Stable "
                                             r"Diffusion 3 / 3.5 base"):
        load_dpo_pipeline(tiny_sd_path, sd3_results["transformer-only"])
    with pytest.raises(DpoResultError, match=r"LoRA .* holds transformer weights .* is a Stable Diffusion 1.x/2.x"):
        load_dpo_pipeline(tiny_sd_path, sd3_results["lora"])
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n")
    with pytest.raises(SystemExit, match="Pass the Stable Diffusion 3 / 3.5 base"):  # before the base samples
        pipeline_dpo.main(pipeline_dpo.parse_args(["compare", "--base", tiny_sd_path, "--dpo", str(sd3_results["lora"]),
                                                   "--prompts", str(prompts_file), "--out", str(tmp_path / "g.png")]))
    assert not (tmp_path / "g.png").exists()
    # An SD/SDXL LoRA file (UNet keys) on the SD3 base.
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)},
              tmp_path / "sd_lora.safetensors")
    with pytest.raises(DpoResultError, match=r"UNet weights \(Stable Diffusion 1.x/2.x or SDXL\)"):
        load_dpo_pipeline(sd3_results["base"], tmp_path / "sd_lora.safetensors")
    # A transformer of another size (SD3.5 large for medium, say) is refused before its weights load.
    other = tmp_path / "other-size"
    shutil.copytree(sd3_results["transformer-only"] / "transformer", other / "transformer")
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(DpoResultError, match="does not fit the base.*num_layers: base 2, DPO 3"):
        load_dpo_pipeline(sd3_results["base"], other)
    # The resumable adapter of a checkpoint alone is refused with the folder to load.
    with pytest.raises(DpoResultError, match="checkpoint folder"):
        load_dpo_pipeline(sd3_results["base"], sd3_results["lora"] / "checkpoint-2" /
                          "transformer_lora_adapter.safetensors")
    # The T5 length is SD3's: asking it of an SD base says so.
    with pytest.raises(SystemExit, match="no T5 encoder"):
        pipeline_dpo.main(pipeline_dpo.parse_args(["generate", "--base", tiny_sd_path, "--prompt", PROMPT, "--out",
                                                   str(tmp_path / "images"), "--max_sequence_length", "32"]))


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1: the same kinds of result, with FLUX's transformer; FLUX.1-dev's defaults, and schnell's for its layout
# ---------------------------------------------------------------------------------------------------------------
FLUX_T5_LENGTH = 32  # every FLUX run's --max_sequence_length: not the default (512), so sampling must read it
FLUX_SIZE = {"height": 64, "width": 64}  # FluxPipeline's own default is 1024 px whatever the model


@pytest.fixture(scope="module")
def flux_results(preference_data_path, tmp_path_factory):
    """The tiny FLUX.1-dev base and its "full", "transformer-only" and "lora" results (the LoRA with checkpoint-2), from
    2-step train_diffusion_dpo_flux.py runs in this process (well under a second each on the tiny model)."""
    import train_diffusion_dpo_flux as flux
    from fixtures.tiny_models import build_tiny_flux

    root = tmp_path_factory.mktemp("flux-results")
    results = {"base": build_tiny_flux(str(root / "base"))}
    runs = {"full": (), "transformer-only": ("--save_transformer_only",),
            "lora": ("--use_lora", "--checkpointing_steps", "2")}
    for kind, extra in runs.items():
        run_in_process(flux, train_args(results["base"], preference_data_path, str(root / kind),
                                        "--max_sequence_length", str(FLUX_T5_LENGTH), *extra))
        results[kind] = root / kind
    return results


def sample_flux(pipe, prompt=PROMPT, seed=0, **kwargs):
    """sample() at 64 px with the trained T5 length (FluxPipeline's defaults are 1024 px and 512 tokens)."""
    return sample(pipe, prompt, seed, max_sequence_length=FLUX_T5_LENGTH, **FLUX_SIZE, **kwargs)


@pytest.fixture(scope="module")
def flux_stock_images(flux_results):
    """What stock diffusers samples from the base and from each FLUX result, loaded as a user would without us."""
    from diffusers import FluxTransformer2DModel

    return {kind: sample_flux(pipe) for kind, pipe in stock_pipelines(flux_results, FluxTransformer2DModel).items()}


# The FLUX script writes its results in the SD3 script's layouts, so the same forms apply.
@pytest.mark.parametrize("form, result_kind, dpo_path, expected_kind", SD3_FORMS, ids=[f[0] for f in SD3_FORMS])
def test_every_kind_of_flux_result_samples_what_stock_diffusers_samples(form, result_kind, dpo_path, expected_kind,
                                                                        flux_results, flux_stock_images):
    from diffusers import FluxPipeline

    dpo = dpo_path(flux_results)
    result = resolve_dpo_result(dpo)
    assert result.kind == expected_kind
    assert result.denoiser == (None if expected_kind == "lora" else "FluxTransformer2DModel")
    pipe = load_dpo_pipeline(flux_results["base"], dpo)
    assert type(pipe) is FluxPipeline

    image = sample_flux(pipe)
    np.testing.assert_array_equal(image, flux_stock_images[result_kind])
    assert not np.array_equal(image, flux_stock_images["base"]), "the DPO result should change the image"


def test_flux_lora_scale_zero_is_the_base_and_fusing_keeps_the_image(flux_results, flux_stock_images):
    base, lora = flux_results["base"], flux_results["lora"]
    np.testing.assert_array_equal(sample_flux(load_dpo_pipeline(base, lora, lora_scale=0.0)),
                                  flux_stock_images["base"])
    fused = load_dpo_pipeline(base, lora, fuse_lora=True)
    assert not has_lora_layers(fused.transformer)
    # one level of 255 apart at most: the fused weights round differently from base + B @ A
    assert np.abs(sample_flux(fused).astype(int) - flux_stock_images["lora"].astype(int)).max() <= 1


def test_flux_defaults_and_the_trained_t5_length(flux_results):
    import train_diffusion_dpo_flux as flux

    pipe = load_dpo_pipeline(flux_results["base"])
    # FLUX.1-dev's: 28 steps, distilled guidance 3.5 (the script's training and validation values), and the script's
    # T5 length where the result records none
    assert pipeline_dpo.sampling_settings(pipe) == {
        "num_inference_steps": 28, "guidance_scale": flux.build_parser().get_default("guidance_scale"),
        "max_sequence_length": flux.build_parser().get_default("max_sequence_length")} == {
        "num_inference_steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512}
    # Every form of result finds its run's training_args.json, which says what T5 length it had.
    for dpo in (flux_results["lora"], flux_results["lora"] / "pytorch_lora_weights.safetensors",
                flux_results["lora"] / "checkpoint-2", flux_results["full"],
                flux_results["transformer-only"] / "transformer"):
        settings = pipeline_dpo.sampling_settings(pipe, result=resolve_dpo_result(dpo))
        assert settings["max_sequence_length"] == FLUX_T5_LENGTH


def test_a_schnell_layout_base_samples_with_schnell_defaults_and_refuses_a_dev_transformer(flux_results, tmp_path):
    from fixtures.tiny_models import build_tiny_flux

    schnell = build_tiny_flux(str(tmp_path / "schnell"), guidance_embeds=False)
    settings = pipeline_dpo.sampling_settings(load_dpo_pipeline(schnell))
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (4, 0.0)
    # A FLUX.1-dev transformer (guidance input) is not one for a schnell base, though both are FLUX transformers.
    with pytest.raises(DpoResultError, match="does not fit the base.*guidance_embeds: base False, DPO True"):
        load_dpo_pipeline(schnell, flux_results["transformer-only"])


def test_compare_with_a_flux_lora_uses_flux_guidance_and_its_t5_length(flux_results, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\na blue square on a green background\n")
    out = tmp_path / "grid.png"
    pipeline_dpo.main(pipeline_dpo.parse_args([
        "compare", "--base", str(flux_results["base"]), "--dpo", str(flux_results["lora"]), "--prompts",
        str(prompts_file), "--out", str(out), "--num_inference_steps", str(STEPS), "--seed", "3", "--height", "64",
        "--width", "64"]))
    record = check_grid(out, ["a red circle", "a blue square on a green background"], [3],
                        load_dpo_pipeline(flux_results["base"]),
                        load_dpo_pipeline(flux_results["base"], flux_results["lora"]))
    assert record["pipeline"] == "FluxPipeline" and record["dpo_kind"] == "lora"
    assert (record["guidance_scale"], record["max_sequence_length"]) == (3.5, FLUX_T5_LENGTH)


def test_generate_with_a_flux_transformer_uses_flux_defaults(flux_results, tmp_path):
    out = tmp_path / "images"
    pipeline_dpo.main(pipeline_dpo.parse_args([
        "generate", "--base", str(flux_results["base"]), "--dpo", str(flux_results["transformer-only"]),
        "--prompt", PROMPT, "--seed", "5", "--height", "64", "--width", "64", "--out", str(out)]))
    record = json.loads((out / "generate.json").read_text())
    assert record["dpo_kind"] == "transformer" and record["pipeline"] == "FluxPipeline"
    assert (record["num_inference_steps"], record["guidance_scale"], record["max_sequence_length"]) == (
        28, 3.5, FLUX_T5_LENGTH)
    image = np.asarray(Image.open(out / record["images"][0]["file"]))
    pipe = load_dpo_pipeline(flux_results["base"], flux_results["transformer-only"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=28, guidance_scale=3.5, max_sequence_length=FLUX_T5_LENGTH,
                    generator=torch.Generator("cpu").manual_seed(5), **FLUX_SIZE).images[0]
    np.testing.assert_array_equal(image, np.asarray(expected))


def test_flux_and_sd3_results_do_not_mix(flux_results, sd3_results, tiny_sd_path, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, ModelMixin

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the mix-up was refused")

    # Every refusal below comes from configs and LoRA file headers alone, before any weights load.
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(no_loading))
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(no_loading))
    flux_base, sd3_base = flux_results["base"], sd3_results["base"]
    # Whole transformers: their config names the class.
    with pytest.raises(DpoResultError, match=r"FLUX transformer weights \(FLUX.1\).*Pass the FLUX.1 base"):
        load_dpo_pipeline(sd3_base, flux_results["transformer-only"])
    with pytest.raises(DpoResultError, match=r"SD3 transformer weights \(Stable Diffusion 3 / 3.5\).*Pass the "
                                             r"Stable Diffusion 3 / 3.5 base"):
        load_dpo_pipeline(flux_base, sd3_results["full"])
    # LoRA: FLUX's adapts the single-stream blocks only FLUX has; SD3's run record names its base.
    with pytest.raises(DpoResultError, match=r"LoRA .* holds transformer weights \(FLUX.1\).*Pass the FLUX.1 base"):
        load_dpo_pipeline(sd3_base, flux_results["lora"])
    with pytest.raises(DpoResultError, match=r"LoRA .* holds transformer weights \(Stable Diffusion 3 / 3.5\).*Pass "
                                             r"the Stable Diffusion 3 / 3.5 base"):
        load_dpo_pipeline(flux_base, sd3_results["lora"])
    with pytest.raises(DpoResultError, match=r"holds transformer weights \(FLUX.1\).*is a Stable Diffusion 1.x/2.x"):
        load_dpo_pipeline(tiny_sd_path, flux_results["lora"])
    # An SD3 LoRA file away from its run (no training_args.json): its modules are not the FLUX transformer's.
    shutil.copy(sd3_results["lora"] / "pytorch_lora_weights.safetensors", tmp_path / "sd3_lora.safetensors")
    with pytest.raises(DpoResultError, match=r"does not fit the base .*transformer_blocks.1.attn.* not in the base's "
                                             r"transformer.*Stable Diffusion 3 / 3.5"):
        load_dpo_pipeline(flux_base, tmp_path / "sd3_lora.safetensors")
    # compare refuses before the base samples.
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n")
    with pytest.raises(SystemExit, match="Pass the FLUX.1 base"):
        pipeline_dpo.main(pipeline_dpo.parse_args(["compare", "--base", str(sd3_base), "--dpo",
                                                   str(flux_results["lora"]), "--prompts", str(prompts_file),
                                                   "--out", str(tmp_path / "g.png")]))
    assert not (tmp_path / "g.png").exists()

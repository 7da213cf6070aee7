#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO open implementation authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Speed and memory of the shipped Diffusion-DPO training step, beside its compute floor, in one process.

    python benchmarks/bench_dpo_step.py --preset tiny --preset sd15 --json bench-output/bench.json   # CPU (make bench)
    python benchmarks/bench_dpo_step.py --preset sd15-512 --preset sdxl-1024 --device cuda --json bench-output/gpu.json
    python benchmarks/bench_dpo_step.py --preset sd35-medium-1024 --modes lora --device cuda   # SD3.5 medium, a GPU
    python benchmarks/bench_dpo_step.py --preset flux-dev-1024 --modes lora --device cuda      # FLUX.1-dev, a GPU

Every model is built from its real config with random weights (no download). For each preset and mode (full
fine-tune with a frozen reference copy; LoRA with the adapters disabled as reference) three things are timed in
the same process, after warm-up, over --steps steps (interleaved on CPU, so load from other processes hits all
three alike):

    floor     policy forward + backward and reference forward on one fixed [2B] noised batch; nothing else
    uncached  the whole training step from pixels: train_diffusion_dpo.dpo_step_losses (VAE and text encoder run)
              + diffusion_dpo_loss + backward + grad clip + optimizer step + zero_grad, as main()'s loop does it
    cached    the same step fed what --cache_latents stores: VAE posteriors and text embeddings

and printed as one table (pairs/s, ms/step, peak memory, step/floor, cache speedup, TFLOP/s and MFU from
torch.utils.flop_counter), followed by where the step's time goes beyond the floor and estimates (labelled as
such) of SDXL's, SD3.5's and FLUX.1-dev's peak GPU memory at 1024 px. --json writes every figure, per-step times
included. The flow presets (tiny-sd3 and tiny-flux on a CPU; sd35-medium-1024 and flux-dev-1024 on a GPU) time
train_diffusion_dpo_sd3.py's and train_diffusion_dpo_flux.py's steps: the same stages on velocity errors; there the
floor is the transformer's forward + backward and the reference forward.
"""

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from configs; nothing may be downloaded

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the training scripts and tools/ are imported from the repository root

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel)
from diffusers.training_utils import cast_training_params  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,  # noqa: E402
                          T5EncoderModel)
from transformers.utils import logging as transformers_logging  # noqa: E402

import train_diffusion_dpo as sd_script  # noqa: E402


# full / lora: the reference runs in every step; *-precomputed: --reference_errors, computed once before training (a
# full fine-tune then keeps no reference copy, and the floor is the policy's forward + backward alone); full-mapo:
# --loss_type mapo, reference-free (no copy, no reference forward: its floor is the policy's alone too)
MODES = ("full", "lora", "full-precomputed", "lora-precomputed", "full-mapo")
KINDS = ("floor", "uncached", "cached")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")  # the three the scripts offer (build_optimizer)
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"float32": "no", "bf16": "bf16", "fp16": "fp16"}
# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS_HALF = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "A10": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}
GIB = 1024 ** 3
DEFAULT_THREADS = torch.get_num_threads()
ACCUMULATION = 64  # the README's LoRA recipe (--gradient_accumulation_steps 64), for the derived per-micro-batch ratio


# ----------------------------------------------------------------------------------------------------------------
# Model configs (real SD 1.5 / SDXL base shapes, random weights) and presets
# ----------------------------------------------------------------------------------------------------------------
def sd15_unet_config():
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def sdxl_unet_config():
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )


def sd_vae_config(scaling_factor, sample_size):
    """The SD 1.x / SDXL VAE (same architecture; SDXL's differs in weights and latent scale)."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=sample_size, scaling_factor=scaling_factor,
    )


def clip_vit_l_text_config():
    """SD 1.x's text encoder (and SDXL's first): CLIP ViT-L/14, 12 layers, 768 wide."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def openclip_bigg_text_config():
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14, 32 layers, 1280 wide, 1280-d pooled projection."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


def sd35_transformer_config(size):
    """SD3.5 medium (2.5B, MMDiT-X: dual attention in its first 13 blocks) or large (8.1B), as released."""
    if size == "medium":
        return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")


def sd3_vae_config():
    """SD3's VAE: SD's architecture with 16 latent channels, latents shifted and scaled, no quant convolutions."""
    return dict(sd_vae_config(1.5305, 1024), latent_channels=16, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


def t5_xxl_config():
    """SD3's third text encoder: the T5 v1.1 XXL encoder (4.7B parameters, 4096 wide)."""
    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)


def flux_dev_transformer_config():
    """FLUX.1-dev's transformer as released: 19 double-stream and 38 single-stream blocks, 3072 wide, 11.9B."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def flux_vae_config():
    """FLUX.1's VAE: SD3's 16-channel layout with its own shift and scale."""
    return dict(sd3_vae_config(), scaling_factor=0.3611, shift_factor=0.1159)


def flux_scheduler():
    """FLUX.1-dev's scheduler config: flow matching with the resolution-dependent (dynamic) shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def sd3_text_configs():
    clip_l = clip_vit_l_text_config()
    clip_l.eos_token_id = 49407  # SD3's CLIP-L pools at <|endoftext|> like SD's; its projection is used here
    return [clip_l, openclip_bigg_text_config(), t5_xxl_config()]


def tiny_configs(family):
    """The sizes of fixtures/tiny_models.py (see DESIGN.md, "Facts of this machine")."""
    from fixtures import tiny_models

    tokenizer = tiny_models.build_tiny_clip_tokenizer()
    text_config = tiny_models.tiny_clip_text_config(tokenizer)
    unet = dict(
        sample_size=tiny_models.LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=32,
        cross_attention_dim=tiny_models.TEXT_HIDDEN_SIZE,
    )
    vae = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=4, latent_channels=4, sample_size=tiny_models.LATENT_SIZE * 8,
        scaling_factor=0.18215 if family == "sd" else 0.13025,
    )
    if family == "sd":
        return unet, vae, [text_config]
    if family == "sd3":
        transformer = dict(sample_size=tiny_models.LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16,
                           num_layers=2, attention_head_dim=8, num_attention_heads=4,
                           joint_attention_dim=tiny_models.T5_HIDDEN_SIZE, caption_projection_dim=32,
                           pooled_projection_dim=2 * tiny_models.TEXT_PROJECTION_DIM,
                           pos_embed_max_size=tiny_models.LATENT_SIZE, dual_attention_layers=(0,), qk_norm="rms_norm")
        vae.update(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                   use_post_quant_conv=False)
        t5 = T5Config(vocab_size=203, d_model=tiny_models.T5_HIDDEN_SIZE, d_kv=16, d_ff=64, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1)
        return transformer, vae, [text_config, tiny_models.tiny_clip_text_config(tokenizer), t5]
    if family == "flux":
        transformer = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=tiny_models.T5_HIDDEN_SIZE,
                           pooled_projection_dim=tiny_models.TEXT_HIDDEN_SIZE, guidance_embeds=True,
                           axes_dims_rope=(4, 6, 6))
        vae.update(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False)
        t5 = T5Config(vocab_size=203, d_model=tiny_models.T5_HIDDEN_SIZE, d_kv=16, d_ff=64, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1)
        return transformer, vae, [text_config, t5]
    unet.update(cross_attention_dim=2 * tiny_models.TEXT_HIDDEN_SIZE, transformer_layers_per_block=1,
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=tiny_models.ADDITION_TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=6 * tiny_models.ADDITION_TIME_EMBED_DIM
                + tiny_models.TEXT_PROJECTION_DIM)
    return unet, vae, [text_config, tiny_models.tiny_clip_text_config(tokenizer)]


@dataclasses.dataclass
class Preset:
    name: str
    family: str  # "sd" (train_diffusion_dpo.py), "sdxl" (train_diffusion_dpo_sdxl.py), "sd3" (..._sd3.py)
    configs: object  # () -> (unet or transformer config, vae config, [text encoder configs])
    resolution: int
    batch_pairs: int
    steps: int
    warmup: int
    optimizer: str  # for full fine-tuning; LoRA always uses AdamW (its state is small)
    gradient_checkpointing: bool
    note: str
    threads: int = None  # torch CPU threads; None = torch's default (one per core)


PRESETS = {
    # The tiny presets run on one thread: their ops are too small to split, and split ops stall badly whenever
    # another process holds a core (steps of ~100 ms took 2-5 s on this 2-core machine under load).
    "tiny": Preset("tiny", "sd", lambda: tiny_configs("sd"), 64, 1, 5, 1, "adamw", False,
                   "fixtures/tiny_models.py sizes; seconds on a CPU", threads=1),
    "tiny-sdxl": Preset("tiny-sdxl", "sdxl", lambda: tiny_configs("sdxl"), 64, 1, 5, 1, "adamw", False,
                        "tiny SDXL wiring (two encoders, text_time); exercises the sdxl-1024 code path on a CPU",
                        threads=1),
    "tiny-sd3": Preset("tiny-sd3", "sd3", lambda: tiny_configs("sd3"), 64, 1, 5, 1, "adamw", False,
                       "tiny SD3.5 wiring (MMDiT-X transformer, CLIP-L, CLIP-G, T5, flow matching) on a CPU",
                       threads=1),
    "tiny-flux": Preset("tiny-flux", "flux", lambda: tiny_configs("flux"), 64, 1, 5, 1, "adamw", False,
                        "tiny FLUX.1-dev wiring (packed latents, distilled guidance, CLIP-L pooled + T5) on a CPU",
                        threads=1),
    "sd15": Preset("sd15", "sd", lambda: (sd15_unet_config(), sd_vae_config(0.18215, 512),
                                          [clip_vit_l_text_config()]), 128, 1, 2, 1, "adafactor", False,
                   "real SD 1.5 configs on a CPU at 128 px (16x16 latents: 256 px takes ~1 min a step on 2 cores); "
                   "full fine-tune with Adafactor, so policy, reference, grads and state fit in ~14 GiB (AdamW "
                   "needs ~20 GiB)"),
    "sd15-512": Preset("sd15-512", "sd", lambda: (sd15_unet_config(), sd_vae_config(0.18215, 512),
                                                  [clip_vit_l_text_config()]), 512, 1, 10, 3, "adamw", False,
                       "real SD 1.5 configs at 512 px; meant for a GPU"),
    "sdxl-1024": Preset("sdxl-1024", "sdxl", lambda: (sdxl_unet_config(), sd_vae_config(0.13025, 1024),
                                                      [clip_vit_l_text_config(), openclip_bigg_text_config()]),
                        1024, 1, 10, 3, "adamw8bit", True,
                        "real SDXL base configs at 1024 px, 8-bit AdamW, gradient checkpointing; meant for a GPU"),
    "sd35-medium-1024": Preset("sd35-medium-1024", "sd3", lambda: (sd35_transformer_config("medium"),
                                                                   sd3_vae_config(), sd3_text_configs()),
                               1024, 1, 10, 3, "adamw8bit", True,
                               "real SD3.5 medium configs at 1024 px, gradient checkpointing (the uncached step "
                               "runs T5-XXL: ~12 GB of frozen encoders in bf16); meant for a GPU"),
    "flux-dev-1024": Preset("flux-dev-1024", "flux", lambda: (flux_dev_transformer_config(), flux_vae_config(),
                                                              [clip_vit_l_text_config(), t5_xxl_config()]),
                            1024, 1, 10, 3, "adafactor", True,
                            "real FLUX.1-dev configs at 1024 px, gradient checkpointing (LoRA is the main path; the "
                            "full mode needs ~250 GB: FSDP); meant for a GPU"),
}
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}  # the scripts' name for it


# ----------------------------------------------------------------------------------------------------------------
# Measuring: time, memory, FLOPs
# ----------------------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory over a region: process RSS sampled every 2 ms on a CPU, max_memory_allocated on CUDA."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self.running = False

    def rss(self):
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * self.page_size
        except OSError:  # not Linux: the process's lifetime peak is the best that the standard library offers
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.rss())


def release_memory():
    """Hand freed memory back, so the next mode's peak is not hidden in what the last one left behind."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise


def register_cpu_attention_flops():
    """Count SDPA on a CPU too: flop_counter knows the CUDA kernels; the CPU one has the same arguments.

    The module's sdpa formulas are already shape-wrapped, hence get_raw=True.
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten
    formulas = {"_scaled_dot_product_flash_attention_for_cpu": flop_counter.sdpa_flop,
                "_scaled_dot_product_flash_attention_for_cpu_backward": flop_counter.sdpa_backward_flop}
    for name, formula in formulas.items():
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


def count_flops(run):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def default_peak_tflops(device, dtype_name):
    """The card's dense half-precision peak, for MFU; None on a CPU, for float32, or for an unknown card."""
    if device.type != "cuda" or dtype_name == "float32":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_HALF.items():
        if key in name:
            return tflops
    return None


# ----------------------------------------------------------------------------------------------------------------
# Building models and batches
# ----------------------------------------------------------------------------------------------------------------
def script_for(family):
    if family == "sd":
        return sd_script
    if family == "sd3":
        import train_diffusion_dpo_sd3

        return train_diffusion_dpo_sd3
    if family == "flux":
        import train_diffusion_dpo_flux

        return train_diffusion_dpo_flux
    import train_diffusion_dpo_sdxl

    return train_diffusion_dpo_sdxl


def script_args(preset, mode, optimizer, bench_args, workdir):
    """The training script's own argument namespace (its defaults: max_grad_norm, betas, LoRA rank and targets...)."""
    argv = ["--pretrained_model_name_or_path", "random-init-from-config", "--train_data_dir", str(workdir),
            "--output_dir", str(Path(workdir) / "output"), "--seed", "0", "--resolution", str(bench_args.resolution),
            "--train_batch_size", str(bench_args.batch_pairs),
            "--mixed_precision", MIXED_PRECISION[bench_args.dtype]]
    if mode.endswith("-precomputed"):
        argv += ["--reference_errors", str(Path(workdir) / "reference-errors")]
    if mode == "full-mapo":
        argv += ["--loss_type", "mapo"]
    if mode.startswith("lora"):
        argv.append("--use_lora")
    elif optimizer == "adamw8bit":
        argv.append("--use_8bit_adam")
    elif optimizer == "adafactor":
        argv.append("--use_adafactor")
    if bench_args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    return script_for(preset.family).parse_args(argv)


def build_frozen_models(preset, device, weight_dtype):
    """VAE and text encoder(s), frozen, as build_models places them (SDXL's own VAE stays float32)."""
    _, vae_config, text_configs = preset.configs()
    torch.manual_seed(1)
    vae = AutoencoderKL(**vae_config)
    vae_dtype = torch.float32 if preset.family == "sdxl" else weight_dtype
    if preset.family == "sd3":  # CLIP-L and CLIP-G with projections, then T5
        with torch.device(device):
            text_encoders = [CLIPTextModelWithProjection(text_configs[0]),
                             CLIPTextModelWithProjection(text_configs[1]), T5EncoderModel(text_configs[2])]
    elif preset.family == "flux":  # CLIP-L (its pooled output), then T5
        with torch.device(device):
            text_encoders = [CLIPTextModel(text_configs[0]), T5EncoderModel(text_configs[1])]
    else:
        text_encoders = [CLIPTextModel(text_configs[0])]
    if preset.family == "sdxl":
        text_encoders.append(CLIPTextModelWithProjection(text_configs[1]))
    for frozen, dtype in [(vae, vae_dtype)] + [(encoder, weight_dtype) for encoder in text_encoders]:
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device, dtype=dtype)
    return vae, text_encoders


def build_trained_unet(preset, mode, args, device, weight_dtype):
    """The UNet (SD3: the transformer) as the script's build_models prepares it: (policy, reference or None).

    Mirrors build_models' branches (which load from disk): LoRA = frozen base in the weight dtype plus float32
    adapters (reference: the same UNet, adapters disabled); full = float32 policy plus a frozen reference copy in
    the weight dtype (norm layers float32), train mode, no grads.
    """
    unet_config, _, _ = preset.configs()
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a real-size UNet is built fastest where it will run
        model_class = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}.get(preset.family,
                                                                                          UNet2DConditionModel)
        unet = model_class(**unet_config)
    ref_unet = None
    if mode.startswith("lora"):
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(
            r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
            target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
        ))
        cast_training_params(unet, dtype=torch.float32)
    elif mode == "full":  # with --reference_errors, or MaPO's reference-free loss, a full fine-tune keeps no copy
        ref_unet = copy.deepcopy(unet)
        ref_unet.requires_grad_(False)
        ref_unet.train()  # the policy's mode, as in build_models
        script_for(preset.family).cast_keeping_norms_in_float32(ref_unet, weight_dtype).to(device)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, ref_unet


def noise_scheduler_for(family):
    """SD 1.5's and SDXL's training schedule (scaled_linear, 1000 steps, epsilon); SD3's flow matching (shift 3)."""
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if family == "flux":
        return flux_scheduler()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                              prediction_type="epsilon")
    if family == "sdxl":
        scheduler.training_timesteps = None  # the SDXL script's attribute: None = all of 0..T-1 (not turbo)
    return scheduler


def make_batches(preset, args, vae, text_encoders, weight_dtype):
    """An uncached batch (pixels, token ids) and the cached batch the same pairs give (posteriors, embeddings).

    Both live on the CPU, as a DataLoader hands them over. The cached one is computed the way --cache_latents
    computes it: VAE posterior parameters and the encoders' outputs, stored as float16 under fp16 and float32
    otherwise (bf16 is stored as float32).
    """
    pairs, resolution = args.train_batch_size, args.resolution
    generator = torch.Generator().manual_seed(0)
    vocab = text_encoders[0].config.vocab_size

    def token_ids():  # <start>, 12 words, <end>, padding: what the tokenizer gives a short caption
        ids = torch.full((pairs, 77), text_encoders[0].config.eos_token_id, dtype=torch.long)
        ids[:, 0] = text_encoders[0].config.bos_token_id
        ids[:, 1:13] = torch.randint(0, min(vocab - 2, 49000), (pairs, 12), generator=generator)
        return ids

    uncached = {
        "pixels_w": torch.rand(pairs, 3, resolution, resolution, generator=generator) * 2 - 1,
        "pixels_l": torch.rand(pairs, 3, resolution, resolution, generator=generator) * 2 - 1,
        "input_ids": token_ids(),
        "index": torch.arange(pairs),
    }
    cache_dtype = torch.float16 if weight_dtype == torch.float16 else torch.float32
    with torch.no_grad():
        def posterior(pixels):
            return vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist.parameters.to("cpu", cache_dtype)

        cached = {"posterior_w": posterior(uncached["pixels_w"]), "posterior_l": posterior(uncached["pixels_l"]),
                  "index": uncached["index"]}
        if preset.family == "sd":
            cached["text_embeddings"] = text_encoders[0](uncached["input_ids"].to(vae.device))[0].to("cpu", cache_dtype)
        elif preset.family == "sd3":
            uncached["input_ids_2"] = token_ids()
            # T5: 12 words, </s> (1), padding (0) to --max_sequence_length
            t5_ids = torch.zeros((pairs, args.max_sequence_length), dtype=torch.long)
            t5_ids[:, :12] = torch.randint(2, text_encoders[2].config.vocab_size, (pairs, 12), generator=generator)
            t5_ids[:, 12] = 1
            uncached["input_ids_3"] = t5_ids
            prompt_embeds, pooled = script_for("sd3").encode_prompt(
                text_encoders, [uncached["input_ids"], uncached["input_ids_2"], uncached["input_ids_3"]])
            cached.update(prompt_embeds=prompt_embeds.to("cpu", cache_dtype),
                          pooled_prompt_embeds=pooled.to("cpu", cache_dtype))
        elif preset.family == "flux":
            t5_ids = torch.zeros((pairs, args.max_sequence_length), dtype=torch.long)
            t5_ids[:, :12] = torch.randint(2, text_encoders[1].config.vocab_size, (pairs, 12), generator=generator)
            t5_ids[:, 12] = 1
            uncached["input_ids_2"] = t5_ids
            prompt_embeds, pooled = script_for("flux").encode_prompt(
                text_encoders, [uncached["input_ids"], uncached["input_ids_2"]])
            cached.update(prompt_embeds=prompt_embeds.to("cpu", cache_dtype),
                          pooled_prompt_embeds=pooled.to("cpu", cache_dtype))
        else:
            uncached["input_ids_2"] = token_ids()
            # original size, crop top-left, target size: what preprocess_pair_with_time_ids gives a centre crop
            uncached["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * pairs,
                                                dtype=torch.float32)
            prompt_embeds, pooled = script_for("sdxl").encode_prompt(
                text_encoders, [uncached["input_ids"], uncached["input_ids_2"]])
            cached.update(prompt_embeds=prompt_embeds.to("cpu", cache_dtype), pooled_prompt_embeds=pooled.to(
                "cpu", cache_dtype), time_ids=uncached["time_ids"])
    return uncached, cached


class StepRunner:
    """Runs one preset x mode: floor, uncached step and cached step, each a callable returning its phase times."""

    def __init__(self, preset, mode, bench_args, workdir, vae, text_encoders, grad_scaler=None):
        """grad_scaler: a GradScaler to put into the Accelerator before anything is prepared (the device check's
        fp16 emulation on a CPU, where accelerate makes none); None: whatever accelerate makes."""
        from accelerate import Accelerator

        self.preset, self.mode, self.device = preset, mode, torch.device(bench_args.device)
        self.script = script_for(preset.family)
        self.optimizer_name = "adamw" if mode.startswith("lora") else bench_args.optimizer
        self.precomputed = mode.endswith("-precomputed")
        self.reference_free = mode == "full-mapo"  # MaPO: the step runs no reference at all
        self.args = script_args(preset, mode, self.optimizer_name, bench_args, workdir)
        self.weight_dtype = DTYPES[bench_args.dtype]
        # One Accelerator per process (its state is global); mixed precision wraps the policy's forward in autocast
        # and fp16 gets a grad scaler, exactly as in the scripts.
        self.accelerator = Accelerator(mixed_precision=MIXED_PRECISION[bench_args.dtype],
                                       cpu=self.device.type == "cpu")
        if grad_scaler is not None:
            self.accelerator.native_amp, self.accelerator.scaler = True, grad_scaler
        started = time.perf_counter()
        unet, self.ref_unet = build_trained_unet(preset, mode, self.args, self.device, self.weight_dtype)
        self.build_s = time.perf_counter() - started
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.unet_params = sum(p.numel() for p in unet.parameters())
        optimizer = self.script.build_optimizer(self.args, self.params)
        lr_scheduler = self.script.get_scheduler(self.args.lr_scheduler, optimizer=optimizer, num_warmup_steps=0,
                                                 num_training_steps=1000)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        self.vae, self.text_encoders = vae, text_encoders
        self.noise_scheduler = noise_scheduler_for(preset.family)
        self.uncached_batch, self.cached_batch = make_batches(preset, self.args, vae, text_encoders,
                                                              self.weight_dtype)
        text_encoder_or_pair = text_encoders[0] if preset.family == "sd" else tuple(text_encoders)
        self.denoiser_module = getattr(self.script, f"{DENOISER[preset.family]}_module")
        self.models = (self.unet, self.ref_unet, vae, text_encoder_or_pair)
        source = f"{self.script.__name__}.micro_batch_step + optimizer_step"
        self.step_sources = {"uncached": source, "cached": source}
        # The loop's state as the script's prepare_training makes it (no dataloader: the batches are fixed here)
        self.training_run = self.script.TrainingRun(
            **{DENOISER[preset.family]: self.unet}, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, train_dataset=None,
            train_dataloader=None, params=self.params, learning_rate=self.args.learning_rate,
            num_processes=self.accelerator.num_processes, mixed_precision=self.accelerator.mixed_precision,
            max_train_steps=10**9, num_train_epochs=1, steps_per_epoch=10**9)
        self.floor_inputs = self.make_floor_inputs()
        self.faults = self.script.InjectedFaults()  # none; the device check injects an fp16 overflow
        self.reference_pairs_per_s = None
        if self.precomputed:
            self.training_run.reference_errors = self.precompute_reference_errors(
                2 * (bench_args.warmup + bench_args.steps) + 2)

    def precompute_reference_errors(self, num_steps):
        """What --reference_errors' pre-pass stores for the benchmark's batch at each of the steps it will run: the
        script's dpo_step_losses with the reference pass alone (a full fine-tune's policy, untrained, is the
        reference). Records the pre-pass's pairs/s."""
        steps, indices, errors = [], [], []
        pairs = self.uncached_batch["index"].shape[0]
        started = time.perf_counter()
        for step in range(num_steps):
            _, ref_losses = self.script.dpo_step_losses(self.args, self.uncached_batch, self.models,
                                                        self.noise_scheduler, step, self.weight_dtype,
                                                        passes=("reference",))
            steps += [step] * pairs
            indices += self.uncached_batch["index"].tolist()
            errors.append(torch.stack([ref_losses[:pairs], ref_losses[pairs:]], dim=1).float().cpu())
        synchronize(self.device)
        self.reference_pairs_per_s = num_steps * pairs / (time.perf_counter() - started)
        return self.script.ReferenceErrors(steps, indices, torch.cat(errors).numpy())
        self.last_logs = None  # what optimizer_step logged for the last step (loss, implicit_acc, grad_norm...)

    def make_floor_inputs(self):
        """One fixed noised [2B] batch on the device, the UNet's inputs and nothing else."""
        pairs, latent_size = self.args.train_batch_size, self.args.resolution // 8
        generator = torch.Generator().manual_seed(1)
        if self.preset.family == "sd3":  # flow matching: x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0
            latents = torch.randn(2 * pairs, 16, latent_size, latent_size, generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            indices = torch.randint(0, 1000, (pairs,), generator=generator).repeat(2)
            sigmas = self.noise_scheduler.sigmas[indices].view(-1, 1, 1, 1)
            to_device = lambda tensor: tensor.to(self.device, self.weight_dtype)  # noqa: E731
            return {"hidden_states": to_device((1 - sigmas) * latents + sigmas * noise),
                    "timestep": self.noise_scheduler.timesteps[indices].to(self.device),
                    "encoder_hidden_states": to_device(self.cached_batch["prompt_embeds"].repeat(2, 1, 1)),
                    "pooled_projections": to_device(self.cached_batch["pooled_prompt_embeds"].repeat(2, 1)),
                    "target": to_device(noise - latents)}
        if self.preset.family == "flux":  # the same, packed in 2x2 patches with position ids and guidance
            latents = torch.randn(2 * pairs, 16, latent_size, latent_size, generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            indices = torch.randint(0, 1000, (pairs,), generator=generator).repeat(2)
            sigmas = self.noise_scheduler.sigmas[indices].view(-1, 1, 1, 1)
            to_device = lambda tensor: tensor.to(self.device, self.weight_dtype)  # noqa: E731
            pack = lambda x: FluxPipeline._pack_latents(x, 2 * pairs, 16, latent_size, latent_size)  # noqa: E731
            prompt_embeds = to_device(self.cached_batch["prompt_embeds"].repeat(2, 1, 1))
            return {"hidden_states": to_device(pack((1 - sigmas) * latents + sigmas * noise)),
                    "timestep": sigmas.flatten().to(self.device), "encoder_hidden_states": prompt_embeds,
                    "pooled_projections": to_device(self.cached_batch["pooled_prompt_embeds"].repeat(2, 1)),
                    "guidance": torch.full((2 * pairs,), 3.5, device=self.device),
                    "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=self.device),
                    "img_ids": FluxPipeline._prepare_latent_image_ids(2 * pairs, latent_size // 2, latent_size // 2,
                                                                      self.device, torch.float32),
                    "target": to_device(pack(noise - latents))}
        latents = torch.randn(2 * pairs, 4, latent_size, latent_size, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (pairs,), generator=generator).repeat(2)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        inputs = {"sample": noisy.to(self.device, self.weight_dtype), "timestep": timesteps.to(self.device),
                  "target": noise.to(self.device, self.weight_dtype)}
        if self.preset.family == "sd":
            embeddings = self.cached_batch["text_embeddings"]
            inputs["encoder_hidden_states"] = embeddings.repeat(2, 1, 1).to(self.device, self.weight_dtype)
        else:
            inputs["encoder_hidden_states"] = self.cached_batch["prompt_embeds"].repeat(2, 1, 1).to(
                self.device, self.weight_dtype)
            inputs["added_cond_kwargs"] = {
                "text_embeds": self.cached_batch["pooled_prompt_embeds"].repeat(2, 1).to(self.device,
                                                                                         self.weight_dtype),
                "time_ids": self.cached_batch["time_ids"].repeat(2, 1).to(self.device, self.weight_dtype)}
        return inputs

    def place_encoders(self, kind):
        """On a GPU the VAE and text encoders sit on it only for the uncached step (with a cache the script moves
        them to the CPU); on a CPU there is nowhere else for them to be."""
        if self.device.type == "cpu":
            return
        where = self.device if kind == "uncached" else torch.device("cpu")
        for module in [self.vae, *self.text_encoders]:
            module.to(where)
        release_memory()

    def floor(self):
        """Policy forward + backward and reference forward on the same [2B] inputs: the unavoidable compute (with
        precomputed reference errors, or MaPO's reference-free loss, the policy's forward + backward alone)."""
        inputs = dict(self.floor_inputs)
        target = inputs.pop("target")
        unet = self.unet
        started = time.perf_counter()
        with torch.no_grad():
            if self.precomputed or self.reference_free:
                pass
            elif self.mode == "lora":
                with self.script.lora_adapters_disabled(self.denoiser_module(unet)) as reference:
                    reference(**inputs)
            else:
                self.ref_unet(**inputs)
        prediction = unet(**inputs).sample
        loss = (prediction.float() - target.float()).pow(2).mean()
        self.accelerator.backward(loss)
        synchronize(self.device)
        total = time.perf_counter() - started
        for param in self.params:  # untimed: the next pass starts without grads, like the training step
            param.grad = None
        return {"total": total}

    def step(self, kind):
        """The whole training step through the script's own stages, as main() runs them (one micro-batch per
        optimizer step): micro_batch_step (per-sample errors, the DPO loss, backward) and optimizer_step (clip,
        metrics reduced across processes, the non-finite check, optimizer and schedule steps, zero_grad)."""
        batch = self.uncached_batch if kind == "uncached" else self.cached_batch
        started = time.perf_counter()
        with self.accelerator.accumulate(self.unet):
            self.script.micro_batch_step(self.args, self.accelerator, self.training_run, batch, self.models,
                                         self.noise_scheduler, self.weight_dtype, self.faults)
            synchronize(self.device)
            micro_batch = time.perf_counter() - started
            self.last_logs, _ = self.script.optimizer_step(self.args, self.accelerator, self.training_run)
            synchronize(self.device)
        total = time.perf_counter() - started
        return {"micro_batch": micro_batch, "optimizer_step": total - micro_batch, "total": total}

    def run(self, kind):
        return self.floor() if kind == "floor" else self.step(kind)

    def close(self):
        self.accelerator.free_memory()
        for name in ("unet", "ref_unet", "optimizer", "lr_scheduler", "models", "params", "floor_inputs",
                     "training_run"):
            setattr(self, name, None)


def measure_mode(preset, mode, bench_args, workdir, vae, text_encoders, log):
    runner = StepRunner(preset, mode, bench_args, workdir, vae, text_encoders)
    device = runner.device
    log(f"  {mode}: {DENOISER[preset.family]} {runner.unet_params / 1e6:.1f}M params, {sum(p.numel() for p in runner.params) / 1e6:.2f}M "
        f"trained, optimizer {runner.optimizer_name}, built in {runner.build_s:.1f} s")
    flops, samples, peaks = {}, {kind: [] for kind in KINDS}, {kind: 0 for kind in KINDS}
    # Warm-up: every kind runs --warmup times; its first run also counts its FLOPs (not timed).
    for kind in KINDS:
        runner.place_encoders(kind)
        for warm in range(bench_args.warmup):
            if warm == 0:
                flops[kind] = count_flops(lambda kind=kind: runner.run(kind))
            else:
                runner.run(kind)
        log(f"    warmed up {kind}")
    # Timed: interleaved on a CPU (other processes slow all three alike); in blocks on a GPU, where the encoders
    # move off the device for the cached step and moving them every step would be a cost of the benchmark.
    if device.type == "cpu":
        order = [kind for _ in range(bench_args.steps) for kind in KINDS]
    else:
        order = [kind for kind in KINDS for _ in range(bench_args.steps)]
    placed = None
    for kind in order:
        if kind != placed:
            runner.place_encoders(kind)
            placed = kind
        with PeakMemory(device) as memory:
            phases = runner.run(kind)
        samples[kind].append(phases)
        peaks[kind] = max(peaks[kind], memory.peak)
        log(f"    {kind}: {phases['total'] * 1e3:.0f} ms")
    result = {
        "optimizer": runner.optimizer_name, "unet_params": runner.unet_params,
        "trained_params": sum(p.numel() for p in runner.params), "build_s": runner.build_s,
        "step_sources": runner.step_sources, "flops": flops, "samples": samples, "peaks": peaks,
        "lora_rank": runner.args.rank if mode.startswith("lora") else None,
        "reference_pairs_per_s": runner.reference_pairs_per_s,
    }
    runner.close()
    del runner
    release_memory()
    return result


def typical(samples, statistic):
    """Phase times of a typical step. "median": those of the median step. "min": each phase's fastest time, summed
    into the total; on a shared CPU other processes only ever add time, so this is the least-disturbed estimate."""
    if statistic == "median":
        return sorted(samples, key=lambda sample: sample["total"])[(len(samples) - 1) // 2]
    phases = {name: min(sample[name] for sample in samples) for name in samples[0] if name != "total"}
    phases["total"] = sum(phases.values()) if phases else min(sample["total"] for sample in samples)
    return phases


def rows_for(preset, mode, measured, bench_args, peak_tflops):
    """Two table rows (uncached, cached) from one mode's measurements."""
    statistic = bench_args.statistic
    floor_s = typical(measured["samples"]["floor"], statistic)["total"]
    step_s = {kind: typical(measured["samples"][kind], statistic)["total"] for kind in ("uncached", "cached")}
    rows = []
    for kind in ("uncached", "cached"):
        phases = typical(measured["samples"][kind], statistic)
        flops = measured["flops"][kind]
        tflops = flops / step_s[kind] / 1e12
        rows.append({
            "preset": preset.name, "family": preset.family, "mode": mode, "cache": kind == "cached",
            "device": bench_args.device_name, "dtype": bench_args.dtype, "optimizer": measured["optimizer"],
            "gradient_checkpointing": bench_args.gradient_checkpointing, "resolution": bench_args.resolution,
            "latent_size": bench_args.resolution // 8, "batch_pairs": bench_args.batch_pairs,
            "steps": bench_args.steps, "warmup": bench_args.warmup, "statistic": statistic,
            "threads": torch.get_num_threads(),
            "pairs_per_s": bench_args.batch_pairs / step_s[kind],
            "step_ms": step_s[kind] * 1e3, "floor_ms": floor_s * 1e3,
            "step_over_floor": step_s[kind] / floor_s,
            # derived, not timed: with accumulation the clip and optimizer run once per ACCUMULATION micro-batches
            f"step_over_floor_accum{ACCUMULATION}": (phases["micro_batch"]
                                                    + phases["optimizer_step"] / ACCUMULATION) / floor_s,
            "cache_speedup": step_s["uncached"] / step_s["cached"] if kind == "cached" else None,
            "phases_ms": {name: value * 1e3 for name, value in phases.items()},
            "step_ms_all": [s["total"] * 1e3 for s in measured["samples"][kind]],
            "phases_ms_all": [{name: value * 1e3 for name, value in s.items()} for s in measured["samples"][kind]],
            "floor_ms_all": [s["total"] * 1e3 for s in measured["samples"]["floor"]],
            "peak_mem_gib": measured["peaks"][kind] / GIB,
            "floor_peak_mem_gib": measured["peaks"]["floor"] / GIB,
            "memory_measure": "cuda max_memory_allocated" if bench_args.device == "cuda" else "process peak RSS",
            "flops_step": flops, "flops_floor": measured["flops"]["floor"],
            "flops_uncached_over_cached": measured["flops"]["uncached"] / max(measured["flops"]["cached"], 1),
            "tflops": tflops, "peak_tflops": peak_tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "unet_params": measured["unet_params"], "trained_params": measured["trained_params"],
            "lora_rank": measured["lora_rank"], "build_s": measured["build_s"],
            "reference_pairs_per_s": measured["reference_pairs_per_s"],
            "step_source": measured["step_sources"][kind],
        })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# SDXL memory estimate: weights, grads and optimizer state from parameter counts; activations from a fwd+bwd pass
# on the meta device (shapes only, no memory touched). An estimate, not a measurement of a training run.
# ----------------------------------------------------------------------------------------------------------------
class LiveMemory(TorchDispatchMode):
    """Live bytes of the tensors that ops create, and their peak; storages that existed before are not counted.

    Parameter grads (marked by a post-accumulate hook) are counted `grad_scale` times: the meta pass runs in bf16,
    the real trained parameters and their grads are float32. Expired storages are swept every few ops, so the
    peak errs a little high.
    """

    def __init__(self, known_storages, grad_scale):
        super().__init__()
        self.known, self.grad_scale = set(known_storages), grad_scale
        self.live, self.grad_storages = {}, set()
        self.current = self.grad_bytes = self.peak = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.known and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.ops += 1
        if self.ops % 16 == 0:
            self.sweep()
        self.peak = max(self.peak, self.counted())
        return out

    def counted(self):
        return self.current + (self.grad_scale - 1) * self.grad_bytes

    def sweep(self):
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            nbytes = self.live.pop(key)[1]
            self.current -= nbytes
            if key in self.grad_storages:
                self.grad_storages.discard(key)
                self.grad_bytes -= nbytes

    def mark_grad(self, param):
        key = param.grad.untyped_storage()._cdata
        if key in self.live and key not in self.grad_storages:
            self.grad_storages.add(key)
            self.grad_bytes += self.live[key][1]
            self.peak = max(self.peak, self.counted())


@contextlib.contextmanager
def flash_attention_on_meta():
    """On the meta device SDPA takes its math path (it would hold [B, heads, L, L] scores); route it to the flash
    kernel, whose saved tensors (q, k, v, out, logsumexp) are what a GPU's flash or memory-efficient kernel keeps."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if not kwargs.get("enable_gqa", True):  # diffusers' attention dispatch (FLUX) passes the default explicitly
            kwargs.pop("enable_gqa")
        if query.device.type != "meta" or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def meta_activation_memory(unet_config, latent_size, pairs, lora, gradient_checkpointing, text_embeds_dim=1280):
    """Peak bytes that one policy forward + backward allocates beyond the weights, on the meta device in bf16.

    Returns (peak with grads at float32 size, live bytes at the end of the forward). Weights are not included.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).to(torch.bfloat16)
        if lora:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        images = 2 * pairs
        sample = torch.randn(images, 4, latent_size, latent_size, dtype=torch.bfloat16)
        timesteps = torch.full((images,), 500)
        hidden = torch.randn(images, 77, unet_config["cross_attention_dim"], dtype=torch.bfloat16)
        extra = {}
        if unet_config.get("addition_embed_type") == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(images, text_embeds_dim, dtype=torch.bfloat16),
                                          "time_ids": torch.randn(images, 6, dtype=torch.bfloat16)}
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    known = [t.untyped_storage()._cdata for t in [*unet.parameters(), *unet.buffers(), sample, timesteps, hidden]]
    # lora: the adapters are float32 in training too, but tiny; full: bf16 grads here, float32 in training
    tracker = LiveMemory(known, grad_scale=1 if lora else 2)
    hooks = [p.register_post_accumulate_grad_hook(tracker.mark_grad) for p in unet.parameters() if p.requires_grad]
    with flash_attention_on_meta(), tracker:
        loss = unet(sample, timesteps, hidden, **extra).sample.float().pow(2).mean()
        tracker.sweep()
        after_forward = tracker.current
        loss.backward()
        tracker.sweep()
    for hook in hooks:
        hook.remove()
    return tracker.peak, after_forward


def adafactor_state_elements(shape):
    """Elements of transformers' Adafactor state for one parameter (beta1=None: no first moment).

    >= 2-d tensors keep a row and a column mean over their last two dims; smaller ones the full second moment.
    """
    if len(shape) >= 2:
        return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    return math.prod(shape)


def sdxl_memory_estimate(resolution=1024, pairs=1):
    """ESTIMATE of peak GPU memory (allocated) of SDXL DPO: 1 pair, bf16 mixed precision, gradient checkpointing.

    Parameter-sized terms are bytes per parameter of the real SDXL UNet config (built on the meta device); the
    activation term is measured by meta_activation_memory. Not a measurement of a training run; the CUDA context
    (~0.5 GiB) and allocator fragmentation come on top.
    """
    from accelerate import init_empty_weights

    config = sdxl_unet_config()
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
        vae = AutoencoderKL(**sd_vae_config(0.13025, 1024))
        encoders = [CLIPTextModel(clip_vit_l_text_config()), CLIPTextModelWithProjection(openclip_bigg_text_config())]
    shapes = [tuple(p.shape) for p in unet.parameters()]
    params = sum(math.prod(shape) for shape in shapes)
    rank, targets = 8, ("to_q", "to_k", "to_v", "to_out.0")  # the scripts' LoRA defaults
    lora_params = sum(rank * (module.in_features + module.out_features) for name, module in unet.named_modules()
                      if isinstance(module, torch.nn.Linear) and name.endswith(targets))
    encoder_bytes = (sum(p.numel() for p in vae.parameters()) * 4  # SDXL's VAE runs in float32
                     + sum(p.numel() for e in encoders for p in e.parameters()) * 2)
    adafactor_elements = sum(adafactor_state_elements(shape) for shape in shapes)
    latent_size = resolution // 8
    full_peak, full_after_forward = meta_activation_memory(config, latent_size, pairs, False, True)
    lora_peak, _ = meta_activation_memory(config, latent_size, pairs, True, True)
    no_ckpt_peak, _ = meta_activation_memory(config, latent_size, pairs, True, False)
    gb = lambda n: n / 1e9  # noqa: E731  (the targets are in GB)
    # Full: during the forward autocast also caches a bf16 copy of every float32 weight (freed when the forward
    # returns); the step's peak is the larger of that moment and the end of backward (float32 grads all live).
    full_transient = max(full_after_forward + 2 * params, full_peak)

    def total(parts):
        return {**{name: round(value, 2) for name, value in parts.items()}, "total": round(sum(parts.values()), 2)}

    full_common = {"policy_fp32": gb(4 * params), "reference_bf16": gb(2 * params),
                   "grads_fp32_and_activations": gb(full_transient)}
    return {
        "label": "ESTIMATE from parameter counts and a meta-device pass, not a measurement",
        "resolution": resolution, "pairs": pairs, "unet_params": params, "lora_params_rank8": lora_params,
        "activations_lora_ckpt_gb": round(gb(lora_peak), 2),
        "activations_lora_no_ckpt_gb": round(gb(no_ckpt_peak), 2),
        "encoders_on_gpu_without_cache_gb": round(gb(encoder_bytes), 2),
        "full_adamw8bit": total({**full_common, "optimizer_state": gb(2 * params)}),
        "full_adafactor": total({**full_common, "optimizer_state": gb(4 * adafactor_elements)}),
        "full_adamw_fp32": total({**full_common, "optimizer_state": gb(8 * params)}),
        "lora_adamw": total({"base_bf16": gb(2 * params), "lora_weights_grads_adam_fp32": gb(16 * lora_params),
                             "activations": gb(lora_peak)}),
        "targets_gb": {"full": 40, "lora": 16}, "published_authors_full_gb": 55.9,
    }


def meta_transformer_activation_memory(config, latent_size, pairs, lora, gradient_checkpointing, text_tokens,
                                       lora_targets):
    """meta_activation_memory for SD3's transformer: peak bytes of one policy forward + backward beyond the weights
    (meta device, bf16), on [2 * pairs] latents and a joint text sequence of `text_tokens` tokens."""
    def sd3_inputs(images):
        return {"hidden_states": torch.randn(images, config["in_channels"], latent_size, latent_size,
                                             dtype=torch.bfloat16),
                "timestep": torch.full((images,), 500.0),
                "encoder_hidden_states": torch.randn(images, text_tokens, config["joint_attention_dim"],
                                                     dtype=torch.bfloat16),
                "pooled_projections": torch.randn(images, config["pooled_projection_dim"], dtype=torch.bfloat16)}

    return meta_flow_activation_memory(SD3Transformer2DModel, config, lora, gradient_checkpointing, lora_targets,
                                       sd3_inputs, 2 * pairs)


def meta_flow_activation_memory(model_class, config, lora, gradient_checkpointing, lora_targets, make_inputs, images):
    """The meta-device pass shared by the SD3 and FLUX estimates: the model (LoRA rank 8 on `lora_targets` when
    `lora`), its inputs from make_inputs(images), and the peak bytes of forward + backward beyond the weights."""
    with torch.device("meta"):
        transformer = model_class(**config).to(torch.bfloat16)
        if lora:
            from peft import LoraConfig

            transformer.requires_grad_(False)
            transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                               target_modules=lora_targets))
        inputs = make_inputs(images)
    transformer.train()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    known = [t.untyped_storage()._cdata for t in [*transformer.parameters(), *transformer.buffers(),
                                                   *inputs.values()]]
    tracker = LiveMemory(known, grad_scale=1 if lora else 2)
    hooks = [p.register_post_accumulate_grad_hook(tracker.mark_grad) for p in transformer.parameters()
             if p.requires_grad]
    with flash_attention_on_meta(), tracker:
        loss = transformer(**inputs).sample.float().pow(2).mean()
        tracker.sweep()
        loss.backward()
        tracker.sweep()
    for hook in hooks:
        hook.remove()
    return tracker.peak


def sd35_memory_estimate(size, resolution=1024, pairs=1, max_sequence_length=77):
    """ESTIMATE of peak GPU memory (allocated) of SD3.5 LoRA DPO with --cache_latents (VAE and the three text
    encoders off the GPU): 1 pair, bf16, gradient checkpointing, the script's default LoRA targets at rank 8.

    The frozen transformer in bf16 plus float32 adapters, their grads and AdamW state from parameter counts of the
    real config (meta device); activations from a forward+backward on the meta device. Not a measurement.
    """
    from accelerate import init_empty_weights

    import train_diffusion_dpo_sd3 as sd3_script

    config = sd35_transformer_config(size)
    targets = sd3_script.DEFAULT_LORA_TARGETS.split(",")
    with init_empty_weights():
        transformer = SD3Transformer2DModel(**config)
        vae = AutoencoderKL(**sd3_vae_config())
        encoders = [CLIPTextModelWithProjection(c) if i < 2 else T5EncoderModel(c)
                    for i, c in enumerate(sd3_text_configs())]
    params = sum(p.numel() for p in transformer.parameters())
    lora_params = sum(8 * (module.in_features + module.out_features) for name, module in transformer.named_modules()
                      if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in targets))
    encoder_bytes = 2 * (sum(p.numel() for p in vae.parameters())
                         + sum(p.numel() for e in encoders for p in e.parameters()))
    latent_size = resolution // 8
    text_tokens = 77 + max_sequence_length
    lora_peak = meta_transformer_activation_memory(config, latent_size, pairs, True, True, text_tokens, targets)
    no_ckpt_peak = meta_transformer_activation_memory(config, latent_size, pairs, True, False, text_tokens, targets)
    gb = lambda n: n / 1e9  # noqa: E731  (the targets are in GB)
    parts = {"base_bf16": gb(2 * params), "lora_weights_grads_adam_fp32": gb(16 * lora_params),
             "activations": gb(lora_peak)}
    return {
        "label": "ESTIMATE from parameter counts and a meta-device pass, not a measurement",
        "model": f"SD3.5 {size}", "resolution": resolution, "pairs": pairs, "transformer_params": params,
        "lora_params_rank8": lora_params, "activations_lora_no_ckpt_gb": round(gb(no_ckpt_peak), 2),
        "encoders_on_gpu_without_cache_gb": round(gb(encoder_bytes), 2), "encoders": "VAE, CLIP-L, CLIP-G, T5-XXL",
        "lora_adamw": {**{k: round(v, 2) for k, v in parts.items()}, "total": round(sum(parts.values()), 2)},
        "target_gb": {"medium": 16, "large": 40}[size],
    }


def print_flow_estimate(estimate):
    parts, limit = estimate["lora_adamw"], estimate["target_gb"]
    detail = ", ".join(f"{name} {value:.1f}" for name, value in parts.items() if name != "total")
    print(f"\n{estimate['model']} LoRA at {estimate['resolution']} px, {estimate['pairs']} pair, bf16, gradient "
          f"checkpointing, cached text embeddings and latents, peak allocated in GB (1e9 bytes):\n  ESTIMATE, not "
          f"measured: {estimate['transformer_params'] / 1e9:.2f}B transformer parameters, "
          f"{estimate['lora_params_rank8'] / 1e6:.1f}M LoRA parameters (rank 8)\n"
          f"  lora_adamw       {parts['total']:5.1f} GB  {'within' if parts['total'] <= limit else 'OVER'} the "
          f"{limit} GB target  ({detail}); without checkpointing the activations are "
          f"{estimate['activations_lora_no_ckpt_gb']:.1f} GB\n  Without the cache add "
          f"{estimate['encoders_on_gpu_without_cache_gb']:.1f} GB of bf16 weights ({estimate['encoders']}) and "
          "their activations; the CUDA context and fragmentation come on top.")


def flux_dev_memory_estimate(resolution=1024, pairs=1, max_sequence_length=512):
    """ESTIMATE of peak GPU memory (allocated) of FLUX.1-dev LoRA DPO with --cache_latents (VAE, CLIP-L and T5 off the
    GPU): 1 pair, bf16, gradient checkpointing, the script's default LoRA targets at rank 8. Parameter-sized terms
    from the real config on the meta device; activations from a forward+backward on the meta device."""
    from accelerate import init_empty_weights

    import train_diffusion_dpo_flux as flux_script

    config = flux_dev_transformer_config()
    targets = flux_script.DEFAULT_LORA_TARGETS.split(",")
    with init_empty_weights():
        encoders = [CLIPTextModel(clip_vit_l_text_config()), T5EncoderModel(t5_xxl_config())]
        vae = AutoencoderKL(**flux_vae_config())
    latent_size = resolution // 8
    tokens = (latent_size // 2) ** 2  # packed 2x2 patches

    def flux_inputs(images):
        return {"hidden_states": torch.randn(images, tokens, 64, dtype=torch.bfloat16),
                "encoder_hidden_states": torch.randn(images, max_sequence_length, 4096, dtype=torch.bfloat16),
                "pooled_projections": torch.randn(images, 768, dtype=torch.bfloat16),
                "timestep": torch.full((images,), 0.5), "guidance": torch.full((images,), 3.5),
                "txt_ids": torch.zeros(max_sequence_length, 3), "img_ids": torch.zeros(tokens, 3)}

    peak, no_ckpt_peak = (meta_flow_activation_memory(FluxTransformer2DModel, config, True, checkpointing, targets,
                                                      flux_inputs, 2 * pairs) for checkpointing in (True, False))
    with init_empty_weights():
        transformer = FluxTransformer2DModel(**config)
        params = sum(p.numel() for p in transformer.parameters())
    lora_params = sum(8 * (module.in_features + module.out_features) for name, module in transformer.named_modules()
                      if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in targets))
    encoder_bytes = 2 * sum(p.numel() for module in (*encoders, vae) for p in module.parameters())
    gb = lambda n: n / 1e9  # noqa: E731
    parts = {"base_bf16": gb(2 * params), "lora_weights_grads_adam_fp32": gb(16 * lora_params),
             "activations": gb(peak)}
    return {
        "label": "ESTIMATE from parameter counts and a meta-device pass, not a measurement",
        "model": "FLUX.1-dev", "resolution": resolution, "pairs": pairs, "max_sequence_length": max_sequence_length,
        "transformer_params": params, "lora_params_rank8": lora_params,
        "activations_lora_no_ckpt_gb": round(gb(no_ckpt_peak), 2),
        "encoders_on_gpu_without_cache_gb": round(gb(encoder_bytes), 2), "encoders": "VAE, CLIP-L, T5-XXL",
        "lora_adamw": {**{k: round(v, 2) for k, v in parts.items()}, "total": round(sum(parts.values()), 2)},
        "target_gb": 40,
    }


def print_sdxl_estimate(estimate):
    print(f"\nSDXL at {estimate['resolution']} px, {estimate['pairs']} pair/GPU, bf16 mixed precision, gradient "
          "checkpointing, latent cache (VAE and text encoders off the GPU), peak allocated in GB (1e9 bytes):")
    print(f"  ESTIMATE, not measured: {estimate['unet_params'] / 1e9:.3f}B UNet parameters x bytes per parameter, "
          "plus what a forward+backward on the meta device (shapes only) holds at its peak beyond the weights: full "
          f"{estimate['full_adamw8bit']['grads_fp32_and_activations']:.1f} GB (fp32 grads "
          f"{4 * estimate['unet_params'] / 1e9:.1f} + activations), LoRA {estimate['activations_lora_ckpt_gb']:.1f} GB "
          f"(without checkpointing {estimate['activations_lora_no_ckpt_gb']:.1f} GB)")
    for key, target in (("full_adamw8bit", "full"), ("full_adafactor", "full"), ("full_adamw_fp32", "full"),
                        ("lora_adamw", "lora")):
        parts, limit = estimate[key], estimate["targets_gb"][target]
        detail = ", ".join(f"{name} {value:.1f}" for name, value in parts.items() if name != "total")
        verdict = "within" if parts["total"] <= limit else "OVER"
        print(f"  {key:16s} {parts['total']:5.1f} GB  {verdict} the {limit} GB target  ({detail})")
    print(f"  Without the cache add {estimate['encoders_on_gpu_without_cache_gb']:.1f} GB of weights (fp32 VAE, bf16 "
          "text encoders) and the VAE's 1024 px activations; the CUDA context (~0.5 GB) and allocator fragmentation "
          f"come on top of every figure. The authors' published figure: {estimate['published_authors_full_gb']} GB.")


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def print_table(rows):
    headers = ["preset", "mode", "cache", "pairs/s", "ms/step", "floor ms", "step/floor", "cache x", "peak GiB",
               "TFLOP/s", "MFU"]
    lines = [[r["preset"], r["mode"], "yes" if r["cache"] else "no", fmt(r["pairs_per_s"], ".3g"),
              fmt(r["step_ms"], ".0f"), fmt(r["floor_ms"], ".0f"), fmt(r["step_over_floor"], ".2f"),
              fmt(r["cache_speedup"], ".2f"), fmt(r["peak_mem_gib"], ".2f"), fmt(r["tflops"], ".3g"),
              fmt(r["mfu"], ".1%")] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def print_precomputed(rows):
    """--reference_errors against the live reference, side by side from this run: step time, floor and peak memory,
    and the pre-pass's speed."""
    by_key = {(r["preset"], r["mode"], r["cache"]): r for r in rows}
    lines = []
    for (preset, mode, cache), row in by_key.items():
        live = by_key.get((preset, mode.removesuffix("-precomputed"), cache))
        if not mode.endswith("-precomputed") or live is None:
            continue
        lines.append(f"  {preset:>9} {live['mode']:>4} cache={'yes' if cache else 'no ':3}  step {row['step_ms']:8.0f} "
                     f"ms vs live {live['step_ms']:8.0f} ms ({row['step_ms'] / live['step_ms']:.2f}x)  floor "
                     f"{row['floor_ms']:7.0f} vs {live['floor_ms']:7.0f} ms  peak {row['peak_mem_gib']:6.2f} vs "
                     f"{live['peak_mem_gib']:6.2f} GiB  pre-pass {row['reference_pairs_per_s']:.3g} pairs/s")
    if lines:
        print("\nWith --reference_errors (reference errors computed once; no reference forward in the step, and a full "
              "fine-tune without its copy) vs the live reference:")
        print("\n".join(lines))
    mapo = [(row, by_key[(row["preset"], "full", row["cache"])]) for row in rows
            if row["mode"] == "full-mapo" and (row["preset"], "full", row["cache"]) in by_key]
    if mapo:
        print("\nMaPO (--loss_type mapo: reference-free, no reference copy and no reference forward) vs DPO, full "
              "fine-tune:")
        for row, dpo in mapo:
            print(f"  {row['preset']:>9} cache={'yes' if row['cache'] else 'no ':3}  step {row['step_ms']:8.0f} ms vs "
                  f"DPO {dpo['step_ms']:8.0f} ms ({row['step_ms'] / dpo['step_ms']:.2f}x)  peak "
                  f"{row['peak_mem_gib']:6.2f} vs {dpo['peak_mem_gib']:6.2f} GiB")


def print_phases(rows):
    """Where each step's time goes, next to the floor: the overheads the ratio is made of."""
    print(f"\nWhere the step goes, ms ({'median step' if rows[0]['statistic'] == 'median' else 'fastest of each'}):")
    print("  micro-batch = the script's micro_batch_step: dpo_step_losses, the loss and its backward (the VAE and "
          "text encoders run here when uncached);\n  optimizer = its optimizer_step: grad clip, metric reduce, step, "
          f"schedule, zero_grad; acc{ACCUMULATION} = step/floor derived for\n  --gradient_accumulation_steps "
          f"{ACCUMULATION} (optimizer_step once per {ACCUMULATION} micro-batches); FLOPs x = counted FLOPs uncached / "
          "cached (the cache's speedup if all ran equally fast).")
    for r in rows:
        p = r["phases_ms"]
        print(f"  {r['preset']:>9} {r['mode']:>4} cache={'yes' if r['cache'] else 'no ':3}  floor {r['floor_ms']:8.0f}"
              f"  micro-batch {p['micro_batch']:8.0f}  optimizer {p['optimizer_step']:7.0f}  acc{ACCUMULATION} {r[f'step_over_floor_accum{ACCUMULATION}']:.2f}  FLOPs x "
              f"{r['flops_uncached_over_cached']:.2f}")


# ----------------------------------------------------------------------------------------------------------------
# Arguments and main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Time the shipped Diffusion-DPO step against its compute floor (policy fwd+bwd + reference fwd), "
                    "with and without the latent cache, full and LoRA; print one table and write JSON.")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="Model family and size to measure; repeat for several. tiny / tiny-sdxl / tiny-sd3 / "
                             "tiny-flux: seconds on a CPU; sd15: real SD 1.5 configs at 128 px on a CPU; sd15-512, "
                             "sdxl-1024, sd35-medium-1024, flux-dev-1024: real configs, meant for a GPU. Default: "
                             "tiny.")
    parser.add_argument("--modes", default="full,lora,full-precomputed,lora-precomputed",
                        help="Comma-separated training modes: full (whole UNet, frozen reference copy), lora, and "
                             "each with --reference_errors (full-precomputed: no reference copy, no reference "
                             "forward in the step; lora-precomputed: no reference forward); also full-mapo (not in "
                             "the default: --loss_type mapo, reference-free, so no copy and no reference forward).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per kind; default: the preset's.")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Untimed steps per kind first (>= 1; the first also counts FLOPs); default: the preset's.")
    parser.add_argument("--batch_pairs", type=int, default=None, help="Pairs per step; default: the preset's.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image side in pixels (latents are 1/8); default: the preset's.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="Where to run; default: cuda when available, else cpu.")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="Mixed precision / weight dtype of frozen models (the scripts' --mixed_precision); "
                             "default: bf16 on cuda, float32 on cpu. Trained parameters stay float32.")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="Full fine-tune optimizer through the script's build_optimizer (adamw = its default, "
                             "adamw8bit = --use_8bit_adam, adafactor = --use_adafactor); default: the preset's. "
                             "LoRA always uses AdamW.")
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="The scripts' --gradient_checkpointing; default: the preset's (on for sdxl-1024).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The device's peak TFLOP/s for MFU; default: the card's dense bf16/fp16 peak when known "
                             "(H100 989, A100 312), none on a CPU.")
    parser.add_argument("--statistic", choices=("min", "median"), default=None,
                        help="What the table reports: min = each phase's fastest time over the timed steps, summed "
                             "(default on a CPU, where other processes only ever add time) or median = the median "
                             "step (default on CUDA). --json keeps every step's phase times.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every preset; default: 1 for tiny presets, else torch's (one per "
                             "core). 1 is steadier on a busy machine.")
    parser.add_argument("--no_estimate", action="store_true",
                        help="Skip the SDXL, SD3.5 and FLUX.1-dev memory estimates.")
    parser.add_argument("--json", type=str, default=None, help="Write every figure to this JSON file.")
    args = parser.parse_args(input_args)
    args.preset = args.preset or ["tiny"]
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}; got {unknown or 'nothing'}.")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this torch; use --device cpu.")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "float32")
    args.statistic = args.statistic or ("median" if args.device == "cuda" else "min")
    if args.dtype == "fp16" and args.device == "cpu":
        parser.error("--dtype fp16 needs --device cuda (CPU autocast is bf16); use bf16 or float32.")
    for name in ("steps", "batch_pairs", "resolution", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first warm-up step counts FLOPs and fills caches).")
    if args.resolution is not None and args.resolution % 8:
        parser.error("--resolution must be a multiple of 8 (the VAE downsamples by 8).")
    return args


def preset_settings(preset, args):
    """The bench's flags with the preset's defaults filled in, as a namespace for this preset."""
    settings = argparse.Namespace(**vars(args))
    for name in ("steps", "warmup", "batch_pairs", "resolution", "optimizer", "gradient_checkpointing", "threads"):
        if getattr(settings, name) is None:
            setattr(settings, name, getattr(preset, name))
    settings.threads = settings.threads or DEFAULT_THREADS
    torch.set_num_threads(settings.threads)
    settings.device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                            else f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
    return settings


def main(args):
    warnings.filterwarnings("ignore")  # bitsandbytes' and diffusers' import-time notices are not figures
    transformers_logging.set_verbosity_error()
    register_cpu_attention_flops()
    peak_tflops = args.peak_tflops or default_peak_tflops(torch.device(args.device), args.dtype)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    rows, settings_used = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as workdir:
        for name in args.preset:
            preset = PRESETS[name]
            settings = preset_settings(preset, args)
            meant_for_a_gpu = ("sd15-512", "sdxl-1024", "sd35-medium-1024", "flux-dev-1024")
            if preset.name in meant_for_a_gpu and settings.device == "cpu":
                log(f"warning: preset {name} is meant for a GPU; on this CPU it may take very long or run out of "
                    "memory.")
            log(f"{name}: {preset.note}; {settings.resolution} px, {settings.batch_pairs} pair(s), "
                f"{settings.dtype} on {settings.device_name}, {settings.threads} thread(s), {settings.warmup} warm-up "
                f"+ {settings.steps} timed steps")
            settings_used[name] = {k: getattr(settings, k) for k in (
                "resolution", "batch_pairs", "steps", "warmup", "dtype", "optimizer", "gradient_checkpointing",
                "threads", "device", "device_name")}
            vae, text_encoders = build_frozen_models(preset, torch.device(settings.device), DTYPES[settings.dtype])
            for mode in args.modes:
                measured = measure_mode(preset, mode, settings, workdir, vae, text_encoders, log)
                rows += rows_for(preset, mode, measured, settings, peak_tflops)
            del vae, text_encoders
            release_memory()

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    statistic = {"min": "each phase's fastest of the timed steps", "median": "the median timed step"}[args.statistic]
    load_note = f"; load average {load_at_start[0]:.1f} at start, {load[0]:.1f} at end" if load else ""
    print(f"\nDiffusion-DPO step benchmark: {settings.device_name}, torch {torch.__version__}; {statistic}{load_note}")
    print_table(rows)
    print_precomputed(rows)
    print_phases(rows)
    estimate, sd35_estimates, flux_estimate = None, None, None
    if not args.no_estimate:
        estimate = sdxl_memory_estimate()
        print_sdxl_estimate(estimate)
        sd35_estimates = [sd35_memory_estimate(size) for size in ("medium", "large")]
        flux_estimate = flux_dev_memory_estimate()
        for flow_estimate in [*sd35_estimates, flux_estimate]:
            print_flow_estimate(flow_estimate)
    wall_s = time.perf_counter() - started
    print(f"\nbenchmark wall time {wall_s:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        report = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                  "cpu_threads": torch.get_num_threads(), "settings": settings_used, "rows": rows,
                  "sdxl_memory_estimate": estimate, "sd35_memory_estimates": sd35_estimates,
                  "flux_dev_memory_estimate": flux_estimate, "wall_s": wall_s,
                  "load_average_start_end": [load_at_start, load]}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main(parse_args())

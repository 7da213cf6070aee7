"""Train the toy world's base text-to-image model from scratch on the CPU: the "SD 1.5" (or "SD3") of `make toy`.

    python toy/toy_base.py --output_dir toy/base                         # 20-30 minutes on 2 CPU cores
    python toy/toy_base.py --family sd3 --output_dir toy/base_sd3        # the flow-matching base, as long

It writes an ordinary StableDiffusionPipeline folder (32 x 32 pictures, 8 x 8 x 4 latents) that
`DiffusionPipeline.from_pretrained` loads and that train_diffusion_dpo.py takes as --pretrained_model_name_or_path;
with --family sd3 a StableDiffusion3Pipeline folder (8 x 8 x 16 latents) for train_diffusion_dpo_sd3.py.
The weights committed at toy/base and toy/base_sd3 were made by these commands with their defaults (torch 2.13.0
CPU, 2 threads).
Every random draw comes from a seeded generator. On 1 thread a run is bit-for-bit repeatable (tests/test_toy.py
trains twice and compares). On 2 threads, re-running the defaults reproduced the committed VAE bit for bit and the
UNet and text encoder to within 2e-3 (a multithreaded CPU backward sums in a varying order), with the same loss
curve and the same caption fidelity. Another torch build gives a different but equally usable base.

Stages:
1. A text encoder: the tiny CLIP of fixtures/tiny_models.py, trained with the UNet (as a from-scratch text-to-image
   model has to learn its words; frozen later, since DPO trains the UNet only).
2. A small AutoencoderKL (3 levels, scale factor 4), trained to reconstruct the world's pictures; its latent scaling
   factor is set so the latents have unit variance, as SD's 0.18215 does for SD's VAE.
3. A small UNet2DConditionModel and the text encoder, trained as a latent diffusion model on those latents (epsilon
   prediction, SD 1.5's noise schedule, 10% empty captions for classifier-free guidance, an exponential moving
   average of the weights).
4. The pipeline is saved with a DDIM scheduler (SD 1.5's betas) for few-step sampling, and its samples are checked
   with the world's caption checker: the fraction that shows what the caption says goes into toy_base.json.

--family sd3 makes the same world's model with SD3's architecture and objective:
1. SD3's three text encoders at toy size (CLIP-L and CLIP-G with projections, a T5 encoder), all trained with the
   transformer; both CLIP tokenizers and the T5 length cut to SD3_TEXT_LENGTH tokens (the captions need 9).
2. The autoencoder with SD3's 16 latent channels and no quant convolutions; its shift factor is the latents' mean
   and its scaling factor makes the shifted latents unit-variance, as SD3's VAE prescribes (x - shift) * scale.
3. An SD3Transformer2DModel (MMDiT, patch size 1: one token per latent pixel, so a shape's place is resolved)
   trained by rectified flow: x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0, sigma logit-normal (SD3's
   density), 10% empty captions, an exponential moving average; the prompt is encoded by the SD3 training
   script's own encode_prompt (held equal to StableDiffusion3Pipeline's by its tests).
4. Saved with FlowMatchEulerDiscreteScheduler at shift 1.0 (the SD3 paper shifts for large images; these are
   32 px), and checked the same way. toy_base.json records how to sample it (with max_sequence_length).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from fixtures import tiny_models  # noqa: E402
from toy import toy_world  # noqa: E402


LATENT_SIZE = toy_world.IMAGE_SIZE // 4
# The flow base's text length, CLIP and T5 alike: every caption of the world is 9 tokens or fewer with its specials.
SD3_TEXT_LENGTH = 16


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train the toy world's base pipeline from scratch on the CPU.")
    parser.add_argument("--output_dir", required=True, help="Where the pipeline folder is written.")
    parser.add_argument("--family", default="sd", choices=("sd", "sd3"),
                        help="sd: a Stable Diffusion 1.x pipeline (UNet, epsilon prediction; toy/base); sd3: a Stable "
                             "Diffusion 3 pipeline (MMDiT transformer, rectified flow; toy/base_sd3).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the pictures, the weights and the noise.")
    parser.add_argument("--num_images", type=int, default=12288, help="Training pictures rendered (random scenes).")
    parser.add_argument("--vae_steps", type=int, default=1000, help="Autoencoder optimizer steps.")
    parser.add_argument("--vae_batch_size", type=int, default=32, help="Pictures per autoencoder step.")
    parser.add_argument("--unet_steps", type=int, default=3000, help="UNet (and text encoder) optimizer steps.")
    parser.add_argument("--unet_batch_size", type=int, default=64, help="Latents per UNet step.")
    parser.add_argument("--unet_learning_rate", type=float, default=None,
                        help="Denoiser AdamW learning rate (peak); default 1e-3 for the UNet, 5e-4 for the "
                             "transformer.")
    parser.add_argument("--ema_decay", type=float, default=0.995, help="Decay of the UNet weights' moving average.")
    parser.add_argument("--check_images_per_caption", type=int, default=4,
                        help="Samples per caption for the final caption-fidelity check (0 skips it).")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 is bit-for-bit repeatable; more is faster, repeatable to ~1e-3).")
    args = parser.parse_args(input_args)
    if args.unet_learning_rate is None:
        args.unet_learning_rate = 1e-3 if args.family == "sd" else 5e-4
    return args


def picture_tensor(images):
    """PIL pictures -> float tensor in [-1, 1], (N, 3, H, W), as the SD pipelines' VAE expects."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def build_vae(family="sd"):
    """SD's 4 latent channels with quant convolutions, or SD3's 16 without (and a shift factor, set after training)."""
    from diffusers import AutoencoderKL

    sd3 = family == "sd3"
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=16 if sd3 else 4,
        sample_size=toy_world.IMAGE_SIZE, use_quant_conv=not sd3, use_post_quant_conv=not sd3,
        shift_factor=0.0 if sd3 else None,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    # Cross-attention at both resolutions: the caption has to reach the 8 x 8 level, where the shape is drawn.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny_models.TEXT_HIDDEN_SIZE, attention_head_dim=8, norm_num_groups=32,
    )


def build_transformer():
    from diffusers import SD3Transformer2DModel

    # 4 MMDiT blocks, 64 wide; patch size 1, so each of the 8 x 8 latent pixels is a token.
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=tiny_models.T5_HIDDEN_SIZE, caption_projection_dim=64,
        pooled_projection_dim=2 * tiny_models.TEXT_PROJECTION_DIM, pos_embed_max_size=LATENT_SIZE, qk_norm="rms_norm",
    )


def sd15_betas():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1)


def cosine_with_warmup(total_steps):
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak (a short run ends on a small rate)."""
    warmup = max(1, total_steps // 20)
    return lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total_steps)))


def train_vae(args, pictures, log):
    """Reconstruction (L1 + MSE) with a small KL term, so the posterior stays tight and its mean decodes well."""
    vae = build_vae(args.family)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.vae_steps))
    generator = torch.Generator().manual_seed(args.seed + 1)
    started = time.time()
    for step in range(1, args.vae_steps + 1):
        index = torch.randint(len(pictures), (args.vae_batch_size,), generator=generator)
        batch = pictures[index]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (reconstruction - batch).abs().mean() + (reconstruction - batch).pow(2).mean()
        loss = loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.vae_steps:
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    vae.eval().requires_grad_(False)
    return vae, loss.item()


def encode_pictures(vae, pictures, batch_size=256):
    """Posterior means and standard deviations of every picture (sampled again at every UNet step)."""
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pictures), batch_size):
            posterior = vae.encode(pictures[start : start + batch_size]).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def fit_with_ema(args, name, parameters, step_loss, log):
    """AdamW on `parameters` (the denoiser's and the text encoders') for --unet_steps steps of `step_loss(generator)`,
    clipped at 1 and on a warmup-cosine schedule; the weights end as their exponential moving average."""
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=args.unet_learning_rate, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.unet_steps))
    generator = torch.Generator().manual_seed(args.seed + 2)
    started, running = time.time(), []
    for step in range(1, args.unet_steps + 1):
        loss = step_loss(generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1 - args.ema_decay)
        running.append(loss.item())
        if step % 200 == 0 or step == args.unet_steps:
            log(f"{name} step {step}/{args.unet_steps} loss {np.mean(running):.4f} ({time.time() - started:.0f} s)")
            running = []
    with torch.no_grad():
        for parameter, average in zip(parameters, ema, strict=True):
            parameter.copy_(average)


def train_unet(args, latent_means, latent_stds, caption_index, caption_ids, text_encoder, scaling_factor, log):
    """The UNet and the text encoder together (epsilon prediction); both end as their moving averages."""
    from diffusers import DDPMScheduler

    unet = build_unet()
    scheduler = DDPMScheduler(**sd15_betas())
    empty_caption = len(caption_ids) - 1  # the last caption is the empty prompt

    def step_loss(generator):
        index = torch.randint(len(latent_means), (args.unet_batch_size,), generator=generator)
        latents = latent_means[index] + latent_stds[index] * torch.randn(latent_means[index].shape, generator=generator)
        latents = latents * scaling_factor
        drop = torch.rand(len(index), generator=generator) < 0.1
        # Every caption of the world goes through the encoder once per step (25 short sequences), then is indexed.
        text = text_encoder(caption_ids)[0][torch.where(drop, empty_caption, caption_index[index])]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        return (prediction - noise).pow(2).mean()

    text_encoder.train()
    fit_with_ema(args, "unet", list(unet.parameters()) + list(text_encoder.parameters()), step_loss, log)
    text_encoder.eval().requires_grad_(False)
    return unet.eval().requires_grad_(False)


def train_transformer(args, latents_mean, latents_std, caption_index, caption_ids, text_encoders, log):
    """SD3's rectified flow on the (already shifted and scaled) latents; the transformer and the three text encoders
    together, all ending as their moving averages."""
    import train_diffusion_dpo_sd3

    transformer = build_transformer()
    empty_caption = len(caption_ids[0]) - 1  # the last caption is the empty prompt

    def step_loss(generator):
        index = torch.randint(len(latents_mean), (args.unet_batch_size,), generator=generator)
        latents = latents_mean[index] + latents_std[index] * torch.randn(latents_mean[index].shape, generator=generator)
        drop = torch.rand(len(index), generator=generator) < 0.1
        # Every caption through the three encoders once per step (25 short sequences), then indexed
        prompt_embeds, pooled = train_diffusion_dpo_sd3.encode_prompt(text_encoders, caption_ids)
        chosen = torch.where(drop, empty_caption, caption_index[index])
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(len(index), generator=generator))  # logit-normal(0, 1), shift 1
        noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
        prediction = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds[chosen],
                                 pooled_projections=pooled[chosen], timestep=sigmas * 1000).sample
        return (prediction - (noise - latents)).pow(2).mean()

    for encoder in text_encoders:
        encoder.train()
    parameters = list(transformer.parameters()) + [p for encoder in text_encoders for p in encoder.parameters()]
    fit_with_ema(args, "transformer", parameters, step_loss, log)
    for encoder in text_encoders:
        encoder.eval().requires_grad_(False)
    return transformer.eval().requires_grad_(False)


def check_samples(pipeline_dir, images_per_caption, seed):
    """Caption fidelity of the saved pipeline's samples: the world's checker on every caption x seed."""
    import pipeline_dpo

    pipe = pipeline_dpo.load_dpo_pipeline(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    captions = list(toy_world.CAPTIONS)
    images = pipeline_dpo.generate_images(pipe, captions, seed=seed, num_images_per_prompt=images_per_caption,
                                          batch_size=96, **sampling(pipe), label="base")
    checks = [toy_world.caption_fidelity(image, caption)
              for image, caption in zip(images, [c for c in captions for _ in range(images_per_caption)], strict=True)]
    return toy_world.fidelity_rates(checks)


# How every stage of `make toy` samples from the toy pipelines (the flow base also cuts its T5 prompt as trained).
TOY_SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0)
SD3_SAMPLING = dict(TOY_SAMPLING, max_sequence_length=SD3_TEXT_LENGTH)


def sampling(pipe):
    """How the toy samples `pipe`: the SD3 pipeline also cuts its T5 prompt to the length it was trained with (the
    pipeline's default, 256 tokens, would pad it with tokens the toy base never saw)."""
    return dict(SD3_SAMPLING if type(pipe).__name__ == "StableDiffusion3Pipeline" else TOY_SAMPLING)


def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    output_dir = Path(args.output_dir)

    def log(message):
        print(f"[toy_base {args.family} {time.time() - started:6.0f} s] {message}", flush=True)

    # 1. Pictures and captions (then each family's text encoders and token ids).
    rng = np.random.default_rng(args.seed)
    scenes = [toy_world.random_scene_image(rng) for _ in range(args.num_images)]
    pictures = picture_tensor([image for image, _ in scenes])
    captions = list(toy_world.CAPTIONS)
    caption_index = torch.tensor([captions.index(caption) for _, caption in scenes])

    # 2-3. The family's autoencoder, text encoders and denoiser, as a pipeline.
    build = build_sd3_pipeline if args.family == "sd3" else build_sd_pipeline
    pipeline, record = build(args, pictures, captions, caption_index, log)

    # 4. Save, then check what it draws.
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    for tokenizer_subfolder in ("tokenizer", "tokenizer_2"):
        if (output_dir / tokenizer_subfolder).is_dir():  # the CLIP tokenizers: files for transformers 4 too
            tiny_models.write_bpe_files(str(output_dir / tokenizer_subfolder))
    record = {"args": vars(args), **record, "train_seconds": round(time.time() - started, 1)}
    record["sampling"] = sampling(pipeline)
    if args.check_images_per_caption:
        record["caption_fidelity"] = check_samples(output_dir, args.check_images_per_caption, args.seed + 100)
        log(f"caption fidelity of the base's samples: {record['caption_fidelity']}")
    (output_dir / "toy_base.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {output_dir}")
    return record


def build_sd_pipeline(args, pictures, captions, caption_index, log):
    """Stages 1-3 for SD: the CLIP text encoder, the 4-channel VAE and the UNet, as a StableDiffusionPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    # 1. The token ids of every caption (and of "", for guidance).
    tokenizer = tiny_models.build_tiny_clip_tokenizer()
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["text_encoder"])
    text_encoder = CLIPTextModel(tiny_models.tiny_clip_text_config(tokenizer))
    caption_ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    log(f"{args.num_images} pictures of {len(captions)} captions rendered")

    # 2. Autoencoder, and the scaling factor that gives the UNet unit-variance latents.
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["vae"])
    vae, vae_loss = train_vae(args, pictures, log)
    latent_means, latent_stds = encode_pictures(vae, pictures)
    scaling_factor = float(1.0 / latent_means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log(f"latents encoded; scaling factor {scaling_factor:.4f}")

    # 3. The latent diffusion UNet, and the text encoder with it.
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["unet"])
    unet = train_unet(args, latent_means, latent_stds, caption_index, caption_ids, text_encoder, scaling_factor, log)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**sd15_betas(), set_alpha_to_one=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return pipeline, {"vae_final_loss": vae_loss, "scaling_factor": scaling_factor}


def build_sd3_pipeline(args, pictures, captions, caption_index, log):
    """Stages 1-3 for SD3: three text encoders, the 16-channel VAE and the MMDiT, as a StableDiffusion3Pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    # 1. SD3's three tokenizers and text encoders, cut to SD3_TEXT_LENGTH tokens.
    tokenizers = [tiny_models.build_tiny_clip_tokenizer(), tiny_models.build_tiny_clip_tokenizer(pad_token="!"),
                  tiny_models.build_tiny_t5_tokenizer()]
    for tokenizer in tokenizers[:2]:  # the pipeline pads CLIP prompts to the tokenizer's model_max_length
        tokenizer.model_max_length = SD3_TEXT_LENGTH
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["text_encoder"])
    text_encoders = [CLIPTextModelWithProjection(tiny_models.tiny_clip_text_config(tokenizers[0]))]
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["text_encoder_2"])
    text_encoders.append(CLIPTextModelWithProjection(tiny_models.tiny_clip_text_config(tokenizers[1])))
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["text_encoder_3"])
    text_encoders.append(T5EncoderModel(tiny_models.tiny_t5_config(tokenizers[2])))
    caption_ids = [tokenizer(captions + [""], padding="max_length", max_length=SD3_TEXT_LENGTH, truncation=True,
                             return_tensors="pt").input_ids for tokenizer in tokenizers]
    log(f"{args.num_images} pictures of {len(captions)} captions rendered")

    # 2. Autoencoder with SD3's 16 channels; shift and scaling factors from its latents.
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["vae"])
    vae, vae_loss = train_vae(args, pictures, log)
    latent_means, latent_stds = encode_pictures(vae, pictures)
    shift_factor = float(latent_means.mean())
    scaling_factor = float(1.0 / (latent_means - shift_factor).std())
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    log(f"latents encoded; shift factor {shift_factor:.4f}, scaling factor {scaling_factor:.4f}")

    # 3. The MMDiT transformer by rectified flow, and the text encoders with it.
    torch.manual_seed(args.seed + tiny_models.SEED_OFFSET["transformer"])
    transformer = train_transformer(args, (latent_means - shift_factor) * scaling_factor, latent_stds * scaling_factor,
                                    caption_index, caption_ids, text_encoders, log)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1], text_encoder_3=text_encoders[2], tokenizer_3=tokenizers[2])
    return pipeline, {"vae_final_loss": vae_loss, "shift_factor": shift_factor, "scaling_factor": scaling_factor}


if __name__ == "__main__":
    main(parse_args())

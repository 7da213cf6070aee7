"""Build tiny, randomly initialised Stable Diffusion / SDXL pipelines on disk, with no download.

    python tools/tiny_models.py --family sd --output_dir tiny-sd
    python tools/tiny_models.py --family sd --prediction_type v_prediction --output_dir tiny-sd-v
    python tools/tiny_models.py --family sdxl --output_dir tiny-sdxl

The result is an ordinary diffusers folder (model_index.json plus one subfolder per component, weights as
safetensors) that `DiffusionPipeline.from_pretrained(output_dir)` loads and that the training scripts
accept as `--pretrained_model_name_or_path`. It generates 64x64 images (latents 8x8, VAE scale factor 8)
in well under a second on a CPU. The weights are random, so the images are noise: these pipelines exist
to exercise code paths offline (tests, demos, CI), not to produce pictures.

Building is deterministic: the same seed gives bit-identical weights, because every component is
initialised right after `torch.manual_seed(seed + offset)` with a fixed offset per component.
"""

import argparse
import json
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


# Sizes known to work together on this stack (see DESIGN.md, "Facts of this machine").
TEXT_HIDDEN_SIZE = 32  # width of each tiny CLIP text encoder
TEXT_PROJECTION_DIM = 32  # pooled embedding width of SDXL's second encoder
ADDITION_TIME_EMBED_DIM = 8  # SDXL embeds 6 micro-conditioning numbers, each to this width
MAX_TEXT_LENGTH = 77  # CLIP's context length; the pipelines pad prompts to it
LATENT_SIZE = 8  # latents are 8x8; the VAE upsamples by 8, so images are 64x64

# Fixed seed offsets, so each component's weights depend only on the seed and its own config:
# changing the UNet's config later does not silently change the text encoder's weights.
SEED_OFFSET = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "safety_checker": 4}

# Words that get whole-word BPE merges, so ordinary captions tokenize into words, not letters.
# Any other text still tokenizes (into single characters), because every byte is in the vocabulary.
CAPTION_WORDS = """
a an the of on in at with and or to from by for is are this that it its
red green blue yellow orange purple pink white black gray grey brown cyan magenta
circle square triangle rectangle star shape dot line
background foreground top bottom left right center middle corner upper lower
small large big tiny little bright dark light colorful colourful
photo picture image painting drawing illustration render art style portrait landscape
cat dog bird horse person man woman child people face tree flower house car city street sky sea
water mountain forest river sun moon night day beautiful detailed high quality realistic
""".split()


def bytes_to_unicode():
    """Map each of the 256 byte values to a printable unicode character, as CLIP's BPE does.

    Adapted from openai/CLIP simple_tokenizer.py (same table as GPT-2): printable bytes map to
    themselves; the rest are shifted above U+0100 so no vocabulary entry is whitespace or a control code.
    """
    printable_bytes = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    byte_values = printable_bytes[:]
    code_points = printable_bytes[:]
    shift = 0
    for byte_value in range(256):
        if byte_value not in byte_values:
            byte_values.append(byte_value)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, [chr(code_point) for code_point in code_points], strict=True))


def apply_bpe(symbols, merge_ranks):
    """Merge adjacent symbols, lowest-ranked pair first, until no ranked pair is left (CLIP's bpe())."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked_positions = [
            (merge_ranks.get((symbols[index], symbols[index + 1]), float("inf")), index)
            for index in range(len(symbols) - 1)
        ]
        best_rank, best_index = min(ranked_positions)
        if best_rank == float("inf"):
            break
        symbols[best_index : best_index + 2] = [symbols[best_index] + symbols[best_index + 1]]
    return symbols


def tiny_clip_vocab_and_merges(words=CAPTION_WORDS):
    """Return (vocab, merges) for a small CLIP-style byte-level BPE tokenizer.

    Laid out like CLIP's own vocabulary: the 256 byte characters, the same 256 with the end-of-word
    marker "</w>", then one entry per merge, then <|startoftext|> and <|endoftext|> last (so the
    end-of-text id is the largest id, as in CLIP).
    Every word in `words` becomes one token. Merges are added word by word, each time to the pieces the
    merges so far leave of the word; a new merge ranks after all earlier ones, so it never changes how
    an earlier word splits, and each word keeps a lower-ranked merge available until it is whole.
    """
    byte_characters = list(bytes_to_unicode().values())
    vocab = {}
    for character in byte_characters:
        vocab[character] = len(vocab)
    for character in byte_characters:
        vocab[character + "</w>"] = len(vocab)

    merges = []
    merge_ranks = {}
    for word in words:  # the words are ASCII, so characters and byte symbols coincide
        while True:
            pieces = apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], merge_ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            merge_ranks[pair] = len(merges)
            merges.append(pair)
            # Two different pairs can spell the same token ("ab"+"c", "a"+"bc"): keep its first id.
            vocab.setdefault(pair[0] + pair[1], len(vocab))

    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tiny_clip_tokenizer(pad_token="<|endoftext|>"):
    """A CLIPTokenizer over the tiny vocabulary; SDXL's second tokenizer pads with "!" instead."""
    vocab, merges = tiny_clip_vocab_and_merges()
    # vocab/merges are passed as objects: transformers 5 silently ignores vocab_file=/merges_file=
    # and would return a 3-token tokenizer that maps every word to <|endoftext|>.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_TEXT_LENGTH)


def write_bpe_files(tokenizer_dir):
    """Write vocab.json and merges.txt next to the saved tokenizer.json.

    transformers 5 saves only tokenizer.json; transformers 4's slow CLIPTokenizer (the class named in
    model_index.json) needs these two files, so writing them keeps the folder loadable there too.
    """
    vocab, merges = tiny_clip_vocab_and_merges()
    with open(os.path.join(tokenizer_dir, "vocab.json"), "w", encoding="utf-8") as vocab_file:
        json.dump(vocab, vocab_file, ensure_ascii=False)
    with open(os.path.join(tokenizer_dir, "merges.txt"), "w", encoding="utf-8") as merges_file:
        merges_file.write("#version: 0.2\n")  # CLIP's header line; readers skip the first line
        merges_file.writelines(f"{left} {right}\n" for left, right in merges)


def tiny_clip_text_config(tokenizer):
    """Config of a 2-layer, 32-wide CLIP text encoder whose vocabulary and special ids match `tokenizer`."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=TEXT_PROJECTION_DIM,
        hidden_act="quick_gelu",  # CLIP ViT-L/14's activation, as in SD 1.x
        # The encoder pools at the first <|endoftext|>; these ids must be the tokenizer's
        # (an eos_token_id of 2 would switch transformers to a legacy argmax pooling).
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_vae(seed, scaling_factor):
    """A 4-level AutoencoderKL (scale factor 2**3 = 8) with 4 latent channels, like SD's VAE but tiny."""
    torch.manual_seed(seed + SEED_OFFSET["vae"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,  # must divide every block width (8 and 16)
        latent_channels=4,
        sample_size=LATENT_SIZE * 8,
        scaling_factor=scaling_factor,
    )


def build_tiny_safety_checker(seed=0):
    """A tiny StableDiffusionSafetyChecker (CLIP vision tower, 32 px) and its image processor, as SD 1.x ships them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed + SEED_OFFSET["safety_checker"])
    config = CLIPConfig(
        text_config={"hidden_size": TEXT_HIDDEN_SIZE, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=TEXT_PROJECTION_DIM,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionSafetyChecker(config).eval(), processor


def build_tiny_sd(output_dir, prediction_type="epsilon", seed=0, safety_checker=False):
    """Build a tiny StableDiffusionPipeline (SD 1.x layout), save it to `output_dir`, return the path.

    `prediction_type` ("epsilon" or "v_prediction") is written to the scheduler config, which is where
    the training scripts and the pipeline read it from (SD 2.x 768 models are "v_prediction").
    `safety_checker`: include a tiny safety checker and feature extractor, as SD 1.x releases do.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")

    torch.manual_seed(seed + SEED_OFFSET["unet"])
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        # diffusers' legacy name for the number of heads per block: 64 channels / 4 heads = 16 per head.
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = build_tiny_vae(seed, scaling_factor=0.18215)  # SD 1.x/2.x VAE latent scale

    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed + SEED_OFFSET["text_encoder"])
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))

    # SD 1.5's noise schedule; DDPM because training samples noise with it directly.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        # without one, don't warn about it on every load
        **dict(zip(("safety_checker", "feature_extractor"), build_tiny_safety_checker(seed)
                   if safety_checker else (None, None))),
        requires_safety_checker=safety_checker,
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    write_bpe_files(os.path.join(output_dir, "tokenizer"))
    return str(output_dir)


def build_tiny_sdxl(output_dir, seed=0):
    """Build a tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning), save, return path.

    Mirrors SDXL base's wiring at toy width: the UNet cross-attends to both encoders' hidden states
    concatenated (32 + 32 = 64) and adds an embedding of the second encoder's pooled projection (32)
    plus six micro-conditioning numbers (original size, crop top-left, target size), each embedded to 8.
    """
    torch.manual_seed(seed + SEED_OFFSET["unet"])
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        transformer_layers_per_block=1,
        use_linear_projection=True,  # as in SDXL base
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
        norm_num_groups=32,
    )
    vae = build_tiny_vae(seed, scaling_factor=0.13025)  # SDXL VAE latent scale

    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    torch.manual_seed(seed + SEED_OFFSET["text_encoder"])
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    torch.manual_seed(seed + SEED_OFFSET["text_encoder_2"])
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer_2))

    # SDXL base ships Euler; the training scripts build their own DDPMScheduler from this config.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # SDXL base's setting: empty negative prompt -> zero embedding
        add_watermarker=False,  # the watermark package is optional and would alter the tiny images
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    for tokenizer_subfolder in ("tokenizer", "tokenizer_2"):
        write_bpe_files(os.path.join(output_dir, tokenizer_subfolder))
    return str(output_dir)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Build a tiny random Stable Diffusion or SDXL pipeline folder for offline tests and demos."
    )
    parser.add_argument(
        "--family",
        choices=("sd", "sdxl"),
        required=True,
        help="Which pipeline to build: 'sd' (StableDiffusionPipeline, SD 1.x/2.x layout) or "
        "'sdxl' (StableDiffusionXLPipeline, two text encoders).",
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write the pipeline to (created if missing).")
    parser.add_argument(
        "--prediction_type",
        choices=("epsilon", "v_prediction"),
        default="epsilon",
        help="What the UNet is trained to predict, stored in the scheduler config. Only for --family sd; "
        "the SDXL pipeline is always 'epsilon', like SDXL base.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for the random weights; the same seed gives identical weights."
    )
    args = parser.parse_args(input_args)
    if args.family == "sdxl" and args.prediction_type != "epsilon":
        parser.error("--prediction_type applies to --family sd only; the tiny SDXL pipeline predicts epsilon.")
    return args


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    if args.family == "sd":
        path = build_tiny_sd(args.output_dir, prediction_type=args.prediction_type, seed=args.seed)
    else:
        path = build_tiny_sdxl(args.output_dir, seed=args.seed)
    print(f"Wrote tiny {args.family} pipeline to {path}")


if __name__ == "__main__":
    main(parse_args())

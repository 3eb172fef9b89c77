"""Tiny random-weight diffusers pipelines, one per supported family.

``make_tiny_model(family, out_dir)`` writes a complete diffusers directory (model_index.json,
component configs, safetensors weights, tokenizers) that diffusers' own
``DiffusionPipeline.from_pretrained(out_dir)`` loads. Nothing is downloaded: the tokenizers
are built here from a character-level vocabulary, the models from small configs modelled on
diffusers' test suite (``get_dummy_components``).

The VAEs deliberately use scale factors other than the real checkpoints' 8 (where the family
allows it), so a stage that falls back to a hard-coded factor fails the exactness tests
instead of passing by luck.

CLI: ``trident tiny-model FAMILY OUT_DIR [--seed N]`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter
from trident.families import FAMILY_NAMES

__all__ = ["TINY_FAMILIES", "TINY_SHAPES", "build_parser", "main", "make_tiny_model"]

TINY_FAMILIES: tuple[str, ...] = FAMILY_NAMES

# Shapes that run each tiny model in well under a second per stage on CPU.
TINY_SHAPES: dict[str, dict[str, int]] = {
    "flux": {"height": 32, "width": 32},
    "sd3": {"height": 32, "width": 32},
    "wan": {"height": 32, "width": 32, "num_frames": 5},
    "cogvideox": {"height": 32, "width": 32, "num_frames": 5},
    "hunyuanvideo": {"height": 32, "width": 32, "num_frames": 5},
}

# Characters every tiny tokenizer knows; anything else maps to its unknown token.
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    # ids 0/1 match the tiny CLIP config's bos/eos (eos != 2 makes CLIP pool at the first eos).
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS.lower() + string.ascii_uppercase:
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in _CHARS:
        pieces.append((ch, -3.0))
        pieces.append(("▁" + ch, -2.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _llama_tokenizer() -> Any:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4}
    for ch in _CHARS:
        for piece in (ch, "▁" + ch):
            vocab.setdefault(piece, len(vocab))
    tok = LlamaTokenizer(
        vocab=vocab, merges=[], pad_token="<pad>", model_max_length=1024, add_prefix_space=False
    )
    # HunyuanVideo crops the first ``crop_start`` (95) hidden states: the system prompt of its
    # template is 95 tokens for the real Llama tokenizer, ~530 for this character-level one,
    # which would crop the user's prompt away. Make the head of the template one added token,
    # sized so the whole template prefix is exactly ``crop_start`` tokens again.
    template = str(DEFAULT_PROMPT_TEMPLATE["template"])
    crop_start = int(DEFAULT_PROMPT_TEMPLATE["crop_start"])  # type: ignore[call-overload]
    prefix = template[: template.index("{}")]
    for k in range(1, len(prefix)):
        if 1 + len(tok(prefix[-k:])["input_ids"]) == crop_start:
            break
    tok.add_tokens([prefix[:-k]])
    got = len(tok(prefix)["input_ids"])
    if got != crop_start:  # guard: the tiny model's prompts must reach the transformer
        raise RuntimeError(
            f"tiny llama tokenizer: template prefix is {got} tokens, want {crop_start}"
        )
    return tok


def _t5_encoder(d_model: int = 32, umt5: bool = False) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls: Any = UMT5Config if umt5 else T5Config
    model_cls: Any = UMT5EncoderModel if umt5 else T5EncoderModel
    cfg = config_cls(
        vocab_size=256,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return model_cls(cfg)


def _clip_config(hidden: int, projection: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=256,
        hidden_act="gelu",
        projection_dim=projection,
    )


def _image_vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    # Three levels: scale factor 4 (real checkpoints: 8).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _flux(seed: int) -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    text_encoder = CLIPTextModel(_clip_config(32))
    text_encoder_2 = _t5_encoder(32)
    vae = _image_vae(4)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
        vae=vae,
        image_encoder=None,
        feature_extractor=None,
    )


def _sd3(seed: int) -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    )
    text_encoder = CLIPTextModelWithProjection(_clip_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(32))
    text_encoder_3 = _t5_encoder(32)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        tokenizer_3=_t5_tokenizer(),
        transformer=transformer,
        vae=_image_vae(4),
    )


def _wan(seed: int) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    # Two spatial / one temporal downsample: factors 4 / 2 (real Wan 2.1: 8 / 4).
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        scale_factor_spatial=4,
        scale_factor_temporal=2,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        # The rope table's rows per axis (frames, height, width, in patches): 64 covers
        # the family's default 81 frames (41 latent frames at factor 2) and up to 127,
        # and 512 px per side; longer requests are refused by validation, not the stage.
        rope_max_seq_len=64,
    )
    return WanPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(32, umt5=True),  # Wan's encoder is UMT5
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _cogvideox(seed: int) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,  # the pipeline's default max_sequence_length
    )
    # Three levels: spatial factor 4 (real CogVideoX: 8); temporal 4 as the real one.
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(32),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def _hunyuanvideo(seed: int) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    llama = LlamaModel(
        LlamaConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            vocab_size=256,
            hidden_act="gelu",
            max_position_embeddings=1024,
        )
    )
    clip = CLIPTextModel(_clip_config(8))
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=_llama_tokenizer(),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip,
        tokenizer_2=_clip_tokenizer(),
    )


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "flux": _flux,
    "sd3": _sd3,
    "wan": _wan,
    "cogvideox": _cogvideox,
    "hunyuanvideo": _hunyuanvideo,
}


def make_tiny_model(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight ``family`` pipeline to ``out_dir``; returns the path.

    Deterministic in ``seed``. Loadable with ``DiffusionPipeline.from_pretrained(out_dir)``
    and with :func:`trident.pipelines.open_pipeline`.
    """
    try:
        build = _BUILDERS[family]
    except KeyError:
        raise ValueError(
            f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}"
        ) from None
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng_state = torch.random.get_rng_state()
    try:
        pipe = build(seed)
    finally:
        torch.random.set_rng_state(rng_state)  # don't disturb the caller's global RNG
    pipe.save_pretrained(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    """``trident tiny-model``'s command line."""
    parser = argparse.ArgumentParser(
        prog="trident tiny-model",
        description="Write a tiny random-weight diffusers pipeline.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "family", choices=TINY_FAMILIES, help=f"pipeline family: {', '.join(TINY_FAMILIES)}"
    )
    parser.add_argument("out_dir", help="directory to write the pipeline to (save_pretrained)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``trident tiny-model FAMILY OUT_DIR [--seed N]``."""
    args = build_parser().parse_args(argv)
    path = make_tiny_model(args.family, args.out_dir, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a random-weight LFM2-Audio checkpoint folder, offline, in seconds.

The folder has the same layout as the published checkpoints, so the service
loads it through exactly the same code as real weights
(`LFM2Backend(model=str(out_dir), ...)`):

    config.json                 model config (hand-written, see below)
    tokenizer.json, tokenizer_config.json
                                a stand-in byte-level tokenizer whose special
                                tokens sit at the ids the model code hard-codes
                                (7 <|im_end|>, 128 <|audio_start|>, 130 <|text_end|>)
    model.safetensors           random LFM2AudioModel weights
    audio_detokenizer/          random LFM2.5 detokenizer (variant lfm2.5)
    tokenizer-e351c8d8-checkpoint125.safetensors
                                random Mimi codec weights (variant lfm2)

Variants follow the two model families: `lfm2.5` ships the LFM-based audio
detokenizer (LFM2.5-Audio-1.5B), `lfm2` only the Mimi codec (LFM2-Audio-1.5B).

Sizes: `tiny` (3.5 M parameters, built in under a second plus imports; for
tests) and `full` (the published architecture: 1453.5 M parameters in bf16,
2.8 GB, plus a 78.5 M fp32 detokenizer; about 40 s and 9.5 GB of RAM on 2
CPU cores; for benchmarks such as `python -m bench.lfm2_steps` and
`python -m bench.engine`). The
full-size shapes were reconstructed from the public LFM2-1.2B backbone config
and ports of the model (mlx-audio, ONNX exports); the parameter counts match
the published checkpoint sizes, but the files are not the official configs.

The random weights are nudged so that the model never ends a response on its
own: the logits of <|im_end|>, <|text_end|>, <|audio_start|> and of the
end-of-audio code are made small. Tests force those tokens explicitly instead,
and a free-running generation always runs to `max_new_tokens`.

Usage:
    python scripts/make_tiny_model.py OUT_DIR [--variant lfm2.5|lfm2] [--size tiny|full] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"

# Special tokens at the ids LFM2's tokenizer uses; the model code hard-codes
# 7, 128 and 130, and ChatState encodes <|startoftext|> and <|im_start|>.
_SPECIAL_IDS = {
    0: "<|pad|>",
    1: "<|startoftext|>",
    2: "<|endoftext|>",
    6: "<|im_start|>",
    7: "<|im_end|>",
    128: "<|audio_start|>",
    129: "<|text_start|>",
    130: "<|text_end|>",
    131: "<|mixed_start|>",
    132: "<|mixed_end|>",
    133: "<|audio_placeholder|>",
}
NUM_SPECIAL = 134
# Tokens whose logits are damped so random weights never end a response.
_END_TOKENS = (7, 128, 130)
END_OF_AUDIO_CODE = 2048

_PREPROCESSOR = {
    "sample_rate": 16000,
    "normalize": "per_feature",
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "features": 128,
    "n_fft": 512,
    "log": True,
    "frame_splicing": 1,
    "dither": 1e-05,
    "pad_to": 0,
    "pad_value": 0.0,
}


def _encoder(*, n_layers: int, d_model: int, channels: int, ff: int, heads: int) -> dict[str, Any]:
    return {
        "feat_in": 128,
        "feat_out": -1,
        "n_layers": n_layers,
        "d_model": d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": channels,
        "causal_downsampling": False,
        "reduction": None,
        "reduction_position": None,
        "reduction_factor": 1,
        "ff_expansion_factor": ff,
        "self_attention_model": "rel_pos",
        "n_heads": heads,
        "att_context_size": [-1, -1],
        "xscaling": False,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "conv_context_size": None,
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    }


def _lfm(*, vocab: int, hidden: int, ff: int, layer_types: list[str], heads: int, kv_heads: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": len(layer_types),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "layer_types": layer_types,
        "max_position_embeddings": 128000,
        "norm_eps": 1e-05,
        "conv_L_cache": 3,
        "conv_bias": False,
        "block_multiple_of": 256,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": True,
        "rope_theta": 1000000.0,
        "bos_token_id": 1,
        "eos_token_id": 7,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }


def model_config(size: str) -> dict[str, Any]:
    """The model's config.json for a size ("tiny" or "full")."""
    if size == "tiny":
        lfm = _lfm(
            vocab=512,
            hidden=64,
            ff=192,
            layer_types=["conv", "full_attention", "conv", "full_attention"],
            heads=4,
            kv_heads=2,
        )
        lfm["block_multiple_of"] = 32
        encoder = _encoder(n_layers=1, d_model=64, channels=32, ff=2, heads=2)
        depthformer = {"layers": 1, "dim": 64, "tie": True}
    elif size == "full":
        # LFM2-1.2B backbone: 16 layers, attention at 2, 5, 8, 10, 12, 14.
        layer_types = ["conv"] * 16
        for i in (2, 5, 8, 10, 12, 14):
            layer_types[i] = "full_attention"
        lfm = _lfm(vocab=65536, hidden=2048, ff=12288, layer_types=layer_types, heads=32, kv_heads=8)
        # canary-180m-flash FastConformer encoder.
        encoder = _encoder(n_layers=17, d_model=512, channels=256, ff=4, heads=8)
        depthformer = {"layers": 6, "dim": 1024, "tie": True}
    else:
        raise ValueError(f"unknown size {size!r}")
    return {
        "architectures": ["LFM2AudioModel"],
        "codebooks": 8,
        "tie_audio_embeddings": False,
        "semantic_codebook_factor": 100,
        "codebook_weight": "log",
        "interleaved_n_text": 6,
        "interleaved_n_audio": 12,
        "preprocessor": dict(_PREPROCESSOR),
        "encoder": encoder,
        "lfm": lfm,
        "depthformer": depthformer,
    }


def detokenizer_config(size: str) -> dict[str, Any]:
    """The audio_detokenizer/config.json (an Lfm2Config); hidden_size must be
    512 because the detokenizer's embedding and output layer hard-code it."""
    if size == "tiny":
        layer_types = ["conv", "sliding_attention"]
        ff, vocab = 768, 16
    else:
        layer_types = ["conv", "conv", "sliding_attention", "conv", "sliding_attention", "conv",
                       "sliding_attention", "conv"]  # fmt: skip
        ff, vocab = 3328, 65536
    config = _lfm(vocab=vocab, hidden=512, ff=ff, layer_types=layer_types, heads=16, kv_heads=8)
    return {"model_type": "lfm2", "architectures": ["Lfm2Model"], **config, "sliding_window": 30}


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE stand-in: the special tokens at their real ids, the
    256 byte symbols, then filler tokens (pairs of byte symbols) up to the
    model's vocabulary size so that every id the model can sample decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for i in range(NUM_SPECIAL):
        vocab[_SPECIAL_IDS.get(i, f"<|reserved_{i}|>")] = i
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault(a + b, len(vocab))
    if len(vocab) < vocab_size:
        raise ValueError(f"vocabulary of {vocab_size} is larger than this stand-in supports")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(_SPECIAL_IDS.get(i, f"<|reserved_{i}|>"), special=True,
                                       normalized=False) for i in range(NUM_SPECIAL)])  # fmt: skip
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    fast.save_pretrained(str(out_dir))


def _damp_end_tokens(model: Any) -> None:
    """Make the end markers unlikely under random weights (see module doc)."""
    import torch

    with torch.no_grad():
        model.lfm.embed_tokens.weight[list(_END_TOKENS)] *= 0.01
        head = model.depth_embeddings[0]
        head.to_logits.weight[END_OF_AUDIO_CODE] *= 0.01


def _save(module: Any, path: Path, dtype: Any) -> None:
    """Save a module's state dict; tied weights are stored once per name the
    loader expects, as separate contiguous tensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def build(out_dir: Path, *, variant: str = "lfm2.5", size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint folder and return its path."""
    import torch
    from liquid_audio.detokenizer import LFM2AudioDetokenizer
    from liquid_audio.model.conformer.encoder import ConformerEncoderConfig
    from liquid_audio.model.lfm2_audio import DepthformerConfig, LFM2AudioConfig, LFM2AudioModel
    from liquid_audio.moshi.models.loaders import get_mimi
    from transformers import Lfm2Config

    if variant not in ("lfm2.5", "lfm2"):
        raise ValueError(f"unknown variant {variant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Full-size weights are stored in bf16 like the published checkpoint.
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    torch.manual_seed(seed)

    config = model_config(size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out_dir, config["lfm"]["vocab_size"])

    rest = {k: v for k, v in config.items() if k not in ("lfm", "encoder", "depthformer")}
    conf = LFM2AudioConfig(
        lfm=Lfm2Config(**config["lfm"]),
        encoder=ConformerEncoderConfig(**config["encoder"]),
        depthformer=DepthformerConfig(**config["depthformer"]),
        **rest,
    )
    model = LFM2AudioModel(conf).eval()
    _damp_end_tokens(model)
    _save(model, out_dir / "model.safetensors", dtype)
    del model

    if variant == "lfm2.5":
        detok_dir = out_dir / DETOKENIZER_DIR
        detok_dir.mkdir(exist_ok=True)
        detok_cfg = detokenizer_config(size)
        (detok_dir / "config.json").write_text(json.dumps(detok_cfg, indent=2) + "\n")
        hf_cfg = Lfm2Config(**{k: v for k, v in detok_cfg.items() if k != "architectures"})
        # The package renames sliding_attention to full_attention and imposes
        # the window with its own mask; build it the same way.
        hf_cfg.layer_types = ["full_attention" if t != "conv" else t for t in hf_cfg.layer_types]
        detok = LFM2AudioDetokenizer(hf_cfg).eval()
        _save(detok, detok_dir / "model.safetensors", torch.float32)
    else:
        # Mimi's architecture is fixed by the package; bf16 halves the file.
        _save(get_mimi(None, device="cpu"), out_dir / MIMI_FILE, torch.bfloat16)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--variant", choices=["lfm2.5", "lfm2"], default="lfm2.5")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    out = build(args.out_dir, variant=args.variant, size=args.size, seed=args.seed)
    logger.info("wrote %s (%s, %s) in %.1f s", out, args.variant, args.size, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Finding, checking and loading an LFM2-Audio checkpoint; torch set-up.

Loading never downloads and never fakes. A Hugging Face id resolves from the
local cache only, at a pinned revision; a folder is passed to the package as
a `Path` (a `str` would be sent to the Hub as a repo id). A missing or
incomplete checkpoint raises `BackendLoadError` naming `make download`. The
package loads weights non-strictly, so the weight file is checked against the
model's parameters first (`check_weights`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from service.backends.base import BackendLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "LiquidAI/LFM2.5-Audio-1.5B"
LFM2_MODEL = "LiquidAI/LFM2-Audio-1.5B"
# Commits on the Hugging Face Hub: the revisions that several independent
# public projects pin and load (cache snapshot paths, `hf models info` pins,
# links to config.json at the commit). Move both only with a test download.
PINNED_REVISIONS: dict[str, str] = {
    DEFAULT_MODEL: "c362a0625dfe45aa588dce5f0ada28a7e5707628",
    LFM2_MODEL: "c798aad30dc3cd72e72970beab51326b8443bd94",
}
PINNED_REVISION = PINNED_REVISIONS[DEFAULT_MODEL]
DOWNLOAD_HINT = "run `make download` (scripts/download_model.py) to fetch it"

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"

# -- torch set-up -------------------------------------------------------------


def configure_torch(device: torch.device) -> None:
    """Process-wide torch settings for serving, all in one place.

    TF32 matmuls on CUDA (the backbone runs in bf16 anyway; this covers the
    fp32 codec and detokenizer). CPU math is left exact. Autograd is switched
    off per call with `inference()` because grad mode is thread-local and the
    model runs in worker threads."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendLoadError(f"device {device!r} requested but no CUDA device is available")
    return resolved


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16, from
    the Linux CPU flags; False where they cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    """The model dtype: `dtype` when given, else bf16 on GPU and, by
    measurement, on CPUs with native bf16 matmuls; fp32 on other CPUs.

    On a CPU with AMX, bf16 was as fast as fp32 for one row and several
    times faster for a batch and for prefill (docs/benchmarks.md, "CPU
    dtype"). Without those instructions bf16 falls back to slow kernels,
    so fp32 stays the default there. Exact comparisons (the tests) ask for
    fp32 explicitly."""
    if dtype is None:
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul()):
            return torch.bfloat16
        return torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]  # fmt: skip
    except KeyError:
        raise BackendLoadError(f"unknown dtype {dtype!r}: choose bf16, fp16 or fp32") from None


# -- checkpoint resolution ----------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pinned_revision(model: str) -> str:
    """The revision to fetch or load for a Hugging Face id."""
    return PINNED_REVISIONS.get(model, "main")


def resolve_checkpoint(model: str, revision: str | None) -> tuple[Path, str]:
    """The checkpoint folder for a local path or a Hugging Face id, and a label.

    Hugging Face ids are looked up in the local cache only: serving never
    downloads (a download belongs to `make download`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            log.warning("revision %s ignored: %s is a local folder", revision, model)
        return path.resolve(), str(path)
    if not _REPO_ID.match(model):
        raise BackendLoadError(f"checkpoint folder {model!r} does not exist; {DOWNLOAD_HINT} or pass a folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    rev = revision or pinned_revision(model)
    try:
        folder = snapshot_download(model, revision=rev, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - every way of "not in the cache" means the same to the operator
        raise BackendLoadError(
            f"model {model} at revision {rev} is not in the local Hugging Face cache ({HF_HUB_CACHE}); {DOWNLOAD_HINT}"
        ) from exc
    return Path(folder), f"{model}@{rev[:12]}"


def weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def check_checkpoint(folder: Path, label: str, decoder: str) -> str:
    """Raise unless every file the model needs is there; return the decoder to
    use ("detokenizer" or "mimi")."""
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    if weights_file(folder) is None:
        missing.append("model.safetensors")
    has_detok = all((folder / DETOKENIZER_DIR / n).is_file() for n in ("config.json", "model.safetensors"))
    has_mimi = (folder / MIMI_FILE).is_file()
    if decoder == "auto":
        decoder = "detokenizer" if has_detok else "mimi"
    if decoder == "detokenizer" and not has_detok:
        missing.append(f"{DETOKENIZER_DIR}/config.json and {DETOKENIZER_DIR}/model.safetensors")
    elif decoder == "mimi" and not has_mimi:
        missing.append(MIMI_FILE)
    elif decoder not in ("detokenizer", "mimi"):
        raise BackendLoadError(f"unknown audio decoder {decoder!r}: choose auto, detokenizer or mimi")
    if missing:
        raise BackendLoadError(
            f"checkpoint {label} ({folder}) is incomplete: missing {', '.join(missing)}; {DOWNLOAD_HINT}"
        )
    return decoder


def _stored_keys(weights: Path) -> set[str]:
    from safetensors import safe_open

    if weights.name.endswith(".index.json"):
        return set(json.loads(weights.read_text())["weight_map"])
    with safe_open(str(weights), framework="pt") as f:
        return set(f.keys())


def check_weights(model: torch.nn.Module, weights: Path, label: str) -> None:
    """The package loads non-strictly (missing tensors keep their random
    init), so a truncated or foreign weight file would serve noise: refuse it.
    Tied parameters count as present when any of their names is stored."""
    stored = _stored_keys(weights)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    missing = [names[0] for names in groups.values() if not any(n in stored for n in names)]
    missing += [n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var")) and n not in stored]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BackendLoadError(f"checkpoint {label}: {weights.name} lacks {shown}; {DOWNLOAD_HINT}")

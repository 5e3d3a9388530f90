"""Fetch the pinned LFM2-Audio checkpoint so the server can load it offline.

By default the files go into the local Hugging Face cache (`HF_HOME` /
`HF_HUB_CACHE`), where `LFM2Backend` finds them by model id and revision
without touching the network; with `--local-dir` they go into a plain
folder, which is then served with `--model DIR`.

Usage:
    python scripts/download_model.py [--model ID] [--revision REV] [--local-dir DIR]

The default model is LiquidAI/LFM2.5-Audio-1.5B at the revision pinned in
`service.backends.lfm2.PINNED_REVISIONS` (LiquidAI/LFM2-Audio-1.5B is pinned
there too). About 3.5 GB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a file (`python scripts/download_model.py`): make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.backends.lfm2 import DEFAULT_MODEL, PINNED_REVISIONS, pinned_revision  # noqa: E402

# Media and other runtimes' exports that serving never reads; everything
# else is fetched so the snapshot is exactly what the package expects.
IGNORE_PATTERNS = ["*.mp4", "*.gif", "*.png", "*.jpg", "*.wav", "*.gguf", "*.onnx"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face model id (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--revision",
        default=None,
        help="commit, tag or branch; default: the pinned commit ("
        + ", ".join(f"{m}@{r[:12]}" for m, r in PINNED_REVISIONS.items())
        + "; other models: main)",
    )
    parser.add_argument("--local-dir", type=Path, default=None, help="download into this folder, not the HF cache")
    args = parser.parse_args(argv)

    from huggingface_hub import snapshot_download

    revision = args.revision or pinned_revision(args.model)
    print(f"fetching {args.model} at revision {revision} ...", flush=True)
    try:
        path = snapshot_download(
            args.model,
            revision=revision,
            local_dir=str(args.local_dir) if args.local_dir else None,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as exc:  # noqa: BLE001 - a command-line tool: say what failed and exit non-zero
        print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded {args.model}@{revision} to {path}")
    if args.local_dir:
        print(f"serve it with: python -m service --backend lfm2 --model {path}")
    else:
        print(f"serve it with: python -m service --backend lfm2 --model {args.model} --revision {revision}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Turn a model name or path into a checked Hugging Face-format directory (no torch).

Two kinds of model exist: the built-in "tandem-tiny", created on first use, and
a directory holding a checkpoint. Checking the directory here, before any
service loads weights, lets every entry point (CLI, workers, router) fail with
the same message naming what is missing.
"""

from __future__ import annotations

from pathlib import Path

from services.engine.errors import CheckpointError, ModelNotFoundError
from services.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model

REQUIRED_FILES = ("config.json", "tokenizer.json")
WEIGHTS_PATTERN = "*.safetensors"


def resolve_model(name_or_path: str) -> Path:
    """Return the directory of the model ``name_or_path`` names.

    Raises ModelNotFoundError when it is neither "tandem-tiny" nor a directory,
    and CheckpointError when the directory lacks a file a checkpoint needs.
    """
    if name_or_path == TINY_MODEL_NAME:
        return ensure_tiny_model()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: give a Hugging Face-format directory "
            f"(config.json, *.safetensors, tokenizer.json) or {TINY_MODEL_NAME!r}"
        )
    missing = missing_checkpoint_files(path)
    if missing:
        raise CheckpointError(
            f"{path} is not a complete model directory: missing {', '.join(missing)}. "
            "A Hugging Face-format model directory holds config.json, tokenizer.json "
            "and its weights as one or more *.safetensors files"
        )
    return path


def missing_checkpoint_files(directory: Path) -> list[str]:
    """Names of the required files ``directory`` lacks ("*.safetensors" for no weights)."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if not any(p.is_file() for p in directory.glob(WEIGHTS_PATTERN)):
        missing.append(WEIGHTS_PATTERN)
    return missing

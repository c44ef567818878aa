"""llama.cpp (through llama-cpp-python) and mlx-lm as oracles: each runs a base model with an adapter file and
returns the logits. Neither is a dependency; ../shared/oracles/setup.sh installs both, and tests that need them are
marked (llama_cpp, mlx) and skip cleanly without them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ORACLES = Path(os.environ.get("LORA_HUB_ORACLES", Path.home() / ".cache" / "lora-hub-oracles"))
LLAMA_CPP = ORACLES / "llama.cpp"
"""llama.cpp's sources as vendored by llama-cpp-python 0.3.36: its converters and gguf-py."""


def need_llama_cpp() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (../shared/oracles/setup.sh llama)")
    pytest.importorskip("sentencepiece", reason="sentencepiece builds the base model's tokenizer")
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converters are not at {LLAMA_CPP} (../shared/oracles/setup.sh llama)")


def need_mlx() -> None:
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (../shared/oracles/setup.sh mlx)")


def add_sentencepiece_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small BPE tokenizer.model, which llama.cpp's base converter knows how to write (trained in memory)."""
    import sentencepiece

    text = ["the quick brown fox jumps over the lazy dog", "a tiny corpus for a tiny tokenizer, hello world"] * 50
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size,
                                             model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def llama_cpp_script(name: str, *args: str | os.PathLike[str]) -> None:
    """Runs one of llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py)."""
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    result = subprocess.run([sys.executable, str(LLAMA_CPP / name), *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def gguf_base(model_folder: Path, out: Path) -> Path:
    """The base model converted by llama.cpp's own converter (F32), as llama.cpp users have it."""
    llama_cpp_script("convert_hf_to_gguf.py", model_folder, "--outtype", "f32", "--outfile", out)
    return out


def llama_cpp_logits(base_gguf: Path, adapter_gguf: Path | None, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position, with an F32 KV cache (the default F16 one costs ~1e-3)."""
    from llama_cpp import Llama

    options = {"lora_path": str(adapter_gguf)} if adapter_gguf is not None else {}
    llm = Llama(str(base_gguf), logits_all=True, type_k=0, type_v=0, n_threads=2, n_ctx=64, verbose=False,
                **options)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def mlx_logits(model_folder: Path, adapter_folder: Path | None, ids: list[int]) -> np.ndarray:
    """mlx-lm's logits: the transformers folder loaded by mlx_lm, the adapter by its load_adapters."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(model_folder)
    if adapter_folder is not None:
        load_adapters(model, str(adapter_folder))
    return np.array(model(mx.array([ids]))[0])

"""The GGUF header reader (qlora_core/ggufmeta.py) against the `gguf` package's own reader and writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from qlora_core.ggufmeta import GGUFFormatError, read_header
from qlora_core.store import find_bundled_gguf


def _write(path: Path, *, untied: bool) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_embedding_length(8)
    w.add_feed_forward_length(24)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_token_list(["<s>", "a", "bé", "ü"])  # no llama.vocab_size: the vocab is the list's length
    w.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0, 3.0])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    if untied:
        w.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("untied", [False, True])
def test_a_written_gguf_reads_back_as_the_gguf_package_reads_it(tmp_path: Path, untied: bool) -> None:
    path = tmp_path / "m.gguf"
    _write(path, untied=untied)
    header = read_header(path)
    theirs = gguf.GGUFReader(str(path))
    scalars = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert header.fields == pytest.approx(scalars)
    assert header.array_lengths == {"tokenizer.ggml.tokens": 4, "tokenizer.ggml.scores": 4}
    assert header.tensors == [t.name for t in theirs.tensors]
    assert ("output.weight" in header.tensors) == untied


def test_the_bundled_gguf_lists_the_tensors_the_gguf_package_lists() -> None:
    path = find_bundled_gguf()
    header = read_header(path)
    assert header.tensors == [t.name for t in gguf.GGUFReader(str(path)).tensors]
    assert header.array_lengths["tokenizer.ggml.tokens"] == 49152


def test_a_truncated_or_foreign_file_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path, untied=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(GGUFFormatError, match="past the end|truncated"):
        read_header(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        read_header(other)

"""benchmarks/compression.py's core on a tiny case, so that the script cannot rot unnoticed:
two rounds of a small MLP with two participants, uncompressed and through two codecs (one
plain, one secure), each figure checked against what the codec must send."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_compression", ROOT / "benchmarks" / "compression.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as the script and every node run: on 2 shared cores, two threads
    per process make a tiny model's training many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_tiny_grid_bytes_and_accuracy(bench: ModuleType) -> None:
    task = bench.load_task("mlp16", 2)
    plain = bench.run(task, "identity", 2)
    d = plain.params
    assert d == 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # 64 -> 16 -> 16 -> 10
    assert plain.float32_bytes == 4 * d
    # identity: the float32 values plus the safetensors header, nothing less
    assert 4 * d < plain.bytes_per_update < 4 * d + 1024
    q8 = bench.run(task, "quantize8", 2)
    # one byte a value plus per-tensor scales and a header: about 4x fewer, never 4x or more
    assert 3.5 < q8.ratio < 4.0
    secure = bench.run(task, "randk0.1+secagg", 2)
    k = math.ceil(0.1 * d)  # the round's shared coordinates (randk keeps at least one)
    # the masked vector: k values and the weight slot, 5 bytes each at the default 40 bits
    assert secure.bytes_per_update in {5 * (k + 1), 5 * k}
    assert secure.fixed_point_error is not None and secure.fixed_point_error <= 2.0**-13
    for o in (plain, q8, secure):
        assert 0.0 <= o.accuracy <= 1.0
        assert o.rounds == 2
    # the table row names the setting and its ratio beside the identity reference
    row = bench._row(q8, plain)
    assert "quantize8" in row and f"{q8.ratio:.1f}x fewer" in row and "pts" in row

"""Python models (spec model.kind = "python"): the allow list, the fingerprint, factory errors.

The model code is a real package the tests write under tmp_path and put on sys.path; its
``__init__`` writes a marker file when it is imported, so a test can prove that a refused
factory was never imported.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import fednode.cli
from fednode import factories, training
from fednode.data import load_partition, parse_dataset_spec
from fednode.participant import LimitExceeded, Limits
from fednode.session import model_spec
from protocol import fingerprint, modelspec
from protocol import spec as specmod
from protocol.errors import (
    ModelCodeError,
    ModelMismatch,
    ModelNotAllowed,
    SpecError,
    ValidationError,
)

FACTORY = "netpkg.nets:small"

NETS = """
from torch import nn


def small(hidden=16, classes=10, bn=False):
    width = hidden * {factor}  # another version of the code: another width
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        *([nn.BatchNorm1d(width)] if bn else []),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


def broken(**kw):
    raise ValueError("no such width")


def not_a_model():
    return 42
"""


def write_package(root: Path, *, factor: int = 1) -> Path:
    """``netpkg`` under ``root`` (returned, for sys.path / PYTHONPATH); importing it writes
    ``root/imported``."""
    pkg = root / "netpkg"
    pkg.mkdir(parents=True)
    marker = root / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (pkg / "nets.py").write_text(NETS.format(factor=factor))
    return root


def python_spec(fp: dict[str, Any], **model: Any) -> dict[str, Any]:
    """A checked spec of the python model ``FACTORY`` with fingerprint ``fp``."""
    return specmod.validate(
        {
            "model": {
                "kind": "python",
                "factory": FACTORY,
                "args": {"hidden": 8},
                "input_shape": [1, 8, 8],
                "fingerprint": fp,
                **model,
            },
            "training": {"local_epochs": 1, "batch_size": 32},
        }
    )


FP = {  # what netpkg.nets:small(hidden=8) holds, factor 1
    "1.weight": ["float32", [8, 64]],
    "1.bias": ["float32", [8]],
    "3.weight": ["float32", [10, 8]],
    "3.bias": ["float32", [10]],
}


@pytest.fixture
def code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """netpkg on sys.path (not imported), nothing allowed; both undone afterwards."""
    root = write_package(tmp_path / "code")
    monkeypatch.syspath_prepend(str(root))
    factories.allow([])
    yield root
    monkeypatch.undo()  # the paths first: an entry point a test put there allows no more
    factories.allow([])
    for name in [m for m in sys.modules if m == "netpkg" or m.startswith("netpkg.")]:
        del sys.modules[name]


def test_a_factory_not_allowed_is_refused_before_any_import(code: Path) -> None:
    m = model_spec(python_spec(FP))
    with pytest.raises(ModelNotAllowed) as info:
        factories.build(m)
    assert info.value.code == "MODEL_NOT_ALLOWED"
    assert FACTORY in info.value.message and f"--allow-model {FACTORY}" in info.value.hint
    with pytest.raises(ModelNotAllowed):  # training builds the same way
        training.init_weights(m, 0)
    assert not (code / "imported").exists() and "netpkg" not in sys.modules

    factories.allow([FACTORY])
    built = factories.verify(m)
    assert (code / "imported").exists()
    assert fingerprint.to_spec(built) == FP


def test_the_participant_prices_a_python_model_by_its_fingerprint_before_importing(
    code: Path,
) -> None:
    s = python_spec(FP)
    assert modelspec.param_count(model_spec(s)) == 8 * 64 + 8 + 10 * 8 + 10
    with pytest.raises(LimitExceeded) as info:
        Limits(max_params=100, max_memory=2**30, max_train_s=0).check(s, 1000)
    assert info.value.code == "LIMIT_PARAMS" and FACTORY in info.value.message
    with pytest.raises(LimitExceeded, match="--max-memory"):
        Limits(max_params=10**6, max_memory=10_000, max_train_s=0).check(s, 1000)
    assert not (code / "imported").exists()


def test_an_entry_point_allows_its_factory(code: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = code.parent / "site"
    dist = site / "netpkg_models-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: netpkg-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fednode.models]\nsmall = {FACTORY}\n")
    assert FACTORY not in factories.allow([])
    monkeypatch.syspath_prepend(str(site))
    assert factories.entry_point_factories()[FACTORY] == "small"
    assert FACTORY in factories.allow([])  # reading entry points imports nothing
    assert not (code / "imported").exists()
    factories.build(model_spec(python_spec(FP)))


def test_code_that_differs_is_named_tensor_by_tensor(
    code: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factories.allow([FACTORY])
    wrong = {**FP, "1.weight": ["float32", [16, 64]], "3.bias": ["float64", [10]]}
    del wrong["1.bias"]
    wrong["9.weight"] = ["float32", [2]]
    with pytest.raises(ModelMismatch) as info:
        factories.build(model_spec(python_spec(wrong)))
    msg = info.value.message
    assert info.value.code == "MODEL_MISMATCH" and FACTORY in msg
    assert "tensor '1.weight' has shape [8, 64], expected [16, 64]" in msg
    assert "tensor '3.bias' has dtype float32, expected float64" in msg
    assert "tensor '9.weight' (float32 [2]) is missing" in msg
    assert "tensor '1.bias' (float32 [8]) is extra" in msg

    # BatchNorm's running statistics travel and are fingerprinted; its counter does not
    with pytest.raises(ModelMismatch, match=r"'2.running_mean' \(float32 \[8\]\) is extra"):
        factories.build(model_spec(python_spec(FP, args={"hidden": 8, "bn": True})))
    # the output must be the task's: 10 classes asked, the model gives 3
    with pytest.raises(ModelMismatch, match=r"outputs \[2, 3\] for a batch of 2.*\[2, 10\]"):
        fp3 = {**FP, "3.weight": ["float32", [3, 8]], "3.bias": ["float32", [3]]}
        factories.verify(model_spec(python_spec(fp3, args={"hidden": 8, "classes": 3})))


def test_differences_is_empty_for_the_same_model() -> None:
    fp = fingerprint.parse(FP)
    assert fingerprint.differences(fp, dict(reversed(fp.items()))) == []  # order is not identity


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("netpkg.nets:broken", r"raised ValueError: no such width"),
        ("netpkg.nets:not_a_model", r"returned int, not a torch nn.Module"),
        ("netpkg.nets:missing", r"cannot be loaded on this node: AttributeError"),
        ("nopkg.nets:small", r"cannot be loaded on this node: ModuleNotFoundError"),
    ],
)
def test_a_failing_factory_is_a_typed_error_naming_it(code: Path, factory: str, match: str) -> None:
    factories.allow([factory])
    with pytest.raises(ModelCodeError, match=match) as info:
        factories.build(model_spec(python_spec(FP, factory=factory, args={})))
    assert info.value.code == "MODEL_BUILD_FAILED" and factory in info.value.message


def test_fednode_fingerprint_prints_what_the_spec_takes_and_a_python_model_trains(
    code: Path,
) -> None:
    out = CliRunner().invoke(
        fednode.cli.app, ["fingerprint", FACTORY, "--args", '{"hidden": 8, "bn": true}']
    )
    assert out.exit_code == 0, out.output
    line = out.output.strip()
    assert line.startswith("fingerprint = {") and "num_batches_tracked" not in line
    raw = tomllib.loads(
        f'[model]\nkind = "python"\nfactory = "{FACTORY}"\nargs = {{ hidden = 8, bn = true }}'
        f"\ninput_shape = [1, 8, 8]\n{line}\n[training]\nlocal_epochs = 1\n"
    )
    s = specmod.validate(raw)  # pasted as printed, it validates
    assert s["model"]["fingerprint"]["2.running_var"] == ["float32", [8]]

    factories.allow([FACTORY])
    m = model_spec(s)
    w = training.init_weights(m, 0)
    assert {k: tuple(v.shape) for k, v in w.items()} == modelspec.shapes(m)
    assert all(v.dtype == np.float32 for v in w.values())  # the wire stays float32
    data = load_partition(
        parse_dataset_spec("digits:0/1"), features="standardize", partition="iid", seed=0
    )
    cfg = training.TrainConfig(local_epochs=2, batch_size=32, lr=0.1, optimizer="sgd", momentum=0.0)
    trained = training.train(m, w, data, cfg).weights
    acc, _loss = training.evaluate(m, trained, data)
    assert acc > 0.8, acc  # the 8x8 images reshaped to [1, 8, 8], flattened by the model

    bad = CliRunner().invoke(fednode.cli.app, ["fingerprint", "netpkg.nets:broken", "--json"])
    assert bad.exit_code == 1 and "MODEL_BUILD_FAILED" in bad.output
    assert json.loads(bad.output.strip().splitlines()[-1])["error"]["code"] == "MODEL_BUILD_FAILED"


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"fingerprint": {}}, "needs model.fingerprint"),
        ({"input_shape": []}, "needs model.input_shape"),
        ({"factory": "os.system"}, "is not a factory name"),
        ({"factory": "a.b:c; rm"}, "is not a factory name"),
        ({"args": {"x": {"nested": 1}}}, r"model.args.x = .* is not accepted"),
        ({"args": {"1x": 1}}, "is not a keyword argument name"),
        ({"fingerprint": {"a": ["float33", [1]]}}, r"model.fingerprint\['a'\]"),
        ({"fingerprint": {"a": ["float32", [-1]]}}, r"model.fingerprint\['a'\]"),
        ({"layers": [{"type": "relu"}]}, "model.layers is set"),
        ({"inputs": 10}, "model.inputs = 10 but model.input_shape gives 64"),
    ],
)
def test_python_specs_are_checked(model: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        python_spec(FP, **model)


def test_factory_fields_need_kind_python() -> None:
    with pytest.raises(SpecError, match=r"model.factory is set but model.kind = 'mlp'"):
        specmod.validate({"model": {"factory": FACTORY}})


def test_allow_model_refuses_a_malformed_name() -> None:
    with pytest.raises(ValidationError, match="--allow-model"):
        factories.allow(["netpkg/nets.py"])
    factories.allow([])

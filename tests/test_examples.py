"""Every example is ready to run: its spec.toml validates with the project's spec loader and
`fedctl model describe` prices its model, and its make_data.py writes data that the
participant's loader (fednode.data.load_split, through the spec's schema) reads as the spec
says: the model's input width, the classes, a held-out split to evaluate on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fednode.data import load_split
from fednode.schema import Schema
from protocol import modelspec
from protocol import spec as specmod
from tests.conftest import cli_json
from tests.examples_helpers import EXAMPLES, NAMES, example_spec, make_data

STEPS = (
    "make_data.py",
    "fedctl model describe",
    "fednode run --role participant",
    "fedctl session create",
    "fedctl session start",
    "fedctl report",
)


def test_every_example_folder_is_listed_and_complete() -> None:
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and p.name[0] != "_")
    assert folders == sorted(NAMES)
    index = (EXAMPLES / "README.md").read_text()
    for name in NAMES:
        assert {"spec.toml", "README.md", "make_data.py"} <= {
            p.name for p in (EXAMPLES / name).iterdir()
        }
        assert f"({name}/)" in index, f"examples/README.md does not link {name}/"
        readme = (EXAMPLES / name / "README.md").read_text()
        # the steps a user runs, with the exact commands
        for command in STEPS:
            assert command in readme, f"{name}/README.md lacks {command!r}"
        assert "../shared" not in readme


@pytest.mark.parametrize("name", NAMES)
def test_the_spec_validates_and_its_model_is_described(name: str) -> None:
    spec = example_spec(name)
    assert spec["model"]["kind"] == "layers"
    assert spec["data"]["dataset"] == "none" and spec["evaluation"]["on"] == "participants"
    model = {k: spec["model"][k] for k in modelspec.MODEL_KEYS}
    described = modelspec.describe(model, spec["training"])
    assert described["params"] == modelspec.param_count(model) > 0
    assert described["layers"][-1]["output_shape"] == [
        1 if spec["model"]["task"] in ("binary", "regression") else spec["model"]["classes"]
    ]


def test_fedctl_model_describe_prints_the_mnist_cnn() -> None:
    got = cli_json("model", "describe", str(EXAMPLES / "mnist-cnn-idx" / "spec.toml"))
    assert got["ok"] and got["input_shape"] == [1, 28, 28]
    assert [layer["type"] for layer in got["layers"]] == [
        "conv2d", "relu", "maxpool2d", "conv2d", "relu", "maxpool2d",
        "flatten", "linear", "relu", "dropout", "linear",
    ]  # fmt: skip
    assert [layer["output_shape"] for layer in got["layers"]][5:7] == [[64, 7, 7], [3136]]
    assert got["params"] == 421_642


# (source form, what make_data.py returns is a list of these, train rows, test rows) with
# two participants; the test rows are what each source holds out
DATA = {
    "mnist-cnn-idx": ("idx", 719, 180),  # 719 of the 1437 train digits, t10k: 180 of 360
    "tabular-csv": ("csv", 160, 40),  # 200 rows, seeded 20 % held out
    "image-folder": ("images", 720, 179),  # 899 of the 1797 images, seeded 20 %
    "regression": ("parquet", 160, 40),  # 200 rows, the split column's 20 %
}


@pytest.mark.parametrize("name", NAMES)
def test_make_data_writes_what_the_spec_reads(name: str, tmp_path: Path) -> None:
    kind, n_train, n_test = DATA[name]
    module = make_data(name)
    kwargs = {"rows": 200} if name in ("tabular-csv", "regression") else {}
    written = module.write_participants(tmp_path, 2, **kwargs)
    assert len(written) == 2 and all(p.exists() for p in written)
    spec = example_spec(name)
    schema = Schema.from_spec(spec)
    train, test = load_split(
        f"{kind}:{written[0]}", features=spec["data"]["features"], seed=0, schema=schema
    )
    assert train.x.shape[1] == spec["model"]["inputs"]
    assert (len(train), len(test)) == (n_train, n_test)
    assert np.isfinite(train.x).all() and np.isfinite(test.x).all()
    if spec["model"]["task"] == "regression":
        assert train.y.dtype == np.float32 and 20 < float(train.y.mean()) < 60
    else:
        classes = 2 if spec["model"]["task"] == "binary" else spec["model"]["classes"]
        assert train.y.dtype == np.int64 and set(train.y.tolist()) == set(range(classes))
    if name == "mnist-cnn-idx":
        # pixels scaled to 0..1, then MNIST's mean and std
        lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
        assert train.x.min() == pytest.approx(lo, abs=1e-5) and train.x.max() <= hi + 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_the_validated_spec_validates_again(name: str) -> None:
    """fedctl sends the spec it validated; the coordinator validates it again (and again at
    each restart). A regression's derived model.classes (1 output) must pass the second
    time too."""
    spec = example_spec(name)
    assert specmod.validate(spec) == spec

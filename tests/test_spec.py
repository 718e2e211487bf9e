"""Session spec validation: every error path names the field and what is accepted."""

from __future__ import annotations

import tomllib

import pytest

from protocol import secagg, spec
from protocol.errors import SpecError
from protocol.identity import Identity


def test_template_is_complete_and_valid() -> None:
    text = spec.template()
    parsed = tomllib.loads(text)
    assert spec.validate(parsed) == spec.defaults()
    for section, fields in spec.SCHEMA.items():
        target = parsed[section] if section else parsed
        assert set(fields) <= set(target)


def test_demo_defaults_match_the_converging_recipe() -> None:
    d = spec.defaults()
    assert d["training"] == {
        "local_epochs": 2,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 0.0,
    }
    assert d["data"]["features"] == "standardize"
    assert d["model"]["hidden"] == [128, 128]


@pytest.mark.parametrize(
    ("raw", "field", "accepted"),
    [
        ({"rounds": 0}, "rounds", "[1, 100000]"),
        ({"rounds": "ten"}, "rounds", "an integer"),
        ({"rounds": True}, "rounds", "an integer"),
        ({"training": {"lr": -1}}, "training.lr", "[1e-09, 10]"),
        ({"training": {"optimizer": "lbfgs"}}, "training.optimizer", "sgd, adam"),
        ({"data": {"partition": "random"}}, "data.partition", "iid, stratified"),
        ({"data": {"dataset": "mnist"}}, "data.dataset", "digits, csv:/path, parquet:/path"),
        ({"model": {"hidden": [128, "x"]}}, "model.hidden", "list of at most 16 integers"),
        ({"model": {"hidden": [0]}}, "model.hidden", "[1, 65536]"),
        ({"aggregation": {"strategy": "fedsgd"}}, "aggregation.strategy", "fedavg"),
        ({"aggregation": {"max_weight": 0}}, "aggregation.max_weight", "[1, 1073741824]"),
        ({"aggregation": {"max_weight": 2**30 + 1}}, "aggregation.max_weight", "[1, 1073741824]"),
        ({"aggregation": {"max_weight": 1.5}}, "aggregation.max_weight", "an integer"),
        ({"name": "has space"}, "name", "letters, digits"),
        ({"participants": ["not-a-peer"]}, "participants", "12D3KooW"),
    ],
)
def test_bad_values_name_field_value_and_range(raw: dict, field: str, accepted: str) -> None:
    with pytest.raises(SpecError) as exc:
        spec.validate(raw)
    msg = exc.value.message + " " + exc.value.hint
    assert field in msg and accepted in msg
    assert exc.value.code == "SPEC_INVALID"


def test_unknown_fields_refused() -> None:
    with pytest.raises(SpecError, match="unknown field 'epochs'"):
        spec.validate({"epochs": 3})
    with pytest.raises(SpecError, match=r"unknown field training\.epochs") as exc:
        spec.validate({"training": {"epochs": 3}})
    assert "local_epochs" in exc.value.hint
    with pytest.raises(SpecError, match=r"\[training\] must be a table"):
        spec.validate({"training": 3})


def test_cross_field_checks() -> None:
    with pytest.raises(SpecError, match="max_participants = 2 is below"):
        spec.validate({"min_participants": 3, "max_participants": 2})
    assert spec.validate({"aggregation": {"secure": True}})["aggregation"]["secure"]
    with pytest.raises(SpecError, match="neighbours"):
        spec.validate({"aggregation": {"neighbours": 3}})  # k-regular graphs need an even k
    assert spec.validate({"aggregation": {"neighbours": 4}})["aggregation"]["neighbours"] == 4


def test_max_weight_defaults_to_the_secagg_bound_and_reaches_the_round_params() -> None:
    agg = spec.defaults()["aggregation"]
    assert agg["max_weight"] == secagg.MAX_WEIGHT == 2**16
    assert "max_weight = 65536" in spec.template()
    small = spec.validate({"aggregation": {"secure": True, "bits": 48, "max_weight": 2**17}})
    p = secagg.params_from_spec(small["aggregation"], 100, b"t", bytes(32))
    assert p.max_weight == 2**17 and p.frac_bits >= 16


def test_secure_defaults_send_5_bytes_per_value_with_12_fraction_bits_for_100() -> None:
    agg = spec.validate({"aggregation": {"secure": True}})["aggregation"]
    assert (agg["bits"], agg["clip"], agg["max_weight"]) == (40, 8.0, 2**16)
    p = secagg.params_from_spec(agg, 100, b"t", bytes(32))
    assert secagg.value_bytes(p) == 5 and p.frac_bits == secagg.DEFAULT_FRAC_BITS >= 12
    assert "update" in spec.SCHEMA["aggregation"]["clip"].doc  # clip bounds w - g, not w


@pytest.mark.parametrize(
    ("raw", "n", "why"),
    [
        ({}, "1000", "assumed when max_participants = 0"),
        ({"max_participants": 400}, "400", "max_participants"),
        ({"participants": [Identity.generate().peer_id for _ in range(3)]}, "3", "listed"),
    ],
)
def test_secure_fixed_point_without_8_fraction_bits_is_refused(raw: dict, n: str, why: str) -> None:
    # 32 bits, clip 100, 2**16 examples: n * 2**16 * ceil(100 * 2**8) overflows 2**31 for n >= 2
    bad = {**raw, "aggregation": {"secure": True, "bits": 32, "clip": 100.0}}
    with pytest.raises(SpecError) as exc:
        spec.validate(bad)
    msg = exc.value.message
    for name in ("aggregation.bits = 32", "aggregation.clip = 100", "aggregation.max_weight"):
        assert name in msg
    assert f"fewer than 8 fraction bits for {n} participants" in msg and why in msg
    assert "raise aggregation.bits to" in exc.value.hint
    assert "lower aggregation.clip to" in exc.value.hint
    assert exc.value.code == "SPEC_INVALID"
    # every fix the hint names is accepted, one at a time
    for fix in exc.value.hint.split("; or "):
        field, value = fix.split(" to ")[0].split()[-1], fix.split(" to ")[1].split()[0]
        section, key = field.split(".") if "." in field else ("", field)
        number = float(value) if key == "clip" else int(value)
        fixed = {**bad, "aggregation": dict(bad["aggregation"])}
        (fixed["aggregation"] if section else fixed)[key] = number
        spec.validate(fixed)


def test_the_fixed_point_check_applies_to_secure_specs_only() -> None:
    plain = spec.validate({"aggregation": {"bits": 32, "clip": 100.0}})
    assert plain["aggregation"]["secure"] is False
    # the old defaults (62 bits, clip 100, 2**20) still validate when chosen
    old = {"secure": True, "bits": 62, "clip": 100.0, "max_weight": 2**20}
    assert spec.validate({"aggregation": old})["aggregation"]["bits"] == 62
    with pytest.raises(SpecError, match="for 1000 participants") as exc:
        spec.validate({"aggregation": {"secure": True, "clip": 100.0}})  # the old clip, 40 bits
    assert "lower aggregation.max_weight to 21474 or less" in exc.value.hint


def test_files(tmp_path) -> None:
    ok = tmp_path / "s.toml"
    ok.write_text("rounds = 4\n[training]\nlr = 0.1\n")
    loaded = spec.load(ok)
    assert loaded["rounds"] == 4 and loaded["training"]["lr"] == 0.1
    js = tmp_path / "s.json"
    pid = Identity.generate().peer_id
    js.write_text(f'{{"participants": ["{pid}"]}}')
    assert spec.load(js)["participants"] == [pid]
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(SpecError, match="not valid TOML"):
        spec.load(bad)
    with pytest.raises(SpecError, match="cannot read"):
        spec.load(tmp_path / "missing.toml")


def test_rollback_defaults_and_template() -> None:
    assert spec.defaults()["rollback"] == {"enabled": True, "margin": 0.05, "rounds": 2}
    text = spec.template()
    assert "\n[rollback]\n" in text
    for line in ("enabled = true", "margin = 0.05", "rounds = 2"):
        assert line in text
    assert "(0.001..1)" in text and "(1..1000)" in text
    got = spec.validate({"rollback": {"enabled": False, "margin": 0.1, "rounds": 3}})
    assert got["rollback"] == {"enabled": False, "margin": 0.1, "rounds": 3}
    assert spec.validate({"rollback": {"margin": 1}})["rollback"]["margin"] == 1.0


@pytest.mark.parametrize(
    ("raw", "field", "accepted"),
    [
        ({"enabled": "yes"}, "rollback.enabled", "true or false"),
        ({"enabled": 1}, "rollback.enabled", "true or false"),
        ({"margin": 0.0}, "rollback.margin", "[0.001, 1]"),
        ({"margin": 1.5}, "rollback.margin", "[0.001, 1]"),
        ({"margin": "5%"}, "rollback.margin", "a number"),
        ({"margin": float("nan")}, "rollback.margin", "a number"),
        ({"rounds": 0}, "rollback.rounds", "[1, 1000]"),
        ({"rounds": 1001}, "rollback.rounds", "[1, 1000]"),
        ({"rounds": 2.0}, "rollback.rounds", "an integer"),
        ({"rounds": True}, "rollback.rounds", "an integer"),
    ],
)
def test_bad_rollback_values_name_field_and_range(raw: dict, field: str, accepted: str) -> None:
    with pytest.raises(SpecError) as exc:
        spec.validate({"rollback": raw})
    msg = exc.value.message + " " + exc.value.hint
    assert field in msg and accepted in msg and exc.value.code == "SPEC_INVALID"


def test_unknown_rollback_field_refused() -> None:
    with pytest.raises(SpecError, match=r"unknown field rollback\.k") as exc:
        spec.validate({"rollback": {"k": 2}})
    assert "margin" in exc.value.hint

"""The one method-spec parser (awqnb.compare.specs): every form, one-line errors, label round trip."""
from __future__ import annotations

import pytest

from awqnb.compare import specs
from awqnb.compare.specs import MethodSpec, ParsedSpec, parse_spec, parse_specs, parse_value, split_specs
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError


@pytest.mark.parametrize("text, kind, method, search, params, config, calibration", [
    ("awq", "awqnb", "awq", {}, {}, {}, {}),
    ("robust_praq@n_calib=16", "awqnb", "robust_praq", {}, {}, {}, {"n_calib": 16}),
    ("awq_gqa@gqa_rope=false", "awqnb", "awq_gqa", {}, {"gqa_rope": False}, {}, {}),
    ("awq_sh@outlier_percent=1", "awqnb", "awq_sh", {}, {"outlier_percent": 1}, {}, {}),
    ("awq_sh@outlier_percent=0.5", "awqnb", "awq_sh", {}, {"outlier_percent": 0.5}, {}, {}),
    ("awq_ref", "awqnb", "awq", {"salience": "l1", "duo_scaling": True, "clip": True, "propagate": "fp"}, {}, {}, {}),
    ("awq_ref@clip=false", "awqnb", "awq", {"salience": "l1", "duo_scaling": True, "clip": False, "propagate": "fp"},
     {}, {}, {}),
    ("full_praq", "awqnb", "full_praq", {}, {}, {}, {}),
    ("awq@salience=l1,n_grid=10,dtype=float32,bits=3,calib_seqlen=256,calib_dataset=c4", "awqnb", "awq",
     {"salience": "l1", "n_grid": 10}, {}, {"dtype": "float32", "bits": 3}, {"seqlen": 256, "dataset": "c4"}),
    ("fp", "fp", "fp", {}, {}, {}, {}),
    ("llmc_awq", "reference", "llmc_awq", {}, {}, {}, {}),
    ("llmc_gptq@n_calib=32", "reference", "llmc_gptq", {}, {}, {}, {"n_calib": 32}),
])
def test_each_form_parses(text, kind, method, search, params, config, calibration):
    p = parse_spec(text)
    assert (p.label, p.kind, p.method) == (text, kind, method)
    assert (dict(p.search), dict(p.params), dict(p.config), dict(p.calibration)) == (search, params, config, calibration)
    assert parse_spec(p.label) == p  # the label round-trips
    assert parse_spec(p.text).overrides == p.overrides  # and so does the canonical spelling


def test_build_gives_the_runner_spec():
    ref = parse_spec("awq_ref").build(QuantConfig(4, 64), SearchConfig(), None, 43, dtype="float32")
    assert isinstance(ref, MethodSpec) and ref.kind == "awqnb" and ref.method == "awq"
    assert ref.config.search.salience == "l1" and ref.config.search.duo_scaling and ref.config.search.clip
    assert ref.config.search.propagate == "fp" and ref.config.quant.group_size == 64 and ref.config.seed == 43
    assert parse_spec("awq@dtype=bfloat16").build(dtype="float32").config.dtype == "bfloat16"  # the spec wins
    full = parse_spec("full_praq").build(QuantConfig(4, 64))
    assert full.method == "praq" and full.config.quant.group_size == -1
    rp = parse_spec("robust_praq@n_calib=16").build()
    assert rp.calibration == {"n_calib": 16} and parse_spec("robust_praq@n_calib=16").run == {"n_calib": 16}
    fp = parse_spec("fp").build()
    assert fp.config is None and fp.kind == "fp" and not fp.needs_calibration


def test_values():
    assert [parse_value(v) for v in ("3", "-2", "0.5", "1e-3", "true", "FALSE", "l1")] == [3, -2, 0.5, 1e-3, True,
                                                                                          False, "l1"]
    assert specs.parse_assignment("outlier-percent=5", "--param") == ("outlier_percent", 5)


@pytest.mark.parametrize("text, match", [
    ("nope", r"unknown method 'nope'; use a registered method"),
    ("awq@foo=1", r"awq has no parameter 'foo'"),
    ("rtn@outlier_percent=3", r"rtn has no parameter 'outlier_percent'"),
    ("awq@n_grid=abc", r"n_grid=abc is not an int"),
    ("awq_gqa@gqa_rope=1", r"gqa_rope=1 is not a bool"),
    ("awq@salience=l3", r"salience='l3' is unknown"),
    ("awq@n_grid", r"must look like key=value"),
    ("fp@outlier_percent=1", r"fp takes no search, config or method parameters"),
    ("llmc_awq@salience=l1", r"llmc_awq takes no search"),
    ("awq@", r"has '@' but no overrides"),
    ("awq@n_grid=5,n_grid=6", r"sets n_grid twice"),
])
def test_mistakes_are_one_line(text, match):
    with pytest.raises(AwqnbError, match=match) as e:
        parse_spec(text)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"method spec {text!r}")


def test_method_params_are_checked_when_built():
    with pytest.raises(AwqnbError, match="has no parameter") as e:
        parse_spec("rtn").build(params={"outlier_percent": 3})
    assert "\n" not in str(e.value)


def test_lists():
    assert split_specs("fp, awq_sh@outlier_percent=1,n_grid=10 ,rtn,") == ["fp", "awq_sh@outlier_percent=1,n_grid=10",
                                                                         "rtn"]
    got = parse_specs("fp,awq_ref,awq@salience=l1,n_grid=10,llmc_gptq")
    assert [p.label for p in got] == ["fp", "awq_ref", "awq@salience=l1,n_grid=10", "llmc_gptq"]
    assert [p.kind for p in got] == ["fp", "awqnb", "awqnb", "reference"]
    assert parse_specs(["awq", parse_spec("rtn")])[1] == parse_spec("rtn")
    assert all(isinstance(p, ParsedSpec) for p in got)
    for bad, match in (("awq,awq", "given twice"), ("", "no method specs"), ("n_grid=3,awq", "override without a method"),
                       ("awq,n_grid=3", "override without a method")):
        with pytest.raises(AwqnbError, match=match):
            parse_specs(bad)


def test_runner_and_claims_take_specs():
    from awqnb.compare.claims import method_configs
    from awqnb.compare.runner import method_specs

    got = method_specs("fp,awq_ref,robust_praq@n_calib=16,llmc_awq", quant=QuantConfig(4, 64), dtype="float32")
    assert [(s.label, s.method, s.kind) for s in got] == [("fp", "fp", "fp"), ("awq_ref", "awq", "awqnb"),
                                                          ("robust_praq@n_calib=16", "robust_praq", "awqnb"),
                                                          ("llmc_awq", "llmc_awq", "reference")]
    assert got[1].config.search.salience == "l1" and got[1].config.dtype == "float32"
    assert got[2].calibration == {"n_calib": 16}
    cfgs = method_configs(["awq_sh@outlier_percent=1", "awq_ref"], None, QuantConfig(), SearchConfig(),
                          {"awq_sh": {"outlier_percent": 3}})
    assert cfgs["awq_sh@outlier_percent=1"].params == {"outlier_percent": 1}  # the spec wins
    assert cfgs["awq_ref"].search.clip

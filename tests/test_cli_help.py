"""The command line explains itself: every option of `quantize` and `eval` has help that states its
default, `quantize --list` says what each method is, and the bare commands work on every model."""
import argparse
import re

import pytest

from awqnb import cli


def _sub(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", ["quantize", "eval"])
def test_every_option_has_help_that_states_its_default(name):
    p = _sub(name)
    fmt = p._get_formatter()
    missing = []
    for a in p._actions:
        if not a.option_strings or a.dest == "help":
            continue
        text = fmt._expand_help(a) if a.help else ""
        if not text or "default" not in text:
            missing.append(a.option_strings[0])
    assert not missing, f"options without help or default: {missing}"
    assert p.description  # the subcommand says what it does


def test_quantize_list_describes_every_method(capsys):
    from awqnb.quant.methods import REGISTRY

    assert cli.main(["quantize", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == sorted(REGISTRY)
    assert all(len(ln.split(None, 1)) == 2 and len(ln.split(None, 1)[1]) > 15 for ln in lines), lines


def test_default_group_size_fits_the_model():
    from awqnb.model.loading import load_model

    model, _ = load_model("tiny-random-llama")  # 160-wide layers: 128 and 64 do not divide them
    assert cli._default_group_size(model) == 32


def test_bare_quantize_works_on_a_model_128_does_not_divide(tmp_path, capsys):
    """`awqnb quantize --model tiny-random-llama` (README's first example, no --group-size) runs."""
    assert cli.main(["quantize", "--model", "tiny-random-llama", "--method", "rtn",
                     "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"_w4_g32_", out) and (tmp_path / out.rsplit("/", 1)[-1] / "config.json").is_file()

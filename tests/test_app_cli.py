"""``sinder-hub view``'s flags: every bad value is one line naming the flag and what was expected, before any model."""

from __future__ import annotations

import pytest

from sinder_hub.cli import main as cli_main

pytest.importorskip("gradio", reason="the viewer needs the app extra: pip install -e '.[app]'")
import sinder_hub.app  # noqa: E402


def view(*argv: str) -> int:
    """``sinder-hub view ARGV`` in this process: its exit code (argparse's errors exit through ``SystemExit``)."""
    try:
        return cli_main(["view", *argv])
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (("--port", "0"), "argument --port: expected a port number from 1 to 65535, got '0'"),
        (("--port", "x"), "argument --port: expected a port number from 1 to 65535, got 'x'"),
        (("--port", "65536"), "argument --port: expected a port number from 1 to 65535, got '65536'"),
        (("--resolution", "-3"), "argument --resolution: expected a positive integer, got '-3'"),
        (("--max-pixels", "0"), "argument --max-pixels: expected a positive integer, got '0'"),
        (("--max-pixels", "1e6"), "argument --max-pixels: expected a positive integer, got '1e6'"),
    ],
)
def test_bad_flag_values_are_one_line_naming_the_flag(argv, line, capsys, no_model):
    assert view(*argv) == 2
    assert capsys.readouterr().err == f"error: sinder-hub view: {line} (see --help)\n"


def test_too_many_or_twice_labelled_compare_specs_fail_before_gradio_starts(capsys, monkeypatch, no_model):
    monkeypatch.setattr(sinder_hub.app, "build_app", lambda **kwargs: pytest.fail("the app was built"))
    assert view("--compare", *["planted-gelu"] * 6) == 2
    assert capsys.readouterr().err == (
        "error: --compare: at most 5 specs besides --model (6 variants side by side), got 6\n"
    )
    assert view("--model", "a=planted-swiglu", "--compare", "a=planted-gelu") == 2
    assert capsys.readouterr().err == "error: --compare: the label 'a' is given twice; expected one label per variant\n"


def test_model_and_compare_reach_build_app_in_order(monkeypatch, no_model):
    built = {}

    class Launched:
        def launch(self, **kwargs):
            built["launch"] = kwargs

    monkeypatch.setattr(sinder_hub.app, "build_app", lambda **kwargs: built.update(kwargs) or Launched())
    assert view("--compare", "sinder=demo-output/run", "planted-gelu", "--port", "7861", "--max-pixels", "1000") == 0
    assert built["models"] == ["planted-swiglu", "sinder=demo-output/run", "planted-gelu"]
    assert built["max_pixels"] == 1000 and built["launch"]["server_port"] == 7861
    assert view() == 0 and built["models"] is None  # build_app's default: default_models()

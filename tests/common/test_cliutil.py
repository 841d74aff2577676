"""What the commands share: library errors and warnings become one stderr line each."""
import warnings

import pytest
import typer

from itm.common.cli import user_errors
from itm.common.errors import ItmError, ItmWarning


def test_library_warnings_are_printed_as_one_line(capsys):
    with user_errors("itm-x"):
        warnings.warn("bf16 is slow here; use --precision fp32", ItmWarning)
        warnings.warn("bf16 is slow here; use --precision fp32", ItmWarning)  # each time, not once per place
    assert capsys.readouterr().err == "itm-x: warning: bf16 is slow here; use --precision fp32\n" * 2


def test_errors_are_one_line_and_exit_1(capsys):
    with pytest.raises(typer.Exit) as info, user_errors("itm-x"):
        raise ItmError("index at /x is broken; rebuild it")
    assert info.value.exit_code == 1
    assert capsys.readouterr().err == "itm-x: error: index at /x is broken; rebuild it\n"

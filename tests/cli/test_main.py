"""The `umit` front door: help lists every stage, --version, clear errors, bad overrides."""

from __future__ import annotations

import subprocess
import sys

import pytest

from umit import __version__
from umit.cli.main import STAGES, main


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run(
        [sys.executable, "-m", "umit.cli.main", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"umit {__version__}"


def test_no_stage_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "STAGE" in capsys.readouterr().out


def test_bad_override_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "raw"), "wrokers=2"]) == 2
    err = capsys.readouterr().err
    assert "umit ingest: error:" in err and "wrokers" in err


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "raw")]) == 2
    assert "does not exist" in capsys.readouterr().err

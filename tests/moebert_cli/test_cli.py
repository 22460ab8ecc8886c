"""The `moebert` command table (moebert_cli): every application's commands are listed, a command whose
package is missing says so, and the model package imports no application."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moebert_cli import COMMANDS, build_parser, main


def test_every_command_is_listed_with_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help column
    for name, command in COMMANDS.items():
        assert name in out and " ".join(command.help.split()[:3]) in out, name


def test_each_command_parses_its_own_flags():
    parser = build_parser()
    assert parser.parse_args(["convert", "t", "-o", "x"]).run.__name__ == "run_convert"
    assert parser.parse_args(["export-onnx", "m"]).run.__name__ == "run_export_onnx"
    assert parser.parse_args(["finetune", "--task", "sst2", "-o", "x"]).run.__name__ == "run_finetune"
    assert parser.parse_args(["serve"]).run.__name__ == "run_serve"


def test_a_command_of_a_missing_package_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "training.cli", None)  # import of training.cli → ModuleNotFoundError
    assert main(["finetune", "--task", "sst2", "-o", "x"]) == 2
    err = capsys.readouterr().err
    assert "moebert finetune: error: needs the `training` package" in err
    assert build_parser().parse_args(["serve"]).run.__name__ == "run_serve"  # the other applications still run


def test_the_model_package_imports_no_application():
    code = (
        "import sys, moebert, moebert.cli, moebert.modeling, moebert.convert, moebert.loading, moebert.qa, "
        "moebert.onnx_export, moebert.remote_code\n"
        "apps = sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'server', 'moebert_cli'))\n"
        "assert not apps, apps"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_python_dash_m_is_the_moebert_command():
    run = subprocess.run([sys.executable, "-m", "moebert_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "pipeline" in run.stdout and "serve" in run.stdout


@pytest.mark.parametrize(
    ("flags", "setting"),
    [(["--backend", "gpu"], "backend"), (["--device", "tpu"], "device"), (["--log-level", "loud"], "log_level")],
)
def test_a_serve_flag_and_its_environment_variable_share_one_check(flags, setting, monkeypatch, capsys):
    assert main(["serve", *flags]) == 2
    flag_error = capsys.readouterr().err
    assert f"invalid settings: {setting}:" in flag_error
    monkeypatch.setenv(f"MOEBERT_SERVE_{setting.upper()}", flags[1])
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == flag_error

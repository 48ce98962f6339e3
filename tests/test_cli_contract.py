"""The command line's contract: every command explains itself, and bad input is one line.

Every command and sub-command answers ``--help`` with a description and its defaults; every bad
input (a missing path, a text file named ``.dcm``, a wrong value, an ``--out`` that cannot be
written) ends with exit 2 (usage) or 1 (failure, 3 for an un-migrated database) and one line on
stderr, never a traceback. Most cases run in-process through ``main()`` for speed; the real
entry points (``python -m her2low|dicom_node|cds_service|models.cli``) run as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from her2low.cli import MODULES, build_parser, main
from tests.conftest import free_port
from tests.dicom_builders import base_dataset, write
from tests.system import popen_group, stop_group

ENTRY_POINTS = ("her2low", "dicom_node", "cds_service", "models.cli")


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (command path, parser) below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                path = f"{parser.prog} {name}".removeprefix("her2low ").strip()
                yield path, child
                yield from _subparsers(child)


ALL_COMMANDS = sorted({path for name in MODULES for path, _ in _subparsers(build_parser(name))})


def test_every_command_is_listed() -> None:
    assert set(MODULES) <= set(ALL_COMMANDS)
    for nested in (
        "model schema",
        "model list",
        "model add",
        "model compare",
        "db upgrade",
        "demo token",
    ):
        assert nested in ALL_COMMANDS


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_help_has_a_description_and_every_option_explained(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: her2low")
    parsers = dict(_subparsers(build_parser(command.split()[0])))
    parser = parsers[command]
    assert parser.description and len(parser.description) > 40, command
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions), command
        elif not isinstance(action, argparse._HelpAction):
            assert action.help, f"{command} {action.dest} has no help"
            if action.option_strings and action.default is not None and action.default is not False:
                flat = " ".join(out.split())
                assert f"(default: {action.default})" in flat, f"{command} {action.dest}"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_answer_help(module: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HER2LOW_HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Names used in the bad-input table, made in a private folder (parallel-safe)."""
    monkeypatch.setenv("HER2LOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.dcm"
    text.write_text("this is not DICOM\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    folder = tmp_path / "folder"
    folder.mkdir()
    mr = base_dataset(study_uid="1.2.3.4", series_uid="1.2.3.4.5", instance=1)
    write(mr, folder / "mr.dcm")
    csv = tmp_path / "cohort.csv"
    csv.write_text("her2_group,dapp_mean\nlow,1.1\n")
    return {
        "MISSING": str(tmp_path / "nowhere"),
        "TEXT_DCM": str(text),
        "FILE": str(a_file),
        "UNWRITABLE": str(a_file / "sub"),  # under a file: not writable even for root
        "BUSY": str(busy),
        "FOLDER": str(folder),
        "MR_DCM": str(folder / "mr.dcm"),
        "OUT": str(tmp_path / "out"),
        "CSV": str(csv),
    }


BAD_INPUT: list[tuple[str, set[int]]] = [
    ("bogus", {2}),
    ("model", {2}),
    ("db", {2}),
    ("config --bogus", {2}),
    ("inspect MISSING", {2}),
    ("inspect TEXT_DCM", {1}),
    ("fit MISSING --out OUT", {2}),
    ("fit TEXT_DCM --out OUT", {1}),
    ("fit FOLDER", {2}),
    ("fit FOLDER --out FILE", {2}),
    ("fit FOLDER --out UNWRITABLE", {1}),
    ("fit FOLDER --roi TEXT_DCM --out OUT", {2}),
    ("fit FOLDER --roi MR_DCM --out OUT", {2}),
    ("fit FOLDER --roi MISSING --out OUT", {2}),
    ("fit FOLDER --jobs 0 --out OUT", {2}),
    ("fit FOLDER --jobs -3 --out OUT", {2}),
    ("fit FOLDER --method lsq --out OUT", {2}),
    ("fit FOLDER --out OUT", {1}),  # an MR image but no diffusion series: says why
    ("synth", {2}),
    ("synth --out FILE", {2}),
    ("synth --out UNWRITABLE", {1, 2}),
    ("synth --out BUSY", {2}),
    ("synth --out OUT --snr 0", {2}),
    ("synth --out OUT --snr abc", {2}),
    ("synth --out OUT --vendor toshiba", {2}),
    ("synth --out OUT --seed -1", {2}),
    ("model schema --bogus", {2}),
    ("model list MISSING", {1}),
    ("model list --registry MISSING", {1}),
    ("model list FOLDER", {1}),
    ("model add MISSING --registry OUT", {1}),
    ("model compare MISSING", {1}),
    ("train MISSING --out OUT", {2}),
    ("train CSV --out OUT --C abc", {2}),
    ("train CSV --out OUT --features nope", {2}),
    ("predict @MISSING", {2}),
    ("predict {bad", {2}),
    ("predict TEXT_DCM", {2}),
    ("predict {} --variant nope", {2}),
]


def _substitute(word: str, paths: dict[str, str]) -> str:
    if word.startswith("@") and word[1:] in paths:
        return "@" + paths[word[1:]]
    return paths.get(word, word)


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, capsys.readouterr().err


def _assert_one_line(err: str) -> None:
    """One error line (progress lines such as ``[1/3] study`` may precede it), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert errors[0].startswith(("her2low", "python -m")), err


@pytest.mark.parametrize(("command", "codes"), BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_an_exit_code(
    command: str, codes: set[int], paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [_substitute(word, paths) for word in command.split()]
    code, err = _run_main(argv, capsys)
    assert code in codes, (code, err)
    _assert_one_line(err)


def test_synth_overwrite_is_offered_and_works(
    paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_main(["synth", "--out", paths["BUSY"]], capsys)
    assert code == 2 and "--overwrite" in err
    code, err = _run_main(["synth", "--out", paths["OUT"], "--snr", "inf"], capsys)
    assert code == 0, err
    code, err = _run_main(["synth", "--out", paths["OUT"], "--overwrite", "--seed", "3"], capsys)
    assert code == 0, err


def test_predict_reads_at_file(paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    inputs = Path(paths["OUT"] + ".json")
    inputs.write_text(json.dumps({"lesion_type": "nme", "nme_distribution": "segmental"}))
    code, err = _run_main(["predict", f"@{inputs}"], capsys)
    assert code == 0, err


def test_model_list_takes_the_registry_as_argument(capsys: pytest.CaptureFixture[str]) -> None:
    from models.registry import reference_root

    code, err = _run_main(["model", "list", str(reference_root())], capsys)
    assert code == 0, err


def test_train_accepts_every_option_of_docs_models_md() -> None:
    args = build_parser("train").parse_args(
        [
            "train",
            "c.csv",
            "--out",
            "d",
            "--name",
            "site",
            "--version",
            "1.0.0",
            "--select",
            "--C",
            "0.5",
            "--seed",
            "3",
            "--features",
            "dapp_mean",
            "mass_shape",
        ]
    )
    assert (args.name, args.version, args.select, args.C, args.seed) == (
        "site",
        "1.0.0",
        True,
        0.5,
        3,
    )


def test_config_sections_in_order(paths: dict[str, str]) -> None:
    result = _her2low("config", "--show", cwd=Path(paths["OUT"]).parent)
    headers = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert headers == ["[floor]", "[node]", "[worker]", "[service]", "[model]"]
    assert "HER2LOW_NODE_PORT" in result.stdout.split("[node]")[1].split("[worker]")[0]


# --- the real entry points, as subprocesses -------------------------------------------------


def _her2low(*args: str, cwd: Path, module: str = "her2low") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=dict(os.environ),
    )


@pytest.mark.parametrize(
    ("module", "args", "codes"),
    [
        ("her2low", ("service",), {3}),
        ("her2low", ("node",), {3}),
        ("her2low", ("worker",), {3}),
        ("her2low", ("fit", "TEXT_DCM", "--out", "UNWRITABLE"), {1}),
        ("her2low", ("demo", "token", "--lifetime", "0"), {2}),
        ("dicom_node", ("bogus",), {2}),
        ("dicom_node", ("node",), {3}),
        ("cds_service", ("--workers", "0"), {2}),
        ("cds_service", (), {3}),
        ("models.cli", ("model", "list", "MISSING"), {1}),
    ],
)
def test_entry_points_fail_in_one_line(
    module: str, args: tuple[str, ...], codes: set[int], paths: dict[str, str]
) -> None:
    """An un-migrated home (no `db upgrade` yet) and bad values, through the real interpreter."""
    argv = [_substitute(a, paths) for a in args]
    result = _her2low(*argv, cwd=Path(paths["OUT"]).parent, module=module)
    assert result.returncode in codes, result.stderr
    _assert_one_line(result.stderr)


def test_demo_without_a_running_node_is_one_line(paths: dict[str, str]) -> None:
    env = {**os.environ, "HER2LOW_NODE_PORT": str(free_port()), "HER2LOW_NODE_HOST": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "her2low", "demo", "--json", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(paths["OUT"]).parent,
        env=env,
    )
    assert result.returncode == 1, result.stderr
    _assert_one_line(result.stderr)
    assert result.stdout == ""  # --json: stdout is the JSON object or nothing


def test_dicom_node_help_does_not_import_the_service(tmp_path: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['dicom_node', '--help']\n"
        "try:\n"
        "    runpy.run_module('dicom_node', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cds_service'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


@pytest.mark.integration
def test_python_m_cds_service_serves_without_the_node(tmp_path: Path) -> None:
    """``python -m cds_service`` starts the service, and no module of dicom_node is imported
    (``-X importtime`` lists every import, in the gunicorn workers too)."""
    from cds_service.db import MIGRATIONS

    home = tmp_path / "home"
    port = free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(home),
        "HER2LOW_CDS_PORT": str(port),
        "HER2LOW_CDS_HOST": "127.0.0.1",
    }
    home.mkdir()
    MIGRATIONS.upgrade(f"sqlite:///{home / 'cds.db'}")
    err = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 - closed in finally
    proc = popen_group(
        [sys.executable, "-X", "importtime", "-m", "cds_service", "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and status is None:
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            try:
                status = requests.get(
                    f"http://127.0.0.1:{port}/cds-services", timeout=2
                ).status_code
            except requests.RequestException:
                time.sleep(0.3)
        assert status == 401, status  # up, and protected like every CDS call
    finally:
        stop_group(proc)
        err.close()
    imports = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert "cds_service.app" in imports
    imported = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] == "dicom_node"}

"""CLI functions: schema, train on a small CSV written here, predict, registry add/list/compare."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest

from models import cli
from models.data import write_cohort_csv
from models.simulate import simulate_cohort


def test_schema_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.cmd_schema(json=True) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {f["name"] for f in listing["features"]} >= {"lesion_type", "dapp_mean", "kapp_entropy"}
    assert cli.cmd_schema(json=False) == 0
    assert "mass_shape" in capsys.readouterr().out


def test_train_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "cohort.csv"
    write_cohort_csv(csv_path, simulate_cohort(12))
    out = tmp_path / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.cmd_train(
            csv_path,
            out,
            "her2_group",
            ["lesion_type", "mass_shape", "peritumoral_edema", "dapp_mean"],
            bootstrap=50,
            folds=3,
            name="site",
            version="2.0.0",
        )
    assert code == 0, capsys.readouterr().err
    assert "AUC" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {
        "model.onnx",
        "card.json",
        "card.md",
        "calibration.png",
        "decision_curve.png",
    }
    inputs = {
        "lesion_type": "mass",
        "mass_shape": "irregular",
        "peritumoral_edema": "no",
        "dapp_mean": 1.1e-3,
    }
    assert cli.cmd_predict(out, json.dumps(inputs)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_name"] == "site" and result["variant"] == "combined"
    assert 0 <= result["probability"] <= 1 and result["reference"] is False
    (tmp_path / "many.json").write_text(json.dumps([inputs, inputs]))
    assert cli.cmd_predict(out, str(tmp_path / "many.json")) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    # Bad input: exit 2 and the feature named on stderr.
    assert cli.cmd_predict(out, json.dumps({**inputs, "dapp_mean": 1.1})) == 2
    assert "dapp_mean" in capsys.readouterr().err
    # Registry: add, list, compare; tampering is refused.
    reg = tmp_path / "registry"
    assert cli.cmd_add(out, reg) == 0
    assert cli.cmd_list(reg) == 0
    assert "site 2.0.0 combined" in capsys.readouterr().out
    assert cli.cmd_compare([reg / "site" / "2.0.0", out]) == 0
    assert "site 2.0.0 combined" in capsys.readouterr().out
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes() + b"x")
    assert cli.cmd_predict(out, json.dumps(inputs)) == 1
    assert "SHA-256" in capsys.readouterr().err


def test_train_rejects_bad_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = simulate_cohort(1)[:30]
    rows[4] = dict(rows[4], mass_margin="wavy", lesion_type="mass")
    write_cohort_csv(tmp_path / "bad.csv", rows)
    assert cli.cmd_train(tmp_path / "bad.csv", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "row 6" in err and "mass_margin" in err
    assert cli.cmd_train(tmp_path / "bad.csv", tmp_path / "m", features=["nope"]) == 2
    assert cli.cmd_train(tmp_path / "missing.csv", tmp_path / "m") == 2


def test_predict_with_reference_and_argparse_wiring(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="her2low")
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "schema", "--json"])
    assert args.func(args) == 0
    capsys.readouterr()
    args = parser.parse_args(
        ["predict", json.dumps({"lesion_type": "nme", "nme_distribution": "segmental"})]
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] is True and result["variant"] == "descriptors"
    args = parser.parse_args(
        ["train", "c.csv", "--out", "d", "--features", "dapp_mean", "--select"]
    )
    assert (args.cohort, args.out, args.features, args.select) == (
        "c.csv",
        "d",
        ["dapp_mean"],
        True,
    )


def _cohort_with_fit_columns(path: Path, fits: list[tuple[str, str]]) -> None:
    """A cohort CSV with the ``method``/``denoise`` columns ``her2low fit`` writes."""
    import csv

    rows = simulate_cohort(12)
    write_cohort_csv(path, rows)
    with path.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    for k, row in enumerate(table):
        row["method"], row["denoise"] = fits[k % len(fits)]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*table[0]])
        writer.writeheader()
        writer.writerows(table)


def test_train_records_the_cohorts_own_fit(tmp_path: Path) -> None:
    """Features computed with the legacy nls fit make a card that scores nls results only."""
    _cohort_with_fit_columns(tmp_path / "nls.csv", [("nls", "none")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.cmd_train(
            tmp_path / "nls.csv", tmp_path / "m", features=["dapp_mean"], bootstrap=20, folds=3
        )
    assert code == 0
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["fit_settings"]["method"] == "nls"
    assert "denoise" not in card["fit_settings"]  # none: the legacy spelling


def test_train_refuses_a_cohort_of_mixed_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cohort_with_fit_columns(tmp_path / "mixed.csv", [("nls", "none"), ("nls_rician", "mppca")])
    assert cli.cmd_train(tmp_path / "mixed.csv", tmp_path / "m", features=["dapp_mean"]) == 2
    err = capsys.readouterr().err
    assert "nls/none" in err and "nls_rician/mppca" in err and "Traceback" not in err

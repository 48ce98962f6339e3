"""Model cards: card.json for machines, card.md + PNG plots for people.

The Markdown is rendered from the JSON only, so the two can never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.contract import TrainingSettings

CARD_JSON = "card.json"
CARD_MD = "card.md"
CALIBRATION_PNG = "calibration.png"
DECISION_CURVE_PNG = "decision_curve.png"

#: What the seed paper reports (Shen et al., Tomography 2025;11(3):31), shown beside every
#: model's own cross-validated figures so the reference model's simulated numbers are never read
#: as clinical ones. ``variant`` is the model variant whose inputs match the paper's comparison.
SEED_PAPER: dict[str, Any] = {
    "citation": "Shen et al., Tomography 2025;11(3):31",
    "comparisons": [
        {
            "comparison": "qualitative (BI-RADS) features, HER2-low vs HER2-zero",
            "variant": "descriptors",
            "task": "low_vs_zero",
            "subsets": ["all"],
            "paper_auc": 0.763,
            "note": "",
        },
        {
            "comparison": "combined variables (qualitative + DKI), the paper's best model",
            "variant": "combined",
            "task": "low_vs_zero",
            "subsets": ["all", "nme"],
            "paper_auc": 0.802,
            "note": "the paper's key findings tie it to non-mass enhancement lesions",
        },
    ],
}

_TASK_LABELS = {
    "low_vs_rest": "HER2-low vs zero+over (multinomial model, P(low))",
    "low_vs_zero": "HER2-low vs HER2-zero (binary model)",
    "low_vs_over": "HER2-low vs HER2-over (binary model)",
}


def read_card(model_dir: Path) -> dict[str, Any]:
    with (Path(model_dir) / CARD_JSON).open(encoding="utf-8") as fh:
        card: dict[str, Any] = json.load(fh)
    return card


def fit_settings(card: dict[str, Any]) -> TrainingSettings:
    """The fit and discretisation settings a model's training features used.

    Cards written before the field existed mean the legacy conventions they were trained with
    (``nls``, no denoising: ``models.contract.LEGACY_CONVENTIONS``), not today's default.
    """
    return TrainingSettings.from_card(card.get("fit_settings"))


def write_card(card: dict[str, Any], out_dir: Path) -> None:
    """Write card.json, the two plots and card.md into ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / CARD_JSON).write_text(
        json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    plot_calibration(card, out_dir / CALIBRATION_PNG)
    plot_decision_curve(card, out_dir / DECISION_CURVE_PNG)
    (out_dir / CARD_MD).write_text(render_markdown(card), encoding="utf-8")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(card: dict[str, Any]) -> str:
    """The human card (FDA CDS criterion 4 content: use, inputs, performance, limitations)."""
    ref = card["reference"]
    lines = [
        f"# Model card: {card['name']} {card['version']} ({card['variant']})",
        "",
    ]
    if ref:
        lines += [
            "> **Reference model trained on simulated data. Not clinically validated.** It shows "
            "how the system works end to end; a site must train and validate a model on its own "
            "labelled cases before any clinical use.",
            "",
        ]
    lines += [
        "> The output is a statistical estimate of the HER2 group, not a pathology result. "
        "Confirm HER2 status by IHC/ISH.",
        "",
        "## Intended use and users",
        card["intended_use"],
        "",
        f"Users: {', '.join(card['intended_users'])}. Out of scope: "
        f"{'; '.join(card['out_of_scope'])}.",
        "",
        "## Training data and provenance",
    ]
    td = card["training_data"]
    counts = ", ".join(f"{k} {v}" for k, v in td["counts"].items())
    lines += [
        td["description"],
        "",
        f"- cases: {td['n']} ({counts}); target column `{td['target']}`",
        "- by lesion type: "
        + "; ".join(
            f"{lt}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            for lt, c in td["by_lesion_type"].items()
        ),
        f"- source file: `{td['source'] or 'in memory'}`"
        + (f", SHA-256 `{td['sha256']}`" if td["sha256"] else ""),
    ]
    for key, value in td.get("provenance", {}).items():
        lines.append(f"- {key}: {value}")
    fs = fit_settings(card).to_card()
    lines += [
        "",
        "## Inputs and the settings they assume",
        "| input | kind | ONNX type | unit |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{i['name']}` | {i['kind']} | {i['onnx_type']} [N,1] | {i['unit'] or ''} |"
        for i in card["inputs"]
    ]
    lines += [
        "",
        f"Required for this variant to be chosen: {', '.join(card['required_inputs']) or 'none'}. "
        "A descriptor not entered is the empty string (its own level); a missing number is NaN "
        "(imputed with the training median).",
        "",
        f"DKI fit: method `{fs['method']}`, b = {fs['b_values']} s/mm², lowest b in the DKI fit "
        f"{fs['dki_bmin']}, bounds Dapp {fs['bounds']['dapp']} mm²/s, Kapp {fs['bounds']['kapp']}; "
        f"denoising before the fit: {fs.get('denoise', 'none')}; ADC on b = {fs['adc_b_values']}; kurtosis {fs['kurtosis']}; percentiles "
        f"{fs['percentile_rule']}; entropy bins of fixed width {fs['discretisation']['bin_width']} "
        f"from {fs['discretisation']['bin_min']}.",
        "",
    ]
    lines += _domain_lines(card)
    sel = card.get("selection") or {}
    if sel:
        lines += [
            f"Feature selection: {sel['method']} (α {sel['alpha_univariable']} / "
            f"{sel['alpha_multivariable']}); kept: "
            + ", ".join(f"`{k}` (p={v:.3g})" for k, v in sel["multivariable_p"].items()),
            "",
        ]
    perf = card["performance"]
    lines += [
        "## Performance",
        perf["evaluation"] + ".",
        "",
        "| task | subset | n | positives | AUC | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for m in perf["metrics"]:
        ci = f"{_fmt(m['ci_low'])}–{_fmt(m['ci_high'])}" if m["ci_low"] is not None else "n/a"
        lines.append(
            f"| {_TASK_LABELS.get(m['task'], m['task'])} | {m['subset']} | {m['n']} | "
            f"{m['n_positive']} | {_fmt(m['auc'])} | {ci} |"
        )
    lines += _paper_lines(card)
    cal = card["calibration"]
    thr = card["threshold"]
    lines += [
        "",
        "## Calibration",
        f"Out-of-fold P(HER2-low): Brier score {_fmt(cal['brier'])}, calibration slope "
        f"{_fmt(cal['slope'], 2)}, intercept {_fmt(cal['intercept'], 2)} (logistic recalibration; "
        "ideal 1 and 0).",
        "",
        f"![calibration]({CALIBRATION_PNG})",
        "",
        *_recalibration_lines(card),
        "## Decision curve",
        f"![decision curve]({DECISION_CURVE_PNG})",
        "",
        "## Operating threshold",
        f"P(HER2-low) ≥ {thr['value']:.3f}, chosen by {thr['method']}: sensitivity "
        f"{_fmt(thr['sensitivity'], 2)}, specificity {_fmt(thr['specificity'], 2)} out of fold. "
        "Sites should re-choose it on their own cases.",
        "",
        "## Explanations",
        card["contributions"]["definition"],
        "",
        "## Limitations",
        *[f"- {item}" for item in card["limitations"]],
        "",
        "## Version and integrity",
        f"- name `{card['name']}`, version `{card['version']}`, variant `{card['variant']}`, "
        f"reference model: {'yes' if ref else 'no'}, created {card['created']}",
        f"- `{card['onnx']['file']}` SHA-256 `{card['onnx']['sha256']}`",
        "- software: " + ", ".join(f"{k} {v}" for k, v in card["software"].items()),
        "",
    ]
    return "\n".join(lines)


def _recalibration_lines(card: dict[str, Any]) -> list[str]:
    """A site recalibration (``models.recalibration``): the map, and calibration before/after."""
    rec = card.get("recalibration")
    if not rec:
        return []
    src = rec["recalibrated_from"]
    cohort = rec["cohort"]
    before, after = rec["before"], rec["after"]
    return [
        "### Site recalibration",
        f"Recalibrated ({rec['method']}) from {src['name']} {src['version']} on "
        f"{cohort['n']} site cases (`{cohort['source']}`, SHA-256 `{cohort['sha256']}`), without "
        "retraining: the ONNX graph is unchanged; the runtime maps P(HER2-low) afterwards.",
        "",
        f"- Brier score on the site cases: before {_fmt(before['brier'])}, after "
        f"{_fmt(after['brier'])}; calibration slope before {_fmt(before['slope'], 2)}, after "
        f"{_fmt(after['slope'], 2)}",
        f"- operating threshold: {rec['threshold_before']:.3f} before, "
        f"{card['threshold']['value']:.3f} after (mapped with P(HER2-low))",
        f"- {rec['note']}",
        "",
        "![before](calibration_before.png) ![after](calibration_after.png)",
        "",
    ]


def _paper_lines(card: dict[str, Any]) -> list[str]:
    """The seed paper's AUCs beside this model's own, labelled by where each comes from."""
    paper = card.get("seed_paper") or SEED_PAPER
    own = "simulated cohort (not clinical)" if card["reference"] else "this site's cohort"
    lines = [
        "",
        f"### What the seed paper reports ({paper['citation']})",
        f"The paper's figures are clinical, from its own patients; this model's are "
        f"cross-validated on its {own}. They are not comparable evidence of clinical performance.",
        "",
        f"| comparison | seed paper AUC | this model ({card['variant']}) AUC, {own} |",
        "|---|---|---|",
    ]
    metrics = {(m["task"], m["subset"]): m["auc"] for m in card["performance"]["metrics"]}
    for item in paper["comparisons"]:
        note = f" ({item['note']})" if item["note"] else ""
        if item["variant"] == card["variant"]:
            label = _TASK_LABELS.get(item["task"], item["task"])
            mine = "; ".join(
                f"{_fmt(metrics.get((item['task'], sub)))} ({sub} lesions)"
                for sub in item["subsets"]
            )
            mine = f"{mine}, {label}"
        else:
            mine = f"see the {item['variant']} variant's card"
        lines.append(f"| {item['comparison']}{note} | {item['paper_auc']:.3f} | {mine} |")
    return lines


def _domain_lines(card: dict[str, Any]) -> list[str]:
    """The training domain: a case outside it is scored only with a visible warning."""
    domain = card.get("training_domain")
    if not domain:
        return []
    ranges = domain.get("feature_ranges") or {}
    lines = [
        "## Training domain",
        "A case outside it is scored only with a warning on the card, in the Observation and on "
        "the review page.",
        "",
        f"- b-values: {domain['b_values']} {domain.get('b_value_unit', 's/mm2')}",
        "- field strength: "
        + (", ".join(f"{t:g} T" for t in domain["field_strength_t"]) or "not recorded"),
        "- vendors: " + (", ".join(domain["vendors"]) or "not recorded"),
        "- feature ranges (min–max of the training cases): "
        + ("; ".join(f"`{k}` {lo:.4g}–{hi:.4g}" for k, (lo, hi) in ranges.items()) or "none"),
    ]
    if domain.get("note"):
        lines.append(f"- {domain['note']}")
    return [*lines, ""]


def plot_calibration(card: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = card["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
    ax.plot(cal["mean_predicted"], cal["observed_fraction"], marker="o", label="model (OOF)")
    ax.set_xlabel("predicted P(HER2-low)")
    ax.set_ylabel("observed fraction HER2-low")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{card['name']} {card['version']} ({card['variant']})", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_decision_curve(card: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dc = card["decision_curve"]
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    ax.plot(dc["thresholds"], dc["net_benefit_model"], label="model (OOF)")
    ax.plot(dc["thresholds"], dc["net_benefit_treat_all"], linestyle="--", label="flag all")
    ax.plot(dc["thresholds"], dc["net_benefit_treat_none"], color="grey", label="flag none")
    top = max(max(dc["net_benefit_model"]), max(dc["net_benefit_treat_all"]), 0.05)
    ax.set_ylim(-0.05, top * 1.1)
    ax.set_xlabel("threshold probability P(HER2-low)")
    ax.set_ylabel("net benefit")
    ax.set_title(
        f"Decision curve, {card['name']} {card['version']} ({card['variant']})", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)

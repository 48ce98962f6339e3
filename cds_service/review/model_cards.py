"""Model cards as HTML pages, one per deployed model version, with their plots.

The card's Markdown is rendered from its ``card.json`` (``models.card.render_markdown``, the same
text as the shipped ``card.md``) by markdown-it-py with raw HTML disabled, so even an edited card
cannot put markup or script on the page. Plots are served only by name from the files a model
folder actually holds: the URL never becomes a path.

URLs: ``/review/models`` (every version) and ``/review/models/<name>/<version>`` (its variants;
``#<variant>`` anchors), plots under ``/review/models/<name>/<version>/<variant>/<file>.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import abort, render_template, send_file, url_for
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup
from werkzeug.wrappers import Response as WerkzeugResponse

from cds_service.audit import AuditAction
from cds_service.review import bp
from cds_service.review.auth import login_required, signed_in_user
from cds_service.state import state
from models.card import CARD_JSON, render_markdown
from models.registry import ModelEntry, Registry, RegistryError, reference_root


@dataclass(frozen=True)
class CardVersion:
    """One deployed (name, version) with its variants."""

    name: str
    version: str
    entries: tuple[ModelEntry, ...]

    @property
    def reference(self) -> bool:
        return any(bool(e.card.get("reference")) for e in self.entries)


def deployed_entries(model_dir: Path | None) -> list[ModelEntry]:
    """Every model folder the service can see: a model folder, a version folder or a registry.

    ``None``: the registry shipped in the package (what ``ModelRuntime.load(None)`` uses).
    """
    root = Path(model_dir) if model_dir is not None else reference_root()
    if (root / CARD_JSON).is_file():
        return [ModelEntry.from_dir(root)]
    if not root.is_dir():
        return []
    children = [p for p in sorted(root.iterdir()) if (p / CARD_JSON).is_file()]
    if children:
        return [ModelEntry.from_dir(p) for p in children]
    registry = Registry(root)
    return [
        entry
        for name in registry.names()
        for version in registry.versions(name)
        for entry in registry.entries(name, version)
    ]


def card_versions(model_dir: Path | None) -> list[CardVersion]:
    """Deployed versions, newest first within a name (registry order reversed)."""
    try:
        entries = deployed_entries(model_dir)
    except RegistryError:
        return []
    grouped: dict[tuple[str, str], list[ModelEntry]] = {}
    for entry in entries:
        grouped.setdefault((entry.name, entry.version), []).append(entry)
    versions = [CardVersion(n, v, tuple(e)) for (n, v), e in grouped.items()]
    return list(reversed(versions))


def model_card_url(name: str, version: str, variant: str | None = None) -> str:
    """The page of a model version (the case page links the version that scored it)."""
    url = url_for("review.model_version", name=name, version=version)
    return f"{url}#{variant}" if variant else url


def plot_names(entry: ModelEntry) -> frozenset[str]:
    """The PNG files of a model folder: the only names a plot URL may ask for."""
    return frozenset(p.name for p in entry.path.iterdir() if p.suffix == ".png" and p.is_file())


def _markdown() -> MarkdownIt:
    # commonmark with tables; "html": False escapes any raw HTML in the text
    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def _retarget_images(tokens: list[Token], entry: ModelEntry, plots: frozenset[str]) -> None:
    """Point ``![...](calibration.png)`` at the plot route; drop images that are not plots."""
    for token in tokens:
        children = token.children or []
        keep = []
        for child in children:
            if child.type == "image":
                src = str(child.attrGet("src") or "")
                if src not in plots:
                    continue
                child.attrSet(
                    "src",
                    url_for(
                        "review.model_plot",
                        name=entry.name,
                        version=entry.version,
                        variant=entry.variant.value,
                        filename=src,
                    ),
                )
            keep.append(child)
        if token.children is not None:
            token.children = keep


def card_html(entry: ModelEntry) -> Markup:
    """The card of one variant as HTML (our Markdown, raw HTML disabled)."""
    md = _markdown()
    tokens = md.parse(render_markdown(entry.card))
    _retarget_images(tokens, entry, plot_names(entry))
    # raw HTML is escaped by markdown-it ("html": False), so the output is safe markup
    return Markup(md.renderer.render(tokens, md.options, {}))


def _version(name: str, version: str) -> CardVersion:
    for found in card_versions(state().settings.model_dir):
        if (found.name, found.version) == (name, version):
            return found
    abort(404, f"model {name} {version} is not deployed here")


@bp.get("/models", strict_slashes=False)
@login_required
def model_cards() -> str:
    """Every deployed model version, with its variants and headline numbers."""
    rows: list[dict[str, Any]] = []
    for found in card_versions(state().settings.model_dir):
        rows.append(
            {
                "name": found.name,
                "version": found.version,
                "url": model_card_url(found.name, found.version),
                "variants": [e.variant.value for e in found.entries],
                "created": found.entries[0].card.get("created", ""),
                "reference": found.reference,
            }
        )
    return render_template("review_model_cards.html", versions=rows, reference=True)


@bp.get("/models/<name>/<version>")
@login_required
def model_version(name: str, version: str) -> str:
    """One version's card per variant, rendered as HTML with its plots and tables."""
    found = _version(name, version)
    state().store.audit(
        signed_in_user().username,
        AuditAction.MODEL_CARD_VIEWED,
        None,
        {"model": name, "version": version},
    )
    cards = [
        {"variant": e.variant.value, "html": card_html(e), "sha256": e.sha256}
        for e in found.entries
    ]
    return render_template(
        "review_model_version.html",
        name=name,
        version=version,
        cards=cards,
        reference=found.reference,
    )


@bp.get("/models/<name>/<version>/<variant>/<filename>")
@login_required
def model_plot(name: str, version: str, variant: str, filename: str) -> WerkzeugResponse:
    """A plot of a model folder, by name only (no path from the URL reaches the filesystem)."""
    for entry in _version(name, version).entries:
        if entry.variant.value == variant and filename in plot_names(entry):
            return send_file(entry.path / filename, mimetype="image/png", max_age=3600)
    abort(404, "no such plot")

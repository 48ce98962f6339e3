"""Model registry: models stored by name, version and variant, each with its card.

Layout::

    REGISTRY/<name>/<version>/<variant>/{model.onnx, card.json, card.md, *.png}

A model folder (what ``her2low train --out DIR`` writes) is added with :meth:`Registry.add`,
which checks the ONNX SHA-256 against the card before copying. Nothing here is trusted without
that check: :meth:`ModelEntry.read_verified` is the only way the runtime reads model bytes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.card import CARD_JSON, read_card
from models.prediction import ModelVariant

REFERENCE_NAME = "her2low-reference"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RegistryError(LookupError):
    """A model, version or variant that is not in the registry, or a malformed folder."""


class ModelIntegrityError(RuntimeError):
    """The ONNX file does not match the SHA-256 its card declares: refuse to use it."""


def reference_root() -> Path:
    """The registry shipped inside the package (simulated-data reference models)."""
    return Path(__file__).resolve().parent / "reference"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version_key(version: str) -> tuple[Any, ...]:
    """Sort "0.10.0" after "0.9.1"; non-numeric parts sort as text after numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


@dataclass(frozen=True)
class ModelEntry:
    """One model folder with its card."""

    path: Path
    card: dict[str, Any]

    @classmethod
    def from_dir(cls, path: Path) -> ModelEntry:
        path = Path(path)
        if not (path / CARD_JSON).is_file():
            raise RegistryError(f"{path}: no {CARD_JSON}")
        card = read_card(path)
        for key in ("name", "version", "variant", "onnx", "classes", "inputs", "threshold"):
            if key not in card:
                raise RegistryError(f"{path / CARD_JSON}: missing {key!r}")
        return cls(path, card)

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def variant(self) -> ModelVariant:
        return ModelVariant(self.card["variant"])

    @property
    def sha256(self) -> str:
        return str(self.card["onnx"]["sha256"])

    @property
    def onnx_path(self) -> Path:
        return self.path / str(self.card["onnx"].get("file", "model.onnx"))

    def read_verified(self) -> bytes:
        """The ONNX bytes, after checking them against the card's SHA-256."""
        if not self.onnx_path.is_file():
            raise ModelIntegrityError(f"{self.onnx_path}: missing ONNX file")
        data = self.onnx_path.read_bytes()
        actual = sha256_bytes(data)
        if actual != self.sha256:
            raise ModelIntegrityError(
                f"{self.onnx_path}: SHA-256 {actual} does not match the card's {self.sha256} "
                f"({self.name} {self.version} {self.variant.value}); refusing to load a model "
                "that is not the one its card describes"
            )
        return data


class Registry:
    """A folder of models by name/version/variant."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions of a model, oldest first."""
        base = self.root / name
        if not base.is_dir():
            return []
        found = [p.name for p in base.iterdir() if p.is_dir() and any(p.glob(f"*/{CARD_JSON}"))]
        return sorted(found, key=_version_key)

    def latest(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"{self.root}: no versions of model {name!r}")
        return versions[-1]

    def entries(self, name: str | None = None, version: str | None = None) -> list[ModelEntry]:
        """The variants of one model version (defaults: the only name, the latest version)."""
        if name is None:
            names = self.names()
            if len(names) != 1:
                raise RegistryError(
                    f"{self.root}: {len(names)} models ({', '.join(names) or 'none'}); name one"
                )
            name = names[0]
        version = version or self.latest(name)
        base = self.root / name / version
        if not base.is_dir():
            raise RegistryError(f"{self.root}: no version {version!r} of {name!r}")
        entries = [
            ModelEntry.from_dir(p) for p in sorted(base.iterdir()) if (p / CARD_JSON).is_file()
        ]
        for entry in entries:
            if (entry.name, entry.version) != (name, version):
                raise RegistryError(
                    f"{entry.path}: card says {entry.name} {entry.version}, folder says "
                    f"{name} {version}"
                )
        return entries

    def add(self, model_dir: Path, *, overwrite: bool = False) -> ModelEntry:
        """Copy a trained model folder in, under its card's name/version/variant.

        The hash is checked first, so a corrupted or edited model never enters the registry.
        """
        entry = ModelEntry.from_dir(Path(model_dir))
        entry.read_verified()
        for part in (entry.name, entry.version):
            if not _NAME.match(part):
                raise RegistryError(f"invalid name or version {part!r}")
        dest = self.root / entry.name / entry.version / entry.variant.value
        if dest.exists():
            if not overwrite:
                raise RegistryError(f"{dest} exists; versions are immutable (use a new version)")
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(entry.path, dest)
        return ModelEntry.from_dir(dest)


def resolve_entries(
    path: Path | None = None, *, name: str | None = None, version: str | None = None
) -> list[ModelEntry]:
    """Find model variants from any of: a model folder, a version folder or a registry root.

    ``None`` means the shipped reference registry.
    """
    root = Path(path) if path is not None else reference_root()
    if (root / CARD_JSON).is_file():
        return [ModelEntry.from_dir(root)]
    children = (
        [p for p in sorted(root.iterdir()) if (p / CARD_JSON).is_file()] if root.is_dir() else []
    )
    if children:
        return [ModelEntry.from_dir(p) for p in children]
    if not root.is_dir():
        raise RegistryError(f"{root}: not a directory")
    return Registry(root).entries(name, version)


def compare(entries: list[ModelEntry], *, task: str = "low_vs_rest") -> list[dict[str, Any]]:
    """One row per model and subset: AUC with CI, threshold, Brier — for choosing a version."""
    rows = []
    for entry in entries:
        for metric in entry.card["performance"]["metrics"]:
            if metric["task"] != task:
                continue
            rows.append(
                {
                    "name": entry.name,
                    "version": entry.version,
                    "variant": entry.variant.value,
                    "reference": bool(entry.card.get("reference", False)),
                    "subset": metric["subset"],
                    "n": metric["n"],
                    "auc": metric["auc"],
                    "ci_low": metric["ci_low"],
                    "ci_high": metric["ci_high"],
                    "brier": entry.card["calibration"]["brier"],
                    "threshold": entry.card["threshold"]["value"],
                }
            )
    return rows

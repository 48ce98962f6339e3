"""The official FHIR R4 JSON schema (fetched once by scripts/fetch-fhir-schema.sh), per resource."""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parents[1]


@cache
def fhir_schema() -> dict[str, Any]:
    """The whole R4 schema; fetched into ``.cache/fhir-schema`` on first use."""
    folder = Path(os.environ.get("HER2LOW_FHIR_SCHEMA_DIR", ROOT / ".cache" / "fhir-schema"))
    path = folder / "fhir.schema.json"
    if not path.is_file():
        run = subprocess.run(
            ["bash", str(ROOT / "scripts" / "fetch-fhir-schema.sh"), str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0 and path.is_file(), f"cannot get the FHIR schema: {run.stderr}"
    schema: dict[str, Any] = json.loads(path.read_text())
    assert schema["id"] == "http://hl7.org/fhir/json-schema/4.0"
    return schema


@cache
def validator(kind: str) -> jsonschema.Draft6Validator:
    """The official FHIR R4 schema restricted to one resource type."""
    one = dict(fhir_schema())
    one["oneOf"] = [{"$ref": f"#/definitions/{kind}"}]
    one.pop("discriminator", None)
    return jsonschema.Draft6Validator(one)

"""Export a fitted :class:`Her2LowClassifier` to ONNX, preprocessing included.

The graph takes one input per selected feature, named after it: ``tensor(string) [N, 1]`` for
descriptors ("" = not entered) and ``tensor(float) [N, 1]`` for numbers (NaN = missing). It
returns ``label`` [N] and ``probabilities`` [N, n_classes] in the order of ``classes_``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType

from models.estimator import Her2LowClassifier
from models.schema import FEATURES, FeatureKind

TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
OUTPUT_LABEL = "label"
OUTPUT_PROBABILITIES = "probabilities"


def onnx_input_type(name: str) -> str:
    """The ONNX element type a feature is fed as."""
    return "string" if FEATURES[name].kind is FeatureKind.CATEGORICAL else "float"


def to_onnx(model: Her2LowClassifier, *, doc_string: str = "") -> onnx.ModelProto:
    """Convert the fitted pipeline; inputs named after ``model.selected_features_``."""
    initial_types: list[tuple[str, Any]] = []
    for name in model.selected_features_:
        if onnx_input_type(name) == "string":
            initial_types.append((name, StringTensorType([None, 1])))
        else:
            initial_types.append((name, FloatTensorType([None, 1])))
    classifier = model.pipeline_.named_steps["classifier"]
    onx = convert_sklearn(
        model.pipeline_,
        initial_types=initial_types,
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    _rename_outputs(onx)
    # Byte-identical rebuilds: skl2onnx names the graph with a random UUID and lists opset
    # imports in hash order, which changes with PYTHONHASHSEED.
    onx.graph.name = "her2low_pipeline"
    opsets = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    for domain, version in opsets:
        onx.opset_import.add(domain=domain, version=version)
    onx.doc_string = doc_string
    onx.producer_name = "her2low-cds models.export (skl2onnx)"
    onnx.checker.check_model(onx)
    return onx


def _rename_outputs(onx: onnx.ModelProto) -> None:
    """Give the two outputs the contract's names whatever skl2onnx called them."""
    wanted = (OUTPUT_LABEL, OUTPUT_PROBABILITIES)
    for output, new in zip(onx.graph.output, wanted, strict=True):
        old = output.name
        if old == new:
            continue
        for node in onx.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        output.name = new


def feed_from_rows(features: tuple[str, ...], rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Build the ONNX feed from validated rows (strings "" / floats NaN for missing)."""
    feed: dict[str, np.ndarray] = {}
    for name in features:
        column = [row[name] for row in rows]
        if onnx_input_type(name) == "string":
            feed[name] = np.asarray(column, dtype=object).reshape(-1, 1)
        else:
            feed[name] = np.asarray(column, dtype=np.float32).reshape(-1, 1)
    return feed

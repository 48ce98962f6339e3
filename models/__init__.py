"""Leaf library: feature schema, training, ONNX export, registry, runtime. Imports no sibling."""

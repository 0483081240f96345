"""ONNX and TorchScript files of tasks, with metadata, checked against the eager model."""

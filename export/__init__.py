"""ddpm.export: checkpoint -> ONNX -> TensorRT engine, with metadata and parity checks."""

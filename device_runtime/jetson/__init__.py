"""Jetson runtime: onnxruntime inference + on-device ZO fine-tuning of the last dense layer (docs/jetson.md)."""

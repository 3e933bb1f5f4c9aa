"""Verification of exported artifacts in real interpreters: LiteRT, TFLite Micro, onnxruntime."""

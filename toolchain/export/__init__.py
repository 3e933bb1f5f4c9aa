"""Export: BN folding, the NHWC Keras mirror, full-int8 TFLite, C arrays for ESP-IDF, ONNX."""

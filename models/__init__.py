"""Model-zoo ONNX graph builders (ResNet, MobileNetV2, YOLO-style, UNet-style) for tests and benchmarks."""

"""Deployment: inference on images (predict) and ONNX export."""

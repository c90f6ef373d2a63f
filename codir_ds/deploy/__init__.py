"""Shipping a distilled model: served models (PyTorch or ONNX), the ONNX export with its parity check and
int8 quantization, and the side-by-side report of size, metrics, latency and speed-up
(``launchers/evaluate.py``, ``launchers/export.py --onnx``)."""

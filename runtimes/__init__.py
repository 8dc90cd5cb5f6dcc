"""Runtimes: config, data, models, the training loop and the torch / ONNX Runtime backends."""
import logging

# onnxruntime.training imports torch.utils.cpp_extension, which warns about CUDA_HOME on every
# CPU-only machine; the warning says nothing about alast's run.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

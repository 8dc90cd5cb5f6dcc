"""Backends behind one :class:`~runtimes.protocol.Runtime` interface: the PyTorch backend
(``torch_backend``, a patched timm model), ONNX Runtime Training (``ort_backend``), the ONNX
inference graph they share, and the data-parallel communicator. Never imports the pipeline."""
import logging

# onnxruntime.training imports torch.utils.cpp_extension, which warns about CUDA_HOME on every
# CPU-only machine; the warning says nothing about alast's run.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

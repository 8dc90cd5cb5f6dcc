"""The pipeline that drives a runtime: config, data, models, the training loop, planning, bench, export.

Where things live:
  ``alast.config``     the YAML config (pydantic, one model per section)
  ``alast.data``       datasets: built-in (digits, shapes, letters, random), image folders, torchvision
  ``alast.models``     timm models and the shipped demo backbone
  ``alast.training``   the loop, run directory, checkpoints, resume, metrics, TensorBoard
  ``alast.planning``   profiling (the cost model) and planning (predictions, FLOPs targets)
  ``alast.bench``      several policies on the same data, one table
  ``alast.export``     a finished run -> verified ONNX, and ONNX evaluation
Dependencies point one way: ``alast_cli`` -> ``alast`` -> ``runtimes`` -> ``planners``.
"""

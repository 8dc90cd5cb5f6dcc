"""Training and validation data: what ``--data SPEC`` names, as torch datasets and loaders."""
from alast.data.datasets import (
    DataBundle,
    DataError,
    StepBatchSampler,
    build_data,
    check_batch_size,
    describe_spec,
    eval_batches,
    train_batches,
)

__all__ = ["DataBundle", "DataError", "StepBatchSampler", "build_data", "check_batch_size", "describe_spec",
           "eval_batches", "train_batches"]

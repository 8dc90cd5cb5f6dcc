"""What autocast ran: the dtypes of the matrix products dispatched under a mode (the bf16 and fp16 tests)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the matrix products dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm"):
            self.dtypes.add(args[0].dtype if func.overloadpacket.__name__ != "addmm" else args[1].dtype)
        return func(*args, **(kwargs or {}))

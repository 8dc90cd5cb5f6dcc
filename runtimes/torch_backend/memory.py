"""Peak memory on the CPU: which steps are measured, and a MemTracker that accepts frozen parameters."""
from __future__ import annotations

import functools


def default_memory_probe(step: int) -> bool:
    """Steps whose CPU peak memory is measured (MemTracker slows a step about 2x): 1, 2, every 50th.

    Step 0 is skipped because AdamW creates its state during that step's update, after the peak
    of the forward/backward.
    """
    return step in (1, 2) or (step > 0 and step % 50 == 0)


@functools.lru_cache(maxsize=1)
def _frozen_aware_tracker_cls():
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareMemTracker(MemTracker):
        """MemTracker that also works when some parameters are frozen.

        Upstream installs a gradient hook on every parameter, which fails for frozen ones. Without
        the hooks gradients are still allocated under the tracker's dispatch mode and so still
        count towards the peak total (only their category label is lost).
        """

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return FrozenAwareMemTracker


def frozen_aware_mem_tracker():
    return _frozen_aware_tracker_cls()()

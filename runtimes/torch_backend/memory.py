"""Peak memory on the CPU: which steps are measured, and a MemTracker that accepts frozen parameters."""
from __future__ import annotations

import functools

import torch

from planners.rules import memory_probe_step

default_memory_probe = memory_probe_step  # one schedule: the planner predicts the probed steps from it


def _tensors(out):
    """The tensors an op returned: itself, or those in its (nested) tuple or list."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread (ModTracker's ``is_bw``)."""
    return torch._C._current_graph_task_id() != -1


class _NoModuleHooks:
    """Stands in for MemTracker's ModTracker, whose global module hooks (and a gradient hook on every
    module's inputs and outputs) only feed the tracker's per-module hooks and snapshots, which the
    tracker below leaves idle: registering them was a third of the demo's profile time. The one
    thing read from it, whether a backward is running, comes from the autograd engine as
    ModTracker's own ``is_bw`` does."""

    is_bw = property(lambda self: _in_backward())

    def register_user_hooks(self, *hooks):
        pass

    def clear_user_hooks(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@functools.lru_cache(maxsize=1)
def frozen_aware_tracker_cls():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class FrozenAwareMemTracker(MemTracker):
        """MemTracker that also works when some parameters are frozen, and costs less per op.

        Upstream installs a gradient hook on every parameter, which fails for frozen ones. Without
        the hooks gradients are still allocated under the tracker's dispatch mode and so still
        count towards the peak total (only their category label is lost).

        Each op's outputs are tracked as upstream's dispatch tracks them (its ``_track``: the same
        storages and sizes, in the same category), without its pytree walk, and its module hooks
        are never installed (:class:`_NoModuleHooks`): they take per-module snapshots, which
        nothing here reads, relabel a gradient left from an earlier pass as a gradient when the
        next forward starts (here it stays a temporary: the totals and the peak are the same), and
        tell apart an activation checkpoint's recomputation, which nothing here runs.
        tests/runtimes/test_memory_tracker.py holds the current and peak snapshots to upstream's.
        """

        def __init__(self):
            super().__init__()
            self._mod_tracker = _NoModuleHooks()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            reftype = (_MemRefType.OPT if self._in_opt else
                       _MemRefType.TEMP if _in_backward() else _MemRefType.ACT)
            for t in _tensors(out):
                self._track(reftype, t)
            self._update_peak_stats(None)
            return out

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        def _update_peak_stats(self, peak_state):
            # Only the global peak is read here (``get_tracker_snapshot("peak")``): upstream also
            # deep-copies a snapshot into every active module's stats on each new peak (the modules
            # ModTracker's hooks mark active, which the stand-in does not keep). With the
            # shallow snapshots below, a profiled block's backward takes 0.12 s instead of 0.19 s;
            # the totals are the same (tests/runtimes/test_memory_tracker.py).
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return FrozenAwareMemTracker


def frozen_aware_mem_tracker():
    return frozen_aware_tracker_cls()()

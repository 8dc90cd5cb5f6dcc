"""The MemTracker the runtime and the profiler use reports the same peaks as torch's own."""
import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import _MemRefType

from runtimes.torch_backend.memory import frozen_aware_mem_tracker
from runtimes.torch_backend.patch import forward_selecting
from tests.conftest import make_tiny_vit, upstream_mem_tracker_cls


class _Forward(nn.Module):
    """The model's blocks, each selecting 8 of its patch tokens inside (or run whole), as one module
    (MemTracker refuses a module called twice at top level)."""

    def __init__(self, model, select):
        super().__init__()
        self.model, self.select = model, select

    def forward(self, x):
        h = self.model.norm_pre(self.model._pos_embed(self.model.patch_embed(x)))
        for blk in self.model.blocks:
            h = forward_selecting(blk, h, 8, 1)[0] if self.select else blk(h)
        return self.model.forward_head(self.model.norm(h))


def _peaks(tracker, model, x, select):
    run = _Forward(model, select)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tracker.track_external(run, opt)
    with tracker:
        loss = run(x).pow(2).sum()
        current = tracker.get_tracker_snapshot("current")
        loss.backward()
        peak = tracker.get_tracker_snapshot("peak")
        opt.step()  # AdamW's state, created in its first step: optimizer state
    return current, peak, tracker.get_tracker_snapshot("current")


@pytest.mark.parametrize("select", [False, True])
def test_peaks_and_snapshots_equal_upstream(select):
    results = []
    for make in (frozen_aware_mem_tracker, upstream_mem_tracker_cls()):
        model = make_tiny_vit()
        model.blocks[0].requires_grad_(False)  # a frozen block, as ALaST trains
        results.append(_peaks(make(), model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                              select))
    (cur, peak, stepped), (up_cur, up_peak, up_stepped) = results
    assert cur == up_cur and peak == up_peak and stepped == up_stepped
    assert next(iter(peak.values()))["Total"] > next(iter(cur.values()))["Total"] > 0
    assert next(iter(stepped.values()))[_MemRefType.OPT] > 0


def test_the_tracker_installs_no_module_hooks_where_upstream_installs_them():
    """MemTracker's ModTracker hooks every module's forward (and, through it, every backward) for
    per-module snapshots the runtime and the profiler never read: the runtime's tracker leaves them out."""
    from torch.nn.modules import module

    def hooks_inside(tracker) -> int:
        with tracker:
            return len(module._global_forward_pre_hooks) + len(module._global_forward_hooks)

    before = len(module._global_forward_pre_hooks) + len(module._global_forward_hooks)
    assert hooks_inside(upstream_mem_tracker_cls()()) > before
    assert hooks_inside(frozen_aware_mem_tracker()) == before

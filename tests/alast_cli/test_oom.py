"""Out of memory during a step, on the GPU or the CPU: one line, exit 1, last checkpoint intact."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from alast_cli.main import cli

CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nlong details")
# what the CPU allocator raises where malloc fails (a plain RuntimeError)
CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 2048000000 bytes. Error code 12 (Cannot allocate memory)")


ONE_PASS = ("`alast plan --batch-size 8` predicts", "use --micro-batch-size (the same steps in smaller passes")
IN_PASSES = ("batch size 8 in passes of 4", "`alast plan --batch-size 8 --micro-batch-size 4` predicts",
             "use a lower --micro-batch-size")


GPU_CACHE = "(the frozen blocks' cache holds 46 MiB of it: a lower backend.frozen_cache_mib, or backend.frozen_cache=off)"


@pytest.mark.parametrize("error,extra,says", [
    (CUDA_OOM, [], ("out of GPU memory at step 4", "backend.precision=bf16", *ONE_PASS)),
    (CPU_OOM, [], ("out of memory at step 4", "at 32 px (a tensor of 1.91 GiB did not fit)", "model.img_size",
                   *ONE_PASS)),
    (CUDA_OOM, ["--micro-batch-size", "4"], ("out of GPU memory at step 4", *IN_PASSES)),
    (CUDA_OOM, ["--set", "backend.frozen_cache=on"], (f"out of GPU memory at step 4 with batch size 8 {GPU_CACHE}",)),
])
def test_out_of_memory_ends_the_run_with_one_line_and_exit_1(tmp_path, monkeypatch, error, extra, says):
    from runtimes.torch_backend.runtime import TorchRuntime

    launch = TorchRuntime.launch_step

    def oom_at_4(self, images, labels, budget, lr, step, **kw):
        if step == 4:
            if self.frozen_cache is not None:  # as if kept on a GPU, whose memory it takes
                self.frozen_cache.device = torch.device("cuda")
            raise error
        return launch(self, images, labels, budget, lr, step, **kw)

    monkeypatch.setattr(TorchRuntime, "launch_step", oom_at_4)
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--steps", "6", "--batch-size", "8", "--out", str(run), "--img-size", "32",
                                   "--set", "backend.count_flops=off", "--set", "output.checkpoint_every=3", *extra])
    assert res.exit_code == 1
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output
    line = lines[0]
    for part in ("batch size 8", "a lower --batch-size", "step_00000003", *says):
        assert part in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003.safetensors"]

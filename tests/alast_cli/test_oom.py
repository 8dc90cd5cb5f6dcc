"""A CUDA out-of-memory error during a step: one line, exit 1, last checkpoint intact."""
from __future__ import annotations

import torch
from click.testing import CliRunner

from alast_cli.main import cli


def test_out_of_memory_ends_the_run_with_one_line_and_exit_1(tmp_path, monkeypatch):
    from runtimes.torch_backend.runtime import TorchRuntime

    launch = TorchRuntime.launch_step

    def oom_at_4(self, images, labels, budget, lr, step):
        if step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nlong details")
        return launch(self, images, labels, budget, lr, step)

    monkeypatch.setattr(TorchRuntime, "launch_step", oom_at_4)
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--steps", "6", "--batch-size", "8", "--out", str(run),
                                   "--set", "backend.count_flops=off", "--set", "output.checkpoint_every=3"])
    assert res.exit_code == 1
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output
    line = lines[0]
    for part in ("out of GPU memory at step 4", "batch size 8", "lower train.batch_size", "step_00000003"):
        assert part in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003.safetensors"]

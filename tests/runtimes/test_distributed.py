"""Data parallel training on 2 gloo ranks (CPU): lock-step weights, 1-rank parity, gradient traffic.

Tolerance for "2 ranks with global batch B == 1 rank with batch B" (5 AdamW steps, lr 1e-2):
losses within 1e-5 and weights within 2e-4, absolute (measured: 2.4e-7 and 5e-5). Both compute
the same mean over the same B samples; only the float summation order differs (two half-batch
means averaged vs one mean). Adam divides by sqrt(v), so on weights whose gradient is near zero
that rounding becomes a visible update difference: hence the looser weight bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alast_cli.launch import cli_args, torchrun_argv
from runtimes.distributed import run_local

STEPS, BATCH, DEPTH = 5, 8, 4
LOSS_TOL, WEIGHT_TOL = 1e-5, 2e-4
REPO = Path(__file__).resolve().parents[2]


def tiny_vit(seed: int):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=10)


def fixed_batches():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (STEPS, BATCH), generator=g)


def train_tiny(comm, policy: str) -> dict:
    """A few plan -> train_step -> observe steps on this rank's share of fixed global batches."""
    from planners import Observation, create_planner
    from runtimes.distributed import weights_digest
    from runtimes.torch_backend.runtime import TorchRuntime

    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    # Different initial weights per rank: the runtime must broadcast rank 0's.
    runtime = TorchRuntime(tiny_vit(seed=rank), lr=1e-2, weight_decay=0.05, grad_clip=1.0, device="cpu",
                           count_flops="off", comm=comm, memory_probe_steps=lambda s: False)
    options = {"alpha": 0.5, "seed": 7} if policy == "alast" else {}
    planner = create_planner(policy, runtime.num_blocks, **options)
    images, labels = fixed_batches()
    per = BATCH // world
    sent_before = len(comm.bytes_history) if comm is not None else 0
    out = {"loss": [], "trained": [], "kept": [], "expected_bytes": []}
    for step in range(STEPS):
        budget = planner.plan(step, step / STEPS)
        sl = slice(rank * per, (rank + 1) * per)
        res = runtime.train_step(images[step, sl], labels[step, sl], budget, 1e-2, step)
        planner.observe(Observation(step, step / STEPS, res.deltas, res.loss))
        trained = [p for ps, on in zip(runtime.block_params, budget.trained) if on for p in ps]
        out["expected_bytes"].append(4 * sum(p.numel() for p in runtime.other_params + trained))
        out["loss"].append(res.loss)
        out["trained"].append(res.trained_blocks)
        out["kept"].append(res.kept_tokens)
    params = list(runtime.model.parameters())
    out["digest"] = weights_digest(params)
    out["weights"] = [p.detach().clone() for p in params]
    out["bytes"] = comm.bytes_history[sent_before:] if comm is not None else []
    return out


def train_both(comm) -> dict:
    return {policy: train_tiny(comm, policy) for policy in ("alast", "full")}


@pytest.fixture(scope="module")
def two_ranks():
    return run_local(2, train_both)


def test_weights_stay_identical_across_ranks(two_ranks):
    r0, r1 = two_ranks
    for policy in ("alast", "full"):
        assert r0[policy]["digest"] == r1[policy]["digest"], policy
        assert r0[policy]["loss"] == r1[policy]["loss"]
        assert r0[policy]["trained"] == r1[policy]["trained"]
        assert r0[policy]["kept"] == r1[policy]["kept"]
    # the test means something: alast froze blocks and dropped tokens
    assert any(len(t) < DEPTH for t in r0["alast"]["trained"])
    assert any(k[-1] < 16 for k in r0["alast"]["kept"])


def test_two_ranks_match_one_rank_with_the_same_global_batch(two_ranks):
    torch.set_num_threads(1)
    for policy in ("alast", "full"):
        one = train_tiny(None, policy)
        two = two_ranks[0][policy]
        assert one["trained"] == two["trained"] and one["kept"] == two["kept"]
        assert max(abs(a - b) for a, b in zip(one["loss"], two["loss"])) < LOSS_TOL
        diff = max(float((a - b).abs().max()) for a, b in zip(one["weights"], two["weights"]))
        assert diff < WEIGHT_TOL, f"{policy}: weights differ by {diff}"


def test_only_trained_parameters_are_reduced(two_ranks):
    for rank in two_ranks:
        for policy in ("alast", "full"):
            assert rank[policy]["bytes"] == rank[policy]["expected_bytes"]
    alast, full = (sum(two_ranks[0][p]["bytes"]) for p in ("alast", "full"))
    assert alast < full


def test_launcher_reruns_the_same_command_without_nproc():
    from alast_cli.main import cli
    from alast_cli.train_cmd import train_command

    parent = cli.make_context("alast", ["--debug", "train"], resilient_parsing=True, obj={"debug": True})
    args = ["cfg.yaml", "--nproc", "2", "--steps", "3", "--no-pretrained", "--set", "train.lr=0.1",
            "--set", "output.keep_last=1", "--skip-bad-images", "--out", "runs/x", "--json"]
    ctx = train_command.make_context("train", list(args), parent=parent)
    argv = torchrun_argv(2, ctx)
    assert argv[:5] == ["--standalone", "--nproc-per-node", "2", "-m", "alast_cli"]
    assert argv[5:7] == ["--debug", "train"]
    rest = argv[7:]
    assert "--nproc" not in rest and rest[0] == "cfg.yaml"
    assert rest == cli_args(ctx)
    again = train_command.make_context("train", list(rest), parent=parent)
    same = {k: v for k, v in ctx.params.items() if k != "nproc"}
    assert {k: v for k, v in again.params.items() if k != "nproc"} == same


# random images: no data set to import or read in each process (the launcher and the ranks)
RANDOM_DATA = ["--data", "random:64"]


def _read_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_nproc_2_end_to_end(tmp_path):
    """`alast train --nproc 2` (torchrun): rank 0 alone writes; same losses as 1 rank within tolerance
    (with the highest-scoring tokens kept: drawn tokens come from each rank's own generator), and
    the same FLOPs per step in its records: the whole step's, not one process's share."""
    common = ["--steps", "3", "--batch-size", "8", "--set", "backend.threads=1", "--set", "policy.token_select=top",
              *RANDOM_DATA, "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "alast_cli", "train", "--nproc", "2", *common,
                          "--out", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    summaries = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only rank 0 prints
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["ranks_in_sync"] is True and s["grad_allreduce_bytes_per_step"] > 0
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # one writer
    assert all(r["grad_allreduce_bytes"] > 0 and r["batch_size"] == 8 for r in records)

    from click.testing import CliRunner

    from alast_cli.main import cli

    one = CliRunner().invoke(cli, ["train", *common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = _read_losses(tmp_path / "one"), _read_losses(tmp_path / "two")
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL
    flops = [[json.loads(line)["train_flops"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    assert flops[0] == pytest.approx(flops[1], rel=1e-6) and sum(flops[1]) == pytest.approx(s["train_flops"], rel=1e-6)


# slow: a rank's bad input is exit 2 and one line in tests/alast_cli/test_launch_signals.py (the launcher's
# report, in-process), and a real torchrun's failed ranks reach that report there too (a rank killed by SIGKILL)
@pytest.mark.slow
def test_cli_nproc_2_exit_code_of_bad_input(tmp_path):
    """A worker's bad input comes back as exit 2 with one message, not torchrun's generic failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "alast_cli", "train", "--nproc", "2", "--steps", "2",
                          "--data", f"imagefolder:{tmp_path / 'missing'}", "--out", str(tmp_path / "run")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "image folder not found" in errors[0]
    assert "Traceback" not in res.stderr


def test_cli_nproc_2_resumes_exactly_and_only_with_2_processes(tmp_path):
    """A 2-process run resumed from its step-2 checkpoint repeats the uninterrupted run's steps 2-3:
    each rank goes on with its own token draws (drawn tokens, the default), not rank 0's. Resuming
    with one process is refused in one line."""
    from click.testing import CliRunner

    from alast_cli.main import cli
    from tests.cli_errors import one_error_line

    common = ["--steps", "4", "--batch-size", "8", "--set", 'backend.count_flops="off"', "--set", "backend.threads=1",
              "--set", "output.checkpoint_every=2", *RANDOM_DATA]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "two"

    def train(*extra: str) -> None:
        res = subprocess.run([sys.executable, "-m", "alast_cli", "train", "--nproc", "2", *common, "--out", str(run),
                              *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                             check=False)
        assert res.returncode == 0, res.stderr[-2000:]

    def steps() -> list[tuple]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["kept_tokens"], r["deltas"]) for r in records]

    train()
    straight = steps()
    for end in (run / "checkpoints" / "step_00000004.safetensors", run / "summary.json"):
        end.unlink()  # as if stopped after step 2
    one_error_line(CliRunner().invoke(cli, ["train", *common, "--out", str(run), "--resume"]), 2,
                   "trained with 2 processes", "resume it with --nproc 2")
    train("--resume")
    assert len(straight) == 4 and steps() == straight


@pytest.mark.slow  # the launcher's once-only report: tests/alast_cli/test_launch_signals.py, without processes
def test_cli_nproc_2_failure_on_every_rank_is_reported_once(tmp_path):
    """A non-finite loss stops both ranks alike: one message (rank 0's), not one per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "alast_cli", "train", "--nproc", "2", "--steps", "3", *RANDOM_DATA,
                          "--batch-size", "8", "--lr", "1e9", "--set", 'backend.count_flops="off"',
                          "--set", "backend.threads=1", "--out", str(tmp_path / "run")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss became nan" in errors[0], res.stderr[-2000:]


def test_a_global_batch_the_ranks_cannot_share_names_sizes_they_can():
    from alast.data import DataError, check_batch_size

    with pytest.raises(DataError, match="^global batch size 15 is not divisible by 2 ranks; use a multiple of 2, "
                                        "such as 14 or 16$"):
        check_batch_size(100, 15, 2)
    with pytest.raises(DataError, match="; use a multiple of 4, such as 4$"):
        check_batch_size(5, 3, 4)  # 8 would exceed the 5 training images
    with pytest.raises(DataError, match="; use fewer ranks$"):
        check_batch_size(1, 1, 2)


def test_the_launcher_refuses_an_indivisible_batch_before_starting_processes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from alast_cli import launch
    from alast_cli.main import cli
    from tests.cli_errors import one_error_line

    def started(*a, **k):
        raise AssertionError("torchrun started")

    monkeypatch.setattr(launch, "launch_torchrun", started)
    res = CliRunner().invoke(cli, ["train", "--nproc", "2", "--batch-size", "15", "--out", str(tmp_path / "run")])
    one_error_line(res, 2, "global batch size 15 is not divisible by 2 ranks; use a multiple of 2, such as 14 or 16")
    assert not (tmp_path / "run").exists()

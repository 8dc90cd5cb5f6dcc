"""The bench's terminal table fits an 80-column terminal; results.md keeps every column."""
from pathlib import Path

from alast.bench_runs import COLUMNS, aggregate, markdown_table
from alast_cli import bench_cmd
from alast_cli.render import results as console

POLICIES = ["full", "alast", "tokens", "alast+lora", "full@matched"]


def _table():
    rs = [{"policy": p.split("@")[0], "label": p, "seed": 0, "val_accuracy": 0.9123, "train_flops": 1e12 * (i + 1),
           "peak_memory_bytes": 123.4 * 2**20, "wall_time_s": 12.3, "median_step_time_s": 0.5, "train_time_s": 10.0,
           "full_ft_train_flops": 1e12, "steps": 300, "inference_flops_ratio": 0.9,
           "val_accuracy_token_schedule": 0.91, "val_accuracy_all_tokens": 0.9123}
          for i, p in enumerate(POLICIES)]
    table = aggregate(rs, POLICIES)
    table["matched"] = None
    return table


def test_the_terminal_table_fits_80_columns_and_results_md_has_every_column(monkeypatch):
    table = _table()
    monkeypatch.setattr(console, "width", 80)
    with console.capture() as cap:
        bench_cmd._render_table(table, Path("bench/x"))
    text = cap.get()
    lines = text.splitlines()
    assert "…" not in text and max(len(line) for line in lines) <= 80
    for policy in POLICIES:
        assert any(line.startswith(policy + " ") for line in lines), policy
    assert "Same steps: alast 91.23% vs full 91.23% (+0.00 pts, at 2.000x full's counted FLOPs)" in " ".join(text.split())
    header = next(line for line in lines if line.startswith("policy"))
    assert header.split() == ["policy", *(h for h in bench_cmd.TERMINAL_COLUMNS.values() for h in h.split())]
    md = markdown_table({**table, "setting": {k: "x" for k in ("model", "data", "backend", "steps", "batch_size",
                                                                 "device")}})
    assert md.splitlines()[2].count("|") == len(COLUMNS) + 1


def test_the_time_compared_to_full_is_time_in_training_steps_not_wall_time():
    """Wall time charges the process's one-time start-up to the first run: no ratio is taken of it."""
    table = _table()
    with console.capture() as cap:
        bench_cmd._render_table(table, Path("bench/x"))
    header = next(line for line in cap.get().splitlines() if line.startswith("policy")).split()
    assert header[-1] == "train" and "wall" not in header
    md = markdown_table({**table, "setting": {k: "x" for k in ("model", "data", "backend", "steps", "batch_size",
                                                                 "device")}})
    head = md.splitlines()[2]
    assert "| train s | train/full | wall s |" in head and "wall/full" not in head
    assert "Train s: the time in training steps" in md

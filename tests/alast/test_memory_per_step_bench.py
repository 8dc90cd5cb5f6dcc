"""benchmarks/memory_per_step.py measures every step's peak and sets the plan's prediction beside it."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_step_is_measured_and_predicted_within_a_tenth_of_a_percent(tmp_path):
    main = runpy.run_path(str(REPO / "benchmarks" / "memory_per_step.py"))["main"]
    out = tmp_path / "m.json"
    main(["--data", "random:64", "--steps", "5", "--batch-size", "16", "--target-flops", "0.5",
          "--set", "policy.dense_final_frac=0.3", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["step"] for row in r["rows"]] == [1, 2, 3, 4]  # step 0: AdamW's state comes after its peak
    # the early phase (the top 5 of 6 blocks), then the other sparse steps and a dense final phase (set)
    assert r["rows"][0]["trained_blocks"] == [1, 2, 3, 4, 5] and r["rows"][-1]["trained_blocks"] == [4, 5]
    for row in r["rows"]:
        assert abs(row["predicted_mib"] / row["measured_mib"] - 1) < 1e-3, row


def test_an_evas_steps_are_predicted_with_its_rotary_embeddings_counted_once(tmp_path):
    """Mixed-mode RoPE (every block's and head's embeddings in one tensor, ``rope_bytes``): the
    blocks' profiles leave the embeddings out, the step counts them once."""
    main = runpy.run_path(str(REPO / "benchmarks" / "memory_per_step.py"))["main"]
    out = tmp_path / "m.json"
    main(["--model", "vit_small_patch16_rope_mixed_224", "--data", "random:32", "--steps", "4", "--batch-size", "8",
          "--target-flops", "0.5", "--set", "model.img_size=64", "--set", "model.pretrained=false",
          "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert any(k < 16 for row in rows for k in row["kept_tokens"])
    for row in rows:
        assert abs(row["predicted_mib"] / row["measured_mib"] - 1) < 1e-3, row

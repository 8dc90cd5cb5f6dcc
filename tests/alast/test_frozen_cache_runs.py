"""The frozen blocks' cache in a run: what it predicts, what the run counts, when it is off."""
import json

import pytest
from click.testing import CliRunner

from alast.data import StepBatchSampler
from alast.training.frozen import cached_shares
from alast_cli.main import cli

TRAIN_IMAGES = 180  # few enough that 20 steps of 24 see each image again


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """180 of the digits to train on and 40 to validate on, as an image folder (train/ and val/): the
    runs read their images back within 20 steps, and their evaluations take no time."""
    from PIL import Image

    from alast.data.datasets import digit_images

    root = tmp_path_factory.mktemp("digits")
    images, labels = digit_images()
    count = {}
    for i, (pixels, label) in enumerate(zip(images, labels)):
        n = count[label] = count.get(label, 0) + 1
        split = "train" if n <= TRAIN_IMAGES // 10 else "val" if n <= TRAIN_IMAGES // 10 + 4 else None
        if split:
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(root / split / str(label) / f"{i:04d}.png")
    return ["--data", f"imagefolder:{root}"]


def test_cached_shares_replay_the_sampler():
    sampler = StepBatchSampler(8, 4, seed=0, start_step=0, total_steps=6)
    batches = [sampler.indices(s) for s in range(6)]
    shares = cached_shares(sampler, 6, lambda s: s != 3, capacity=8)
    held, expected = set(), []
    for s, keys in enumerate(batches):
        if s == 3:
            held.clear()
            expected.append(0.0)
            continue
        expected.append(sum(k in held for k in keys) / 4)
        held.update(keys)
    assert shares == expected and shares[2] == 1.0 and shares[4] == 0.0
    # a resumed run's cache starts empty at its first step
    resumed = cached_shares(sampler, 6, lambda s: True, capacity=8, start=2)
    assert resumed[:3] == [0.0, 0.0, 0.0] and resumed[3] == sum(k in batches[2] for k in batches[3]) / 4
    # a cache of 2 images: only the first two of step 0 are ever held
    small = cached_shares(sampler, 6, lambda s: True, capacity=2)
    assert small == [0.0] + [sum(k in batches[0][:2] for k in b) / 4 for b in batches[1:]]


def train(data, tmp_path, name, *extra):
    out = tmp_path / name
    res = CliRunner().invoke(cli, ["train", *data, "--steps", "20", "--batch-size", "24", "--target-flops", "0.4",
                                   "--set", "backend.threads=1", *extra, "--out", str(out)])
    return res, out


def test_a_run_reads_its_frozen_blocks_from_the_cache_and_lands_on_its_target(digits, tmp_path):
    res, out = train(digits, tmp_path, "cached")
    assert res.exit_code == 0, res.output
    assert f"frozen blocks 0-1 cached for up to {TRAIN_IMAGES} images" in res.output and "the plan reads" in res.output
    summary = json.loads((out / "summary.json").read_text())
    frozen = summary["frozen_cache"]
    assert frozen["blocks"] == 2 and 150 < frozen["held_images"] <= TRAIN_IMAGES and frozen["cleared"] == 0
    assert 0.3 < frozen["planned_share"] and abs(frozen["read_share"] - frozen["planned_share"]) < 0.02
    assert abs(summary["flops_ratio_vs_full"] / 0.4 - 1) < 0.01
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    early = [r for r in records if len(r["trained_blocks"]) == 5]  # the early phase trains block 1: nothing read
    assert early and all(r["cached_images"] == 0 for r in early)
    assert sum(r["cached_images"] for r in records) > 0
    # the plan replays what ran, the cache's reads included
    res = CliRunner().invoke(cli, ["plan", "--trace", str(out), "--json", "--throughput", "1e12"])
    assert res.exit_code == 0, res.output
    replayed = json.loads(res.stdout)
    trace = replayed["trace"]
    assert abs(trace["train_flops_rel_error"]) < 1e-3
    # its time prices what ran: at a given throughput, the FLOPs left after the reads
    alast = replayed["policies"]["alast"]
    assert alast["time_s"] * 1e12 == pytest.approx(alast["train_flops"], rel=1e-9)
    assert trace["predicted_peak_memory_sampled_steps_bytes"] == pytest.approx(summary["peak_memory_bytes"], rel=1e-3)
    # a cache kept on a GPU is in the run's peak: the trace adds it
    (out / "summary.json").write_text(json.dumps({**summary, "frozen_cache": {**frozen, "device": "cuda"}}))
    res = CliRunner().invoke(cli, ["plan", "--trace", str(out), "--json"])
    on_gpu = json.loads(res.stdout)["trace"]
    assert on_gpu["predicted_peak_memory_bytes"] - trace["predicted_peak_memory_bytes"] == frozen["bytes"]
    (out / "summary.json").write_text(json.dumps(summary))
    # so does the plan, before the run: the same shares read, the same tokens bought with them
    res = CliRunner().invoke(cli, ["plan", *digits, "--steps", "20", "--batch-size", "24", "--target-flops", "0.4",
                                   "--json", "--throughput", "1e12"])
    assert res.exit_code == 0, res.output
    planned = json.loads(res.stdout)
    assert planned["policies"]["alast"]["time_s"] * 1e12 == pytest.approx(planned["policies"]["alast"]["train_flops"],
                                                                           rel=1e-9)
    assert planned["frozen_cache"]["planned_share"] == pytest.approx(frozen["planned_share"])
    assert planned["frozen_cache"]["bytes"] == frozen["bytes"] and frozen["device"] == "cpu"
    assert planned["policies"]["alast"]["train_flops"] == pytest.approx(summary["train_flops"], rel=0.01)
    # off: the same target, every block computed; the run reads nothing and spends the same FLOPs
    res, off = train(digits, tmp_path, "off", "--set", "backend.frozen_cache=off")
    assert res.exit_code == 0, res.output
    plain = json.loads((off / "summary.json").read_text())
    assert plain["frozen_cache"] is None and abs(plain["flops_ratio_vs_full"] / 0.4 - 1) < 0.01
    assert "cached_images" not in (off / "metrics.jsonl").read_text()


@pytest.mark.parametrize("extra, why", [
    (["--set", "data.augment=true"], "data.augment gives each step new views of its images"),
    (["--policy", "tokens"], "no bottom block stays frozen with every token in this policy"),
    (["--set", "policy.freeze_embeddings=false"], "the embeddings train in this run"),
    (["--micro-batch-size", "8"], "not with gradient accumulation (train.micro_batch_size)"),
])
def test_where_the_cache_cannot_apply_auto_leaves_it_off_and_on_refuses(digits, tmp_path, extra, why):
    res, out = train(digits, tmp_path, "on", "--set", "backend.frozen_cache=on", *extra)
    assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
    assert not out.exists()
    if extra[0] == "--policy":
        return
    res, out = train(digits, tmp_path, "auto", "--steps", "4", *extra)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["frozen_cache"] is None


def test_on_a_gpu_auto_leaves_the_cache_off_and_on_keeps_it_in_device_memory(digits, monkeypatch):
    from alast.config import load_config
    from alast.planning import plan as planning
    from alast.training.frozen import setup_frozen_cache

    args = ["plan", *digits, "--steps", "20", "--batch-size", "24", "--target-flops", "0.4", "--json"]
    plans = {}
    for name, extra in [("cpu", []), ("auto", ["--set", "backend.device=cuda"]),
                        ("on", ["--set", "backend.device=cuda", "--set", "backend.frozen_cache=on"])]:
        res = CliRunner().invoke(cli, args + extra)
        assert res.exit_code == 0, res.output
        plans[name] = json.loads(res.stdout)
    assert plans["cpu"]["frozen_cache"]["device"] == "cpu"
    on = plans["on"]["frozen_cache"]
    # auto plans the run without it, and says what `on` would cache
    offer = plans["auto"]["frozen_cache"]
    assert offer["left_off"] and {k: offer[k] for k in on} == on and "left_off" not in on
    assert plans["auto"]["policies"]["alast"]["peak_memory_bytes"] < plans["on"]["policies"]["alast"]["peak_memory_bytes"]
    res = CliRunner().invoke(cli, args[:-1] + ["--set", "backend.device=cuda"])
    assert "on a GPU the frozen blocks' cache stays off (backend.frozen_cache=auto); with backend.frozen_cache=on" \
        in " ".join(res.output.split())
    assert on["device"] == "cuda" and on["planned_share"] == plans["cpu"]["frozen_cache"]["planned_share"]
    assert on["bytes"] == TRAIN_IMAGES * (65 * 128 * 4 + 2 * 4)  # each training image: 65 tokens of 128, two deltas
    # the plan's peak holds the cache's bytes on top of the steps' own
    monkeypatch.setattr(planning, "_resident", lambda pred, nbytes: None)
    res = CliRunner().invoke(cli, args + ["--set", "backend.device=cuda", "--set", "backend.frozen_cache=on"])
    apart = json.loads(res.stdout)["policies"]["alast"]["peak_memory_bytes"]
    assert plans["on"]["policies"]["alast"]["peak_memory_bytes"] - apart == on["bytes"]

    # the run decides as the plan does: auto turns nothing on for a runtime on a GPU
    class GpuRuntime:
        device, name = "cuda:0", "torch"

        def enable_frozen_cache(self, *a):
            raise AssertionError("auto must not turn the cache on on a GPU")

    class Planner:
        frozen_bottom = 2

    cfg = load_config()
    assert cfg.backend.frozen_cache == "auto"
    assert setup_frozen_cache(cfg, GpuRuntime(), Planner(), 100, 10) is None

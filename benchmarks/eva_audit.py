"""timm's Eva models (rotary position embeddings), or its BEiT models (relative position biases), end
to end through the CLI, at random initialisation.

For each model: ``alast train`` on a FLOPs target, ``alast plan --trace`` of the run (counted FLOPs,
peak memory and the inference schedule against the plan), ``alast export`` and ``alast eval`` of the
ONNX model (its accuracy against the run's), and an ``alast+lora`` run with the LoRA targets given.
Prints one JSON record per model and writes them all to ``--out``. ``--backend ort`` trains on the
ort backend (no LoRA run: it has none).

  python benchmarks/eva_audit.py --out docs/results/eva_audit.json
  python benchmarks/eva_audit.py --backend ort --out docs/results/eva_audit_ort.json
  python benchmarks/eva_audit.py --family beit --out docs/results/beit_audit.json
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ALAST = str(Path(sys.executable).with_name("alast"))
# model: (image size, LoRA targets). The default target, qkv, is refused where timm applies its
# weight directly (a query and a value bias beside a fused qkv), and absent with separate q, k, v.
MODELS = {
    "vit_small_patch16_dinov3": (64, "[qkv]"),
    "vit_small_patch16_dinov3_qkvb": (64, "[proj,fc1,fc2]"),
    "eva02_tiny_patch14_224": (56, "[proj,fc1,fc2]"),
    "vit_small_patch16_rope_224": (64, "[qkv]"),
    "vit_small_patch16_rope_mixed_224": (64, "[qkv]"),
    "vit_medium_patch16_rope_reg1_gap_256": (64, "[proj,fc1,fc2]"),
    "vit_pe_core_tiny_patch16_384": (64, "[qkv]"),
    "eva02_base_patch16_clip_224": (64, "[q_proj,v_proj]"),
}
# timm's Beit: every layout it lists (the 384 and 512 px variants are these at another size)
BEIT_MODELS = {
    "beit_base_patch16_224": (64, "[proj,fc1,fc2]"),
    "beitv2_base_patch16_224": (64, "[proj,fc1,fc2]"),
    "beit_large_patch16_224": (64, "[proj,fc1,fc2]"),
    "beitv2_large_patch16_224": (64, "[proj,fc1,fc2]"),
}
FAMILIES = {"eva": MODELS, "beit": BEIT_MODELS}


def alast(*args: str) -> tuple[int, str]:
    r = subprocess.run([ALAST, *args], capture_output=True, text=True, check=False)
    return r.returncode, r.stdout + r.stderr


def last_json(text: str) -> dict:
    return json.loads(next(line for line in reversed(text.strip().splitlines()) if line.startswith("{")))


def audit(model: str, size: int, targets: str, work: Path, args: argparse.Namespace) -> dict:
    common = ["--model", model, "--no-pretrained", "--set", f"model.img_size={size}", "--batch-size",
              str(args.batch_size), "--target-flops", str(args.target_flops), "--data", "digits", "--set",
              f"backend.threads={args.threads}", "--backend", args.backend]
    rec: dict = {"model": model, "img_size": size, "backend": args.backend, "lora_targets": targets}
    rc, out = alast("train", *common, "--steps", str(args.steps), "--out", str(work / "run"))
    rec["train_rc"] = rc
    if rc == 0:
        s = json.loads((work / "run" / "summary.json").read_text())
        rec.update(flops_ratio=s["flops_ratio_vs_full"], eval_kept_tokens=s["eval_kept_tokens"],
                   trim_last=s["plan"]["knobs"].get("trim_last"), mem_measured=s["peak_memory_bytes"])
        t = last_json(alast("plan", "--trace", str(work / "run"), "--json")[1])["trace"]
        rec.update(trace_flops_rel_error=t["train_flops_rel_error"],
                   mem_predicted=t["predicted_peak_memory_sampled_steps_bytes"],
                   infer_predicted=t.get("predicted_inference_flops_ratio"),
                   infer_counted=t.get("counted_inference_flops_ratio"))
        rc, out = alast("export", str(work / "run"), "--out", str(work / "m.onnx"))
        found = re.search(r"max \|logit diff\| vs PyTorch (\S+)", out) if rc == 0 else re.search(r"error: (.*)", out)
        rec["export"] = found.group(1)[:200] if found else out[-200:]
        if rc == 0:
            got = last_json(alast("eval", str(work / "m.onnx"), "--data", "digits", "--json")[1])
            rec["onnx_accuracy_equals_run"] = abs(got["accuracy"] - s["val_accuracy"]) < 1e-9
    if args.backend == "ort":
        rec["lora"] = "not run: the ort backend has no LoRA"
        return rec
    rc, out = alast("train", *common, "--steps", str(max(2, args.steps - 2)), "--policy", "alast+lora", "--set",
                    f"policy.lora.targets={targets}", "--out", str(work / "lora"))
    rec["lora"] = (json.loads((work / "lora" / "summary.json").read_text())["flops_ratio_vs_full"] if rc == 0
                   else out.strip().splitlines()[-1][:200])
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=tuple(FAMILIES), default="eva", help="which models (default: eva)")
    ap.add_argument("--models", help="comma-separated, from the family's: " + "; ".join(
        f"{f}: {', '.join(m)}" for f, m in FAMILIES.items()) + " (default: all of them)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=("torch", "ort"), default="torch", help="the runs' backend (ort: no LoRA run)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    family = FAMILIES[args.family]
    records = []
    for model in (args.models or ",".join(family)).split(","):
        if model not in family:
            raise SystemExit(f"error: unknown {args.family} model {model!r}; use some of {', '.join(family)}")
        work = Path(tempfile.mkdtemp(prefix=f"alast-{args.family}-audit-"))
        try:
            records.append(audit(model, *family[model], work, args))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(records[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["benchmarks/eva_audit.py", *(argv or sys.argv[1:])]),
                                    "records": records}, indent=1))


if __name__ == "__main__":
    main()

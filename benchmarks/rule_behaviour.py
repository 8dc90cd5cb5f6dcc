"""How the ALaST budget rules behave on different models: counted FLOPs and budget movement.

For each model (random init unless it is a shipped backbone), fine-tunes on `digits` for a few
steps with each rule at its defaults (no FLOPs target, no dense final phase) and reports: counted
training FLOPs as a ratio to full fine-tuning, how far the budgets moved from where they started,
their spread across blocks at the end, and the share of budgets sitting at a clip bound.
``--freeze-mode`` picks the trained blocks: ``last`` (alast's default: the top half of the blocks,
embeddings frozen) or ``sample`` (the paper: 3/4 of the blocks drawn from softmax(budgets),
embeddings trained).

  python benchmarks/rule_behaviour.py --models vit_base_patch16_224,deit_small_patch16_224 \
      --steps 30 --batch-size 4 --out docs/results/rule_behaviour.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from alast.config import load_config  # noqa: E402
from alast.data import build_data  # noqa: E402
from alast.models import DEMO_MODEL, SHIPPED_MODELS, create_model  # noqa: E402
from alast.training.build import model_data_config  # noqa: E402
from planners import Observation, create_planner  # noqa: E402
from runtimes.token_schedule import head_reads_prefix  # noqa: E402
from runtimes.torch_backend.runtime import TorchRuntime  # noqa: E402

SHIPPED = set(SHIPPED_MODELS)  # the backbones alast ships start from their weights, timm models at random
IMG_SIZE = {"vit_small_patch14_reg4_dinov2": 224}  # 518 px by default: too slow for a CPU check


def run_rule(model_name: str, rule: str, steps: int, batch: int, lr: float, seed: int,
             freeze_mode: str = "last") -> dict:
    img = IMG_SIZE.get(model_name)
    data = build_data("digits", model_data_config(model_name, img), seed=seed)
    torch.manual_seed(seed)
    model = create_model(model_name, len(data.classes), pretrained=model_name in SHIPPED, img_size=img)
    policy = load_config(None, [f"policy.freeze_mode={freeze_mode}"]).policy  # as alast train
    rt = TorchRuntime(model, lr=lr, weight_decay=0.05, grad_clip=1.0, memory_probe_steps=lambda s: False,
                      freeze_embeddings=policy.embeddings_frozen, token_select=policy.token_select,
                      token_score=policy.token_score, seed=seed)
    planner = create_planner("alast", rt.num_blocks, rule=rule, alpha=lr, seed=seed, freeze_mode=freeze_mode,
                             trim_last=policy.trim_last and head_reads_prefix(model), spare_first=policy.spare_first,
                             early_frac=policy.early_phase)
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), drop_last=True)
    budgets, flops, t0 = [], 0.0, time.perf_counter()
    for step, (x, y) in zip(range(steps), _forever(loader)):
        budget = planner.plan(step, step / steps)
        result = rt.train_step(x, y, budget, lr, step)
        planner.observe(Observation(step, step / steps, result.deltas, result.loss))
        budgets.append(list(budget.budgets))
        flops += result.train_flops
    full = rt.full_ft_step_flops(batch) * steps
    b0, last = budgets[0], budgets[-1]
    at_bound = sum(1 for b in last if b <= planner.b_min + 1e-9 or b >= planner.b_max - 1e-9)
    return {
        "model": model_name, "rule": rule, "freeze_mode": freeze_mode, "blocks": rt.num_blocks,
        "patch_tokens": rt.num_patches,
        "steps": steps, "batch_size": batch, "lr": lr, "pretrained": model_name in SHIPPED,
        "img_size": rt.timm_model.patch_embed.img_size[0],
        "flops_ratio": flops / full, "fewer_flops_x": full / flops,
        "max_budget_move": max(abs(b - s) for row in budgets for b, s in zip(row, b0)),
        "final_budget_spread": statistics.pstdev(last), "final_budgets": last,
        "final_share_at_clip_bound": at_bound / len(last), "seconds": time.perf_counter() - t0,
    }


def _forever(loader):
    while True:
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=f"vit_base_patch16_224,deit_small_patch16_224,"
                    f"vit_small_patch14_reg4_dinov2,{DEMO_MODEL}")
    ap.add_argument("--rules", default="normalized,paper")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze-mode", choices=["last", "sample"], default="last")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results/rule_behaviour.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for rule in args.rules.split(","):
            row = run_rule(name, rule, args.steps, args.batch_size, args.lr, args.seed, args.freeze_mode)
            rows.append(row)
            print(f"{name:32s} {rule:10s} FLOPs {row['flops_ratio']:.3f}x ({row['fewer_flops_x']:.2f}x fewer)  "
                  f"max move {row['max_budget_move']:.3f}  spread {row['final_budget_spread']:.3f}  "
                  f"at bound {row['final_share_at_clip_bound']:.0%}  ({row['seconds']:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__, "rows": rows},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

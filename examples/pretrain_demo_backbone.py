"""Pre-train the demo backbone (``alast_demo_vit``) on the synthetic ``pretrain`` family.

Every step draws a fresh batch of procedurally generated 32x32 images (alast/data/synthetic.py): no
download, no over-fitting. The backbone (without ``head.*``) goes to ``--out`` as safetensors, with
a JSON record next to it. Full run, one GPU, about 4-5 minutes:
    python examples/pretrain_demo_backbone.py --device cuda
Short CPU check: ... --device cpu --steps 50 --batch-size 32 --out /tmp/demo.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from alast.data.synthetic import generate_batch, num_classes  # noqa: E402
from alast.models import DEMO_WEIGHTS, build_demo_model  # noqa: E402

FAMILY = "pretrain"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps, at most 1000)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for cuda, off for cpu)")
    p.add_argument("--gen-batches", type=int, default=16, help="batches generated per call (amortises launches)")
    p.add_argument("--eval-size", type=int, default=4096)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model, images, labels, batch_size, autocast) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        with autocast():
            correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / images.shape[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    use_bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    warmup = args.warmup if args.warmup is not None else min(1000, max(1, args.steps // 20))
    torch.manual_seed(args.seed)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    model = build_demo_model(num_classes(FAMILY), pretrained=False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (  # noqa: E731
        1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    train_gen = torch.Generator(device=device).manual_seed(args.seed)
    eval_gen = torch.Generator().manual_seed(args.seed + 1_000_003)  # CPU: same held-out set everywhere
    eval_x, eval_y = (t.to(device) for t in generate_batch(FAMILY, args.eval_size, eval_gen))

    start, run_loss, run_acc, n_run = time.time(), 0.0, 0.0, 0
    for step in range(args.steps):
        k = step % args.gen_batches
        if k == 0:
            pool_x, pool_y = generate_batch(FAMILY, args.batch_size * args.gen_batches, train_gen, device)
        x = pool_x[k * args.batch_size:(k + 1) * args.batch_size]
        y = pool_y[k * args.batch_size:(k + 1) * args.batch_size]
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss, run_acc = run_loss + loss.detach(), run_acc + (logits.argmax(1) == y).float().mean()
        n_run += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  loss {float(run_loss) / n_run:.4f}  "
                  f"acc {float(run_acc) / n_run:.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
            run_loss, run_acc, n_run = 0.0, 0.0, 0

    held_out = evaluate(model, eval_x, eval_y, 512, autocast)
    elapsed = time.time() - start
    print(f"held-out {FAMILY} accuracy: {held_out:.4f} ({args.eval_size} images, {elapsed:.0f}s)")

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("head.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"family": FAMILY, "steps": str(args.steps)})
    record = dict(family=FAMILY, num_classes=num_classes(FAMILY), steps=args.steps, batch_size=args.batch_size,
                  held_out_accuracy=round(held_out, 4), eval_size=args.eval_size, seconds=round(elapsed, 1),
                  device=args.device, bf16=use_bf16, torch=torch.__version__,
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {len(state)} tensors to {args.out}")
    return record


if __name__ == "__main__":
    main()

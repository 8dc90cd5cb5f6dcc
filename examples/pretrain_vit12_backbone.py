"""Pre-train the 12-block backbone (``alast_vit12``) on formula-driven fractals (FDSL).

Every step draws fresh fractal images of 1,000 IFS classes (alast/data/formula.py) on the device: no
natural image, no download. The backbone (without ``head.*``) goes to ``--out`` as fp16 safetensors,
with a JSON record next to it. The learning rate follows warm-up + cosine over the run's progress,
the larger of step/--steps and elapsed/--minutes, so a run fits a fixed GPU slot. The shipped weights
come from one H200 in 4.5 minutes (3,290 steps of 1,024 images at 112 px, 96.5% held-out on the 1,000
classes; record alast/assets/alast_vit12_fdsl.json; `bash benchmarks/gpu_job.sh OUT` ran it):
    python examples/pretrain_vit12_backbone.py --device cuda --minutes 4.5 --log-every 1000
Without a GPU, most of the run can see smaller images (--img-size 56: 7x7 = 49 patch tokens, about
3.5x more images a second on two CPU cores); the position embedding stays a 14x14 grid, resampled on
the fly, and the last --full-res-frac of the run trains at 112 px, the size the backbone is fine-tuned
at. The backbone shipped before came from two CPU cores this way (78.6% held-out on 256 classes):
    python examples/pretrain_vit12_backbone.py --device cpu --minutes 45 --img-size 56 --full-res-frac 0.15 \
        --batch-size 64 --lr 5e-4 --classes 256 --eval-size 1024 --log-every 500
CPU smoke check (seconds): ... --smoke --out /tmp/vit12.safetensors
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

from alast.data.formula import DEFAULT_SIZE, held_out_batch, sample_batch  # noqa: E402
from alast.models import VIT12_ARCH, VIT12_MODEL, VIT12_PRETRAINED_CFG, VIT12_WEIGHTS, build_shipped_model  # noqa: E402

SMOKE = dict(steps=3, batch_size=8, classes=10, eval_size=20, log_every=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the training loop")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000, help="number of IFS classes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the run's progress")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--img-size", type=int, default=DEFAULT_SIZE,
                   help=f"image side for most of the run (a multiple of the patch, 8; default {DEFAULT_SIZE})")
    p.add_argument("--full-res-frac", type=float, default=0.1,
                   help=f"with --img-size below {DEFAULT_SIZE}: share of the run's progress, at its end, "
                        f"at {DEFAULT_SIZE} px")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for cuda, off for cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-size", type=int, default=5000, help="held-out images (5 per class at 1000 classes)")
    p.add_argument("--log-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=VIT12_WEIGHTS)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (3 steps of 8 images): checks the pipeline")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.command = " ".join(["python", "examples/pretrain_vit12_backbone.py", *argv])
    if args.smoke:
        vars(args).update(SMOKE, device="cpu")
    patch = VIT12_ARCH["patch_size"]
    if not patch <= args.img_size <= DEFAULT_SIZE or args.img_size % patch:
        p.error(f"--img-size must be a multiple of {patch} between {patch} and {DEFAULT_SIZE}, got {args.img_size}")
    if not 0.0 <= args.full_res_frac <= 1.0:
        p.error(f"--full-res-frac must be in [0, 1], got {args.full_res_frac}")
    return args


def image_size(progress: float, args: argparse.Namespace) -> int:
    """The side of this step's images: ``--img-size``, then the fine-tuning size for the final share."""
    return DEFAULT_SIZE if progress >= 1.0 - args.full_res_frac else args.img_size


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images to the model's input convention (the mean/std that fine-tuning will use)."""
    mean = torch.tensor(VIT12_PRETRAINED_CFG["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(VIT12_PRETRAINED_CFG["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def evaluate(model, images, labels, batch_size, autocast) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        with autocast():
            correct += (model(normalise(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / max(1, images.shape[0])


def generation_rate(args, device: torch.device) -> float:
    """Formula images per second on ``device`` at ``args.batch_size`` (after one warm-up batch)."""
    g = torch.Generator(device=device).manual_seed(12345)
    sample_batch(args.classes, args.batch_size, g, args.img_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, n = time.time(), 2 if args.smoke else 5
    for _ in range(n):
        sample_batch(args.classes, args.batch_size, g, args.img_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * args.batch_size / (time.time() - start)


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of the run, then cosine to zero."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu (or --smoke)")
    device = torch.device(args.device)
    use_bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # dynamic_img_size: the 14x14 position embedding is resampled to smaller grids on the fly, so the
    # saved weights are alast_vit12's whatever --img-size was (the flag is not part of the state dict).
    model = build_shipped_model(VIT12_MODEL, args.classes, pretrained=False,
                                dynamic_img_size=args.img_size != DEFAULT_SIZE).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    train_gen = torch.Generator(device=device).manual_seed(args.seed)
    eval_x, eval_y = held_out_batch(args.classes, args.eval_size, seed=args.seed, device=device)
    args.generation_images_per_s = round(generation_rate(args, device))
    print(f"{VIT12_MODEL}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.classes} classes, "
          f"held-out {args.eval_size}, data {args.generation_images_per_s} img/s", flush=True)

    start, run_loss, run_acc, n_run, evals, step, progress = time.time(), 0.0, 0.0, 0, [], 0, 0.0
    while progress < 1.0:
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress, args.warmup)
        x, y = sample_batch(args.classes, args.batch_size, train_gen, image_size(progress, args), device)
        with autocast():
            logits = forward(normalise(x))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, elapsed = step + 1, time.time() - start
        progress = max(step / args.steps, elapsed / (60 * args.minutes) if args.minutes else 0.0)
        run_loss, run_acc = run_loss + loss.detach(), run_acc + (logits.argmax(1) == y).float().mean()
        n_run += 1
        if step % args.log_every == 0 or progress >= 1.0:
            held = evaluate(model, eval_x, eval_y, 500, autocast)
            evals.append(dict(step=step, held_out_accuracy=round(held, 4), seconds=round(elapsed, 1)))
            print(f"step {step}  loss {float(run_loss) / n_run:.4f}  acc {float(run_acc) / n_run:.3f}  held-out "
                  f"{held:.3f}  lr {opt.param_groups[0]['lr']:.2e}  {step * args.batch_size / elapsed:.0f} img/s  "
                  f"{elapsed:.0f}s", flush=True)
            run_loss, run_acc, n_run = 0.0, 0.0, 0
    args.steps = step
    return save(model, args, evals, time.time() - start, use_bf16)


def save(model, args, evals, elapsed: float, use_bf16: bool) -> dict:
    """Backbone weights (fp16, no head) to ``args.out`` and the run's record next to it."""
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("head.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"data": "formula:fractal_ifs", "steps": str(args.steps)})
    record = dict(model=VIT12_MODEL, arch=VIT12_ARCH, data="formula-driven fractals (alast/data/formula.py)",
                  num_classes=args.classes, img_size=DEFAULT_SIZE, pretrain_img_size=args.img_size,
                  full_res_frac=args.full_res_frac if args.img_size != DEFAULT_SIZE else None,
                  steps=args.steps, batch_size=args.batch_size,
                  held_out_accuracy=evals[-1]["held_out_accuracy"] if evals else None, evals=evals,
                  eval_size=args.eval_size, seconds=round(elapsed, 1), data_images_per_s=args.generation_images_per_s,
                  device=args.device, device_name=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  bf16=use_bf16, dtype_saved="float16", torch=torch.__version__, command=args.command,
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {len(state)} tensors ({args.out.stat().st_size / 1e6:.1f} MB) to {args.out}; "
          f"held-out accuracy {record['held_out_accuracy']}")
    return record


if __name__ == "__main__":
    main()

"""Step time of full-token vs token-dropping training on vit_base_patch16_224, and what the
selection costs.

Budgets are fixed (keep 0.83 after every block, all blocks trained) so only token dropping is
measured. Variants: the shipped top-k + gather selection, a row index_select alternative, and both
with the CLS-attention scoring replaced by random scores (to isolate the scoring cost). Prints
median step times in ms. On CUDA it uses bf16 autocast.

  python benchmarks/token_selection_speed.py 64      # the batch size
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alast.models import create_model  # noqa: E402
from planners import Budget  # noqa: E402
from runtimes.torch_backend import patch as P  # noqa: E402
from runtimes.torch_backend.runtime import TorchRuntime  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def select_rows(x, scores, keep, num_prefix):
    b, n, d = x.shape
    idx = scores[:, num_prefix:].topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values + num_prefix
    pre = torch.arange(num_prefix, device=x.device).expand(b, num_prefix)
    idx = torch.cat([pre, idx], 1) + (torch.arange(b, device=x.device) * n)[:, None]
    return x.reshape(b * n, d).index_select(0, idx.reshape(-1)).reshape(b, num_prefix + keep, d)


def random_scores(qkv, num_heads, head_dim, scale, q_norm, k_norm):
    return torch.rand(qkv.shape[0], qkv.shape[1], device=qkv.device)


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=DEV)
    y = torch.randint(0, 10, (batch,), device=DEV)
    rt = TorchRuntime(create_model("vit_base_patch16_224", 10), lr=1e-4, weight_decay=0.05, grad_clip=1.0,
                      device=DEV, precision="bf16" if CUDA else "fp32", count_flops="off",
                      memory_probe_steps=lambda s: False)
    rt._should_probe = lambda *a: False

    def median_ms(budget: Budget, n: int = 8) -> float:
        times = sorted(rt.train_step(x, y, budget, 1e-4, s).step_time_s for s in range(n))[1:]
        return round(1000 * times[len(times) // 2], 2)

    full, tokens = Budget((1.0,) * 12, (True,) * 12), Budget((0.83,) * 12, (True,) * 12)
    select, scores = P.select_tokens, P.cls_attention_scores
    res = {"full": median_ms(full), "tokens": median_ms(tokens)}
    P.select_tokens = select_rows
    res["tokens_rows"] = median_ms(tokens)
    P.cls_attention_scores = random_scores
    res["tokens_rows_noscores"] = median_ms(tokens)
    P.select_tokens = select
    res["tokens_gather_noscores"] = median_ms(tokens)
    P.cls_attention_scores = scores
    print(json.dumps({"batch": batch, "device": DEV, "median_step_ms": res}))


if __name__ == "__main__":
    main()

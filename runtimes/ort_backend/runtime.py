"""The ONNX Runtime Training runtime (``backend.name: ort``).

Forward and backward run in ONNX Runtime on the graph of ``graph.py``: token keep counts are
int64 graph inputs (computed on the host from the budget planned for this step, so there is no
lag behind the torch backend) and per-block CLS deltas are graph outputs. Frozen blocks select an
artifact set of ``artifacts.py`` in which their parameters are frozen, so ONNX Runtime computes
no weight gradient for them; when a policy samples more distinct sets than fit in memory, steps
run on the all-trainable set with the frozen blocks' gradients discarded (see
:meth:`OrtRuntime._artifact_trained`). A step that freezes the embeddings (ALaST's dense final
phase) runs on a set whose embeddings are frozen too, so ONNX Runtime's backward stops at the
lowest trained block, as the torch backend's does. An artifact set is named by its trained-block
mask, plus ``-stem0`` when the embeddings are frozen (:func:`artifacts.set_name`).

The optimizer is torch's AdamW, applied to ONNX Runtime's own parameter and gradient buffers
through DLPack views (no copies). ORT 1.19's AdamW graph has one weight decay for every
parameter, one step counter for all of them and no per-parameter state access, so it could not
honour the torch backend's parameter groups (no decay on 1-D parameters and timm's
``no_weight_decay``), per-parameter step counts after a block was frozen, or carry moments over
when the trained-block set changes. With torch's AdamW on the same buffers the update, the
gradient clipping and the parameter groups are exactly the torch backend's, and the optimizer
state survives every switch because it never lives in ONNX Runtime.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from planners import Budget, StepResult, kept_token_counts
from planners.rules import reduce_deltas

from ..images import as_float
from ..protocol import Capabilities, NonFiniteLoss, pass_sizes
from ..registry import register_runtime
from ..torch_backend.params import embedding_parameters, parameter_counts
from ..torch_backend.tokens import check_temperature, check_token_choice, tempered
from .artifacts import ArtifactCache
from .graph import GraphError, StepFlops, TrainingGraph, export_training_graph

_PREFIX = "model."  # parameter names in the training graph: the timm names under TrainingGraph.model
FREEZE_MODES = ("auto", "exact", "masked")


def require_training() -> None:
    """Raise ValueError (exit code 2) unless ONNX Runtime Training is importable."""
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.training import artifacts  # noqa: F401
        from onnxruntime.training.api import Module  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"--backend ort needs ONNX Runtime Training, which is not importable here ({exc}). It ships as "
            "onnxruntime-training-cpu==1.19.2 (or the CUDA build onnxruntime-training) for Python <= 3.12 "
            "only; install it in place of plain onnxruntime, or use --backend torch") from None
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # generate_artifacts logs every graph transformer at INFO


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters and on timm's ``no_weight_decay()`` names
    (the same rule as the torch backend, so both backends optimise the same objective)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve_device(name: str) -> str:
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if name == "cuda" and not has_cuda:
        raise ValueError("backend.device=cuda but this onnxruntime-training build has no CUDA provider; install "
                         "the CUDA build of onnxruntime-training (docs/backends.md) or use backend.device=cpu")
    return "cuda" if name == "cuda" or (name == "auto" and has_cuda and torch.cuda.is_available()) else "cpu"


class OrtRuntime:
    """ALaST training with ONNX Runtime Training; see the module docstring."""

    name = "ort"

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, grad_clip: float | None,
                 label_smoothing: float = 0.0, delta_reduction: str = "mean", device: str = "auto",
                 threads: int | None = None, count_flops: str = "every", max_live_sets: int | None = None,
                 freeze_artifacts: str = "auto", freeze_embeddings: bool = False,
                 token_select: str = "top", token_score: str = "attention", seed: int = 0,
                 micro_batch: int | None = None, token_temperature: float = 1.0) -> None:
        from ..torch_backend.patch import check_patchable

        require_training()
        pass_sizes(1, micro_batch)  # refuses a size below 1
        self.micro_batch = micro_batch
        check_patchable(model)
        if freeze_artifacts not in FREEZE_MODES:
            raise ValueError(f"freeze_artifacts must be one of {FREEZE_MODES}, got {freeze_artifacts!r}")
        self.freeze_artifacts = freeze_artifacts
        self.device = torch.device(_resolve_device(device))
        self.capabilities = Capabilities(dynamic_tokens=True, per_step_freezing=True, lora=False,
                                         data_parallel=False)
        self.model = model.cpu().train()
        self.freeze_embeddings = bool(freeze_embeddings)  # policy.freeze_embeddings: never trained
        self.grad_clip = grad_clip
        self.delta_reduction = delta_reduction
        self.count_flops = count_flops
        self.num_blocks = len(model.blocks)
        self.num_patches = int(model.patch_embed.num_patches)
        self.slots: dict[str, nn.Parameter] = {_PREFIX + n: p for n, p in model.named_parameters()}
        stem = {id(p) for p in embedding_parameters(model)}
        # the trainable groups an artifact set freezes or not: every block, then the embeddings
        groups = [[f"{_PREFIX}blocks.{i}.{n}" for n, _ in blk.named_parameters()]
                  for i, blk in enumerate(model.blocks)]
        groups.append([_PREFIX + n for n, p in model.named_parameters() if id(p) in stem])
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
        check_token_choice(token_select, token_score)
        check_temperature(token_temperature)
        self.token_temperature = float(token_temperature) if token_select == "sample" else 1.0
        self.token_rng = torch.Generator().manual_seed(int(seed))  # the graph's noise input; saved with the state
        self.graphs = {"dense": TrainingGraph(model, label_smoothing, select=False),
                       "select": TrainingGraph(model, label_smoothing, select=True, token_select=token_select,
                                               token_score=token_score)}
        exporters = {v: (lambda v=v: self._export(v)) for v in self.graphs}
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        live = max_live_sets or max(2, min(8, int(2e9 // max(1, 2 * param_bytes))))
        self.cache = ArtifactCache(exporters, list(self.slots), groups, max_live=live,
                                   threads=threads or torch.get_num_threads(), device=self.device.type)
        self._active = None
        self._seen: set[tuple[str, tuple[bool, ...]]] = set()
        self.flops = StepFlops(self.graphs["select"])
        self._inference_bytes: dict[tuple[int, ...] | None, bytes] = {}  # per token schedule

    @property
    def token_score(self) -> str:
        """What ranks the tokens (``policy.token_score``), as the selecting graph has it."""
        return self.graphs["select"].token_score

    def bind_run_dir(self, run_dir: Any) -> None:
        """Cache artifact sets under the run directory (reused on resume)."""
        self.cache.bind_dir(run_dir)

    def _export(self, variant: str) -> bytes:
        graph = self.graphs[variant]
        data = export_training_graph(self.model, select=graph.select, label_smoothing=graph.label_smoothing,
                                     token_select=graph.token_select, token_score=graph.token_score)
        import onnx

        inits = {i.name for i in onnx.load_from_string(data).graph.initializer}
        missing = [n for n in self.slots if n not in inits]
        if missing:
            raise GraphError(f"the exported training graph lost parameter {missing[0]!r} (shared or folded "
                             "weights?); use --backend torch for this model")
        return data

    # -- training --------------------------------------------------------------------------
    def _artifact_trained(self, variant: str, trained: tuple[bool, ...]) -> tuple[bool, ...]:
        """Which artifact set runs a step that trains ``trained`` (one flag per block, then one for
        the embeddings).

        ``exact``: the set in which exactly these blocks are trainable (frozen blocks compute no
        weight gradients). ``masked``: the all-trainable set; frozen blocks' weight gradients are
        computed and discarded, so they are neither updated nor decayed. ``auto`` runs exact sets
        while every trained-block set seen so far fits in memory, or when the set is already
        live; beyond that (sampled freezing on deep models: C(12, 9) = 220 sets) building a
        session per step would cost more than the weight gradients it saves, so it runs masked.
        """
        everything = (True,) * (self.num_blocks + 1)
        if self.freeze_artifacts == "masked" or trained == everything:
            return everything
        if self.freeze_artifacts == "exact" or self.cache.is_live(variant, trained):
            return trained
        self._seen.add((variant, trained))
        return trained if len(self._seen) <= self.cache.max_live else everything

    def _activate(self, variant: str, trained: tuple[bool, ...]):
        """Make the artifact set for ``(variant, trained)`` current, moving the weights into it."""
        ts, _ = self.cache.get(variant, trained)
        if all(trained):
            self.cache.pinned.add(ts.name)
        if ts is not self._active:
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, slot in self.slots.items():
                    buf = ts.params[n]
                    buf.copy_(slot.data)
                    slot.data = buf
            self._active = ts
            self.cache.record_switch(time.perf_counter() - t0)
            self.cache.trim()
        return ts

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, budget: Budget, lr: float,
                   step: int) -> StepResult:
        t0 = time.perf_counter()
        tokens_in, tokens_out = kept_token_counts(budget.keep_ratios, self.num_patches, budget.min_tokens)
        select = any(o < i for i, o in zip(tokens_in, tokens_out))
        variant = "select" if select else "dense"
        mask = (*budget.trained, budget.train_embeddings and not self.freeze_embeddings)
        ran = self._artifact_trained(variant, mask)
        ts = self._activate(variant, ran)
        images = as_float(images).detach().cpu().float().contiguous().numpy()
        labels = labels.detach().cpu().long().numpy()
        trained = set(self.cache.trainable_names(mask))
        ts.module.train()
        sizes = pass_sizes(len(labels), self.micro_batch)
        grads: dict[str, torch.Tensor] = {}  # with several passes: their gradients, each weighted by its share
        draws = select and self.graphs[variant].draws  # the whole batch's, [L, B, N]: a pass takes its rows
        noise = (tempered(torch.rand(self.graphs[variant].noise_shape(len(labels)), generator=self.token_rng),
                          self.token_temperature) if draws else None)
        loss_value, deltas, start = 0.0, [], 0
        for size in sizes:
            feeds = [images[start:start + size], labels[start:start + size]]
            if select:
                feeds.append(np.asarray(tokens_out, dtype=np.int64))
                if noise is not None:
                    feeds.append(noise[:, start:start + size].contiguous().numpy())
            start += size
            ts.module.lazy_reset_grad()
            loss, pass_deltas = ts.module(*feeds)
            if not np.isfinite(float(loss)):
                raise NonFiniteLoss(step, float(loss))
            share = size / len(labels)
            loss_value += float(loss) * share
            deltas.append(np.asarray(pass_deltas))
            if len(sizes) > 1:
                for n in trained:
                    g = ts.grads.get(n)
                    if g is not None:
                        grads[n] = g * share if n not in grads else grads[n].add_(g, alpha=share)
        if len(sizes) == 1:
            grads = {n: g for n, g in ts.grads.items() if n in trained}
        for n, slot in self.slots.items():
            slot.grad = grads.get(n)
        if ran != mask:
            self.cache.stats.masked_steps += 1
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.slots.values() if p.grad is not None], self.grad_clip)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        for slot in self.slots.values():
            slot.grad = None
        elapsed = time.perf_counter() - t0
        flops = self._step_flops(len(labels), tokens_in, tokens_out, ran, select)
        per_block = tuple(reduce_deltas(row, self.delta_reduction) for row in np.concatenate(deltas, axis=1).tolist())
        return StepResult(loss=loss_value, deltas=per_block, tokens_in=tokens_in, kept_tokens=tokens_out,
                          trained_blocks=budget.trained_blocks, batch_size=len(labels), step_time_s=elapsed,
                          train_flops=flops, embeddings_trained=mask[-1])

    # -- FLOPs -------------------------------------------------------------------------------
    def _step_flops(self, batch: int, tokens_in: tuple[int, ...], kept: tuple[int, ...], mask: tuple[bool, ...],
                    select: bool) -> float | None:
        """Counted flops of a step with these shapes and this artifact set's trained blocks and
        embeddings (``mask``: one flag per block, then the embeddings')."""
        if self.count_flops == "off":
            return None
        return self.flops.step(batch, tokens_in, kept, mask[:-1], select, embeddings=mask[-1])

    def full_ft_step_flops(self, batch_size: int) -> float | None:
        every = (self.num_patches,) * self.num_blocks
        return self._step_flops(batch_size, every, every, (True,) * (self.num_blocks + 1), False)

    def peak_memory_bytes(self) -> int | None:
        """Not measured: ONNX Runtime's allocations are invisible to torch's trackers."""
        return None

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 kept: Sequence[int] | None = None) -> dict[str, float]:
        """Eval-mode accuracy with ONNX Runtime on the current weights, on every token or on the
        token schedule ``kept``."""
        sess = self._inference_session(None if kept is None else tuple(int(k) for k in kept))
        correct, total, loss_sum = 0, 0, 0.0
        for images, labels in batches:
            logits = torch.from_numpy(sess.run(None, {"images": as_float(images).float().contiguous().numpy()})[0])
            labels = labels.long()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
        return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}

    def _inference_session(self, kept: tuple[int, ...] | None) -> Any:
        """An inference session whose weights are the current parameter buffers (no copies)."""
        import onnxruntime as ort

        from ..onnx_export import export_inference_bytes

        if kept not in self._inference_bytes:
            self._inference_bytes[kept] = export_inference_bytes(self.model, constant_folding=False, kept=kept,
                                                                  score=self.token_score)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.cache.threads or 0
        keep_alive = []
        for n, slot in self.slots.items():
            # ORT only accepts user-owned initializer buffers: hand it a numpy view of the live
            # parameter (ORT's own buffer when a set is active; no copy either way).
            arr = slot.detach().cpu().numpy()
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            keep_alive += [arr, value]
            opts.add_initializer(n[len(_PREFIX):], value)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else \
            ["CPUExecutionProvider"]
        sess = ort.InferenceSession(self._inference_bytes[kept], opts, providers=providers)
        sess._alast_keep_alive = keep_alive  # the session reads these buffers while it lives
        return sess

    def parameter_counts(self) -> dict[str, int]:
        """Total, trainable and updated parameters (:func:`~runtimes.torch_backend.params.parameter_counts`)."""
        stem = {id(p) for p in embedding_parameters(self.model)} if self.freeze_embeddings else set()
        trainable = [p for p in self.model.parameters() if id(p) not in stem]
        return parameter_counts(self.model, trainable, self.optimizer)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (the loop torch.saves them): timm weights and torch AdamW state."""
        self.cache.write_stats()
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "token_rng": self.token_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])  # copies into the live buffers in place
        self.optimizer.load_state_dict(state["optimizer"])
        if "token_rng" in state:  # absent from checkpoints written before the token draws
            self.token_rng.set_state(state["token_rng"])

    def export_model(self) -> nn.Module:
        """A plain timm model with the trained weights, on the CPU."""
        import copy

        model = copy.deepcopy(self.model).cpu().eval()
        for p in model.parameters():
            p.data = p.data.clone()
            p.requires_grad_(True)
        return model

    @property
    def artifact_stats(self) -> dict[str, Any]:
        return self.cache.stats.summary()


def check_config(cfg: Any) -> None:
    """Refuse what the ort backend cannot do, in one line (``alast plan`` refuses it too; LoRA is
    refused by the config itself, ``AlastConfig``'s backend check)."""
    if cfg.backend.token_multiple != 1:
        raise ValueError("the ort backend keeps exact token counts; drop backend.token_multiple or use --backend torch")
    if cfg.policy.fuse_tokens:
        raise ValueError("the ort backend does not fuse dropped tokens; set policy.fuse_tokens=false or use "
                         "--backend torch")
    if cfg.backend.precision != "fp32":
        raise ValueError("the ort backend trains in fp32; set backend.precision=fp32 or use --backend torch")
    if cfg.backend.compile:
        raise ValueError("the ort backend runs ONNX Runtime graphs, not torch.compile; set backend.compile=false "
                         "or use --backend torch")
    if cfg.backend.sync_free == "on":
        raise ValueError("the ort backend reads each step's loss as the step ends; set backend.sync_free=auto or "
                         "use --backend torch")


@register_runtime("ort", check=check_config)
def _ort_runtime(cfg: Any, model: Any, comm: Any = None) -> OrtRuntime:
    if comm is not None:
        raise ValueError("the ort backend trains in one process; use --backend torch for data-parallel runs")
    check_config(cfg)
    return OrtRuntime(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                      label_smoothing=cfg.train.label_smoothing, delta_reduction=cfg.policy.delta_reduction,
                      device=cfg.backend.device, threads=cfg.backend.threads, count_flops=cfg.backend.count_flops,
                      freeze_embeddings=cfg.policy.embeddings_frozen, token_select=cfg.policy.token_select,
                      token_score=cfg.policy.token_score, seed=cfg.train.seed,
                      micro_batch=cfg.train.micro_batch_size, token_temperature=cfg.policy.token_temperature)

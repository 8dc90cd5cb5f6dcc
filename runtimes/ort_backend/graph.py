"""The ONNX training graph of an ALaST step, built from the timm model's own forward.

:class:`TrainingGraph` wraps a timm VisionTransformer. Its forward calls the model itself (so no
upstream forward is copied) while, for the duration of that call, the blocks do the ALaST work:

- where every block is timm's standard block (or ``Eva``'s), each selects inside, as the torch
  runtime's blocks do (:func:`runtimes.token_schedule.inside_schedule`): the CLS-attention scores
  come from the qkv projection, only the prefix and the top ``keep[l]`` patch tokens are queries
  and pass the output projection and the MLP, every token is a key and a value; the per-sample
  CLS delta is recorded;
- otherwise two forward hooks per block (:func:`runtimes.token_schedule.selection_hooks`): one on
  ``attn.qkv`` computes the scores, one on the block records the delta and replaces the block's
  output by the prefix tokens plus the top ``keep[l]`` patch tokens (the block runs whole).

``keep`` is an int64 graph input (one count per block, computed on the host from the budget
planned for this very step, so there is no lag behind the torch backend). Exported with the
TorchScript exporter at opset 16, the selection becomes TopK with a dynamic K and a GatherND of the
kept rows (:func:`runtimes.torch_backend.tokens.rows_by_gather_nd`: ONNX Runtime's CPU gradient of a
``Gather`` locks a mutex per element).
Where ``keep[l]`` equals the current token count the selection is an identity permutation.
With ``policy.token_select`` ``sample`` or ``random`` the selecting graph takes the uniform draws
of its selections as one more input, ``noise``, drawn on the host from torch's generator.

Graph interface (names are part of the contract with ``artifacts.py``)::

    inputs:  images [B, 3, H, W] float32, labels [B] int64, keep [L] int64 (selecting graphs only),
             noise [L, B, prefix + patches] float32 (selecting graphs that draw tokens only)
    outputs: loss [] float32 (first: the gradient builder starts there), deltas [L, B] float32
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planners.countfit import PieceCounts, block_kind

from ..onnx_export import exporter_symbolics
from ..token_schedule import inside_schedule, select_in_block, selection_hooks, selects_inside
from ..torch_backend.params import block_signature, embedding_parameters, input_channels
from ..torch_backend.relpos import is_beit_block, leading_positions
from ..torch_backend.tokens import rows_by_gather_nd, summary_pool

OPSET = 16  # opset 17's fused LayerNormalization has no gradient in ORT 1.19 (see docs/backends.md)
INPUTS_SELECT = ("images", "labels", "keep")
INPUTS_DENSE = ("images", "labels")
INPUTS_DRAW = (*INPUTS_SELECT, "noise")
OUTPUTS = ("loss", "deltas")


class GraphError(ValueError):
    """The model cannot be exported as an ONNX Runtime training graph (bad input: exit code 2)."""


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Mean cross-entropy, with label smoothing written out (the ONNX exporter refuses
    ``label_smoothing`` in ``F.cross_entropy``); equal to ``F.cross_entropy(..., label_smoothing=eps)``."""
    if label_smoothing == 0.0:
        return F.cross_entropy(logits, labels)
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    return ((1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)).mean()


class TrainingGraph(nn.Module):
    """One ALaST training forward: ``(images, labels[, keep[, noise]]) -> (loss, deltas [L, B])``."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, select: bool = True,
                 token_select: str = "top", token_score: str = "attention") -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = float(label_smoothing)
        self.select = select
        self.token_select = token_select
        self.token_score = token_score

    @property
    def inside(self) -> bool:
        """Whether the blocks select their tokens inside, as the torch runtime's do (timm's standard
        block, and ``Eva``'s): only the kept tokens are queries and pass the MLP."""
        return selects_inside(self.model)

    @property
    def draws(self) -> bool:
        """Whether the graph's selections are random draws (fed as the ``noise`` input)."""
        return self.select and self.token_select != "top"

    def noise_shape(self, batch_size: int) -> tuple[int, int, int]:
        m = self.model
        return len(m.blocks), batch_size, int(m.num_prefix_tokens) + int(m.patch_embed.num_patches)

    def forward(self, images: Tensor, labels: Tensor, keep: Tensor | None = None,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        deltas: list[Tensor] = []
        m = self.model
        if self.inside:
            counts = keep if self.select else [None] * len(m.blocks)
            schedule = inside_schedule(m, counts, self.token_score, deltas=deltas, select=self.token_select, noise=noise)
        else:
            schedule = selection_hooks(list(m.blocks), int(m.num_prefix_tokens), keep if self.select else None, deltas,
                                       select=self.token_select, noise=noise, score=self.token_score,
                                       pool=summary_pool(m))
        with schedule:
            logits = self.model(images)
        loss = classification_loss(logits, labels, self.label_smoothing)
        return loss, torch.stack(deltas)


def example_keep(num_patches: int, num_blocks: int) -> Tensor:
    """A valid cumulative keep vector for tracing (the exported K is dynamic, not this value)."""
    out, n = [], num_patches
    for _ in range(num_blocks):
        n = max(1, (n * 7) // 8)
        out.append(n)
    return torch.tensor(out, dtype=torch.int64)


def export_training_graph(model: nn.Module, *, select: bool, label_smoothing: float,
                          batch_size: int = 2, token_select: str = "top", token_score: str = "attention") -> bytes:
    """The serialized ONNX training graph (weights included as named initializers).

    TorchScript exporter, opset 16, ``training=TRAINING`` and no constant folding, so every
    parameter stays an initializer named like the timm state dict (prefixed ``model.``).
    Raises :class:`GraphError` when the exporter cannot handle the model.
    """
    graph = TrainingGraph(model, label_smoothing, select, token_select, token_score).train()
    img = model.patch_embed.img_size
    in_chans = input_channels(model)
    images = torch.zeros(batch_size, in_chans, img[0], img[1])
    labels = torch.zeros(batch_size, dtype=torch.int64)
    args: tuple = (images, labels)
    names = list(INPUTS_DENSE)
    if select:
        args += (example_keep(int(model.patch_embed.num_patches), len(model.blocks)),)
        names = list(INPUTS_SELECT)
    if graph.draws:
        args += (torch.full(graph.noise_shape(batch_size), 0.5),)  # a trace value (leaves the generator alone)
        names = list(INPUTS_DRAW)
    dynamic = {"images": {0: "batch"}, "labels": {0: "batch"}, "deltas": {1: "batch"}, "noise": {1: "batch"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(), exporter_symbolics(OPSET), \
                rows_by_gather_nd():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, args, buf, dynamo=False, opset_version=OPSET, export_params=True,
                              training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                              input_names=names, output_names=list(OUTPUTS), dynamic_axes=dynamic)
    except Exception as exc:  # the exporter raises many types; all mean "this model is not exportable"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise GraphError(f"{type(model).__name__} cannot be exported for ONNX Runtime Training ({reason}); "
                         "use --backend torch") from None
    return buf.getvalue()


def count_step_flops(graph: TrainingGraph, batch_size: int, keep: Sequence[int] | None,
                     trained_param_names: set[str]) -> float:
    """Flops (2 per multiply-add) of one forward+backward of the whole ``graph`` with these shapes.

    Counted with ``torch.utils.flop_counter`` on fake tensors (no data, no kernels run) with the
    same shapes, trained parameters and selection ops as the ONNX graph, so the figure is
    comparable with the torch backend's counted flops. :class:`StepFlops` gives the same figure
    from cached per-block counts.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    from ..torch_backend.flops import counter

    model = graph.model
    img = model.patch_embed.img_size
    in_chans = input_channels(model)
    with FakeTensorMode():
        params = _fake_state(model, lambda n, _p: f"model.{n}" in trained_param_names, "model.")
        images = torch.empty(batch_size, in_chans, img[0], img[1])
        labels = torch.zeros(batch_size, dtype=torch.int64)
        args: tuple = (images, labels)
        if keep is not None:
            args += (list(keep),)
        with counter() as fc:
            loss, _ = functional_call(graph, params, args)
            wanted = [p for p in params.values() if p.requires_grad]
            if wanted:
                torch.autograd.grad(loss, wanted)
    return float(fc.get_total_flops())


class StepFlops:
    """Counted flops of a training step, from per-block counts cached by shape.

    A step's count is ``rest(B, embeddings, kept_L) + sum_l block_l(B, tokens_in_l, kept_l,
    trained_l, select, below_l)``: every counted op belongs to exactly one block or to the rest
    (patch embedding, head, loss); the rest depends on token counts only through a head that reads
    the last block's tokens (attention pooling), :meth:`head`. ``kept_l``: the patch
    tokens block ``l`` keeps, the queries of a block that selects inside (:attr:`TrainingGraph.inside`).
    ``below_l``: whether anything under block ``l`` (the embeddings or a lower block) is trained, so
    the block back-propagates to its input. Caching per block keeps counting cheap when budgets and
    trained sets change every step.
    """

    def __init__(self, graph: TrainingGraph) -> None:
        self.graph = graph
        self.model = graph.model
        self.prefix = int(self.model.num_prefix_tokens)
        self.inside = graph.inside
        # Blocks built alike share their counts (by the first of them); a shape never counted is
        # solved from counted ones of its kind where they determine it (planners.countfit).
        signatures = [block_signature(b) for b in self.model.blocks]
        self._alike = [signatures.index(sig) for sig in signatures]
        self._blocks = PieceCounts(lambda k: block_kind((k[0], k[1], k[4], k[5], k[6]), k[2], k[3]))
        self._rest: dict[tuple[int, bool], float] = {}
        self._heads = PieceCounts(lambda k: (k[0], (k[1],)))

    def block(self, index: int, batch: int, tokens_in: int, kept: int, trained: bool, select: bool,
              below: bool = True) -> float:
        if not (select and self.inside):
            kept = tokens_in  # the block runs whole (and drops after it)
        key = (self._alike[index], batch, tokens_in, kept, trained, select, below)
        value = self._blocks.get(key)
        if value is None:
            value = self._count_block(index, *key[1:])
            self._blocks.add(key, value)
        return value

    def _count_block(self, index: int, batch: int, tokens_in: int, kept: int, trained: bool, select: bool,
                     below: bool) -> float:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.func import functional_call

        from ..torch_backend.flops import counter

        blk = self.model.blocks[index]
        dim = self.model.embed_dim
        graph, pool = self.graph, summary_pool(self.model)
        inside = select and self.inside
        with FakeTensorMode():
            params = _fake_state(blk, lambda _n, _p: trained, "block." if inside else "")
            x = torch.empty(batch, self.prefix + tokens_in, dim).requires_grad_(True)
            # the counter's module hooks refuse leaf inputs under autograd.grad
            x_in = x.clone() if below else x.detach()
            deltas: list[Tensor] = []
            with counter() as fc:
                if inside:
                    selecting = _Selecting(blk, kept, self.prefix, graph.token_score, pool, graph.token_select)
                    out = functional_call(selecting, params, (x_in,))
                else:
                    with selection_hooks([blk], self.prefix, [tokens_in] if select else None, deltas,
                                         select=graph.token_select, score=graph.token_score, pool=pool):
                        out = functional_call(blk, params, (x_in,))
                wanted = ([x] if below else []) + [p for p in params.values() if p.requires_grad]
                if wanted:
                    torch.autograd.grad(out.sum(), wanted)
        return float(fc.get_total_flops())

    def rest(self, batch: int, embeddings: bool = True, head_tokens: int | None = None) -> float:
        """Patch embedding, head and loss: a full dense step (every block trained, the embeddings
        as given) minus its blocks, with the head's cost at ``head_tokens`` patch tokens (those
        leaving the last block; None: every one): an attention-pooling head's depends on them."""
        key = (batch, bool(embeddings))
        n = int(self.model.patch_embed.num_patches)
        if key not in self._rest:
            stem = {id(p) for p in embedding_parameters(self.model)}
            names = {f"model.{n}" for n, p in self.model.named_parameters() if embeddings or id(p) not in stem}
            dense = TrainingGraph(self.model, self.graph.label_smoothing, select=False)
            total = count_step_flops(dense, batch, None, names)
            self._rest[key] = total - sum(self.block(i, batch, n, n, True, False, embeddings or i > 0)
                                          for i in range(len(self.model.blocks)))
        if head_tokens is None or head_tokens == n:
            return self._rest[key]
        return self._rest[key] + self.head(batch, head_tokens) - self.head(batch, n)

    def head(self, batch: int, tokens: int) -> float:
        """The final norm, the head and the loss on ``tokens`` patch tokens (and the prefix), forward
        and backward to their input and the head's parameters."""
        key = (batch, tokens)
        value = self._heads.get(key)
        if value is None:
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.func import functional_call

            from ..torch_backend.flops import counter

            head = _Head(self.model, self.graph.label_smoothing)
            below_head = {id(p) for p in self.model.blocks.parameters()} | {
                id(p) for p in embedding_parameters(self.model)}
            with FakeTensorMode():
                params = _fake_state(self.model, lambda _n, p: id(p) not in below_head, "model.")
                x = torch.empty(batch, self.prefix + tokens, self.model.embed_dim).requires_grad_(True)
                labels = torch.zeros(batch, dtype=torch.int64)
                with counter() as fc:
                    loss = functional_call(head, params, (x.clone(), labels))
                    torch.autograd.grad(loss, [x] + [p for p in params.values() if p.requires_grad])
            value = float(fc.get_total_flops())
            self._heads.add(key, value)
        return value

    def step(self, batch: int, tokens_in: Sequence[int], kept: Sequence[int], trained: Sequence[bool],
             select: bool, embeddings: bool = True) -> float:
        return self.rest(batch, embeddings, kept[-1]) + sum(
            self.block(i, batch, n, k, t, select, embeddings or any(trained[:i]))
            for i, (n, k, t) in enumerate(zip(tokens_in, kept, trained)))


def _fake_state(module: nn.Module, trained: Callable[[str, Tensor], bool], prefix: str = "") -> dict[str, Tensor]:
    """Empty tensors shaped as ``module``'s parameters (requiring grad where ``trained(name, param)``)
    and buffers (Eva's rotary tables and zero key bias), named ``prefix + name``, for
    :func:`torch.func.functional_call` under a ``FakeTensorMode``: shapes alone decide a count."""
    state = {prefix + n: torch.empty(p.shape, dtype=p.dtype).requires_grad_(trained(n, p))
             for n, p in module.named_parameters()}
    state.update({prefix + n: torch.empty(b.shape, dtype=b.dtype) for n, b in module.named_buffers()})
    return state


class _Head(nn.Module):
    """The model's final norm, head and loss on the last block's output, for :meth:`StepFlops.head`."""

    def __init__(self, model: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return classification_loss(self.model.forward_head(self.model.norm(x)), labels, self.label_smoothing)


class _Selecting(nn.Module):
    """One block that selects ``keep`` of its patch tokens inside (:func:`select_in_block`), as a
    module for :func:`torch.func.functional_call` (its parameters: the block's, under ``block.``)."""

    def __init__(self, block: nn.Module, keep: int, prefix: int, score: str, pool: int | None, select: str) -> None:
        super().__init__()
        self.block = block
        self.options = {"keep": keep, "prefix": prefix, "score": score, "pool": pool, "select": select}

    def forward(self, x: Tensor) -> Tensor:
        # BEiT: its bias, which trains with the block, sends the attention down another kernel (counted apart)
        pos = leading_positions(self.block, x) if is_beit_block(self.block) else None
        return select_in_block(self.block, x, pos=pos, **self.options)[0]

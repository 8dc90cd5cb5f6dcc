"""The eager PyTorch runtime: a patched timm model, per-step freezing, counted FLOPs."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from planners import Budget, StepResult, kept_token_counts
from planners.rules import MemoryProbes

from ..images import DeviceImages, Pixels
from ..protocol import Capabilities, NonFiniteLoss, pass_sizes
from ..registry import register_runtime
from ..token_schedule import token_schedule
from .flops import StepFlopCache, counter, grad_flags_restored, name_modules
from .frozen_cache import FrozenCache, FrozenCacheError, bytes_per_image, check_frozen_prefix, to_device
from .memory import default_memory_probe, frozen_aware_mem_tracker
from .params import (
    apply_lora,
    embedding_parameters,
    input_channels,
    is_adapter,
    make_optimizer,
    parameter_counts,
    timm_model,
)
from .patch import AlastPatch
from .pending import DeviceTimer, PendingStep
from .precision import autocast, check_precision, loss_scaler
from .tokens import check_temperature, check_token_choice, cls_delta


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("backend.device=cuda but no CUDA device is visible; use backend.device=cpu")
    return torch.device(name)


def _compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process (dynamo + inductor, both passes)."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    keys = [k for k in metrics if k == "_compile.compile_inner" or k.endswith("bw_compiler")]
    return float(sum(sum(metrics[k]) for k in keys))


def resolve_observe_lag(setting: str | bool, device: torch.device) -> bool:
    """``auto``: read step results one step late on CUDA (no host sync), at once on the CPU
    (where nothing is asynchronous to gain, and results stay exactly as before)."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"backend.sync_free must be auto, on or off, got {setting!r}")
    return device.type == "cuda" if setting == "auto" else setting == "on"


class TorchRuntime:
    """Eager PyTorch training of a patched timm ViT.

    Frozen blocks get ``requires_grad=False`` before the forward, so autograd computes no weight
    gradients for them and AdamW (which skips parameters whose grad is None) neither updates nor
    decays them. Token dropping happens inside the patched blocks.
    """

    name = "torch"

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, grad_clip: float | None,
                 label_smoothing: float = 0.0, delta_reduction: str = "mean", device: str = "auto",
                 precision: str = "fp32", count_flops: str = "every", lora: dict[str, Any] | None = None,
                 comm: Any = None, memory_probe_steps: Callable[[int], bool] | None = None,
                 freeze_embeddings: bool = False, compile: bool = False, token_multiple: int = 1,
                 sync_free: str | bool = "auto", fuse_tokens: bool = False,
                 token_select: str = "top", token_score: str = "attention", seed: int = 0,
                 micro_batch: int | None = None, token_temperature: float = 1.0) -> None:
        self.device = resolve_device(device)
        pass_sizes(1, micro_batch)  # refuses a size below 1
        self.micro_batch = micro_batch
        self.observe_lag = resolve_observe_lag(sync_free, self.device)
        self.compile = compile
        self.compile_time_s = 0.0
        if token_multiple < 1:
            raise ValueError(f"backend.token_multiple must be >= 1, got {token_multiple}")
        self.token_multiple = int(token_multiple)
        check_precision(self.device, precision)
        self.precision = precision
        self.scaler = loss_scaler(self.device, precision)  # fp16 only
        self.count_flops = count_flops
        self.delta_reduction = delta_reduction
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip
        self.comm = comm
        self._probes = MemoryProbes(memory_probe_steps or default_memory_probe)
        self.capabilities = Capabilities(dynamic_tokens=True, per_step_freezing=True, lora=True,
                                         data_parallel=True)
        if lora is not None:
            model = apply_lora(model, **lora)
        self.model = model.to(self.device)
        self._images = DeviceImages(self.device)
        self.timm_model = timm_model(self.model)
        self.patch = AlastPatch(self.timm_model)
        self._choose_tokens(fuse_tokens, token_select, token_score, seed, token_temperature)
        self.num_blocks = self.patch.num_blocks
        self.num_patches = self.patch.num_patches
        self._group_parameters(freeze_embeddings)
        if comm is not None:
            comm.broadcast_parameters(list(self.model.parameters()))
        self.optimizer = make_optimizer(self.model, lr, weight_decay, self.device)
        self._all_params = list(self.model.parameters())  # walked once: a step reads it for the clip
        root = type(self.model).__name__
        names = {id(m): n for n, m in self.model.named_modules()}
        self._flops = StepFlopCache([f"{root}.{names[id(b)]}" for b in self.patch.blocks])
        self.force_count = False  # count every step under the counter (calibration times what counting costs)
        if compile:
            self.patch.compile_blocks()
        self._peak_bytes: int | None = None
        self.frozen_cache: FrozenCache | None = None  # see enable_frozen_cache
        # one image's counted FLOPs in the cached embeddings and in each cached block
        self._bottom_flops: list[float] = [0.0]
        self._full_step_flops: dict[int, float] = {}  # by batch size: shapes alone decide the count
        self._every_token_flops: dict[int, float] = {}  # the same, of the run's own model (LoRA)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _choose_tokens(self, fuse: bool, select: str, score: str, seed: int, temperature: float = 1.0) -> None:
        """How dropping blocks pick and keep their tokens (``policy.fuse_tokens``, ``token_select``,
        ``token_score``); the draws come from the runtime's own generator, saved with its state, so a
        resumed run draws as the original did."""
        check_token_choice(select, score)
        ctl = self.patch.control
        check_temperature(temperature)
        ctl.fuse, ctl.select, ctl.score, ctl.temperature = bool(fuse), select, score, float(temperature)
        self.token_rng = torch.Generator(device=self.device)
        self.token_rng.manual_seed(int(seed) + 7919 * int(getattr(self.comm, "rank", 0)))
        ctl.generator = self.token_rng

    def _group_parameters(self, freeze_embeddings: bool) -> None:
        """The trainable parameters by where they live: the embeddings (none if frozen), each block's,
        and the rest (head, final norm); a step sets ``requires_grad`` per group."""
        stem = embedding_parameters(self.timm_model)  # one autograd pass over the stem
        if freeze_embeddings:
            for p in stem:
                p.requires_grad_(False)
        self.embed_params = [p for p in stem if p.requires_grad]
        self.block_params = [[p for p in blk.parameters() if p.requires_grad] for blk in self.patch.blocks]
        in_blocks = {id(p) for ps in self.block_params for p in ps}
        self.other_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in in_blocks]

    # -- training --------------------------------------------------------------------------
    def _set_trained(self, budget: Budget) -> bool:
        """Set ``requires_grad`` per the budget; returns whether the embeddings are trained this step."""
        for params, on in zip(self.block_params, budget.trained):
            for p in params:
                p.requires_grad_(on)
        embeddings = bool(self.embed_params) and budget.train_embeddings
        for p in self.embed_params:
            p.requires_grad_(embeddings)
        return embeddings

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _attention_kernels(self):
        """On CUDA, keep scaled_dot_product_attention off the cuDNN backend while tokens are dropped.

        cuDNN attention builds an execution plan per sequence length; ALaST changes the length
        from step to step, and each new plan costs far more than the step itself. Flash and
        memory-efficient attention take any length at no extra cost.
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, budget: Budget, lr: float,
                   step: int, keys: Sequence[int] | None = None) -> StepResult:
        """Run one step and read its results back now (the host waits for the device)."""
        return self.launch_step(images, labels, budget, lr, step, keys=keys).resolve()

    # -- the frozen bottom blocks' cache -------------------------------------------------------
    def enable_frozen_cache(self, depth: int, num_images: int, max_bytes: int) -> FrozenCache:
        """Keep, per training image, what the embeddings and the first ``depth`` blocks compute for it
        (:mod:`.frozen_cache`), in at most ``max_bytes`` of the runtime's device memory (on a GPU,
        counted in the peak it reports). A step given the images' ``keys`` (training indices) then
        runs those blocks only for images not kept, where it trains neither them nor the embeddings
        and they keep every token; a step that trains one of them empties the cache. Counted FLOPs
        are what ran: a step's count less one image's count of the cached part for each image read
        from the cache."""
        check_frozen_prefix(self.timm_model, depth)
        if self.embed_params:
            raise FrozenCacheError("the embeddings train in this run, so what the blocks above them compute changes "
                                   "every step; set policy.freeze_embeddings=true or backend.frozen_cache=off")
        tokens, width = self.patch.num_prefix + self.num_patches, int(self.timm_model.embed_dim)
        capacity = max_bytes // bytes_per_image(tokens, width, depth)
        try:
            self.frozen_cache = FrozenCache(depth, num_images, tokens, width, capacity, device=self.device)
        except RuntimeError as exc:  # the device could not give the storage (torch's OutOfMemoryError included)
            need = min(capacity, num_images) * bytes_per_image(tokens, width, depth) / 2 ** 20
            where = "GPU" if self.device.type == "cuda" else "host"
            raise FrozenCacheError(f"the frozen blocks' cache could not allocate {need:.0f} MiB of {where} memory "
                                   f"({str(exc).splitlines()[0][:120]}); lower backend.frozen_cache_mib or set "
                                   "backend.frozen_cache=off") from None
        if self.count_flops == "every":
            self._bottom_flops = self._count_bottom(depth)
        return self.frozen_cache

    @torch.no_grad()
    def _count_bottom(self, depth: int) -> list[float]:
        """One image's counted FLOPs in the embeddings, then in each of the first ``depth`` blocks, as a
        training step runs them (every token, nothing trained)."""
        tm = self.timm_model
        img = tm.patch_embed.img_size
        x = torch.zeros(1, input_channels(tm), img[0], img[1], device=self.device)
        eager, self.patch.control.eager = self.patch.control.eager, True
        self._train_mode()
        counts = []
        try:
            with self._autocast(), self._attention_kernels():
                with counter() as fc:
                    x = self._embed(x)
                counts.append(float(fc.get_total_flops()))
                for blk in tm.blocks[:depth]:
                    with counter() as fc:
                        x = blk(x)
                    counts.append(float(fc.get_total_flops()))
        finally:
            self.patch.control.eager = eager
        return counts

    @torch.no_grad()
    def _run_bottom(self, images: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens leaving block ``depth - 1`` and each of the first ``depth`` blocks' per-sample
        deltas ``[depth, B]``, as a training forward computes them when those blocks keep every token."""
        with self._autocast(), self._attention_kernels():
            x = self._embed(images)
            deltas = []
            for blk in self.timm_model.blocks[:depth]:
                out = blk(x)
                deltas.append(cls_delta(x, out, blk._alast_pool))
                x = out
        return x, torch.stack(deltas)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens entering block 0, as timm's ``forward_features`` makes them."""
        tm = self.timm_model
        return tm.norm_pre(tm.patch_drop(tm._pos_embed(tm.patch_embed(images))))

    def _bottom_of(self, images: torch.Tensor, keys: torch.Tensor, held: torch.Tensor, cache: FrozenCache
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A step's input to block ``cache.depth`` and its bottom blocks' deltas: read from the cache for
        the images it holds (``held``, :meth:`FrozenCache.held` of ``keys``), computed (and stored) for the
        others. Returns them and the images read."""
        n_held = int(held.sum())
        batch, depth = int(keys.numel()), cache.depth
        cache.hits += n_held
        if n_held == batch:  # every image held: the gather is the input
            tokens, d = cache.get(keys)
            return tokens.to(self.device), d.t().to(self.device), n_held
        x = torch.empty((batch, *cache.tokens.shape[1:]), dtype=cache.tokens.dtype, device=self.device)
        deltas = torch.empty((depth, batch), dtype=torch.float32, device=self.device)
        if n_held:
            rows = to_device(held.nonzero().flatten(), self.device)
            tokens, d = cache.get(keys[held])
            x[rows] = tokens.to(self.device)
            deltas[:, rows] = d.t().to(self.device)
        if n_held < batch:
            rows = to_device((~held).nonzero().flatten(), self.device)
            tokens, d = self._run_bottom(images.index_select(0, rows), depth)
            x[rows], deltas[:, rows] = tokens.to(x.dtype), d
            cache.put(keys[~held], tokens, d)
        return x, deltas, n_held

    def _forward_from(self, x: torch.Tensor, depth: int, bottom_deltas: torch.Tensor, ctl: Any) -> torch.Tensor:
        """The logits of a training forward that starts at block ``depth`` with its input ``x``."""
        tm = self.timm_model
        ctl.bottom_deltas = bottom_deltas
        if self.patch.pool is None:  # the class token's rows: block ``depth`` records its own
            ctl.cls_rows = torch.zeros((self.num_blocks + 1, x.shape[0], x.shape[-1]), dtype=torch.float32,
                                       device=x.device)
            ctl.cls_rows[depth].copy_(x[:, 0])
        else:
            for i in range(depth):
                ctl.deltas[i] = bottom_deltas[i]
        for blk in tm.blocks[depth:]:
            x = blk(x)
        return tm.forward_head(tm.norm(x))

    def _cache_use(self, budget: Budget, keep: tuple[int | None, ...], embeddings: bool,
                   keys: Sequence[int] | None) -> FrozenCache | None:
        """The cache this step reads and fills, or None; a step that trains the cached part empties it."""
        cache = self.frozen_cache
        if cache is None or keys is None:
            return None
        cache.images += len(keys)
        depth = cache.depth
        if embeddings or any(budget.trained[:depth]):
            cache.clear()
            return None
        return cache if all(k is None for k in keep[:depth]) else None

    def launch_step(self, images: torch.Tensor, labels: torch.Tensor, budget: Budget, lr: float,
                    step: int, keys: Sequence[int] | None = None) -> PendingStep:
        """Queue one step; nothing here waits for the device when ``observe_lag`` is on (CUDA).

        Without the lag the loss is checked before the backward pass (a non-finite loss never
        reaches the weights) and the step is timed between two device syncs. With it, the loss
        and deltas stay on the device until :meth:`PendingStep.resolve`, one step later. ``keys``:
        the images' training indices, for :meth:`enable_frozen_cache`.
        """
        lag = self.observe_lag
        images, labels = self._to_device(images, labels)
        tokens_in, tokens_out = kept_token_counts(budget.keep_ratios, self.num_patches, budget.min_tokens,
                                                  self.token_multiple)
        keep = tuple(o if o < i else None for i, o in zip(tokens_in, tokens_out))
        self._train_mode()
        embeddings = self._set_trained(budget)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        probe_mem = self.device.type == "cpu" and self._should_probe(step, tokens_in, budget)
        mem_ctx = self._mem_tracker() if probe_mem else contextlib.nullcontext()
        flop_keys = StepFlopCache.keys(int(images.shape[0]), tokens_in, tokens_out, budget.trained, embeddings)
        flops = self._flops.lookup(flop_keys) if self.count_flops == "every" else None
        counting = self.count_flops == "every" and (flops is None or self.force_count)
        cache = self._cache_use(budget, keep, embeddings, keys)
        compiled_before = _compile_seconds() if self.compile else 0.0
        if not lag:
            self._sync()
        timer = DeviceTimer.begin(self.device)
        read, bottom, store = 0, None, None
        keys_t = None if cache is None else torch.as_tensor(keys, dtype=torch.long)
        with mem_ctx as mt:
            # a step that holds some of its images in the cache starts above the cached blocks (and runs
            # them for the others first); any other runs every block and fills the cache from block
            # ``depth``'s input
            held = None if cache is None else cache.held(keys_t)
            if held is not None and bool(held.any()):
                x, d, read = self._bottom_of(images, keys_t, held, cache)
                bottom = (cache.depth, x, d)
            with counter() if counting else contextlib.nullcontext() as fc:
                self.patch.control.eager = counting  # the counter must see every op
                if counting and bottom is not None:
                    name_modules(fc, self.model)
                with self._capture_bottom(cache if cache is not None and bottom is None else None) as inputs:
                    loss, deltas = self._forward_backward(images, labels, keep, tokens_in, step, check_loss=not lag,
                                                          tracker=mt if probe_mem else None, bottom=bottom)
            if inputs:
                store = (keys_t, inputs, deltas[:cache.depth])
            scales = self._update(budget)
        if store is not None:
            cache.put(store[0], store[1][0] if len(store[1]) == 1 else torch.cat(store[1]), store[2])
        if counting and bottom is not None:  # the counter saw the blocks above the cached ones only
            batch, per_image = int(images.shape[0]), self._bottom_flops
            flops = self._flops.record(fc, flop_keys, [batch * f for f in per_image[1:]], batch * per_image[0])
            flops += (batch - read) * sum(per_image)  # the images not read ran the cached part before
        elif counting:
            flops = self._flops.record(fc, flop_keys)
        elif flops is not None and read:
            flops -= read * sum(self._bottom_flops)
        if not lag:
            self._sync()
        timer.stop()
        if probe_mem:
            self._record_cpu_peak(mt)
        compile_s = _compile_seconds() - compiled_before if self.compile else 0.0
        self.compile_time_s += compile_s
        fields = dict(tokens_in=tokens_in, kept_tokens=tokens_out, trained_blocks=budget.trained_blocks,
                      embeddings_trained=embeddings, cached_images=read,
                      batch_size=int(images.shape[0]), train_flops=flops, memory_measured=probe_mem)
        return PendingStep.launch(step, loss, deltas, self.comm, self.delta_reduction, timer, fields, compile_s,
                                  scales)

    @contextlib.contextmanager
    def _capture_bottom(self, cache: FrozenCache | None):
        """While a step runs every block, keep block ``cache.depth``'s input of each pass (the yielded
        list; empty without ``cache``), for the cache."""
        inputs: list[torch.Tensor] = []
        if cache is None:
            yield inputs
            return
        hook = self.timm_model.blocks[cache.depth].register_forward_pre_hook(
            lambda _m, args: inputs.append(args[0].detach()))
        try:
            yield inputs
        finally:
            hook.remove()

    def passes(self, batch_size: int) -> list[int]:
        """The images of each forward and backward pass of a step (:func:`~..protocol.pass_sizes`)."""
        return pass_sizes(batch_size, self.micro_batch)

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, keep: tuple[int | None, ...],
                          tokens_in: tuple[int, ...], step: int, check_loss: bool,
                          tracker: Any = None, bottom: tuple[int, torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward and backward passes (:meth:`passes`), their gradients accumulated: each
        pass's mean loss weighted by its share of the batch, so that the gradients are the whole
        batch's, and its token draws the rows of the whole batch's (:meth:`_step_draws`): the passes
        are the one-pass step, to float rounding. Returns the batch's mean loss and the per-sample
        deltas ``[L, B]``. ``check_loss``: a non-finite loss raises before its backward.
        ``tracker``: the step's memory tracker, whose per-module records each later pass clears (it
        refuses a module run twice; the peak stays). ``bottom``: ``(depth, x, deltas)``, the batch's input
        to block ``depth`` and its first blocks' deltas (:meth:`_bottom_of`): the passes start there."""
        batch = int(images.shape[0])
        sizes = self.passes(batch)
        noise = self._step_draws(batch, keep, tokens_in) if len(sizes) > 1 else None
        losses, deltas, start = [], [], 0
        for size in sizes:
            if start and tracker is not None:
                tracker.reset_mod_stats()
            # one pass takes the batch itself: a slice is a new tensor to the CPU memory tracker
            x, y = (images, labels) if size == batch else (images[start:start + size], labels[start:start + size])
            rows, start = slice(start, start + size), start + size
            with self.patch.training_forward(keep, noise, rows) as ctl, self._autocast(), self._attention_kernels():
                if bottom is None:
                    logits = self.model(x)
                else:
                    depth, xb, db = bottom
                    logits = (self._forward_from(xb, depth, db, ctl) if size == batch else
                              self._forward_from(xb[rows], depth, db[:, rows], ctl))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            if check_loss and not torch.isfinite(loss.detach()):
                raise NonFiniteLoss(step, float(loss.detach()))
            if size < batch:
                loss = loss * (size / batch)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            losses.append(loss.detach())
            deltas.append(ctl.block_deltas())
        if len(losses) == 1:
            return losses[0], deltas[0]
        return torch.stack(losses).sum(), torch.cat(deltas, dim=1)

    def _step_draws(self, batch: int, keep: tuple[int | None, ...], tokens_in: tuple[int, ...]
                    ) -> list[torch.Tensor | None] | None:
        """The token draws of a step run in passes, made for the whole batch before its first pass:
        per block that drops tokens, what one pass would draw there (``[B, prefix + tokens in]``,
        from the same generator, in block order; each pass ranks its rows as one pass ranks them,
        temperature included); None for select 'top', which draws nothing."""
        if self.patch.control.select == "top":
            return None
        prefix = self.patch.num_prefix
        return [None if k is None else
                torch.rand((batch, prefix + n), generator=self.token_rng, device=self.device, dtype=torch.float32)
                for k, n in zip(keep, tokens_in)]

    def _train_mode(self) -> None:
        """``model.train()`` where the model is not in training mode already: the call visits every
        module (about 0.8 ms of host time per step on DeiT-S), and every mode change here is to the
        whole model (evaluation, counting), so the root, the timm model and a block tell."""
        if not (self.model.training and self.timm_model.training and self.patch.blocks[-1].training):
            self.model.train()

    def _to_device(self, images: torch.Tensor | Pixels, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device, its images float32 (8-bit :class:`Pixels` normalised there)."""
        if self.observe_lag and self.device.type == "cuda" and not images.is_pinned():
            images, labels = images.pin_memory(), labels.pin_memory()  # else the copy waits on the stream
        return self._images(images, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _update(self, budget: Budget) -> torch.Tensor | None:
        """The optimizer step on this step's gradients: reduced across ranks, unscaled (fp16),
        clipped. With fp16, returns the loss scale before and after the step, on the device: a step
        whose gradients overflowed was not applied and halved the scale. Every rank reduces before it
        unscales, so all see the same overflow and keep the same scale."""
        self._reduce_gradients(budget)
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_clip:
            params = [p for p in self._all_params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if scaler is None:
            self.optimizer.step()
            return None
        before = scaler._get_scale_async().detach().clone()  # the device tensor get_scale() would read
        scaler.step(self.optimizer)  # the fused AdamW (CUDA) skips an overflowed step on the device
        scaler.update()
        return torch.stack([before, scaler._get_scale_async()]).float()

    def _reduce_gradients(self, budget: Budget) -> None:
        if self.comm is None:
            return
        params = list(self.other_params)
        for params_l, on in zip(self.block_params, budget.trained):
            if on:
                params += params_l
        self.comm.all_reduce_gradients([p for p in params if p.grad is not None])

    # -- memory ------------------------------------------------------------------------------
    def _should_probe(self, step: int, tokens_in: tuple[int, ...], budget: Budget) -> bool:
        return self._probes(step, tokens_in, len(budget.trained_blocks))

    def _mem_tracker(self):
        mt = frozen_aware_mem_tracker()
        mt.track_external(self.model, self.optimizer)
        return mt

    def _record_cpu_peak(self, mt: Any) -> None:
        snap = mt.get_tracker_snapshot("peak")
        total = max((int(s.get("Total", 0)) for s in snap.values()), default=0)
        self._peak_bytes = max(self._peak_bytes or 0, total)

    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._peak_bytes

    # -- FLOPs of the comparison ---------------------------------------------------------------
    def full_ft_step_flops(self, batch_size: int) -> float | None:
        """Counted flops of one full fine-tuning step (all tokens, every weight trained) at this
        batch size; the model's weights, grads, optimizer and RNG are left as they were. Counted once
        per batch size (the TensorBoard log and the summary both ask)."""
        if self.count_flops == "off":
            return None
        if batch_size not in self._full_step_flops:
            # With LoRA the reference is full fine-tuning of the plain model: adapters off.
            lora = self._has_lora()
            self._full_step_flops[batch_size] = self._count_passes(
                batch_size, lambda p: not is_adapter(p, self.model) if lora else True, adapters_off=True)
        return self._full_step_flops[batch_size]

    def every_token_step_flops(self, batch_size: int) -> float | None:
        """Counted flops of one step of this run's own model training every block on every token at
        this batch size: under LoRA the adapters on, and trained as LoRA trains them (the adapters and
        the classifier, the base weights frozen), which is what a ``lora`` run's every step costs;
        without LoRA, :meth:`full_ft_step_flops`. State, grads, flags and RNG are left as they were;
        counted once per batch size."""
        if self.count_flops == "off":
            return None
        if not self._has_lora():
            return self.full_ft_step_flops(batch_size)
        if batch_size not in self._every_token_flops:
            trained = {id(p) for p in (*self.embed_params, *(p for ps in self.block_params for p in ps),
                                       *self.other_params)}
            self._every_token_flops[batch_size] = self._count_passes(batch_size, lambda p: id(p) in trained,
                                                                     adapters_off=False)
        return self._every_token_flops[batch_size]

    def _has_lora(self) -> bool:
        return getattr(self.model, "disable_adapter", None) is not None

    def _count_passes(self, batch_size: int, trained: Callable[[nn.Parameter], bool], adapters_off: bool) -> float:
        """:meth:`_count_step` of a step of ``batch_size`` images as the runtime trains it, in its
        :meth:`passes` (on a GPU no larger batch than the run's passes is ever run), each size counted once."""
        sizes = self.passes(batch_size)
        counted = {n: self._count_step(n, trained, adapters_off) for n in set(sizes)}
        return float(sum(counted[n] for n in sizes))

    def _count_step(self, batch_size: int, trained: Callable[[nn.Parameter], bool], adapters_off: bool,
                    fake: bool | None = None) -> float:
        """Counted flops of one forward and backward on every token of a batch, with each
        floating-point parameter trained where ``trained`` says (and LoRA's adapters off where
        ``adapters_off``); the model's parameters, flags, grads and the RNG are left as they were.
        ``fake`` (default: on the CPU) counts on fake tensors: shapes, no data and no compute, so a
        ViT-B step at batch 16 costs half a second, not a real step's eight; a CUDA device runs the
        real step, which costs it milliseconds. The blocks run eagerly, as in a counted step, so
        that the counter sees every op."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.func import functional_call

        fake = self.device.type == "cpu" if fake is None else fake
        adapters = self.model.disable_adapter() if adapters_off and self._has_lora() else contextlib.nullcontext()
        img = self.timm_model.patch_embed.img_size
        flags = {n: p.is_floating_point() and trained(p) for n, p in self.model.named_parameters()}
        ctl = self.patch.control
        eager, ctl.eager = ctl.eager, True
        self.model.train()
        try:
            with (grad_flags_restored(self.model.parameters()),  # peft's disable_adapter sets the adapters' flags
                  adapters, FakeTensorMode() if fake else contextlib.nullcontext(),
                  torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])):
                like = (lambda t: torch.empty(t.shape, dtype=t.dtype, device=self.device)) if fake else (
                    lambda t: t.detach())
                state = {n: like(p).requires_grad_(flags[n]) for n, p in self.model.named_parameters()}
                state |= {n: like(b) for n, b in self.model.named_buffers()}
                x = torch.randn(batch_size, input_channels(self.timm_model), img[0], img[1], device=self.device)
                wanted = [t for t in state.values() if t.requires_grad]
                with counter() as fc, self._autocast():
                    loss = functional_call(self.model, state, (x,)).float().sum()
                    torch.autograd.grad(loss, wanted, allow_unused=True)
        finally:
            ctl.eager = eager
        return float(fc.get_total_flops())

    # -- evaluation, state, export -----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 kept: Sequence[int] | None = None) -> dict[str, float]:
        self.model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for images, labels in batches:
            images, labels = self._images(images), labels.to(self.device)
            with self._autocast(), token_schedule(self.timm_model, kept, self.patch.control.fuse,
                                                           self.patch.control.score):
                logits = self.model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
        return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}

    def parameter_counts(self) -> dict[str, int]:
        """Total, trainable and updated parameters (:func:`~.params.parameter_counts`)."""
        trainable = [*self.embed_params, *(p for ps in self.block_params for p in ps), *self.other_params]
        return parameter_counts(self.model, trainable, self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **({"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                "probed_load": list(self._probes.load), "token_rng": self.token_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.frozen_cache is not None:
            self.frozen_cache.clear()  # the weights it was computed with are replaced
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "loss_scaler" in state:  # resume checks the precision matches
            self.scaler.load_state_dict(state["loss_scaler"])
        self._probes.load = tuple(state.get("probed_load", (0, 0)))
        if "token_rng" in state:  # absent from checkpoints written before the token draws
            self.token_rng.set_state(state["token_rng"])

    def export_model(self) -> nn.Module:
        """A plain (unpatched, LoRA-merged) timm model with the trained weights, on the CPU."""
        import copy

        self.patch.unpatch()
        try:
            model = copy.deepcopy(self.model).cpu().eval()
        finally:
            self.patch = AlastPatch(self.timm_model)
            if self.compile:
                self.patch.compile_blocks()
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            if hasattr(model.head, "modules_to_save"):
                model.head = model.head.modules_to_save["default"]
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def check_config(cfg: Any) -> None:
    """Refuse a precision the run's device cannot run, or would run slower than fp32."""
    check_precision(resolve_device(cfg.backend.device), cfg.backend.precision)


@register_runtime("torch", check=check_config)
def _torch_runtime(cfg: Any, model: Any, comm: Any = None) -> Any:
    lora = cfg.policy.lora.model_dump() if cfg.policy.lora is not None else None
    return TorchRuntime(
        model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
        label_smoothing=cfg.train.label_smoothing, delta_reduction=cfg.policy.delta_reduction,
        device=cfg.backend.device, precision=cfg.backend.precision, count_flops=cfg.backend.count_flops,
        lora=lora, comm=comm, freeze_embeddings=cfg.policy.embeddings_frozen, compile=cfg.backend.compile,
        token_multiple=cfg.backend.token_multiple, sync_free=cfg.backend.sync_free,
        fuse_tokens=cfg.policy.fuse_tokens, token_select=cfg.policy.token_select, token_score=cfg.policy.token_score,
        seed=cfg.train.seed, micro_batch=cfg.train.micro_batch_size, token_temperature=cfg.policy.token_temperature,
    )

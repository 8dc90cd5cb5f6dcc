"""ONNX Runtime Training artifact sets: one per (graph variant, trained-block set), made on demand.

The trainable parameters of an ORT training model are fixed when its artifacts are generated, so
per-step freezing needs one artifact set per trained-block set. :class:`ArtifactCache` generates a
set the first time it is asked for (``generate_artifacts`` with no loss block, because the graph
computes its own loss, and no optimizer graph, because the runtime's optimizer works on the
parameter buffers directly), keeps it on disk under ``<run dir>/ort_artifacts`` (reused on resume
when the graph's fingerprint matches) and keeps the most recently used sets alive in memory.

A live :class:`TrainingSet` exposes its parameter and gradient buffers as torch tensors that share
memory with ONNX Runtime (DLPack, no copies). Switching sets copies the current weights into the
new set's buffers; optimizer state never lives in ONNX Runtime, so it needs no carrying over.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

CACHE_DIR = "ort_artifacts"
_FILES = ("training_model.onnx", "nominal_checkpoint")


@dataclass
class ArtifactStats:
    """Costs of freezing by artifact sets, in seconds (written to ``ort_artifacts/stats.json``)."""

    export_s: dict[str, float] = field(default_factory=dict)
    generated: int = 0
    generation_s: float = 0.0
    loaded_from_disk: int = 0
    rebuilt_damaged: int = 0  # sets on disk ONNX Runtime could not load (a disk fault, an edit): built again
    sessions: int = 0
    session_s: float = 0.0
    switches: int = 0
    switch_s: float = 0.0
    evictions: int = 0
    masked_steps: int = 0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_generation_s"] = self.generation_s / self.generated if self.generated else None
        out["mean_session_s"] = self.session_s / self.sessions if self.sessions else None
        out["mean_switch_s"] = self.switch_s / self.switches if self.switches else None
        return out


def set_name(variant: str, trained: Sequence[bool]) -> str:
    """``trained``: one flag per block, then one for the embeddings (``-stem0`` when frozen)."""
    return f"{variant}-{''.join('1' if t else '0' for t in trained[:-1])}" + ("" if trained[-1] else "-stem0")


def graph_fingerprint(model_bytes: bytes) -> str:
    """A hash of the graph's structure and parameter shapes (not values): equal fingerprints mean
    artifacts generated from either graph are interchangeable."""
    import onnx
    import onnxruntime

    model = onnx.load_from_string(model_bytes)
    h = hashlib.sha256(onnxruntime.__version__.encode())
    g = model.graph
    for part in (*g.node, *g.input, *g.output):
        h.update(part.SerializeToString())
    for init in g.initializer:
        h.update(f"{init.name}:{list(init.dims)}:{init.data_type}".encode())
    return h.hexdigest()[:16]


def _load_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for files it cannot load (its own classes, outside Python's tree)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    return (RuntimeError, ValueError, ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.NoSuchFile,
            ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.RuntimeException)


def ort_reason(exc: BaseException) -> str:
    """The part of an ONNX Runtime error that says what went wrong, without the C++ source location
    and signature it starts with (``... [ONNXRuntimeError] : 1 : FAIL : Node (...) ...``, or a failed
    check: ``.../file.cc:29 signature(...) condition was false. What went wrong``)."""
    text = " ".join(str(exc).split())
    if "[ONNXRuntimeError]" in text:
        text = text.split("[ONNXRuntimeError]", 1)[1].lstrip(" :")
        parts = text.split(" : ", 2)  # code, status name, message
        text = parts[-1] if len(parts) == 3 else text
    elif " was false. " in text:
        text = text.split(" was false. ", 1)[1]
    return text[:200] if text else exc.__class__.__name__


def _refuses_graph(exc: BaseException) -> bool:
    """Whether ONNX Runtime refused a graph it was given (its shape or type inference, an invalid
    graph), not failed for another reason (memory, a device, our own code)."""
    text = str(exc)
    return "[ONNXRuntimeError]" in text and any(
        kind in text for kind in ("ShapeInferenceError", "TypeInferenceError", "INVALID_GRAPH"))


class TrainingSet:
    """A live artifact set: checkpoint state, training module, and its buffers as torch tensors."""

    def __init__(self, name: str, directory: Path, param_names: Sequence[str], options: Any, device: str) -> None:
        from onnxruntime.training.api import CheckpointState, Module

        self.name = name
        self.state = CheckpointState.load_checkpoint(str(directory / "nominal_checkpoint"))
        self.module = Module(str(directory / "training_model.onnx"), self.state, None, device=device,
                             session_options=options)
        # A nominal checkpoint holds shapes only: allocate the parameters once (values come from
        # the runtime's current weights before the first step), then map them without copies.
        import numpy as np
        import onnxruntime as ort

        total = self.module.get_parameters_size(trainable_only=False)
        zeros = ort.OrtValue.ortvalue_from_numpy(np.zeros(total, np.float32))  # keeps the array alive
        self.module.copy_buffer_to_parameters(zeros._ortvalue, trainable_only=False)
        del zeros
        self.params: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        for n in param_names:
            p = self.state._state.get_parameter(n)
            self.params[n] = torch.utils.dlpack.from_dlpack(p.data.to_dlpack())
            if p.requires_grad:
                self.grads[n] = torch.utils.dlpack.from_dlpack(p.grad.to_dlpack())

    def ort_value(self, name: str) -> Any:
        """The parameter's OrtValue (shares memory with ``params[name]``)."""
        return self.state._state.get_parameter(name).data


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence C++ output on file descriptor 2 within the block.

    ``generate_artifacts`` optimizes the graph in a session that logs every graph transformer at
    INFO level regardless of the default logger severity; Python-level errors still propagate.
    """
    fd = 2  # where the C++ logger writes, whatever Python's sys.stderr is
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


class ArtifactCache:
    """Artifact sets per (variant, trained blocks): generated on demand, kept on disk and in memory.

    ``exporters`` maps a variant name ('dense', 'select') to a function returning the serialized
    base training graph; each variant is exported once, on first use. ``block_params`` holds the
    parameter names of each group a set freezes or trains: one per block, then the embeddings; a
    set's ``trained`` mask has one flag per group.
    """

    def __init__(self, exporters: dict[str, Callable[[], bytes]], param_names: Sequence[str],
                 block_params: Sequence[Sequence[str]], *, max_live: int, threads: int | None,
                 device: str = "cpu") -> None:
        self.exporters = exporters
        self.param_names = list(param_names)
        self.block_params = [list(b) for b in block_params]
        self.max_live = max(1, max_live)
        self.threads = threads
        self.device = device
        self.stats = ArtifactStats()
        self._bases: dict[str, bytes] = {}
        self._fingerprints: dict[str, str] = {}
        self._live: OrderedDict[str, TrainingSet] = OrderedDict()
        self.pinned: set[str] = set()  # never evicted (the all-trainable fallback sets)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.root: Path | None = None

    # -- where artifacts live ---------------------------------------------------------------
    def bind_dir(self, run_dir: Path) -> None:
        """Keep artifacts under ``run_dir/ort_artifacts`` (call before the first step)."""
        self.root = Path(run_dir) / CACHE_DIR
        self._tmp = None  # sets already made in a temporary root stay valid: their sessions are loaded

    def _root(self) -> Path:
        if self.root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="alast-ort-")
            self.root = Path(self._tmp.name)
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def _variant_dir(self, variant: str) -> Path:
        """The variant's directory; artifacts there from a different graph are discarded."""
        base = self.base(variant)
        fp = self._fingerprints.setdefault(variant, graph_fingerprint(base))
        vdir = self._root() / variant
        marker = vdir / "fingerprint"
        if vdir.exists() and (not marker.exists() or marker.read_text().strip() != fp):
            shutil.rmtree(vdir)
        if not vdir.exists():
            vdir.mkdir(parents=True)
            marker.write_text(fp + "\n")
        return vdir

    def base(self, variant: str) -> bytes:
        if variant not in self._bases:
            t0 = time.perf_counter()
            self._bases[variant] = self.exporters[variant]()
            self.stats.export_s[variant] = time.perf_counter() - t0
        return self._bases[variant]

    # -- sets -------------------------------------------------------------------------------
    def trainable_names(self, trained: Sequence[bool]) -> list[str]:
        frozen = {n for names, on in zip(self.block_params, trained) if not on for n in names}
        return [n for n in self.param_names if n not in frozen]

    def get(self, variant: str, trained: Sequence[bool]) -> tuple[TrainingSet, bool]:
        """The live set for ``(variant, trained)``; the flag says whether it was just created."""
        name = set_name(variant, trained)
        if name in self._live:
            self._live.move_to_end(name)
            return self._live[name], False
        directory = self._variant_dir(variant) / name
        t0 = time.perf_counter()
        if all((directory / f).exists() for f in _FILES):
            try:
                with _quiet_native_stderr():
                    ts = TrainingSet(name, directory, self.param_names, self._session_options(), self.device)
                self.stats.loaded_from_disk += 1
            except _load_errors():  # a truncated model, a checkpoint that fails to verify
                # The files are a cache of what _generate builds from the graph: build them again.
                self.stats.rebuilt_damaged += 1
                ts = None
        else:
            ts = None
        if ts is None:
            self._generate(variant, trained, directory)
            t0 = time.perf_counter()
            try:
                ts = TrainingSet(name, directory, self.param_names, self._session_options(), self.device)
            except _load_errors() as exc:
                if not _refuses_graph(exc):
                    raise
                shutil.rmtree(directory, ignore_errors=True)
                from .graph import GraphError

                raise GraphError("ONNX Runtime Training cannot run the gradient graph it built for this model "
                                 f"({ort_reason(exc)}); use --backend torch") from None
        self.stats.sessions += 1
        self.stats.session_s += time.perf_counter() - t0
        self._live[name] = ts
        self.write_stats()
        return ts, True

    def trim(self) -> None:
        """Drop the least recently used live sets beyond ``max_live`` (their files stay on disk).

        Called after the runtime moved the weights into the newest set, never before.
        """
        for name in list(self._live):
            if len(self._live) - len(self.pinned & set(self._live)) <= self.max_live:
                break
            if name not in self.pinned:
                del self._live[name]
                self.stats.evictions += 1

    def is_live(self, variant: str, trained: Sequence[bool]) -> bool:
        return set_name(variant, trained) in self._live

    def _generate(self, variant: str, trained: Sequence[bool], directory: Path) -> None:
        import onnx
        from onnxruntime.training import artifacts

        base = onnx.load_from_string(self.base(variant))
        trainable = self.trainable_names(trained)
        frozen = [n for n in self.param_names if n not in set(trainable)]
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with _quiet_native_stderr():
                artifacts.generate_artifacts(base, requires_grad=trainable, frozen_params=frozen, loss=None,
                                             optimizer=None, artifact_directory=str(tmp), nominal_checkpoint=True)
            # The complete checkpoint duplicates every weight; the runtime supplies weights itself.
            (tmp / "checkpoint").unlink(missing_ok=True)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise  # disk trouble is a failure of the run, not bad input
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            from .graph import GraphError

            raise GraphError("ONNX Runtime Training cannot build the gradient graph for this model "
                             f"({ort_reason(exc)}); use --backend torch") from None
        self.stats.generated += 1
        self.stats.generation_s += time.perf_counter() - t0

    def _session_options(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        return opts

    def record_switch(self, seconds: float) -> None:
        self.stats.switches += 1
        self.stats.switch_s += seconds

    def write_stats(self) -> None:
        if self.root is None or self._tmp is not None:
            return
        try:
            (self.root / "stats.json").write_text(json.dumps(self.stats.summary(), indent=2) + "\n")
        except OSError:
            pass  # statistics are informative only

"""What the loop needs from the process it runs in: ranks, signals and random-number state."""
from __future__ import annotations

import contextlib
import random
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Self

import numpy as np
import torch


@dataclass
class Comm:
    """Rank info for the loop; ``extra`` is the communicator (runtimes.distributed.TorchComm)."""

    rank: int = 0
    world_size: int = 1
    extra: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _has(self, method: str) -> bool:
        return self.world_size > 1 and hasattr(self.extra, method)

    def any_true(self, flag: bool) -> bool:
        return self.extra.any_true(flag) if self._has("any_true") else flag

    def broadcast_object(self, obj: Any) -> Any:
        return self.extra.broadcast_object(obj) if self._has("broadcast_object") else obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.extra.all_gather_object(obj) if self._has("all_gather_object") else [obj]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second one stops at once.

    Stopping between steps keeps the checkpoint consistent (an exception mid-step could land
    after the optimizer update but before the planner saw the step). Handlers are only installed
    from the main thread (Python's rule); elsewhere signals keep their default behaviour. On its
    way out it puts back the handlers it found (the command's :class:`StopAtOnce`, if any).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if _command is not None:
            _command.signalled = True
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class StopAtOnce:
    """For a whole command: SIGINT and SIGTERM stop it at once (``KeyboardInterrupt``, as Python's
    default SIGINT handler does), also where SIGTERM would kill the process or was ignored.

    Outside the training loop's steps there is nothing to save first: before the first step
    nothing has been trained, and after the last one the final checkpoint is already written
    (the final evaluation can take minutes; a stop request must not wait for it). Inside the loop
    :class:`StopOnSignal` takes over and hands these handlers back when it ends. Run-dir writes
    made through :func:`on_main` finish before the stop, so none is left half-done.
    ``signalled``: a signal arrived (a peer rank that stopped first may then be why a collective
    failed). ``signals``: the ones it handles (by default SIGINT and SIGTERM).
    """

    def __init__(self, signals: tuple[int, ...] = StopOnSignal.SIGNALS) -> None:
        self.signals = signals
        self.signalled = False
        self._held = 0  # > 0 inside on_main: the stop waits for the write to finish
        self._pending = False
        self._old: dict[int, Any] = {}
        self._outer: StopAtOnce | None = None

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        if self._held:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        """Stop only once the block is done (and not if it raised: its exception says more)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if self._pending and not self._held:
            self._pending = False
            raise KeyboardInterrupt

    def __enter__(self) -> Self:
        global _command
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
            self._outer, _command = _command, self
        return self

    def __exit__(self, *exc: object) -> None:
        global _command
        for s, old in self._old.items():
            signal.signal(s, old)
        if self._old:
            _command = self._outer


_command: StopAtOnce | None = None  # the active one, whose stops on_main holds back


def stop_signalled() -> bool:
    """Whether SIGINT or SIGTERM reached the command running now (see :class:`StopAtOnce`)."""
    return _command is not None and _command.signalled


def on_main(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result or raises its exception. A stop
    signal (:class:`StopAtOnce`) waits until ``fn`` is done and every rank has its result: ``fn``
    writes the run dir, and a write cut short could leave it half-done."""
    result, error = None, None
    with _command.held() if _command is not None else contextlib.nullcontext():
        if comm.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if comm.world_size > 1:
            error = comm.broadcast_object(_portable(error))
            result = comm.broadcast_object(result if error is None else None)
        if error is not None:
            raise error
    return result


def _portable(exc: BaseException | None) -> BaseException | None:
    """``exc`` if it survives pickling (to send to the other ranks), else a same-message RuntimeError."""
    import pickle

    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - custom exception signatures do not always pickle
        return RuntimeError(str(exc))

"""Nested training state <-> (named tensors, JSON tree): a checkpoint that cannot run code.

A pickle runs whatever its bytes say when it is loaded, so a run directory from someone else
(or a file swapped in it) could run code on ``--resume``. Here a checkpoint is split into tensors,
which safetensors stores as raw bytes, and a JSON tree of plain data that points at them; reading
either never calls a constructor named by the file.

:func:`flatten` accepts dicts (any hashable plain keys: optimizer states use ``int``), lists,
tuples, tensors (strided, any dtype safetensors knows: bf16, int64, uint8, empty, 0-d), numpy
arrays, numpy scalars, ``None``, ``bool``, ``int``, ``float`` and ``str``. :func:`unflatten`
gives back an equal structure with the same types (tuples stay tuples, as ``random.setstate`` and
``np.random.set_state`` need), except that ``OrderedDict`` comes back as ``dict`` (same order)
and tensors come back on the CPU. Anything else is refused at save time with its key.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

TAG = "__alast__"  # marks an encoded node in the JSON tree; plain dicts never hold this key
_PLAIN = (bool, int, float, str)


class UnsupportedValue(TypeError):
    """A value a checkpoint cannot hold (it would need pickle); the message names its key."""


def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``obj`` as ``(tensors, tree)``: contiguous CPU tensors by name, and a JSON-ready tree."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()
    return tensors, _encode(obj, "", tensors, storages)


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The structure :func:`flatten` was given, rebuilt from its tree and tensors."""
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        if tree is not None and type(tree) not in _PLAIN:
            raise ValueError(f"unexpected {type(tree).__name__} in a checkpoint tree")
        return tree
    kind = tree.get(TAG)
    if kind is None:
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if kind == "tuple":
        return tuple(unflatten(v, tensors) for v in tree["items"])
    if kind == "dict":
        return {_key(unflatten(k, tensors)): unflatten(v, tensors) for k, v in tree["items"]}
    if kind == "tensor":
        return tensors[tree["key"]]
    if kind == "ndarray":
        return tensors[tree["key"]].numpy()
    if kind == "npscalar":
        return np.dtype(tree["dtype"]).type(tree["value"])
    raise ValueError(f"unknown node {kind!r} in a checkpoint tree")


def _key(k: Any) -> Any:
    hash(k)  # a list key would be a corrupt tree: fail here with a TypeError
    return k


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], storages: set[tuple[int, int]]) -> Any:
    if obj is None or type(obj) in _PLAIN:
        return obj
    if isinstance(obj, torch.Tensor):
        return {TAG: "tensor", "key": _store(_cpu_tensor(obj, path), path, tensors, storages)}
    if isinstance(obj, np.ndarray):
        return {TAG: "ndarray", "key": _store(_numpy_tensor(obj, path), path, tensors, storages)}
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return {TAG: "npscalar", "dtype": obj.dtype.str, "value": obj.item()}
    if type(obj) is list:
        return [_encode(v, f"{path}[{i}]", tensors, storages) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {TAG: "tuple", "items": [_encode(v, f"{path}[{i}]", tensors, storages) for i, v in enumerate(obj)]}
    if type(obj) in (dict, OrderedDict):
        items = [(k, _encode(v, f"{path}.{k}" if path else str(k), tensors, storages)) for k, v in obj.items()]
        if all(type(k) is str for k in obj) and TAG not in obj:
            return dict(items)
        return {TAG: "dict", "items": [[_encode(k, f"{path} key {k!r}", tensors, storages), v] for k, v in items]}
    raise UnsupportedValue(f"{path or 'the state'}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                           "stored in a checkpoint (only tensors, numpy arrays and plain data; never pickle)")


def _cpu_tensor(t: torch.Tensor, path: str) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized:
        raise UnsupportedValue(f"{path}: a {t.layout} tensor cannot be stored in a checkpoint (dense tensors only)")
    return t.detach().to("cpu")


def _numpy_tensor(a: np.ndarray, path: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(a))
    except (TypeError, ValueError):
        raise UnsupportedValue(f"{path}: a numpy array of {a.dtype} cannot be stored in a checkpoint") from None


def _store(t: torch.Tensor, path: str, tensors: dict[str, torch.Tensor], storages: set[tuple[int, int]]) -> str:
    """Add ``t`` under a name derived from ``path``; a view or a second reference is copied,
    because safetensors stores each tensor's own bytes (shared storage is refused)."""
    storage = t.untyped_storage()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == storage.nbytes()
    ident = (storage.data_ptr(), storage.nbytes())
    if not whole or (t.nbytes and ident in storages):
        t = t.clone(memory_format=torch.contiguous_format)
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    if t.nbytes:
        storages.add(ident)
    key = path or "tensor"
    if key in tensors:
        key = f"{key}#{len(tensors)}"
    tensors[key] = t
    return key

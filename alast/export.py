"""Export a finished run to a verified ONNX inference model, and evaluate runs and ONNX models.

The exported graph is the timm model in eval mode with a dynamic batch axis, input ``images`` and
output ``logits``, as the run deployed it: on its token schedule where ``summary.json``'s
``eval_kept_tokens`` names one (after each block, the patch tokens with the highest CLS attention,
as many as the final training steps kept; see :mod:`runtimes.token_schedule`), otherwise on every
token (runs that kept every token or measured it more accurate, runs made before schedules
existed, and ``all_tokens=True``). Its
``metadata_props`` carry what a consumer needs to use it without alast: preprocessing (input size,
mean, std, interpolation, crop), class names, and provenance (source model, policy, backend).
Every export is checked with ``onnxruntime.InferenceSession`` against the PyTorch model before the
file appears under its final name. Works with plain ``onnxruntime`` or ``onnxruntime-training``.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alast.config import MIN_OPSET  # the lowest opset with scaled_dot_product_attention in the exporter
from alast.training.checkpoint import file_mode
from runtimes.onnx_export import INPUT, OUTPUT, ExportError, export_inference_bytes, max_logit_diff
from runtimes.protocol import RuntimeError_
from runtimes.token_schedule import ScheduleError, check_schedule, token_schedule

META_PREFIX = "alast."
# the metadata values written as JSON (the others are plain strings)
JSON_METADATA = ("classes", "input_size", "mean", "std", "skip_bad_images", "splits", "kept_tokens", "fuse_tokens",
                 "data_fingerprint")
SPLIT_KEYS = ("train_split", "val_split", "subset")  # a torchvision dataset's split names in the data config


class VerificationError(RuntimeError_):
    """The exported model disagrees with PyTorch beyond the tolerance (exit code 1, no file left)."""


@dataclass
class LoadedRun:
    run_dir: Path
    config: Any
    summary: dict[str, Any]
    model: nn.Module

    @property
    def fuse_tokens(self) -> bool:
        """Whether the run fused dropped tokens (its token schedule then fuses them too)."""
        return bool(self.config.policy.fuse_tokens)

    @property
    def token_score(self) -> str:
        """What scored the tokens in training (its token schedule keeps the highest scores)."""
        return str(self.config.policy.token_score)

    @property
    def kept_tokens(self) -> tuple[int, ...] | None:
        """The token schedule the run deployed (None: every token)."""
        kept = self.summary.get("eval_kept_tokens")
        if not kept:
            return None
        try:
            return check_schedule(kept, len(self.model.blocks), int(self.model.patch_embed.num_patches))
        except (ScheduleError, TypeError, ValueError) as exc:
            raise ExportError(f"{self.run_dir}: eval_kept_tokens in the summary is corrupt ({exc}); "
                              "use --all-tokens or rerun the training") from None


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    atol: float
    opset: int
    batch: int
    metadata: dict[str, str]
    kept_tokens: tuple[int, ...] | None = None


# -- runs ----------------------------------------------------------------------------------------
def load_run(run_dir: Path) -> LoadedRun:
    """The run's config, summary and fine-tuned model (eval mode, CPU), or :class:`ExportError`."""
    from alast.config import load_run_config
    from alast.training.rundir import CONFIG, FINAL_WEIGHTS, SUMMARY

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    if not (run_dir / CONFIG).exists():
        raise ExportError(f"{run_dir} is not a run directory (no {CONFIG})")
    if (run_dir / SUMMARY).exists() and not (run_dir / FINAL_WEIGHTS).exists():  # finished; its weights gone
        raise ExportError(f"run {run_dir} finished, but its fine-tuned weights ({run_dir / FINAL_WEIGHTS}) are gone; "
                          "restore the file, or rerun the training")
    if not (run_dir / SUMMARY).exists() or not (run_dir / FINAL_WEIGHTS).exists():
        from alast.training.rundir import lock_holder

        holder = lock_holder(run_dir)
        then = (f"it is still training (process {holder}); export it when that ends" if holder else
                f"finish it with `alast train --resume --out {run_dir}`")
        raise ExportError(f"run {run_dir} has not finished (no {SUMMARY} or {FINAL_WEIGHTS}); {then}")
    cfg = load_run_config(run_dir / CONFIG)
    summary, num_classes = _read_summary(run_dir / SUMMARY)
    model = _build_model(cfg, num_classes)
    _load_weights(model, run_dir / FINAL_WEIGHTS)
    return LoadedRun(run_dir, cfg, summary, model.eval())


def _read_summary(path: Path) -> tuple[dict[str, Any], int]:
    """A run's summary and class count, or :class:`ExportError` naming what is missing: the class
    count, one name per class, and the input size and normalisation its images were prepared with
    (an export writes them into the model's metadata, and evaluation prepares its images by them)."""
    fix = "rerun the training, or restore the summary.json the run wrote"
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path} is not valid JSON ({type(e).__name__}); {fix}") from None
    try:
        num_classes = int(summary["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise ExportError(f"{path} is corrupt (no num_classes); {fix}") from None
    classes = summary.get("classes")
    if not isinstance(classes, list) or len(classes) != num_classes:
        raise ExportError(f"{path} is corrupt (classes should name its {num_classes} classes); {fix}")
    data_cfg = summary.get("data_config")
    missing = [k for k in ("input_size", "mean", "std")
               if not isinstance(data_cfg, dict) or not isinstance(data_cfg.get(k), list) or not data_cfg[k]]
    if missing:
        raise ExportError(f"{path} is corrupt (its data_config lacks {', '.join(missing)}); {fix}")
    return summary, num_classes


def _build_model(cfg: Any, num_classes: int) -> nn.Module:
    from alast.models import SHIPPED_MODELS, build_shipped_model, create_model

    extra = {"img_size": cfg.model.img_size} if cfg.model.img_size else {}
    if cfg.model.name in SHIPPED_MODELS:
        return build_shipped_model(cfg.model.name, num_classes, pretrained=False, **extra)
    return create_model(cfg.model.name, num_classes, pretrained=False, **extra)


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise ExportError(f"cannot read {path} ({exc.__class__.__name__}); the weights file is corrupt: restore "
                          "it from a copy, or train the run again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ExportError(f"{path} does not fit the run's model ({first})") from None


def run_metadata(run: LoadedRun, kept: tuple[int, ...] | None = None) -> dict[str, str]:
    """``metadata_props`` for a run's model: preprocessing, classes, token schedule, provenance."""
    s, cfg = run.summary, run.config
    dc = s.get("data_config") or {}
    meta = {
        "format": "1",
        "model": str(s.get("model", cfg.model.name)),
        "policy": str(s.get("policy", cfg.policy.name)),
        "backend": str(s.get("backend", cfg.backend.name)),
        "num_classes": str(s["num_classes"]),
        "classes": json.dumps(list(s.get("classes") or [])),
        "input_size": json.dumps(list(dc.get("input_size", []))),
        "mean": json.dumps(list(dc.get("mean", []))),
        "std": json.dumps(list(dc.get("std", []))),
        "interpolation": str(dc.get("interpolation", "bicubic")),
        "crop_pct": str(dc.get("crop_pct", 1.0)),
        "crop_mode": str(dc.get("crop_mode", "center")),
        "data": str(cfg.data.spec),
        "val_fraction": str(cfg.data.val_fraction),
        "seed": str(cfg.train.seed),
        "skip_bad_images": json.dumps(bool(cfg.data.skip_bad_images)),
        "splits": json.dumps({k: getattr(cfg.data, k, None) for k in SPLIT_KEYS}),
        "data_fingerprint": json.dumps(s.get("data_fingerprint")),
        "kept_tokens": json.dumps(list(kept) if kept else None),
        "fuse_tokens": json.dumps(bool(kept) and run.fuse_tokens),
        "token_score": str(run.token_score) if kept else "",
    }
    return {META_PREFIX + k: v for k, v in meta.items()}


@functools.lru_cache(maxsize=1)
def supported_opsets() -> tuple[int, int]:
    """The opsets an export can use here: from :data:`MIN_OPSET` up to the lowest of the highest the
    TorchScript exporter writes and the highest this onnxruntime (which verifies every export) loads."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # a private module: should it move, the TorchScript exporter's long-time maximum
        torch_max = 20
    for opset in range(torch_max, MIN_OPSET - 1, -1):
        if _runtime_loads(opset):
            return MIN_OPSET, opset
    return MIN_OPSET, torch_max


def _runtime_loads(opset: int) -> bool:
    """Whether onnxruntime loads a one-node model of ``opset`` (milliseconds)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime's own error types: this opset is too new for it
        return False
    return True


def check_opset(opset: int, source: str = "--opset") -> int:
    """``opset`` if an export can use it, else :class:`ExportError` with the supported range."""
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise ExportError(f"{source} {opset} is not supported: this torch and onnxruntime export and verify "
                          f"opsets {low} to {high} (timm's attention needs {MIN_OPSET}); pass --opset in that range")
    return opset


def export_run(run_dir: Path, out: Path, *, atol: float | None = None, opset: int | None = None,
               all_tokens: bool = False, force: bool = False) -> ExportReport:
    """Export ``run_dir`` to ``out`` on its token schedule (every token with ``all_tokens``); the
    file appears only if it verified within ``atol``. An existing ``out`` is replaced only with
    ``force``, and the run's own files never are."""
    import onnx

    from alast.training.rundir import check_out_file

    check_out_file(out, force, "export", "model.onnx", run_dir)
    if opset is not None:
        opset = check_opset(int(opset))  # before the run loads: a bad --opset fails at once
    run = load_run(run_dir)
    kept = None if all_tokens else run.kept_tokens
    atol = float(atol if atol is not None else run.config.export.atol)
    if opset is None:
        opset = check_opset(int(run.config.export.opset), "the run's export.opset")
    model = onnx.load_from_string(export_inference_bytes(run.model, opset, kept=kept, fuse=run.fuse_tokens,
                                                               score=run.token_score))
    meta = run_metadata(run, kept)
    model.producer_name = "alast"
    model.doc_string = f"{meta[META_PREFIX + 'model']} fine-tuned with alast ({meta[META_PREFIX + 'policy']})"
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save(model, str(tmp))
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would make the model private
        diff = max_logit_diff(tmp, run.model, kept=kept, fuse=run.fuse_tokens, score=run.token_score)
        if not diff <= atol:
            raise VerificationError(f"verification failed: ONNX logits differ from PyTorch by {diff:.3g} "
                                    f"(> atol {atol:g}); no file written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, diff, atol, opset, 3, meta, kept)


# -- ONNX evaluation -----------------------------------------------------------------------------
_ONNX_OR_RUN = "pass a run directory or a model written by `alast export`"


def read_metadata(path: Path) -> dict[str, str]:
    """The alast metadata of an ONNX model (prefix stripped), or :class:`ExportError`."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf DecodeError and friends
        raise ExportError(f"{path} is not an ONNX model; {_ONNX_OR_RUN}") from None
    if len(model.graph.node) == 0:
        raise ExportError(f"{path} is not an ONNX model (no graph); {_ONNX_OR_RUN}")
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if "input_size" not in meta:
        raise ExportError(f"{path} has no alast preprocessing metadata; export it with `alast export`")
    for key in JSON_METADATA:
        try:
            json.loads(meta.get(key, "null"))
        except ValueError:
            raise ExportError(f"{path}: its metadata {META_PREFIX}{key} is not JSON ({meta[key][:40]!r}); export "
                              "the model again with `alast export`") from None
    return meta


def data_config_from_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """timm's eval transform settings from the model's metadata."""
    return {"input_size": tuple(json.loads(meta["input_size"])), "mean": tuple(json.loads(meta["mean"])),
            "std": tuple(json.loads(meta["std"])), "interpolation": meta.get("interpolation", "bicubic"),
            "crop_pct": float(meta.get("crop_pct", 1.0)), "crop_mode": meta.get("crop_mode", "center")}


def _val_data(spec: str, data_cfg: dict[str, Any], data_dir: Path | None, val_fraction: float, seed: int,
              classes: list[str], skip_bad_images: bool = False, for_eval: bool = False,
              splits: dict[str, str | None] | None = None, fingerprint: dict[str, Any] | None = None) -> Any:
    """The data ``spec``'s evaluation images, labelled with the model's indices of its ``classes``.

    ``for_eval``: ``spec`` is other data than the run's (see :func:`_other_data`): a flat image folder
    is scored whole (but one that holds the very files the run split, by the ``fingerprint`` it
    recorded of them, a copy of the run's folder, gets the run's split again: scored whole, it would
    count the images the run trained on), and any of the model's classes, even one, will do. Otherwise the run's own
    validation split, as training drew it from ``val_fraction``, ``seed`` and ``splits``; an image
    folder whose files differ from the ``fingerprint`` the run recorded of them is refused (its split
    moved: it would score training images). The dataset carries ``skipped_files``, the unreadable
    files skipped in reading ``spec`` (:attr:`~alast.data.common.DataBundle.skipped_files`).
    """
    from alast.data import DataError, build_data
    from alast.data.common import check_fingerprint, nfc

    if data_dir is not None and not spec.startswith("torchvision:"):  # nothing would read it
        raise DataError(f"--data-dir applies to torchvision:NAME data only, not to {spec}; drop it")
    bundle = build_data(spec, data_cfg, data_dir=data_dir, val_fraction=val_fraction, seed=seed,
                        skip_bad_images=skip_bad_images, for_eval=for_eval, run_files=fingerprint if for_eval else None,
                        **(splits or {}))
    if not for_eval:
        check_fingerprint(fingerprint, bundle)
    classes = [nfc(c) for c in classes]  # older runs kept a folder's name as written
    if classes and list(bundle.classes) != list(classes):
        unknown = [c for c in bundle.classes if c not in classes]
        if unknown:
            raise DataError(f"data {spec!r} has classes the model was not trained on ({', '.join(unknown[:5])}); "
                            f"it knows {len(classes)}: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}; "
                            "evaluate on data with the run's class folders (a subset is fine)")
        val = _Relabelled(bundle.val, [classes.index(c) for c in bundle.classes])
    else:
        val = bundle.val
    val.skipped_files = bundle.skipped_files
    return val


class _Relabelled(torch.utils.data.Dataset):
    """``dataset`` with its labels mapped to the model's (``labels[i]``: the model's index of the
    data's class ``i``), for evaluation data that holds some of the model's classes."""

    def __init__(self, dataset: Any, labels: list[int]) -> None:
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[i]
        return image, self.labels[int(label)]


def _accumulate(batches: Any, predict) -> dict[str, float]:
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in batches:
        logits = predict(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}


def evaluate_onnx(path: Path, spec: str | None = None, data_dir: Path | None = None,
                  batch_size: int | None = None, skip_bad_images: bool = False) -> dict[str, Any]:
    """Accuracy of an exported model with onnxruntime, preprocessing read from its metadata, and its
    token schedule (``kept_tokens``, None where every token is kept) as :func:`evaluate_run` reports it.

    Without ``spec`` it evaluates on the validation split the run was trained against (skipping
    unreadable images where the run did, so the split is the run's); ``batch_size=None`` sizes
    batches for memory (:func:`alast.data.datasets.auto_eval_batch_size`).
    """
    import onnxruntime as ort

    from alast.data import eval_batches

    meta = read_metadata(path)
    other = _other_data(spec, meta.get("data", "digits"))
    spec = spec or meta.get("data", "digits")
    splits = None if other else json.loads(meta.get("splits", "null"))  # exports before 'splits': automatic
    val = _val_data(spec, data_config_from_metadata(meta), data_dir, float(meta.get("val_fraction", 0.2)),
                    int(meta.get("seed", 0)), json.loads(meta.get("classes", "[]")),
                    skip_bad_images or json.loads(meta.get("skip_bad_images", "false")), for_eval=other,
                    splits=splits, fingerprint=json.loads(meta.get("data_fingerprint", "null")))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # invalid graph
        raise ExportError(f"onnxruntime cannot load {path} ({str(exc).strip().splitlines()[0][:160]})") from None

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run([OUTPUT], {INPUT: images.float().contiguous().numpy()})[0])

    metrics = _accumulate(eval_batches(val, batch_size), predict)
    kept = json.loads(meta.get("kept_tokens", "null"))  # the schedule built into the graph, as the export wrote it
    return {**metrics, "skipped_files": getattr(val, "skipped_files", 0), "source": "onnx", "path": str(path),
            "data": spec, "kept_tokens": list(kept) if kept else None}


def run_val_data(run: LoadedRun, spec: str | None = None, data_dir: Path | None = None,
                 skip_bad_images: bool = False) -> Any:
    """The run's validation split (or ``spec``'s), with the run's preprocessing and class check;
    unreadable images are skipped where the run skipped them, or with ``skip_bad_images``."""
    cfg = run.config
    dc = run.summary.get("data_config") or {}
    data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()}
    other = _other_data(spec, cfg.data.spec)
    spec = spec or cfg.data.spec
    if spec.startswith("torchvision:"):  # the run's dataset root serves other torchvision data too
        data_dir = data_dir or cfg.data.data_dir

    splits = None if other else {k: getattr(cfg.data, k, None) for k in SPLIT_KEYS}
    return _val_data(spec, data_cfg, data_dir, cfg.data.val_fraction, cfg.train.seed,
                     list(run.summary.get("classes") or []), skip_bad_images or cfg.data.skip_bad_images,
                     for_eval=other, splits=splits, fingerprint=run.summary.get("data_fingerprint"))


def _other_data(spec: str | None, run_spec: str) -> bool:
    """Whether ``spec`` (``--data``) names other data than the run's ``run_spec``. The run's own
    data is evaluated on its validation split, which training never saw; other data whole."""
    if spec is None:
        return False
    kind, _, path = spec.partition(":")
    run_kind, _, run_path = run_spec.partition(":")
    if kind == run_kind == "imagefolder" and path and run_path:
        return Path(path).expanduser().resolve() != Path(run_path).expanduser().resolve()
    return spec != run_spec


def evaluate_model(run: LoadedRun, kept: Sequence[int] | None, spec: str | None = None, data_dir: Path | None = None,
                   batch_size: int | None = None, skip_bad_images: bool = False) -> dict[str, float]:
    """Accuracy, loss and sample count of the run's model on the token schedule ``kept`` (None: every
    token), on its validation split or ``spec``, and the unreadable files skipped (``skipped_files``)."""
    from alast.data import eval_batches

    val = run_val_data(run, spec, data_dir, skip_bad_images)
    with torch.no_grad(), token_schedule(run.model, kept, run.fuse_tokens, run.token_score):
        metrics = _accumulate(eval_batches(val, batch_size or run.config.train.eval_batch_size), run.model)
    return {**metrics, "skipped_files": getattr(val, "skipped_files", 0)}


def evaluate_run(run_dir: Path, spec: str | None = None, data_dir: Path | None = None,
                 batch_size: int | None = None, all_tokens: bool = False,
                 skip_bad_images: bool = False) -> dict[str, Any]:
    """Accuracy of a run's fine-tuned PyTorch model on its validation split (or on ``spec``), as
    deployed: on its token schedule, if any (every token with ``all_tokens``)."""
    run = load_run(run_dir)
    kept = None if all_tokens else run.kept_tokens
    metrics = evaluate_model(run, kept, spec, data_dir, batch_size, skip_bad_images)
    return {**metrics, "source": "run", "path": str(run_dir), "data": spec or run.config.data.spec,
            "kept_tokens": list(kept) if kept else None}

"""How fast the training batches come: an image folder of photos at a model's input size, read
through the decoded-image cache (``data.cache``) or not, with 0..N DataLoader workers.

Times whole batches (the loader's own work, no model), each setting over ``--passes`` passes over
the folder; the cache's first pass decodes, the later ones read what it stored. The cache is timed
twice: giving float32 batches (as for a run on the CPU) and 8-bit ones (``runtimes.images.Pixels``,
as for a run on CUDA, which normalises them on the device); ``host_float_ms_per_batch`` times
making an 8-bit batch float32 on the host apart. Without
``--folder``, it writes one: ``--images`` crops of 500x375 from the two photographs scikit-learn
ships (``sklearn.datasets.load_sample_images``), JPEG quality 90, in 4 classes.

  python benchmarks/data_speed.py --model deit_small_patch16_224 --batch-size 64 --out data_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alast.data.cache import DecodedCache
from alast.data.datasets import StepBatchSampler, build_data, train_batches
from alast.training.build import model_data_config
from runtimes.images import Pixels, as_float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224", help="whose input size and transform")
    ap.add_argument("--folder", type=Path, default=None, help="an image folder (default: photos written here)")
    ap.add_argument("--images", type=int, default=512, help="images written without --folder")
    ap.add_argument("--write-folder", type=Path, default=None,
                    help="write the photos here (kept) and read them; an image folder for alast train")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3, help="passes over the training images per setting")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the loading process")
    ap.add_argument("--out", type=Path, default=Path("data_speed.json"))
    return ap.parse_args(argv)


def write_photos(root: Path, n: int) -> Path:
    """``n`` 500x375 JPEG crops (random positions, half mirrored) of scikit-learn's two photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        src = photos[i % len(photos)]
        y, x = rng.integers(0, src.shape[0] - 375 + 1), rng.integers(0, src.shape[1] - 500 + 1)
        crop = src[y:y + 375, x:x + 500][:, ::-1 if rng.random() < 0.5 else 1]
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(root / f"c{i % 4}" / f"{i}.jpg", quality=90)
    return root


def time_passes(ds, batch_size: int, passes: int, workers: int, eight_bit: bool = False
                ) -> tuple[list[float], list[float | None]]:
    """Images per second of each pass over ``ds`` (the loader started before the clock), and the
    mean milliseconds of making each 8-bit batch float32 on the host (None: no such batch)."""
    per_pass = len(ds) // batch_size
    sampler = StepBatchSampler(len(ds), batch_size, 0, 0, per_pass * passes, 0, 1)
    batches = iter(train_batches(ds, sampler, num_workers=workers, eight_bit=eight_bit))
    rates, floats = [], []
    for _ in range(passes):
        loading = normalising = 0.0
        eight_bit = 0
        for _ in range(per_pass):
            start = time.perf_counter()
            images, _ = next(batches)
            loading += time.perf_counter() - start
            if isinstance(images, Pixels):
                start = time.perf_counter()
                as_float(images)
                normalising += time.perf_counter() - start
                eight_bit += 1
        rates.append(per_pass * batch_size / loading)
        floats.append(round(1e3 * normalising / eight_bit, 2) if eight_bit else None)
    return rates, floats


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or write_photos(args.write_folder or Path(tmp) / "photos", args.images)
        data_cfg = model_data_config(args.model)
        train = build_data(f"imagefolder:{folder}", data_cfg, seed=0).train
        shape = train[0][0].shape
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            for cached, eight_bit in ((False, False), (True, False), (True, True)):
                ds = DecodedCache(train, shape, data_cfg["mean"], data_cfg["std"]) if cached else train
                rates, floats = time_passes(ds, args.batch_size, args.passes, workers, eight_bit)
                rows.append({"workers": workers, "cache": cached, "batches": "8-bit" if eight_bit else "float32",
                             "images_per_s": [round(r, 1) for r in rates],
                             "ms_per_batch": [round(1e3 * args.batch_size / r, 2) for r in rates],
                             "host_float_ms_per_batch": floats})
                print(f"workers {workers}  cache {'on ' if cached else 'off'}  "
                      f"{'8-bit  ' if eight_bit else 'float32'}  images/s per pass: "
                      + ", ".join(f"{r:.0f}" for r in rates)
                      + ("" if not any(floats) else "  (8-bit batches to float32 on the host, ms: "
                         + ", ".join("-" if f is None else f"{f:.1f}" for f in floats) + ")"), flush=True)
    result = {"model": args.model, "input": list(shape), "images": len(train), "batch_size": args.batch_size,
              "threads": args.threads, "cpu_count": os.cpu_count(), "folder": str(args.folder or "sklearn photos"), "images_written": None if args.folder else args.images,
              "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

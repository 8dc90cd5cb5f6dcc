"""Write scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) as an image folder.

Real images that need no download, in the layout ``--data imagefolder:DIR`` reads (one folder per
class), to try ALaST on files as one's own data would come:
    python examples/digits_folder.py --out /tmp/digits
    alast bench --data imagefolder:/tmp/digits --policies full,alast,tokens --targets 0.5,0.4 --seeds 3 --steps 150
(add ``--lrs 1e-3,5e-4`` to compare each policy at its own learning rate, chosen on images held out
of the training split). The pixels are the built-in ``digits`` task's (8-bit greyscale, 0..16 scaled to 0..255).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_digits(out: Path) -> int:
    """Write ``out/<label>/<index>.png`` for every digit; returns how many were written."""
    from PIL import Image

    from alast.data.datasets import digit_images

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; name a new or empty directory with --out")
    images, labels = digit_images()
    for i, (pixels, label) in enumerate(zip(images, labels)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return len(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory to create (new or empty)")
    args = p.parse_args(argv)
    n = write_digits(args.out)
    print(f"wrote {n} images of 10 classes to {args.out}")
    return n


if __name__ == "__main__":
    main()

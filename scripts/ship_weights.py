"""Retrain the demos' weights on this machine and write them into the package (``infkit/demo/weights``).

    make weights            # or: .venv/bin/python scripts/ship_weights.py [--text] [--diffusion]

Run this only when a demo's corpus, architecture or recipe changes (and bump its VERSION): the shipped bytes are what
every user and every stored notebook output rely on. Training is deterministic on one machine, so running it twice
here writes the same weight files (the manifest's timings differ); another CPU writes a slightly different model.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from infkit.demo import _weights, diffusion, model


def ship(name: str, load) -> None:
    target = _weights.SHIPPED / name
    with tempfile.TemporaryDirectory(prefix="infkit-ship-") as tmp:
        trained = load(cache_dir=Path(tmp) / name, retrain=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(trained.cache_path, target)
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f">> wrote {target} ({size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", action="store_true", help="only the language demo")
    parser.add_argument("--diffusion", action="store_true", help="only the diffusion demo")
    args = parser.parse_args()
    both = not (args.text or args.diffusion)
    if args.text or both:
        ship(model.SHIPPED_NAME, model.load)
    if args.diffusion or both:
        ship(diffusion.SHIPPED_NAME, diffusion.load)


if __name__ == "__main__":
    main()

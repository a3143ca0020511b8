"""Re-train the DigitNet the embedded default ships (``patchcsra/assets/digitnet.safetensors``).

    python benchmarks/train_demo_weights.py [--force]

Trains with ``patchcsra.demo.RECIPE`` on the integer-built digit canvases and writes the weights with
their record (recipe, sha256 of the training canvases, and the environment they were trained in). After
this, re-record the reference figures (README.md "Refreshing the pins and the figures").
"""
from __future__ import annotations

import argparse
import json

from patchcsra.demo import WEIGHTS_FILE, write_shipped_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS_FILE))
    ap.add_argument("--force", action="store_true", help="replace an existing file")
    args = ap.parse_args()
    record = write_shipped_weights(args.out, force=args.force,
                                   progress=lambda e, n, loss: print(f"epoch {e}/{n}: loss {loss:.4f}", flush=True))
    print(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

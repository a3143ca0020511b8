"""One plain evaluation as a user would write it (timm ``validate.py`` style), for ``sweep_cost.py --mode first``:
build the model from an architecture file, load a state dict, read an ImageFolder with torchvision, run
``model(x)`` over every image and print top-1. Whole process, timed from outside."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--arch", required=True, help="path/to/file.py:factory")
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--mean", default="0.485,0.456,0.406")
    p.add_argument("--std", default="0.229,0.224,0.225")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=max(0, min(8, len(os.sched_getaffinity(0)) - 1)))
    a = p.parse_args(argv)

    import torch
    from torchvision import datasets, transforms as T

    file, fn = a.arch.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("plain_arch", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, fn)()
    obj = torch.load(a.weights, map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj)
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    model.eval()
    tf = T.Compose([T.Resize(a.size), T.CenterCrop(a.size), T.ToTensor(),
                    T.Normalize([float(v) for v in a.mean.split(",")], [float(v) for v in a.std.split(",")])])
    ds = datasets.ImageFolder(a.data, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers)
    hits = total = 0
    with torch.inference_mode():
        for x, y in loader:
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    print(f"top1 {100.0 * hits / total:.2f} on {total} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())

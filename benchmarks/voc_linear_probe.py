"""A real multi-label Table-1 row from the shared data: ImageNet MobileNetV2 features, a VOC head.

The shared real ImageNet MobileNetV2 (``../shared/weights``, TF "SAME" padding on its five stride-2
convolutions, input ``(p - 128) / 128``) is turned into a 20-class VOC2007 classifier the way
multi-label papers fine-tune one, cut down to what a CPU does in a minute: the backbone stays
frozen, and a linear head (``classifier.1`` = Linear(1280, 20)) is fitted by one-vs-rest logistic
regression on the globally pooled features of the official VOC2007 ``train`` images. Then
``patchcsra.sweep_lambda`` evaluates it on the official ``val`` images (1,450 real photos, no image
of ``train``) and writes the run directory (Table 1 row, curve, per-class AP).

    python benchmarks/voc_linear_probe.py --out runs/mobilenetv2-voc07val
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def mobilenet_v2_tf_same(weights: Path):
    """torchvision MobileNetV2 with the shared TFLite weights and TF "SAME" stride-2 padding."""
    import torch
    from torch import nn

    import patchcsra

    model = patchcsra.load(weights, arch="torchvision:mobilenet_v2")
    for name in ("features.0.0", "features.2.conv.1.0", "features.4.conv.1.0", "features.7.conv.1.0",
                 "features.14.conv.1.0"):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        conv = getattr(parent, child)
        conv.padding = (0, 0)
        # even inputs (any size divisible by 32): 0 before, 1 after, as TF "SAME" with stride 2, kernel 3
        setattr(parent, child, nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv))
    model.patchcsra_source = {"spec": str(weights), "input_size": (3, 224, 224)}
    return model.eval()


def build_probe(voc: str, *, weights: str = str(SHARED / "weights" / "mobilenet_v2_1.0_224_quant_float.safetensors"),
                img_size: int = 224, batch_size: int = 50, workers=None, C: float = 1.0, verbose: bool = True):
    """The shared MobileNetV2 with a VOC linear head fitted on VOC2007 ``train``; returns (model, transform kwargs)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from torch.utils.data import DataLoader

    from patchcsra.data import open_dataset, resolve_transform
    from patchcsra.stats import default_workers

    workers = default_workers() if workers is None else workers
    model = mobilenet_v2_tf_same(Path(weights))
    s = img_size
    tf = dict(input_size=(3, s, s), crop_pct=0.875, interpolation="bilinear", mean=(128 / 255,) * 3,
              std=(128 / 255,) * 3)
    spec = resolve_transform(model, **tf)
    train = open_dataset(voc, split="train")
    train.transform = spec.build()
    t0 = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for x, _, ok in DataLoader(train, batch_size=batch_size, num_workers=workers):
            feats.append(model.features(x).mean((2, 3)))
    f = torch.cat(feats).numpy().astype(np.float64)
    w = np.zeros((20, f.shape[1]))
    b = np.zeros(20)
    for j in range(20):
        keep = train.targets[:, j] >= 0  # difficult-only entries are left out of training as well
        clf = LogisticRegression(C=C, max_iter=2000).fit(f[keep], train.targets[keep, j] == 1)
        w[j], b[j] = clf.coef_[0], clf.intercept_[0]
    head = torch.nn.Linear(f.shape[1], 20)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    model.classifier[1] = head
    if verbose:
        print(f"head fitted on {len(train)} VOC2007 train images ({time.perf_counter() - t0:.1f} s, CPU)")
    return model, tf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_quant_float.safetensors"))
    p.add_argument("--voc", default=str(SHARED / "data" / "voc2007-trainval-rf" / "VOCdevkit"))
    p.add_argument("--out", default="runs/mobilenetv2-voc07val")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)

    import patchcsra
    from patchcsra.report import display_frame, table_frame, to_markdown
    from patchcsra.stats import default_workers

    workers = default_workers() if a.workers is None else a.workers
    model, tf = build_probe(a.voc, weights=a.weights, img_size=a.img_size, batch_size=a.batch_size,
                            workers=workers, C=a.C)
    run = patchcsra.sweep_lambda(model, a.voc, split="val", temperatures=[1, 2, 4, math.inf], workers=workers,
                                 batch_size=a.batch_size, cache_dir=a.cache_dir, **tf)
    run.summary["model"]["name"] = "MobileNetV2 (ImageNet, TFLite) + VOC linear head"
    out = run.write(a.out, force=a.force)
    print(to_markdown(display_frame(table_frame([run.summary]))))
    b0 = run.summary["baseline"]
    print(f"baseline: mAP {b0['mAP']:.2f}  CF1 {b0['CF1']:.2f}  OF1 {b0['OF1']:.2f}; "
          f"{run.summary['collect']['images_per_s']} images/s; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

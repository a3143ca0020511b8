"""Parity of written files with the in-memory patched model: format x model x resolution, and export seconds.

Random-init models on the CPU (no downloads), patched at λ=0.2, written as .pt2 (torch.export), .pt
(TorchScript) and .onnx (checked with onnxruntime); each file is run at the probe size and two other sizes
(non-square where the model takes them) and compared with the in-memory model::

    python benchmarks/export_parity.py            # prints the table
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _models():
    import timm
    import torchvision

    from cifar_resnet import resnet20

    torch.manual_seed(0)
    yield "timm resnet18", timm.create_model("resnet18", pretrained=False), (3, 160, 160)
    yield "timm vit (dynamic_img_size)", timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                           dynamic_img_size=True, depth=4), (3, 160, 160)
    yield "timm convnext_atto", timm.create_model("convnext_atto", pretrained=False), (3, 160, 160)
    yield "timm mobilenetv3_small_050", timm.create_model("mobilenetv3_small_050", pretrained=False), (3, 160, 160)
    yield "torchvision resnet18", torchvision.models.resnet18(), (3, 160, 160)
    yield "CIFAR resnet20", resnet20(), (3, 32, 32)


def _runner(fmt: str, path: Path):
    if fmt == "onnx":
        import onnxruntime as ort

        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    return torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()


def main() -> None:
    import patchcsra
    from patchcsra.export import check_sizes, save_patched

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for name, model, size in _models():
            patched = patchcsra.patch(model.eval(), lam=0.2, input_size=size)
            info = patched.info
            stride = info.probe_input_size[1] // info.grid[0] if info.grid else None
            sizes = check_sizes(patched, size, stride)
            for fmt, suffix in (("export", ".pt2"), ("torchscript", ".pt"), ("onnx", ".onnx")):
                t = time.perf_counter()
                try:
                    p = save_patched(patched, Path(d) / f"m{suffix}", force=True)
                except Exception as e:  # noqa: BLE001 - a row saying why
                    rows.append((fmt, name, "-", f"refused: {str(e)[:90]}", f"{time.perf_counter() - t:.1f}"))
                    continue
                secs = time.perf_counter() - t
                run = _runner(fmt, p)
                for s in sizes:
                    x = torch.randn(2, *s)
                    try:
                        got, want = run(x), patched(x)
                        err = f"{float((got - want).abs().max()) / max(1.0, float(want.abs().max())):.1e}"
                    except Exception as e:  # noqa: BLE001
                        err = f"fails ({type(e).__name__})"
                    rows.append((fmt, name, "x".join(map(str, s[1:])), err, f"{secs:.1f}"))
    head = ("format", "model", "HxW", "max rel err", "export s")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()

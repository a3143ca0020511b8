"""``patchcsra explain``: per-location class scores and attention maps over images (PNG grids + .npy)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PatchCSRAError
from ..options import DEFAULT_MAX_PIXELS
from ._common import (OUTPUT, SOURCE_HELP, Arch, CropPct, Ema, Force, ImgSize, InputSize, Interpolation, MaxPixels,
                      Mean, NumClasses, Pretrained, Std, Trust, Weights, done, fail, model_source, parse_float,
                      status, transform_overrides)


def explain(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    images: list[Path] = typer.Argument(..., help="image files (PNG, JPEG, ...)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="directory for <image>.png grids and raw .npy maps",
                                 rich_help_panel=OUTPUT),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names or indices "
                                          "(default: the top predicted)"),
    class_names: Optional[Path] = typer.Option(None, "--class-names", help="names of the model's outputs: one per "
                                               "line (line i names output i, e.g. imagenet_labels.txt) or a JSON "
                                               "list (default: the names the model carries)"),
    top_k: int = typer.Option(3, "--top-k", help="how many top predicted classes when --classes is not given"),
    lam: Optional[str] = typer.Option(None, "--lam", metavar="FLOAT", help="λ of the patched logits shown (default: "
                                      "0.02 for ResNets, 0.2 otherwise)"),
    temperature: str = typer.Option("1", "--temperature", "-T", metavar="FLOAT|inf", help="T of the attention map "
                                    "and of the logits shown (default 1, not patch's inf: at inf the map is a "
                                    "one-hot argmax)"),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    img_size: ImgSize = None, input_size: InputSize = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, mean: Mean = None, std: Std = None,
    arch: Arch = None, weights: Weights = None, num_classes: NumClasses = None, pretrained: Pretrained = True,
    trust: Trust = False, ema: Ema = False, force: Force = False,
) -> None:
    """Per-location class scores and attention maps over images (PNG grids + .npy)."""
    from ..data import model_label_names
    from ..explain import explain_to_dir
    from ..patcher import patch as do_patch

    try:
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise PatchCSRAError(f"image file(s) not found: {', '.join(missing[:5])}")
        t_v = parse_float(temperature, "--temperature")
        lam_v = None if lam is None else parse_float(lam, "--lam")
        with status(f"loading {source}"):
            model = model_source(source, arch, weights, num_classes, pretrained, trust, ema).load()
        tf = transform_overrides(img_size, input_size, crop_pct, interpolation, mean, std)
        tf.apply_to(model)
        spec = tf.resolve(model)
        patched = do_patch(model, lam=lam_v, temperature=t_v, input_size=spec.input_size)
        wanted = None
        if classes:
            wanted = [int(c) if c.strip().isdigit() else c.strip() for c in classes.split(",") if c.strip()]
        with status("explaining"):
            paths = explain_to_dir(patched, [str(p) for p in images], out_dir, transform_spec=spec, classes=wanted,
                                   top_k=top_k, temperature=t_v, force=force,
                                   class_names=class_names if class_names is not None else model_label_names(model),
                                   max_pixels=max_pixels)
    except (PatchCSRAError, OSError) as e:
        fail(e)
    pngs = [p for p in paths if p.suffix == ".png"]
    done(f"[green]wrote[/] {len(pngs)} picture(s) and their maps to {out_dir}/")

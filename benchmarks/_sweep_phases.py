"""Where a ``patchcsra sweep-lambda`` process spends its time: run by ``sweep_cost.py --mode cached`` in a fresh
interpreter, it times the imports, then runs the real CLI with timers around the named steps and prints one JSON
line ``{"phases": {step: seconds exclusive of the steps inside it}, "total": s}`` on stdout (the CLI's own output
goes to stderr). Not a test: what it prints is a measurement."""
from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()
PHASES: dict[str, float] = {}
_stack: list[list] = []


def _wrap(owner, attr: str, phase: str) -> None:
    fn = getattr(owner, attr)  # a missing step fails loudly: the breakdown must follow the code

    def timed(*a, **k):
        frame = [phase, time.perf_counter(), 0.0]  # name, start, time of nested steps
        _stack.append(frame)
        try:
            return fn(*a, **k)
        finally:
            _stack.pop()
            spent = time.perf_counter() - frame[1]
            PHASES[phase] = PHASES.get(phase, 0.0) + spent - frame[2]
            if _stack:
                _stack[-1][2] += spent

    setattr(owner, attr, timed)


def main(argv: list[str]) -> int:
    t = time.perf_counter()
    import torch  # noqa: F401

    PHASES["import torch"] = time.perf_counter() - t
    t = time.perf_counter()
    import patchcsra.api as api
    import patchcsra.cli as cli
    import patchcsra.data as data
    import patchcsra.grid as grid
    import patchcsra.report as report
    import patchcsra.stats as stats
    from patchcsra.data.base import ImageDataset

    PHASES["import patchcsra (typer, numpy, pandas...)"] = time.perf_counter() - t
    _wrap(api, "_load", "model build + weights")
    _wrap(api, "patch", "head discovery + check (patch)")
    _wrap(data, "open_dataset", "dataset scan")
    _wrap(ImageDataset, "fingerprint", "dataset fingerprint (sampled bytes)")
    _wrap(stats, "model_fingerprint", "model fingerprint")
    _wrap(api, "collect", "stats cache read (collect)")
    _wrap(grid, "_evaluate", "grid metrics (every point)")
    _wrap(grid, "_cross_validate", "cross-validated λ")
    _wrap(grid, "_choices", "bootstrap CIs of the choices")
    _wrap(grid, "_comparators", "comparator rows (+ bootstrap)")
    _wrap(grid, "_band", "bootstrap band of the curve")
    _wrap(grid, "_per_class", "per-class AP")
    _wrap(api, "sweep", "sweep (rest)")
    _wrap(report, "plot_curve", "plot (curve.png)")
    _wrap(report, "to_latex", "table.tex")
    _wrap(api.SweepRun, "write", "writes (csv, json, md)")
    _wrap(api, "sweep_lambda", "CLI + API glue")
    sys.argv = ["patchcsra", "sweep-lambda", *argv]
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        cli.app()
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    finally:
        sys.stdout = stdout
    total = time.perf_counter() - T0
    PHASES["other (CLI parsing, interpreter)"] = total - sum(PHASES.values())
    print(json.dumps({"phases": PHASES, "total": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

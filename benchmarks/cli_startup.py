"""Start-up cost of the ``patchcsra`` command line: wall time and peak RSS of ``--help``, ``--version`` and
``sweep-lambda -h``, each the median of ``--reps`` fresh processes (default 5).

Each command runs as a child process; its peak resident set comes from ``os.wait4`` (the rusage of that
one child, ``ru_maxrss``, KiB on Linux), its time from a monotonic clock around spawn-to-exit. Heavy
libraries (torch, torchvision, timm, pandas, matplotlib) must stay inside the verbs: the script also
reports whether importing ``patchcsra.cli`` pulls any of them in, and exits 1 if it does or if a
median exceeds ``--max-seconds`` (default 1.0) or ``--max-mib`` (default 100).

    python benchmarks/cli_startup.py [--reps 5] [--exe .venv/bin/patchcsra]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "timm", "pandas", "matplotlib", "transformers", "numpy")
COMMANDS = (("--help",), ("--version",), ("sweep-lambda", "-h"))


def _exe(given: str | None) -> list[str]:
    if given:
        return [given]
    beside = Path(sys.executable).with_name("patchcsra")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("patchcsra")
    return [found] if found else [sys.executable, "-m", "patchcsra"]


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one run of ``cmd`` (stdout and stderr discarded)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}")
    return dt, usage.ru_maxrss / 1024  # KiB -> MiB (Linux)


def heavy_imports() -> list[str]:
    code = ("import sys, patchcsra.cli; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return res.stdout.split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--exe", default=None, help="the patchcsra executable (default: beside this Python)")
    ap.add_argument("--max-seconds", type=float, default=1.0)
    ap.add_argument("--max-mib", type=float, default=100.0)
    args = ap.parse_args()
    exe = _exe(args.exe)
    print(f"{' '.join(exe)}: median of {args.reps} fresh processes (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'command':<34} {'wall s':>8} {'min s':>8} {'peak RSS MiB':>13}")
    bad = []
    measure(exe + ["--version"])  # warm the file cache once
    for argv in COMMANDS:
        runs = [measure(exe + list(argv)) for _ in range(args.reps)]
        secs, mib = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        label = "patchcsra " + " ".join(argv)
        print(f"{label:<34} {secs:>8.3f} {min(r[0] for r in runs):>8.3f} {mib:>13.1f}")
        if secs > args.max_seconds or mib > args.max_mib:
            bad.append(f"{label}: {secs:.2f} s, {mib:.0f} MiB (limits {args.max_seconds} s, {args.max_mib} MiB)")
    heavy = heavy_imports()
    print(f"heavy modules imported by 'import patchcsra.cli': {', '.join(heavy) or 'none'}")
    if heavy:
        bad.append(f"import patchcsra.cli imports {', '.join(heavy)}")
    for b in bad:
        print(f"FAIL: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

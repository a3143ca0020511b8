"""Draw a run's curve in a second process, so that importing matplotlib and rendering overlap the main work.

A cached re-sweep spends about 0.8 s of its ~5 s in :func:`patchcsra.figures.plot_curve` (0.5 s importing
matplotlib, 0.3 s drawing); torch's import alone takes 1.8 s. :class:`PlotWorker` starts a child interpreter
that imports matplotlib and pandas (not torch) while the parent imports torch and sweeps, then draws the figure
when :meth:`PlotWorker.submit` hands it the frame, while the parent writes the other files.

The figure is the one :func:`~patchcsra.figures.plot_curve` draws in this process -- same code, same
matplotlib, same rc settings (the child inherits the environment). Whatever goes wrong in the child (it died,
could not start, raised) the parent draws the figure itself: the worker only ever saves time. It is worth it
only with a second core (:func:`worth_it`).

Protocol: the parent writes one pickle ``(frame, summary, path, formats)`` to the child's stdin; the child
answers one line, ``ok`` or the error, on stdout and exits. A closed stdin (the parent is gone) ends it.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

__all__ = ["PlotWorker", "worth_it"]

_logger = logging.getLogger(__name__)


def worth_it() -> bool:
    """A second process pays off with at least two usable cores."""
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) >= 2


class PlotWorker:
    """``with PlotWorker() as w: wait = w.submit(frame, summary, path, formats); ...; wait()``.

    Start it early (it needs ~1 s to import matplotlib); one figure per worker.
    """

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "patchcsra.plot_worker"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError as e:  # no process to spare: the parent draws
            _logger.debug("plot worker did not start (%s); drawing in this process", e)

    def submit(self, frame: Any, summary: dict, path: Union[str, Path],
               formats: Sequence[str] = ("png",)) -> Callable[[], None]:
        """Hand over one figure (:func:`~patchcsra.figures.plot_curve`'s arguments); returns ``wait()``, which
        returns once ``path`` (and its other formats) are written -- by the child, or else by this process."""
        from ._io import json_default
        from .figures import plot_curve

        # the summary as summary.json holds it: its records may name torch's or a user module's types, which the
        # child would have to import (torch) or could not import at all (an --arch file)
        plain = json.loads(json.dumps(summary, default=json_default))
        args = (frame, plain, str(path), tuple(formats))
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.write(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
                proc.stdin.close()
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
                _logger.debug("plot worker refused the figure (%s); drawing in this process", e)
                _stop(proc)
                proc = None

        def wait() -> None:
            if proc is not None:
                try:
                    answer = proc.stdout.read().decode("utf-8", "replace").strip()
                    proc.wait()
                except OSError as e:
                    answer = str(e)
                if answer == "ok" and proc.returncode == 0:
                    return
                _logger.debug("plot worker failed (%s, status %s); drawing in this process", answer,
                              proc.returncode)
            plot_curve(*args)

        return wait

    def close(self) -> None:
        """Stop a child that was never handed a figure."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)

    def __enter__(self) -> "PlotWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stop(proc: subprocess.Popen) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _serve() -> int:
    """The child: import what drawing needs, read one figure from stdin, draw it, answer on stdout."""
    try:
        if hasattr(os, "nice"):
            os.nice(10)  # yield the cores to the parent, whose torch threads stall behind a busy core
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        from .figures import plot_curve

        _warm_up(Figure)
        data = sys.stdin.buffer.read()
        if not data:  # the parent closed without a figure
            return 0
        frame, summary, path, formats = pickle.loads(data)
        plot_curve(frame, summary, path, formats)
    except BaseException as e:  # noqa: BLE001 -- any failure is the parent's cue to draw it itself
        sys.stdout.write(f"{type(e).__name__}: {e}\n")
        return 1
    sys.stdout.write("ok\n")
    return 0


def _warm_up(Figure: Any) -> None:
    """Draw a throw-away figure with text: the font cache and the renderer load before the parent asks."""
    import io

    fig = Figure(figsize=(2, 2), dpi=50)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], marker="o", label="T=∞")
    ax.fill_between([0, 1], [0, 0], [1, 1], alpha=0.2)
    ax.annotate("λ", (0.5, 0.5), xytext=(0.7, 0.4), arrowprops=dict(arrowstyle="-"))
    ax.set_title("warm-up")
    ax.legend()
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")


if __name__ == "__main__":
    sys.exit(_serve())

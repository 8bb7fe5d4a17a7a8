"""Output of a benchmark run: rich tables on the terminal, one JSON with every figure, PNG plots.

Every file is written to a temporary name in its folder and then renamed, so an
interrupted run leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pararnn_bench import machine


class Report:
    """Figures of one subcommand's run: ``record`` rows, ``table`` them, ``save`` JSON and plots."""

    def __init__(self, command: str, out_dir: str | os.PathLike, settings: dict, console: Console | None = None):
        self.command = command
        self.out_dir = Path(out_dir)
        self.console = console or Console(width=None if sys.stdout.isatty() else 160)
        self.payload = {"command": command, "settings": settings, "machine": machine.describe(), "results": {},
                        "files": []}
        self.console.print(f"[bold]pararnn-bench {command}[/bold] on {machine.one_line(self.payload['machine'])}")

    def record(self, section: str, value):
        self.payload["results"][section] = value

    def note(self, text: str):
        self.payload.setdefault("notes", []).append(text)
        self.console.print(f"[dim]{text}[/dim]")

    def table(self, title: str, columns: list[str], rows: list[list]):
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(columns):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(_cell_text(v) for v in row))
        self.console.print(table)

    def plot(self, name: str, figure):
        """Save a matplotlib figure as ``<out>/<name>.png``."""
        import matplotlib.pyplot as plt

        path = self.out_dir / f"{name}.png"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, suffix=".png.tmp")
        os.close(fd)
        try:
            figure.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, path)
        finally:
            plt.close(figure)
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.payload["files"].append(str(path))

    def save(self) -> Path:
        path = self.out_dir / f"{self.command}.json"
        self.payload["files"].append(str(path))
        write_json(path, self.payload)
        self.console.print(f"wrote {', '.join(self.payload['files'])}")
        return path


def _cell_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def _jsonable(obj):
    if is_dataclass(obj):
        return asdict(obj)
    return str(obj)


def write_json(path: str | os.PathLike, payload: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=_jsonable)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def new_figure(rows: int, cols: int, title: str, width: float = 5.0, height: float = 3.6):
    """A grid of axes (matplotlib without a display); returns (figure, axes[row][col])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    fig.suptitle(title, fontsize=9)
    return fig, axes

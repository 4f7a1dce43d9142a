"""The report as files: port.png (per-layer differences) and port.json, all or none."""

from __future__ import annotations

import io

import numpy as np

from shared.port.report import PortReport

__all__ = ["PORT_FILES", "render_figure", "write_port_report"]


def render_figure(report: PortReport, dpi: int = 100) -> bytes:
    """PNG: per-layer max abs difference (log scale), both modes, tolerance line, first marked."""
    from matplotlib.figure import Figure

    n = len(report.pairs)
    fig = Figure(figsize=(max(6.0, min(16.0, 0.25 * n + 4)), 4.5), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    floor = np.finfo(np.float32).tiny
    for rows, style, label in ((report.inference, "-o", "inference mode"),
                               (report.training, "--x", "training mode")):
        ax.plot(range(n), [max(r.max_abs, floor) for r in rows], style, markersize=4,
                label=label)
    ax.axhline(report.tolerance["atol"], color="grey", linestyle=":",
               label=f"{report.tolerance['name']} atol {report.tolerance['atol']:g}")
    names = [k for k, _, _ in report.pairs]
    marks: dict[int, list[str]] = {}
    for mode in ("inference", "training"):
        first = report.first_divergent(mode)
        if first:
            marks.setdefault(names.index(first.keras_layer), []).append(mode)
    for i, modes in marks.items():
        ax.axvline(i, color="red", alpha=0.5)
        ax.annotate(f"first divergent ({' and '.join(modes)}): {names[i]}", (i, 0.97),
                    xycoords=("data", "axes fraction"), fontsize=8, color="red",
                    rotation=90, ha="right", va="top")
    if 0 < n <= 40:
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("paired layer (call order)")
    ax.set_ylabel("max |keras - torch|")
    n_findings = len(report.findings)
    ax.set_title(f"port check {report.keras_model} vs {report.torch_model}: {n} pairs, "
                 f"{n_findings} finding{'s' if n_findings != 1 else ''}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


PORT_FILES = ("port.json", "port.png")


def write_port_report(report: PortReport, out) -> dict[str, object]:
    """Write port.json and port.png into ``out``, all or none (temporary files, then renames)."""
    import json
    from contextlib import ExitStack
    from pathlib import Path

    from shared.io import atomic_path, ensure_writable_dir

    out = ensure_writable_dir(out)
    contents = {"port.json": (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
                "port.png": render_figure(report)}
    paths = {name: Path(out) / name for name in PORT_FILES}
    with ExitStack() as stack:
        for name in PORT_FILES:
            tmp = stack.enter_context(atomic_path(paths[name]))
            tmp.write_bytes(contents[name])
    return paths

"""The compare report: one table, three renderings (terminal, Markdown, JSON) and a figure.

:func:`build_report` turns the two RunRecords of each strategy into a
:class:`Report`: one row per strategy with the numbers the table shows (full
precision; each column names its display format), a verdict against the
strategy's declared expectations and cross-framework parity, and the per-step
losses. Every rendering formats the same row values with the same column
formats, so ``report.json`` holds exactly what the table shows.
:func:`write_reports` writes ``report.md``, ``report.json`` and
``figure.png`` all-or-nothing. Framework-free: matplotlib (Agg, no pyplot)
and rich only.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import UsageError
from shared.io import ensure_writable_dir
from shared.record import RunRecord
from shared.strategies import get_strategy

if TYPE_CHECKING:
    from shared.matrix import StrategyResult

__all__ = [
    "COLUMNS",
    "DROPOUT_COLUMNS",
    "REPORT_FILES",
    "REPORT_VERSION",
    "Column",
    "Report",
    "build_report",
    "check_report_dir",
    "columns_for",
    "figure_size",
    "format_cell",
    "render_figure",
    "render_json",
    "render_markdown",
    "render_table",
    "verdict",
    "write_reports",
]

REPORT_VERSION = 1
REPORT_FILES = ("report.md", "report.json", "figure.png")
FRAMEWORK_ORDER = ("tf", "torch")


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    # format spec for numbers (format(value, fmt)); None: the value is text
    fmt: str | None = None
    description: str = ""


COLUMNS: tuple[Column, ...] = (
    Column("strategy", "strategy", None, "freezing strategy (shared/strategies.py)"),
    *(c for fw in FRAMEWORK_ORDER for c in (
        Column(f"{fw}_train", f"{fw} train", ".4f",
               f"{fw}: training-mode loss of the last step (the loss its gradients came from)"),
        Column(f"{fw}_eval", f"{fw} eval", ".4f",
               f"{fw}: inference-mode loss of the last step's batch at the same weights"),
        Column(f"{fw}_gap", f"{fw} gap", ".3g",
               f"{fw}: largest |train - eval| over all steps (0 when BatchNorm is in inference mode)"),
        Column(f"{fw}_acc", f"{fw} acc", ".3f",
               f"{fw}: held-out target accuracy after the last step (inference mode)"),
    )),
    Column("step_max", "one step", ".3g",
           "lockstep: largest |tf - torch| of the losses when both take the same step from "
           "the same state (shared/lockstep.py); every tensor's change is compared too"),
    Column("free_max", "free run", ".3g",
           "largest |tf - torch| of per-step train/eval and held-out losses when each "
           "framework runs on its own"),
    Column("envelope", "envelope", ".3g",
           "rounding envelope: largest spread of torch reruns whose float32 rounding differs "
           "from the run's (start one ulp off, batches reordered); the free run passes within "
           "ENVELOPE_MULTIPLE times it (shared/envelope.py)"),
    Column("tf_vs_f64", "tf vs f64", ".3g",
           "largest |tf float32 - float64| of the same losses (the float64 run from the same start)"),
    Column("torch_vs_f64", "torch vs f64", ".3g",
           "largest |torch float32 - float64| of the same losses"),
    Column("verdict", "verdict", None, "freezing semantics (declared expectations, lockstep), "
           "free run against the envelope; numerics: one framework's float32 departing"),
)

# vit (an arch with dropout in its base): the columns above are of the verdict runs, with
# dropout, attention dropout and drop-path at 0 (RunConfig.base_dropout); these two are of
# each framework's run with them on, what users run and where the trap shows.
DROPOUT_COLUMNS: tuple[Column, ...] = tuple(
    Column(f"{fw}_dropout_gap", f"{fw} gap, dropout on", ".3g",
           f"{fw}: largest |train - eval| over all steps of the run with the base's dropout "
           f"and drop-path on (the other columns: the runs with them at 0)")
    for fw in FRAMEWORK_ORDER)


def columns_for(dropout: bool) -> tuple[Column, ...]:
    """The table's columns: :data:`COLUMNS`, with :data:`DROPOUT_COLUMNS` before the verdict
    columns when the runs have a dropout-on pair (vit)."""
    if not dropout:
        return COLUMNS
    at = [c.key for c in COLUMNS].index("step_max")
    return COLUMNS[:at] + DROPOUT_COLUMNS + COLUMNS[at:]


def format_cell(value, column: Column) -> str:
    if column.fmt is None:
        return str(value)
    if value is None:  # nothing to show (e.g. naive, whose frameworks differ by design)
        return "-"
    return format(float(value), column.fmt)


def verdict(result: StrategyResult) -> str:
    """Short verdict of one strategy: "ok", "ok: differs as expected", "ok; numerics: tf",
    or "FAIL: what"."""
    problems = []
    if result.lockstep.failures:
        problems.append("lockstep" if result.expected_to_match else "lockstep agrees, expected to differ")
    if result.free.failures:
        problems.append("free run" if result.expected_to_match else "free run agrees, expected to differ")
    problems += [f"{fw} expectations" for fw in FRAMEWORK_ORDER if result.expectations.get(fw)]
    if problems:
        return "FAIL: " + ", ".join(problems)
    text = "ok" if result.expected_to_match else "ok: differs as expected"
    departing = sorted({e.departs for e in result.lockstep.numerics_events if e.departs != "both"}
                       | ({result.free.departs} if result.free.finding else set()))
    return text + (f"; numerics: {', '.join(departing)}" if departing else "")


def _run_data(record: RunRecord) -> dict:
    return {
        "train_loss": record.train_losses,
        "eval_loss": record.eval_losses,
        "heldout": [{"step": h.step, "loss": h.loss, "accuracy": h.accuracy} for h in record.heldout],
        "frozen_unchanged": record.frozen_unchanged,
        "frozen_changes": dict(record.frozen_changes),
        "bn_stats_changed": record.bn_stats_changed,
        "bn_stats_max_change": record.bn_stats_max_change,
    }


@dataclass
class Report:
    settings: dict
    rows: list[dict]
    # every failure sentence (lockstep, free run, expectations), in strategy order
    failures: list[str]
    # strategy -> {"tf": run data, "torch": run data, "lockstep": ..., "free_run": ...,
    #              "envelope": ..., "float64": run data or None}
    runs: dict[str, dict] = field(default_factory=dict)
    # numerics findings: one framework's float32 departing from float64 (never failures)
    findings: list[str] = field(default_factory=list)
    # compare --replicas: shared.distributed.replica_section (rows, notes, failures)
    replicas: dict | None = None
    # the table's columns (columns_for: COLUMNS, and vit's dropout-on gaps)
    columns: tuple[Column, ...] = COLUMNS

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def strategies(self) -> list[str]:
        return [row["strategy"] for row in self.rows]

    def cells(self) -> list[list[str]]:
        """The table as displayed: one list of strings per row, in ``columns`` order."""
        return [[format_cell(row[c.key], c) for c in self.columns] for row in self.rows]

    def to_dict(self) -> dict:
        return {
            "version": REPORT_VERSION,
            "settings": dict(self.settings),
            "ok": self.ok,
            "failures": list(self.failures),
            "findings": list(self.findings),
            "table": {
                "columns": [{"key": c.key, "title": c.title, "format": c.fmt,
                             "description": c.description} for c in self.columns],
                "rows": [dict(row) for row in self.rows],
            },
            "runs": self.runs,
            **({"replicas": self.replicas} if self.replicas is not None else {}),
        }


def build_report(results: list[StrategyResult], settings: dict) -> Report:
    """A Report from one :class:`~shared.matrix.StrategyResult` per strategy, in order."""
    rows, failures, findings, runs = [], [], [], {}
    for result in results:
        get_strategy(result.strategy)
        tf_record, torch_record = result.tf, result.torch
        if (tf_record.framework, torch_record.framework) != FRAMEWORK_ORDER:
            raise ValueError(f"build_report: expected (tf, torch) records, got "
                             f"({tf_record.framework}, {torch_record.framework})")
        row = {"strategy": result.strategy}
        for record in (tf_record, torch_record):
            last = record.steps[-1]
            row[f"{record.framework}_train"] = last.train_loss
            row[f"{record.framework}_eval"] = last.eval_loss
            row[f"{record.framework}_gap"] = record.max_train_eval_gap
            row[f"{record.framework}_acc"] = record.heldout[-1].accuracy
        free = result.free
        row["step_max"] = result.lockstep.max_loss_diff
        row["free_max"] = free.max_diff
        row["envelope"] = free.envelope if result.envelope is not None else None
        row["tf_vs_f64"] = free.tf_departure
        row["torch_vs_f64"] = free.torch_departure
        for fw, record in result.dropout.items():
            row[f"{fw}_dropout_gap"] = record.max_train_eval_gap
        row["verdict"] = verdict(result)
        rows.append(row)
        failures += result.failures
        findings += result.findings
        runs[result.strategy] = {
            "tf": _run_data(tf_record), "torch": _run_data(torch_record),
            "lockstep": result.lockstep.to_dict(), "free_run": free.to_dict(),
            "envelope": result.envelope.to_dict() if result.envelope is not None else None,
            "float64": _run_data(result.exact) if result.exact is not None else None,
            **({"dropout_on": {fw: _run_data(r) for fw, r in result.dropout.items()}}
               if result.dropout else {}),
        }
    dropout = any(result.dropout for result in results)
    if dropout and not all(set(result.dropout) == set(FRAMEWORK_ORDER) for result in results):
        raise ValueError("build_report: every strategy needs both frameworks' dropout-on runs "
                         "or none")
    return Report(settings=dict(settings), rows=rows, failures=failures, runs=runs,
                  findings=findings, columns=columns_for(dropout))


# --------------------------------------------------------------------------- #
# renderings
# --------------------------------------------------------------------------- #
def render_table(report: Report):
    """A rich Table (print it with a Console wide enough: see :func:`table_width`)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(_title(report)), box=box.SQUARE, title_justify="left")
    for column in report.columns:
        table.add_column(column.title, justify="left" if column.fmt is None else "right",
                         no_wrap=True)
    for row, cells in zip(report.rows, report.cells()):
        style = None if row["verdict"].startswith("ok") else "bold red"
        table.add_row(*map(escape, cells), style=style)  # cells are text, not rich markup
    return table


def table_width(table, console) -> int:
    """Columns the table needs so that no cell wraps."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(10_000), table).maximum


def _title(report: Report) -> str:
    s = report.settings
    return (f"freeze-parity compare: {s.get('arch')}, {s.get('optimizer')} (lr {s.get('learning_rate')}),"
            f" {s.get('steps')} steps of {s.get('batch_size')}")


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, allow_nan=True) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(report: Report, figure: str | None = "figure.png") -> str:
    lines = [f"# {_title(report)}", ""]
    if report.ok:
        lines.append("**Result: every declared expectation holds, lockstep agrees step by step and "
                     "every free run stays within its rounding envelope.**")
    else:
        lines.append(f"**Result: {len(report.failures)} failure(s).**")
    lines += ["", "| " + " | ".join(_md_escape(c.title) for c in report.columns) + " |",
              "|" + "|".join("---" if c.fmt is None else "---:" for c in report.columns) + "|"]
    lines += ["| " + " | ".join(_md_escape(cell) for cell in cells) + " |" for cells in report.cells()]
    lines += ["", "Columns:", ""]
    lines += [f"- **{_md_escape(c.title)}**: {c.description}" for c in report.columns]
    if report.replicas is not None:
        from shared.distributed import replica_markdown

        lines += ["", *replica_markdown(report.replicas)]
    if report.failures:
        lines += ["", "## Failures", ""] + [f"- {_md_escape(f)}" for f in report.failures]
    if report.findings:
        lines += ["", "## Numerics findings (not failures)", ""]
        lines += [f"- {_md_escape(f)}" for f in report.findings]
    lines += ["", "## Strategies", ""]
    for name in report.strategies:
        runs = report.runs[name]
        held = {fw: runs[fw]["heldout"][-1] for fw in FRAMEWORK_ORDER}
        lines.append(f"- **{name}**: {get_strategy(name).summary}. Held-out target loss after "
                     f"training: tf {held['tf']['loss']:.4f} (accuracy {held['tf']['accuracy']:.3f}), "
                     f"torch {held['torch']['loss']:.4f} (accuracy {held['torch']['accuracy']:.3f}).")
    if figure:
        lines += ["", "## Losses per step", "",
                  ("Training-mode (solid) and inference-mode (dashed) loss of each step's batch at "
                   "the pre-update weights, both frameworks overlaid; markers: held-out target loss."),
                  "", f"![loss curves per strategy]({figure})"]
    s = report.settings
    lines += ["", "## Settings", ""] + [f"- {k}: `{v}`" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def figure_size(panels: int, dpi: int = 100) -> tuple[int, int, int, int]:
    """``(rows, cols, width_px, height_px)`` of the figure for ``panels`` panels."""
    if panels < 1:
        raise ValueError(f"figure: need at least one panel, got {panels}")
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    return rows, cols, 5 * cols * dpi, (4 * rows + 1) * dpi


_COLOURS = {"tf": "tab:orange", "torch": "tab:blue"}
_WIDTHS = {"tf": 3.0, "torch": 1.2}  # tf drawn wide underneath, torch thin on top: overlaps show


def render_figure(report: Report, dpi: int = 100) -> bytes:
    """PNG bytes: one panel per strategy; metadata "panels", "grid", "size", "strategies"."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(report.rows)
    rows, cols, width, height = figure_size(n, dpi)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, row in zip(axes.flat, report.rows):
        runs = report.runs[row["strategy"]]
        envelope = runs.get("envelope")
        if envelope is not None:
            _envelope_inset(ax, runs, envelope)
        for fw in FRAMEWORK_ORDER:
            run = runs[fw]
            steps = range(len(run["train_loss"]))  # step i: measured after i updates
            style = {"color": _COLOURS[fw], "linewidth": _WIDTHS[fw]}
            ax.plot(steps, run["train_loss"], linestyle="-", **style)
            ax.plot(steps, run["eval_loss"], linestyle="--", **style)
            ax.plot([h["step"] for h in run["heldout"]], [h["loss"] for h in run["heldout"]],
                    linestyle="none", marker="o" if fw == "tf" else "x", color=_COLOURS[fw],
                    markersize=7 if fw == "tf" else 6)
        ax.set_title(f"{row['strategy']}: {row['verdict']}", fontsize=10,
                     color="black" if row["verdict"].startswith("ok") else "red")
        ax.set_xlabel("updates applied")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=_COLOURS[fw], linewidth=_WIDTHS[fw], linestyle=ls, marker=m,
                      label=f"{fw} {what}")
               for fw in FRAMEWORK_ORDER
               for ls, m, what in (("-", None, "train mode"), ("--", None, "eval mode"),
                                   ("none", "o" if fw == "tf" else "x", "held-out"))]
    handles.append(Patch(color="tab:green", alpha=0.25,
                         label="inset: |tf - torch| (train mode) within the envelope x multiple"))
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=9)
    fig.suptitle(_title(report), fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={
        "Title": _title(report),
        "panels": str(n),
        "grid": f"{rows}x{cols}",
        "size": f"{width}x{height}",
        "strategies": ",".join(report.strategies),
    })
    return buffer.getvalue()


def _envelope_inset(ax, runs: dict, envelope: dict) -> None:
    """Top right of a panel, log scale: the free runs' per-step |tf - torch| training-mode
    loss over the band the verdict allows (the envelope's running maximum x its multiple)."""
    import numpy as np

    multiple = runs["free_run"]["multiple"]
    band = multiple * np.maximum.accumulate(np.asarray(envelope["spread"]["train_loss"]))
    diff = np.abs(np.asarray(runs["tf"]["train_loss"]) - np.asarray(runs["torch"]["train_loss"]))
    floor = np.finfo(np.float32).eps  # a log axis needs a positive floor
    inset = ax.inset_axes([0.52, 0.56, 0.45, 0.40])
    steps = range(len(diff))
    inset.fill_between(steps, floor, np.maximum(band, floor), color="tab:green", alpha=0.25,
                       linewidth=0)
    inset.plot(steps, np.maximum(diff, floor), color="black", linewidth=0.8)
    inset.set_yscale("log")
    inset.tick_params(labelsize=6)
    inset.set_title("|tf - torch| vs envelope", fontsize=7)


def write_reports(report: Report, out: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and figure.png as the directory ``out``, all or none.

    Everything is rendered first and written into a new directory beside
    ``out``; only when all three files are complete is that directory swapped
    in (the previous ``out`` is renamed aside, the new one renamed into place,
    then the old one removed; if the second rename fails the old one is put
    back). A reader never sees a mix of old and new files, and a failure
    leaves the previous reports, if any, untouched and nothing temporary.
    ``out`` belongs to the reports: a directory holding other files is refused.
    """
    out = check_report_dir(out)
    contents = {"report.md": render_markdown(report).encode(),
                "report.json": render_json(report).encode(),
                "figure.png": render_figure(report)}
    parent = ensure_writable_dir(out.parent if str(out.parent) else Path("."), "directory")
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=parent))
    try:
        for name in REPORT_FILES:
            with open(new / name, "wb") as fh:
                fh.write(contents[name])
                fh.flush()
                os.fsync(fh.fileno())
            (new / name).chmod(_file_mode())  # what open(path, "w") would give
        new.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; reports are an ordinary directory
        _swap_in(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return {name: out / name for name in REPORT_FILES}


def check_report_dir(out: str | Path) -> Path:
    """``out`` as a Path if :func:`write_reports` may replace it; UsageError (one line) if not."""
    out = Path(out)
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if others:
            raise UsageError(f"report directory {out}: holds {others[0]!r} besides the reports "
                             f"({len(others)} other entr{'y' if len(others) == 1 else 'ies'}); "
                             "give reports a directory of their own")
    elif out.exists() or out.is_symlink():
        raise UsageError(f"report directory {out}: exists and is not a directory")
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Rename directory ``new`` to ``out``, replacing an existing ``out`` (restored on failure)."""
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)  # only the unique name is needed
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """What ``open(path, "w")`` would give: 0o666 less the process umask."""
    return 0o666 & ~_umask()

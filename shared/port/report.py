"""The port check's report: pairs, findings, per-layer rows, steps; as a dict, lines and a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from shared.port.divergence import LayerDiff, first_out
from shared.port.findings import Finding

__all__ = ["REPORT_VERSION", "PortReport"]

REPORT_VERSION = 1


@dataclass
class PortReport:
    keras_model: str
    torch_model: str
    input_shape: tuple  # canonical (C, H, W)
    pairs: list[tuple[str, str, str]]  # (keras name, torch name, kind)
    findings: list[Finding]
    inference: list[LayerDiff]
    training: list[LayerDiff]
    tolerance: dict  # {"name": ..., "atol": ..., "rtol": ...}
    steps: list[dict] = field(default_factory=list)  # per step: keras/torch train/eval loss
    moved: list[dict] = field(default_factory=list)  # per paired tensor: moved on each side
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # framework differences no port can remove (listed with a code, not failing the check)
    expected: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def first_divergent(self, mode: str = "inference") -> LayerDiff | None:
        return first_out(self.inference if mode == "inference" else self.training)

    def to_dict(self) -> dict:
        return {"version": REPORT_VERSION, "ok": self.ok,
                "keras_model": self.keras_model, "torch_model": self.torch_model,
                "input_shape": list(self.input_shape), "tolerance": self.tolerance,
                "settings": self.settings,
                "first_divergent": {m: (asdict(r) if r else None) for m, r in
                                    (("inference", self.first_divergent("inference")),
                                     ("training", self.first_divergent("training")))},
                "findings": [asdict(f) for f in self.findings],
                "expected": [asdict(f) for f in self.expected],
                "pairs": [{"keras": k, "torch": t, "kind": kind} for k, t, kind in self.pairs],
                "inference": [asdict(r) for r in self.inference],
                "training": [asdict(r) for r in self.training],
                "steps": self.steps, "moved": self.moved, "notes": list(self.notes)}

    def finding_lines(self) -> list[str]:
        """Two lines per finding (what and where, then the fix); expected differences last."""
        lines = []
        for f in self.findings:
            lines.append(f.line())
            lines.append(f"  fix: {f.fix}")
        for f in self.expected:
            lines.append(f"expected: {f.line()}")
        return lines

    def summary(self) -> str:
        first = self.first_divergent("inference") or self.first_divergent("training")
        where = (f"first divergent layer {first.keras_layer} <-> {first.torch_layer} "
                 f"({'output shapes differ' if first.shapes else f'max abs {first.max_abs:.3g}'})"
                 if first else "no divergent layer")
        n = len(self.findings)
        return (f"port check: {len(self.pairs)} pairs, {n} finding{'s' if n != 1 else ''}, "
                f"{where}")

    def render(self):
        """Per-layer table (rich): both modes' max abs / rel differences, flagged rows red."""
        from rich.markup import escape
        from rich.table import Table

        flagged = {f.keras_layer for f in self.findings}
        firsts = {r.keras_layer for r in (self.first_divergent("inference"),
                                          self.first_divergent("training")) if r}
        table = Table(title=escape(f"{self.summary()}; tolerance {self.tolerance['name']} "
                                   f"(atol {self.tolerance['atol']:g}, "
                                   f"rtol {self.tolerance['rtol']:g})"))
        for column in ("#", "keras layer", "torch module", "kind", "inference max abs",
                       "rel", "training max abs", "rel", ""):
            table.add_column(column)
        for i, ((k, t, kind), inf, tr) in enumerate(zip(self.pairs, self.inference,
                                                        self.training)):
            mark = ("<- first divergent" if k in firsts else
                    "finding" if k in flagged else "")
            style = "red" if (k in firsts or k in flagged) else None
            cells = (str(i), k, t, kind, *_cells(inf), *_cells(tr), mark)
            table.add_row(*map(escape, cells), style=style)
        return table


def _cells(row: LayerDiff) -> tuple[str, str]:
    """A row's max abs and relative difference, as the table shows them."""
    if row.shapes is not None:
        return "shapes differ", "-"
    return f"{row.max_abs:.2e}", f"{row.max_rel:.2e}"

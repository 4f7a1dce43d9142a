"""Every number in the README's demo tables comes from a run this test repeats.

The README shows what ``make demo`` (``freeze-parity compare``) and
``freeze-parity explain`` print, on the shipped checkpoint. This test re-runs
the same configurations (the session's ``run_record`` runs are exactly the
demo's: default RunConfig, shipped checkpoint), renders them with the same
code, and compares each printed cell of the README with the re-run's, within
the row's named cross-CPU tolerance (``shared/tolerances.py``
``README_*``). A number that drifts fails and names its table cell.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from shared import tolerances
from shared.compare import step_tolerance
from shared.record import RunConfig
from shared.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The goals issue 12 sets for the demo, read from the same run.
DEMO_MIN_BEST_ACCURACY = 0.85  # the best strategy's held-out target accuracy
DEMO_MIN_ACCURACY_OVER_CHANCE = 3.0  # "clearly above chance": every strategy but naive
DEMO_MIN_TRAP_GAP = 1.0  # train/eval gap of the batch-statistics strategies
CHANCE = 1 / 10  # ten balanced target classes
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _text_block_after(text: str, marker: str) -> str:
    """The first ```text fenced block after ``marker`` in ``text``."""
    start = text.index(marker)
    block = text.index("```text\n", start) + len("```text\n")
    return text[block:text.index("```", block)]


def _rows(block: str) -> list[list[str]]:
    """Cells of every row of a rich SQUARE-box table (header included)."""
    rows = []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("│"):
            rows.append([c.strip() for c in line.strip("│").split("│")])
    return rows


def _half_unit(cell: str) -> float:
    """Half a unit of the last printed digit of ``cell`` (its printed precision)."""
    mantissa, _, exponent = cell.lower().lstrip("+-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def _compare_tables(expected: list[list[str]], got: list[list[str]], row_tolerance, what: str):
    """Cell by cell: text equal; numbers within the row's tolerance + half a printed unit."""
    assert [r[0] for r in expected] == [r[0] for r in got], f"{what}: rows differ"
    problems = []
    header = expected[0]
    for row_readme, row_run in zip(expected[1:], got[1:]):
        for column, cell_readme, cell_run in zip(header[1:], row_readme[1:], row_run[1:]):
            where = f"{what}: row {row_readme[0]!r}, column {column!r}: README {cell_readme}, run {cell_run}"
            if NUMBER.match(cell_readme) and NUMBER.match(cell_run):
                atol = row_tolerance(row_readme[0], column) + _half_unit(cell_readme)
                if abs(float(cell_readme) - float(cell_run)) > atol:
                    problems.append(f"{where} (allowed {atol:.3g})")
            elif cell_readme != cell_run:
                problems.append(where)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- #
# make demo: freeze-parity compare
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def demo_report(run_record, tinyconv_checkpoint):
    from shared.report import build_report

    pairs = [(run_record("tf", name), run_record("torch", name)) for name in STRATEGIES]
    config = RunConfig()
    return build_report(pairs, {"arch": config.arch, "optimizer": config.optimizer,
                                "learning_rate": config.learning_rate, "steps": config.steps,
                                "batch_size": config.batch_size})


def _demo_tolerance(strategy: str, column: str) -> float:
    if column.endswith(" acc"):
        return (0.0 if step_tolerance(strategy, "sgd").name == "STEP_LOSS"
                else tolerances.README_ACCURACY_ATOL)
    return step_tolerance(strategy, "sgd").atol


def test_readme_demo_table_matches_a_run_on_the_shipped_checkpoint(demo_report):
    from shared.report import COLUMNS

    readme = _rows(_text_block_after(README.read_text(), "## What `make demo` shows"))
    assert readme[0] == [c.title for c in COLUMNS], "README table header is not compare's"
    run = [[c.title for c in COLUMNS], *demo_report.cells()]
    _compare_tables(readme, run, _demo_tolerance, "README demo table")


def test_demo_goals_hold_on_the_shipped_checkpoint(demo_report):
    """The issue's goals, read from the same run: transfer works and BN's lesson shows."""
    rows = {row["strategy"]: row for row in demo_report.rows}
    best = max(max(r["tf_acc"], r["torch_acc"]) for r in rows.values())
    assert best >= DEMO_MIN_BEST_ACCURACY
    for name, row in rows.items():
        if name != "naive":
            assert min(row["tf_acc"], row["torch_acc"]) >= DEMO_MIN_ACCURACY_OVER_CHANCE * CHANCE, name
    for name in ("bn_adapt", "full", "naive"):
        assert min(rows[name]["tf_gap"], rows[name]["torch_gap"]) >= DEMO_MIN_TRAP_GAP, name
    # the seed's lesson: statistics adapted to the target beat stored source statistics
    assert rows["bn_adapt"]["torch_acc"] > rows["frozen"]["torch_acc"]
    assert rows["bn_adapt"]["tf_acc"] > rows["frozen"]["tf_acc"]
    assert demo_report.ok, demo_report.failures


# --------------------------------------------------------------------------- #
# freeze-parity explain
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def explain_block(tinyconv_checkpoint) -> str:
    from rich.console import Console

    from shared import frameworks
    from shared.commands.explain import DEFAULT_STRATEGIES
    from shared.explain import render_table

    impls = {fw: frameworks.load(fw, "explain") for fw in ("torch", "tf")}
    results = [impls[fw].decompose(RunConfig(strategy=name, checkpoint=str(tinyconv_checkpoint)))
               for name in DEFAULT_STRATEGIES for fw in ("tf", "torch")]
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(results, title="fit vs evaluate on the same data"))
    return out.getvalue()


def _explain_tolerance(label: str, column: str) -> float:
    return step_tolerance(column.split()[-1], "sgd").atol


def test_readme_explain_table_matches_a_run_on_the_shipped_checkpoint(explain_block):
    readme = _rows(_text_block_after(README.read_text(), "`freeze-parity explain` reproduces"))
    _compare_tables(readme, _rows(explain_block), _explain_tolerance, "README explain table")


def test_half_unit_reads_printed_precision():
    assert _half_unit("1.2802") == pytest.approx(5e-5)
    assert _half_unit("3.27") == pytest.approx(5e-3)
    assert _half_unit("8.32e-07") == pytest.approx(5e-10)
    assert _half_unit("0") == pytest.approx(0.5)
    assert _half_unit("+0.8451") == pytest.approx(5e-5)


def test_compare_tables_names_the_drifted_cell():
    header = ["strategy", "tf train"]
    with pytest.raises(AssertionError, match="row 'frozen', column 'tf train': README 1.2802, run 1.2810"):
        _compare_tables([header, ["frozen", "1.2802"]], [header, ["frozen", "1.2810"]],
                        lambda *_: 0.0, "t")
    _compare_tables([header, ["frozen", "1.2802"]], [header, ["frozen", "1.28024"]],
                    lambda *_: 0.0, "t")


# --------------------------------------------------------------------------- #
# docs/PORTING.md, "In this project's runs": the rows that quote run numbers
# --------------------------------------------------------------------------- #
PORTING = ROOT / "docs" / "PORTING.md"
FLOAT = re.compile(r"(?<![\w.])[+-]?\d+\.\d+(?:e[+-]?\d+)?(?![\w.])")
VARIANT = {"steps": 30}  # tests/test_train.py::VARIANT_STEPS
F64 = {"dtype": "float64", "steps": 30}


def _porting_row(concept: str) -> str:
    section = PORTING.read_text().split("## In this project's runs", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == concept:
            return cells[3]  # "what differs"
    raise AssertionError(f"docs/PORTING.md: no row {concept!r} in \"In this project's runs\"")


def _diff(run_record, strategy, attr, **config):
    from shared.compare import compare_records

    return getattr(compare_records(run_record("tf", strategy, **config),
                                   run_record("torch", strategy, **config)), attr)


def _step0(run_record):
    record = run_record("torch", "bn_adapt")
    first = record.steps[0]
    return [abs(first.train_loss - first.eval_loss), first.train_loss, first.eval_loss]


def _variance(run_record):
    import dataclasses

    from shared.compare import compare_records

    torch_record = run_record("torch", "bn_adapt", **F64)
    raw = compare_records(dataclasses.replace(
        run_record("tf", "bn_adapt", reconcile_bn_variance=False, **F64),
        config=torch_record.config), torch_record)
    return [raw.max_eval_diff, raw.max_train_diff]


BATCH = tolerances.BATCH_STATS_STEP_ATOL
STEP = tolerances.STEP_LOSS_ATOL
FULL = tolerances.FULL_FLOAT32_STEP_ATOL
# concept -> (the numbers its "what differs" cell quotes, in order; each one's tolerance)
PORTING_ROWS = {
    "BN in batch-statistics mode on a shifted domain":
        (lambda r: _step0(r), [BATCH, BATCH, STEP]),
    "naive freezing, cross-framework":
        (lambda r: [_diff(r, "naive", "max_eval_diff"),
                    _diff(r, "naive", "max_eval_diff", optimizer="adam", **VARIANT)], [BATCH, BATCH]),
    "per-step parity, frozen-BN strategies":
        (lambda r: [_diff(r, "frozen", "max_diff"),
                    _diff(r, "frozen", "max_diff", optimizer="adam", **VARIANT),
                    _diff(r, "partial", "max_diff"),
                    _diff(r, "partial", "max_diff", optimizer="adam", **VARIANT)], [STEP] * 4),
    "BN batch statistics in float32":
        (lambda r: [_diff(r, "bn_adapt", "max_diff"), _diff(r, "full", "max_diff"),
                    _diff(r, "bn_adapt", "max_diff", **F64), _diff(r, "full", "max_diff", **F64)],
         [BATCH, FULL, STEP, STEP]),
    "`full` + Adam in float64":
        (lambda r: [_diff(r, "full", "max_diff", optimizer="adam", **F64)],
         [tolerances.FULL_ADAM_FLOAT64_STEP_ATOL]),
    "moving-variance convention in a run":
        (lambda r: _variance(r), [STEP, STEP]),
}


@pytest.mark.parametrize("concept", list(PORTING_ROWS))
def test_porting_run_numbers_match_a_run(run_record, concept):
    measure, atols = PORTING_ROWS[concept]
    quoted = FLOAT.findall(_porting_row(concept))
    measured = measure(run_record)
    assert len(quoted) == len(measured), (
        f"docs/PORTING.md row {concept!r}: quotes {quoted}, the check measures {len(measured)} "
        f"numbers: {[f'{m:.3g}' for m in measured]}")
    problems = [f"docs/PORTING.md row {concept!r}, number {i + 1}: quoted {q}, measured {m:.3g}"
                for i, (q, m, atol) in enumerate(zip(quoted, measured, atols))
                if abs(float(q) - m) > atol + _half_unit(q)]
    assert not problems, "\n".join(problems)

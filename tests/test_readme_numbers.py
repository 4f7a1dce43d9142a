"""Every number in the README's and docs' demo tables, and in PORTING.md's run rows, comes
from a run this test repeats, and is checked the way the number deserves.

The README and docs/demo.md show what ``make demo`` (``freeze-parity compare``) and
``freeze-parity explain`` print on the shipped checkpoint, on this project's machine. The
session's ``strategy_result`` runs are exactly the demo's (default RunConfig, shipped
checkpoint); this test renders them with the same code and compares each printed cell:

* text (strategy, verdict) exactly, and a printed 0 as 0 (a verdict's "; numerics: ..."
  part names a framework whose float32 left float64 on this CPU: the semantics verdict
  before it is compared exactly, the numerics part may differ from CPU to CPU);
* a number one step decides (the lockstep's one-step loss difference, step-0 losses)
  within one forward pass's rounding (LOCKSTEP_LOSS_*), plus half a printed unit;
* a number of a free float32 run (losses after 100 steps, their differences, distances
  from float64), which another CPU moves as far as rounding carries the run, within
  ENVELOPE_MULTIPLE times the rounding envelope the re-run measures, plus half a unit;
* a held-out accuracy within ENVELOPE_MULTIPLE times the spread of the envelope's reruns'
  accuracies (0 where every rerun classifies alike), plus half a unit;
* an envelope itself within a factor ENVELOPE_MULTIPLE of the re-run's;
* hand-derived numbers (Adam's float32-beta factor) against the formula, and bounds as
  bounds.

A number out of its band fails naming its table, row and column.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from shared import tolerances
from shared.record import RunConfig
from shared.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO = ROOT / "docs" / "demo.md"
PORTING = ROOT / "docs" / "PORTING.md"
# The goals issue 12 sets for the demo, read from the same run.
DEMO_MIN_BEST_ACCURACY = 0.85  # the best strategy's held-out target accuracy
DEMO_MIN_ACCURACY_OVER_CHANCE = 3.0  # "clearly above chance": every strategy but naive
DEMO_MIN_TRAP_GAP = 1.0  # train/eval gap of the batch-statistics strategies
CHANCE = 1 / 10  # ten balanced target classes
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
MULTIPLE = tolerances.ENVELOPE_MULTIPLE


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


def _forward(value: float) -> float:
    return tolerances.LOCKSTEP_LOSS_ATOL + tolerances.LOCKSTEP_LOSS_RTOL * abs(value)


VERDICT_NUMERICS = re.compile(r"^ok(; numerics: (tf|torch)(, (tf|torch))?)?$")


def _compare_tables(expected: list[list[str]], got: list[list[str]], allowed, what: str):
    """Cell by cell: text equal, a printed 0 as 0, numbers within ``allowed(row, column,
    printed, measured)`` (None: a factor check, see ``_envelope_cell``) + half a unit."""
    assert [r[0] for r in expected] == [r[0] for r in got], f"{what}: rows differ"
    problems = []
    header = expected[0]
    for row_doc, row_run in zip(expected[1:], got[1:]):
        for column, cell_doc, cell_run in zip(header[1:], row_doc[1:], row_run[1:]):
            where = f"{what}: row {row_doc[0]!r}, column {column!r}: printed {cell_doc}, run {cell_run}"
            if NUMBER.match(cell_doc) and NUMBER.match(cell_run):
                printed, measured = float(cell_doc), float(cell_run)
                if printed == 0:
                    if measured != 0:
                        problems.append(f"{where} (a printed 0 is checked as 0)")
                    continue
                atol = allowed(row_doc[0], column, printed, measured)
                if atol is None:
                    if not max(printed, measured) <= MULTIPLE * min(printed, measured):
                        problems.append(f"{where} (more than a factor {MULTIPLE:g} apart)")
                elif abs(printed - measured) > atol + _half_unit(cell_doc):
                    problems.append(f"{where} (allowed {atol + _half_unit(cell_doc):.3g})")
            elif column == "verdict" and VERDICT_NUMERICS.match(cell_doc) and \
                    VERDICT_NUMERICS.match(cell_run):
                # the semantics verdict exactly; a numerics finding is where one framework's
                # float32 left float64, which the CPU (and its summation order) decides
                if cell_doc.split("; numerics")[0] != cell_run.split("; numerics")[0]:
                    problems.append(where)
            elif cell_doc != cell_run:
                problems.append(where)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- #
# make demo: freeze-parity compare
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def demo_results(strategy_result):
    return [strategy_result(name) for name in STRATEGIES]


@pytest.fixture(scope="session")
def demo_report(demo_results):
    from shared.report import build_report

    config = RunConfig()
    return build_report(demo_results, {"arch": config.arch, "optimizer": config.optimizer,
                                       "learning_rate": config.learning_rate,
                                       "steps": config.steps, "batch_size": config.batch_size})


def _demo_allowed(results):
    """Per strategy and column: what another CPU may move the printed number by."""
    by_name = {r.strategy: r for r in results}

    def allowed(strategy, column, printed, measured):
        result = by_name[strategy]
        env = result.envelope
        band = {s: float(env.band(s)[-1]) for s in ("train_loss", "eval_loss", "heldout_loss")}
        spread = MULTIPLE * env.max_spread + _forward(measured)
        if column == "one step":  # one step from one state: one forward's rounding
            return _forward(measured)
        if column == "envelope":
            return None
        if column.endswith(" acc"):
            low, high = env.accuracy_band()
            return MULTIPLE * (high - low)
        if column.endswith(" train"):
            return MULTIPLE * band["train_loss"] + _forward(measured)
        if column.endswith(" eval"):
            return MULTIPLE * band["eval_loss"] + _forward(measured)
        return spread  # gap, free run, vs f64: free-run numbers over the whole run

    return allowed


def test_readme_and_docs_show_the_same_demo_table():
    marker = "```text\nfreeze-parity compare: tinyconv, sgd (lr 0.02), 100 steps of 32"
    readme = _text_block_after(README.read_text(), "## What `make demo` prints")
    docs = _text_block_after(DEMO.read_text(), "`make demo` runs `freeze-parity compare`")
    assert readme == docs
    assert marker.split("\n", 1)[1] in readme


def test_readme_demo_table_matches_a_run_on_the_shipped_checkpoint(demo_report, demo_results):
    from shared.report import COLUMNS

    readme = _rows(_text_block_after(README.read_text(), "## What `make demo` prints"))
    assert readme[0] == [c.title for c in COLUMNS], "README table header is not compare's"
    run = [[c.title for c in COLUMNS], *demo_report.cells()]
    _compare_tables(readme, run, _demo_allowed(demo_results), "README demo table")


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
    # the seed's lesson, and docs/demo.md's ranking: adapted statistics beat stored ones,
    # and partly unfreezing the last block on stored statistics repairs only part of it
    for fw in ("tf", "torch"):
        acc = {name: row[f"{fw}_acc"] for name, row in rows.items()}
        assert acc["bn_adapt"] > acc["partial"] > acc["frozen"] == acc["feature_extraction"], fw
        assert acc["bn_adapt"] > acc["full"], fw
    assert demo_report.ok, demo_report.failures


def test_compare_tables_checks_zero_as_zero_and_names_the_drifted_cell():
    header = ["strategy", "tf train"]
    keep = lambda *_: 0.0  # noqa: E731
    with pytest.raises(AssertionError, match="row 'frozen', column 'tf train': printed 1.2802, run 1.2810"):
        _compare_tables([header, ["frozen", "1.2802"]], [header, ["frozen", "1.2810"]], keep, "t")
    _compare_tables([header, ["frozen", "1.2802"]], [header, ["frozen", "1.28024"]], keep, "t")
    with pytest.raises(AssertionError, match="a printed 0 is checked as 0"):
        _compare_tables([header, ["frozen", "0"]], [header, ["frozen", "1e-09"]], keep, "t")
    with pytest.raises(AssertionError, match="more than a factor"):
        _compare_tables([header, ["frozen", "1e-06"]], [header, ["frozen", "1e-04"]],
                        lambda *_: None, "t")


def test_half_unit_reads_printed_precision():
    assert _half_unit("1.2802") == pytest.approx(5e-5)
    assert _half_unit("3.27") == pytest.approx(5e-3)
    assert _half_unit("8.32e-07") == pytest.approx(5e-10)
    assert _half_unit("+0.8451") == pytest.approx(5e-5)


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


def test_docs_explain_table_matches_a_run_on_the_shipped_checkpoint(explain_block):
    """explain's four steps of a head on fixed features (frozen) or on batch-statistics
    features (naive) move no further than one forward's rounding between CPUs."""
    docs = _rows(_text_block_after(DEMO.read_text(), "`freeze-parity explain` reproduces"))
    _compare_tables(docs, _rows(explain_block), lambda _r, _c, _p, m: _forward(m),
                    "docs/demo.md explain table")


# --------------------------------------------------------------------------- #
# docs/PORTING.md, "In this project's runs": the rows that quote run numbers
# --------------------------------------------------------------------------- #
FLOAT = re.compile(r"(?<![\w.])[+-]?\d+\.\d+(?:e[+-]?\d+)?(?![\w.])")
SECTION = "## In this project's runs"
ADAM = {"optimizer": "adam", "steps": 30}  # tests/test_train.py's Adam variants


def _porting_rows() -> dict[str, str]:
    section = PORTING.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("concept", "---"):
            rows[cells[0]] = cells[3]  # "what differs"
    return rows


def _free(result, attr="max_diff"):
    """(a free-run number, what another CPU may move it by)."""
    return getattr(result.free, attr), MULTIPLE * result.envelope.max_spread


def _step0(result):
    first = result.torch.steps[0]
    return [(abs(first.train_loss - first.eval_loss), 2 * _forward(first.eval_loss)),
            (first.train_loss, _forward(first.train_loss)),
            (first.eval_loss, _forward(first.eval_loss))]


def _naive(r):
    sgd, adam = r("naive"), r("naive", **ADAM)
    return [(sgd.free.max_diff, MULTIPLE * sgd.envelope.max_spread),
            (adam.free.max_diff, MULTIPLE * adam.envelope.max_spread)]


def _adam_factor(_):
    """Keras's Adam step over torch's at step 1 with betas 0.9 / 0.999, written out."""
    b1, b2 = 0.9, 0.999
    f1, f2 = float(np.float32(b1)), float(np.float32(b2))
    return [(1 - (np.sqrt(1 - f2) / (1 - f1)) / (np.sqrt(1 - b2) / (1 - b1)), 0.0)]


EXACT = 0.0
# concept -> its quoted numbers, in order, as (measured, what another CPU may move it by)
PORTING_ROWS = {
    "BN in batch-statistics mode on a shifted domain": lambda r: _step0(r("bn_adapt")),
    "naive freezing, cross-framework": _naive,
    "free runs of batch-statistics strategies": lambda r: [_free(r("bn_adapt")), _free(r("full"))],
    "a point where rounding decides": lambda r: [_free(r("partial"))],
    "Adam's bias correction": _adam_factor,
}


def test_porting_rows_with_numbers_are_all_checked():
    quoting = {concept for concept, text in _porting_rows().items() if FLOAT.findall(text)}
    assert quoting == set(PORTING_ROWS), sorted(quoting ^ set(PORTING_ROWS))


@pytest.mark.parametrize("concept", list(PORTING_ROWS))
def test_porting_run_numbers_match_a_run(strategy_result, concept):
    quoted = FLOAT.findall(_porting_rows()[concept])
    measured = PORTING_ROWS[concept](strategy_result)
    assert len(quoted) == len(measured), (
        f"docs/PORTING.md row {concept!r}: quotes {quoted}, the check measures {len(measured)} "
        f"numbers: {[f'{m:.3g}' for m, _ in measured]}")
    problems = [f"docs/PORTING.md row {concept!r}, number {i + 1}: quoted {q}, measured {m:.3g}"
                for i, (q, (m, atol)) in enumerate(zip(quoted, measured))
                if abs(float(q) - m) > atol + _half_unit(q)]
    assert not problems, "\n".join(problems)

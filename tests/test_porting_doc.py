"""docs/PORTING.md is executable: every claim cites a test that exists, the banner names the
installed versions, and the recipes shown are the files in docs/recipes/, which work.

Any table in the guide may gain rows that cite tests in other files: a row's last cell is
searched for pytest node ids (``tests/<path>.py::<name>`` or ``...::<name>[<param>]``), and
checked against the node ids of the cited files: those this session collected when it
collected the whole tests directory (tests/session_ids.py: before ``-k``/``-m``), else those of
one fresh ``pytest --collect-only`` of the cited files (collected, not run).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch  # before keras/TensorFlow: see tests/test_import_order.py
from session_ids import collected_ids, collects_whole, covers
from torch import nn

from shared.tolerances import SAME_FRAMEWORK_ATOL
from tf_impl import keras  # tf_impl imports torch_impl before TensorFlow

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "PORTING.md"
RECIPES = REPO / "docs" / "recipes"
CONSTRAINTS = REPO / "constraints.txt"
# Test files whose every test is a guide claim: each must be cited by some row.
CLAIM_FILES = (
    "tests/test_traps_keras.py",
    "tests/test_traps_torch.py",
    "tests/test_cross_numerics.py",
    "tests/test_import_order.py",
)
COLLECT_TIMEOUT_S = 300

NODE_ID = re.compile(r"tests/[\w./-]+?\.py::\w+(?:\[[^\]\s`|]*\])?")
BANNER_PIN = re.compile(r"\b([a-z][a-z0-9_-]*) (\d+(?:\.\d+)+)\b")
RECIPE_BLOCK = re.compile(r"<!-- recipe: (\S+) -->\n```python\n(.*?)```\n", re.DOTALL)
FENCE = re.compile(r"^\s*```")
SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


# --- parsing the guide ------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    section: str  # the nearest heading above the table
    line: int  # 1-based line of the header row
    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]  # (line, cells)


def split_cells(line: str) -> tuple[str, ...]:
    """Cells of one markdown table line; ``\\|`` is a literal pipe, not a separator."""
    body = line.strip()
    body = body.removeprefix("|")
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return tuple(cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body))


def parse_tables(text: str) -> list[Table]:
    """Every pipe table outside fenced code blocks, with the section it sits in."""
    lines = text.splitlines()
    tables, section, in_fence, i = [], "", False, 0
    while i < len(lines):
        line = lines[i]
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif (
            not in_fence
            and line.lstrip().startswith("|")
            and i + 1 < len(lines)
            and SEPARATOR.match(lines[i + 1])
        ):
            header, start, rows = split_cells(line), i + 1, []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append((i + 1, split_cells(lines[i])))
                i += 1
            tables.append(Table(section, start, header, tuple(rows)))
            continue
        i += 1
    return tables


def cited_ids(cell: str) -> list[str]:
    return NODE_ID.findall(cell)


def parse_banner(text: str) -> dict[str, str]:
    """``{distribution: version}`` from the first blockquote line of the guide."""
    first_quote = next(line for line in text.splitlines() if line.startswith(">"))
    return dict(BANNER_PIN.findall(first_quote))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tables(doc_text) -> list[Table]:
    found = parse_tables(doc_text)
    assert found, f"{DOC.relative_to(REPO)}: no tables found"
    return found


def _all_citations(tables: list[Table]) -> list[tuple[int, str]]:
    return [(line, node) for t in tables for line, cells in t.rows for node in cited_ids(cells[-1])]


@pytest.fixture(scope="session")
def collected(request) -> set[str]:
    """Node ids of every test file the guide cites plus CLAIM_FILES: this session's own when it
    collected all of tests/, else from one collect-only run of those files."""
    citations = _all_citations(parse_tables(DOC.read_text(encoding="utf-8")))
    files = sorted({node.split("::")[0] for _, node in citations} | set(CLAIM_FILES))
    existing = [f for f in files if (REPO / f).is_file()]
    if not existing:
        return set()
    if collects_whole(request.config, REPO / "tests"):
        return {node for node in collected_ids(request.config) if node.split("::")[0] in existing}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *existing,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COLLECT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"pytest --collect-only {' '.join(existing)} exited {result.returncode}:\n"
        f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
    return {line.strip() for line in result.stdout.splitlines() if "::" in line}


# --- where the node ids come from ---------------------------------------------------------


def test_session_ids_only_when_the_whole_tests_dir_is_collected(tmp_path):
    tests = tmp_path / "tests"
    (tests / "examples").mkdir(parents=True)
    (tests / "test_a.py").write_text("")
    assert covers(["tests"], tmp_path, tests)  # testpaths, or `pytest tests`
    assert covers(["."], tests, tests) and covers([str(tmp_path)], tests, tests)
    assert covers(["tests/test_a.py", "tests/"], tmp_path, tests)  # a file more adds nothing
    assert not covers(["tests/test_a.py"], tmp_path, tests)
    assert not covers(["tests::test_x", "tests/test_a.py::test_x"], tmp_path, tests)
    assert not covers(["tests/examples"], tmp_path, tests)
    assert not covers(["tests/missing"], tmp_path, tests)


def test_session_ids_are_collect_only_node_ids(request):
    """This session records ids as ``pytest --collect-only -q`` prints them from the repo."""
    this = "tests/test_porting_doc.py::test_session_ids_are_collect_only_node_ids"
    assert request.node.nodeid == this and this in collected_ids(request.config)


# --- the parser itself ---------------------------------------------------------------------


def test_parse_tables_reads_ids_params_escaped_pipes_and_skips_code():
    text = (
        "## Topic\n"
        "| concept | idiom | test |\n"
        "|---|---|---|\n"
        "| a | `x \\| y` | `tests/t_a.py::test_a`, `tests/sub/t_b.py::test_b[p-1]` |\n"
        "| b | nothing cited | see above |\n"
        "```\n"
        "| not | a | table |\n"
        "|---|---|---|\n"
        "```\n"
    )
    (table,) = parse_tables(text)
    assert table.section == "Topic" and table.header == ("concept", "idiom", "test")
    (line_a, cells_a), (_, cells_b) = table.rows
    assert line_a == 4 and cells_a[1] == "`x | y`"
    assert cited_ids(cells_a[-1]) == ["tests/t_a.py::test_a", "tests/sub/t_b.py::test_b[p-1]"]
    assert cited_ids(cells_b[-1]) == []


# --- the guide -----------------------------------------------------------------------------


def test_porting_doc_banner_matches_installed_versions(doc_text):
    banner = parse_banner(doc_text)
    assert {_normalise(name) for name in banner} >= {
        "torch",
        "torchvision",
        "tensorflow-cpu",
        "keras",
        "numpy",
    }, f"docs/PORTING.md banner: missing pins, found {banner}"
    installed = {name: importlib.metadata.version(name) for name in banner}
    mismatched = {n: (banner[n], installed[n]) for n in banner if banner[n] != installed[n]}
    assert not mismatched, (
        f"docs/PORTING.md banner vs installed (banner, installed): {mismatched}; re-run the "
        f"trap tests on the new versions and update the guide's numbers and banner together"
    )


def test_porting_doc_banner_matches_constraints(doc_text):
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[_normalise(name)] = version.strip()
    banner = {_normalise(n): v for n, v in parse_banner(doc_text).items()}
    mismatched = {n: (v, pins.get(n)) for n, v in banner.items() if pins.get(n) != v}
    assert not mismatched, f"docs/PORTING.md banner vs constraints.txt: {mismatched}"


def test_porting_doc_every_table_ends_with_test_column(tables):
    wrong = [(t.line, t.header[-1]) for t in tables if t.header[-1].lower() != "test"]
    assert not wrong, f"docs/PORTING.md tables whose last column is not 'test' (line, got): {wrong}"


def test_porting_doc_every_row_cites_a_test(tables):
    uncited = [
        (line, cells[0]) for t in tables for line, cells in t.rows if not cited_ids(cells[-1])
    ]
    assert not uncited, f"docs/PORTING.md rows citing no test node id (line, concept): {uncited}"


def test_porting_doc_rows_have_header_width(tables):
    ragged = [
        (line, len(cells), len(t.header))
        for t in tables
        for line, cells in t.rows
        if len(cells) != len(t.header)
    ]
    assert not ragged, f"docs/PORTING.md rows with a wrong cell count (line, got, want): {ragged}"


def test_porting_doc_cited_tests_exist(tables, collected):
    def exists(node: str) -> bool:
        if "[" in node:
            return node in collected
        return node in collected or any(c.startswith(node + "[") for c in collected)

    missing = [(line, node) for line, node in _all_citations(tables) if not exists(node)]
    assert not missing, f"docs/PORTING.md cites tests that do not exist (line, node id): {missing}"


def test_porting_doc_cites_every_claim_test(tables, collected):
    cited = {node.split("[")[0] for _, node in _all_citations(tables)}
    cited |= {node for _, node in _all_citations(tables)}
    claims = {c for c in collected if c.split("::")[0] in CLAIM_FILES}
    uncited = sorted(c for c in claims if c not in cited and c.split("[")[0] not in cited)
    assert not uncited, f"tests in {CLAIM_FILES} that no docs/PORTING.md row cites: {uncited}"


# --- the recipes ---------------------------------------------------------------------------

RECIPE_FILES = sorted(p.relative_to(REPO).as_posix() for p in RECIPES.glob("*.py"))


def _load_recipe(name: str) -> ModuleType:
    path = RECIPES / name
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", RECIPE_FILES)
def test_porting_doc_recipe_block_equals_file(recipe, doc_text):
    blocks = dict(RECIPE_BLOCK.findall(doc_text))
    assert recipe in blocks, (
        f"docs/PORTING.md: no '<!-- recipe: {recipe} -->' marker followed by a python block"
    )
    assert blocks[recipe] == (REPO / recipe).read_text(encoding="utf-8"), (
        f"docs/PORTING.md: the block after '<!-- recipe: {recipe} -->' differs from {recipe}; "
        f"paste the file verbatim"
    )


def test_porting_doc_recipe_markers_name_existing_files(doc_text):
    named = [name for name, _ in RECIPE_BLOCK.findall(doc_text)]
    assert named and set(named) == set(RECIPE_FILES), (
        f"docs/PORTING.md recipe blocks {named} vs docs/recipes files {RECIPE_FILES}"
    )


IMAGE_SIZE, CHANNELS, CLASSES, BATCH = 6, 3, 3, 8


def _images_and_labels():
    rng = np.random.RandomState(0)
    images = (rng.randn(BATCH, IMAGE_SIZE, IMAGE_SIZE, CHANNELS) + 2.0).astype(np.float32)
    return images, rng.randint(0, CLASSES, size=BATCH)


def _keras_base() -> keras.Model:
    """A stand-in for a pretrained base: conv -> BN -> ReLU -> Dropout -> pooled features."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, CHANNELS))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="base")


def _keras_snapshot(layer) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy()) for v in layer.weights}


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[str]:
    return sorted(name for name in before if not np.array_equal(before[name], after[name]))


@pytest.fixture
def keras_recipe_model():
    keras.utils.set_random_seed(0)
    recipe = _load_recipe("keras_freeze.py")
    base = _keras_base()
    return recipe, base, recipe.build_classifier(base, CLASSES)


def test_keras_recipe_frozen_stage_trains_head_only_in_inference_mode(keras_recipe_model):
    recipe, base, model = keras_recipe_model
    images, labels = _images_and_labels()
    recipe.compile_frozen_stage(model, base, learning_rate=0.1)
    base_before, head_before = _keras_snapshot(base), _keras_snapshot(model.get_layer("head"))
    inference_loss = float(model.evaluate(images, labels, batch_size=BATCH, verbose=0))
    history = model.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    fit_loss = float(history.history["loss"][0])  # one batch: the pre-update training loss
    assert _changed(base_before, _keras_snapshot(base)) == [], "frozen stage moved the base"
    assert _changed(head_before, _keras_snapshot(model.get_layer("head"))), "head did not train"
    assert abs(fit_loss - inference_loss) <= SAME_FRAMEWORK_ATOL, (
        f"frozen stage: training-mode loss {fit_loss:.7g} != inference loss "
        f"{inference_loss:.7g}: BN or Dropout in the base ran in training mode"
    )


def test_keras_recipe_fine_tune_stage_trains_conv_keeps_bn(keras_recipe_model):
    recipe, base, model = keras_recipe_model
    images, labels = _images_and_labels()
    recipe.compile_frozen_stage(model, base, learning_rate=0.1)
    model.fit(images, labels, batch_size=BATCH, epochs=1, verbose=0)
    recipe.compile_fine_tune_stage(model, base, learning_rate=0.1)
    before = _keras_snapshot(base)
    model.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert _changed(before, _keras_snapshot(base)) == ["conv/kernel"], (
        f"fine-tune stage: expected only the conv kernel to change in the base, changed "
        f"{_changed(before, _keras_snapshot(base))}"
    )


def _torch_base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _torch_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def _torch_changed(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    after = module.state_dict()
    return sorted(name for name in before if not torch.equal(before[name], after[name]))


@pytest.fixture
def torch_recipe_model():
    recipe = _load_recipe("torch_freeze.py")
    model = recipe.Classifier(_torch_base(), nn.Linear(4, CLASSES))
    images, labels = _images_and_labels()
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)
    return recipe, model, batch


def test_torch_recipe_frozen_stage_trains_head_only_in_inference_mode(torch_recipe_model):
    recipe, model, (images, labels) = torch_recipe_model
    optimizer = recipe.frozen_stage_optimizer(model, lr=0.1)
    base_before, head_before = _torch_snapshot(model.base), _torch_snapshot(model.head)
    with torch.no_grad():
        inference_loss = float(nn.functional.cross_entropy(model.eval()(images), labels))
    train_loss = recipe.train_step(model, optimizer, images, labels)
    assert _torch_changed(base_before, model.base) == [], "frozen stage moved the base"
    assert _torch_changed(head_before, model.head), "head did not train"
    assert abs(train_loss - inference_loss) <= SAME_FRAMEWORK_ATOL, (
        f"frozen stage: training-mode loss {train_loss:.7g} != inference loss "
        f"{inference_loss:.7g}: BN or Dropout in the base ran in training mode"
    )


def test_torch_recipe_fine_tune_stage_trains_conv_keeps_bn(torch_recipe_model):
    recipe, model, (images, labels) = torch_recipe_model
    recipe.train_step(model, recipe.frozen_stage_optimizer(model, lr=0.1), images, labels)
    optimizer = recipe.fine_tune_stage_optimizer(model, lr=0.1)
    before = _torch_snapshot(model.base)
    recipe.train_step(model, optimizer, images, labels)
    assert _torch_changed(before, model.base) == ["0.weight"], (
        f"fine-tune stage: expected only the conv weight to change in the base, changed "
        f"{_torch_changed(before, model.base)}"
    )

"""``freeze-parity convert``: torchvision ResNet-18 state_dict <-> canonical checkpoint, and
torch training file <-> canonical training checkpoint.

The command is called through its own module (``add_parser`` + ``run``) so it
is testable before the other subcommands exist; one test runs the whole command
line (``shared.cli.main``, what the console script runs, in this process:
tests/cli_inprocess.py) once they do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from cli_inprocess import cli

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.cli import COMMANDS
from shared.commands import convert as convert_command
from shared.convert import is_canonical_checkpoint, to_canonical_key, to_torchvision_key
from shared.errors import UsageError
from shared.training_state import load_training_checkpoint, save_training_checkpoint
from torch_impl import model as torch_model
from torch_impl import resnet
from torch_impl import weights as torch_weights

ROOT = Path(__file__).resolve().parents[1]
LAYER = "layer3.1.conv2.weight"  # a key removed or reshaped by the malformed cases


def _randomised_resnet18(seed: int = 0) -> torchvision.models.ResNet:
    """torchvision's resnet18() with its own random init and non-trivial BN state."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def state_dict():
    return _randomised_resnet18().state_dict()


@pytest.fixture(scope="module")
def pth(tmp_path_factory, state_dict) -> Path:
    path = tmp_path_factory.mktemp("src") / "resnet18.pth"
    torch.save(state_dict, path)
    return path


def _parser() -> argparse.ArgumentParser:
    """A parser holding only ``convert`` (shared.cli imports every command module)."""
    parser = argparse.ArgumentParser(prog="freeze-parity")
    sub = parser.add_subparsers(dest="command", required=True)
    convert_command.add_parser(sub.add_parser("convert"))
    return parser


def _convert(src, dst) -> int:
    return convert_command.run(_parser().parse_args(["convert", str(src), str(dst)]))


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- #
# round trips
# --------------------------------------------------------------------------- #
def test_convert_key_names_roundtrip():
    for key in ("conv1.weight", "layer2.0.downsample.1.running_var", "fc.bias"):
        assert to_torchvision_key(to_canonical_key(key)) == key
    assert to_canonical_key("fc.weight") == "head.fc.weight"
    assert to_canonical_key("layer4.1.bn2.bias") == "base.layer4.1.bn2.bias"


def test_convert_pth_to_canonical_and_back_exact(tmp_path, pth, state_dict, capsys):
    canonical = tmp_path / "resnet18.safetensors"
    assert _convert(pth, canonical) == 0
    assert "canonical" in capsys.readouterr().out
    assert is_canonical_checkpoint(canonical)
    tensors, meta = load_checkpoint(canonical)
    assert meta["arch"] == "resnet18" and meta["made_by"].startswith("freeze-parity convert")
    assert (float(meta["bn_epsilon"]), float(meta["bn_momentum"])) == (1e-5, 0.1)
    assert not any(k.endswith("num_batches_tracked") for k in tensors)
    assert tensors["head.fc.weight"].shape == (1000, 512)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            assert np.array_equal(tensors[to_canonical_key(key)], value.numpy()), key

    back = tmp_path / "back.pth"
    assert _convert(canonical, back) == 0
    loaded = torch.load(back, map_location="cpu", weights_only=True)
    assert list(loaded) == list(state_dict)
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            assert int(loaded[key]) == 0, f"{key}: bookkeeping is written as 0"
        else:
            assert torch.equal(loaded[key], value), key
    torchvision.models.resnet18().load_state_dict(loaded, strict=True)
    assert _files(tmp_path) == ["back.pth", "resnet18.safetensors"]  # no temporary files left


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_accepts_pt_and_safetensors_state_dicts(tmp_path, state_dict, suffix):
    src = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(dict(state_dict), src)
    else:
        torch.save(state_dict, src)
    assert not is_canonical_checkpoint(src)
    _convert(src, tmp_path / "out.safetensors")
    tensors, _ = load_checkpoint(tmp_path / "out.safetensors")
    assert np.array_equal(tensors["base.layer1.0.bn1.running_var"],
                          state_dict["layer1.0.bn1.running_var"].numpy())


def test_convert_keeps_a_fine_tuned_head_size(tmp_path):
    model = torchvision.models.resnet18(num_classes=5)
    src, mid, back = tmp_path / "five.pth", tmp_path / "five.safetensors", tmp_path / "back.pth"
    torch.save(model.state_dict(), src)
    _convert(src, mid)
    _convert(mid, back)
    torchvision.models.resnet18(num_classes=5).load_state_dict(
        torch.load(back, weights_only=True), strict=True)


# --------------------------------------------------------------------------- #
# bad input: one line naming the file and the key, no output left behind
# --------------------------------------------------------------------------- #
def _missing_layer(sd):
    return {k: v for k, v in sd.items() if k != LAYER}


def _wrong_shape(sd):
    return {**sd, LAYER: sd[LAYER][:, :128]}


def _resnet34(sd):
    with torch.device("meta"):
        shapes = torchvision.models.resnet34().state_dict()
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}


def _training_checkpoint(sd):
    return {"model": sd, "epoch": 3}


def _half(sd):
    return {**sd, LAYER: sd[LAYER].half()}


def _non_finite(sd):
    bad = sd[LAYER].clone()
    bad[0, 0, 0, 0] = float("nan")
    return {**sd, LAYER: bad}


@pytest.mark.parametrize("mutate, words", [
    (_missing_layer, ["missing key", f"'{LAYER}'"]),
    (_wrong_shape, [f"'{LAYER}'", "shape expected (256, 256, 3, 3), got (256, 128, 3, 3)"]),
    (_resnet34, ["unexpected key", "'layer1.2.", "ResNet-18"]),
    (_training_checkpoint, ["key 'model'", "not a state_dict"]),
    (_half, [f"'{LAYER}'", "float32", "float16"]),
    (_non_finite, [f"'{LAYER}'", "non-finite"]),
    (lambda sd: [sd[LAYER]], ["not a state_dict", "list"]),
], ids=["missing_layer", "wrong_shape", "resnet34", "training_checkpoint", "float16", "nan",
        "list"])
def test_convert_malformed_state_dict_names_the_key(tmp_path, state_dict, mutate, words):
    src, dst = tmp_path / "bad.pth", tmp_path / "out.safetensors"
    torch.save(mutate(dict(state_dict)), src)
    with pytest.raises(CheckpointError) as info:
        _convert(src, dst)
    message = str(info.value)
    assert "\n" not in message and str(src) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _files(tmp_path) == ["bad.pth"]


@pytest.mark.parametrize("case, error, words", [
    ("missing_file", UsageError, ["file not found"]),
    ("directory", UsageError, ["not a file"]),
    ("garbage_pth", CheckpointError, ["could not be read as a state_dict"]),
    ("garbage_safetensors", CheckpointError, ["not a valid safetensors file"]),
    ("pickled_module", CheckpointError, ["could not be read as a state_dict"]),
    ("unknown_suffix", UsageError, ["unknown suffix '.bin'"]),
    ("wrong_dst_suffix", UsageError, ["DST", "needs suffix .safetensors"]),
])
def test_convert_bad_files_give_one_line_error(tmp_path, pth, case, error, words):
    dst = tmp_path / "out.safetensors"
    src = tmp_path / "src.pth"
    if case == "missing_file":
        pass
    elif case == "directory":
        src = tmp_path / "dir.pth"
        src.mkdir()
    elif case == "garbage_pth":
        src.write_bytes(b"not a pickle at all")
    elif case == "garbage_safetensors":
        src = tmp_path / "src.safetensors"
        src.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    elif case == "pickled_module":  # weights_only=True refuses arbitrary objects
        torch.save(torch.nn.Linear(2, 2), src)
    elif case == "unknown_suffix":
        src = tmp_path / "src.bin"
        src.write_bytes(pth.read_bytes())
    elif case == "wrong_dst_suffix":
        src, dst = pth, tmp_path / "out.pth"
    before = _files(tmp_path)
    with pytest.raises(error) as info:
        _convert(src, dst)
    message = str(info.value)
    assert "\n" not in message and str(src if case != "wrong_dst_suffix" else dst) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _files(tmp_path) == before


@pytest.fixture(scope="module")
def canonical(tmp_path_factory, pth) -> Path:
    path = tmp_path_factory.mktemp("canonical") / "resnet18.safetensors"
    _convert(pth, path)
    return path


@pytest.mark.parametrize("case, error, words", [
    ("missing_key", CheckpointError, ["missing key", "'base.layer3.1.conv2.weight'"]),
    ("tinyconv", CheckpointError, ["meta key 'arch'", "'tinyconv'"]),
    ("keras_epsilon", CheckpointError, ["meta key 'bn_epsilon'", "'0.001'"]),
    ("wrong_dst_suffix", UsageError, ["needs suffix .pth or .pt"]),
])
def test_convert_bad_canonical_checkpoint_names_the_key(tmp_path, canonical, case, error, words):
    tensors, meta = load_checkpoint(canonical)
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    if case == "missing_key":
        del tensors["base." + LAYER]
    elif case == "tinyconv":
        meta["arch"] = "tinyconv"
    elif case == "keras_epsilon":
        meta["bn_epsilon"] = "0.001"
    elif case == "wrong_dst_suffix":
        dst = tmp_path / "out.safetensors"
    save_checkpoint(src, tensors, meta)
    with pytest.raises(error) as info:
        _convert(src, dst)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _files(tmp_path) == ["src.safetensors"]


# --------------------------------------------------------------------------- #
# ImageNet weights: wired to torchvision, not downloaded here
# --------------------------------------------------------------------------- #
def test_pretrained_imagenet_state_dict_uses_torchvision_weights(monkeypatch, state_dict):
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append((url, kwargs))
        return state_dict

    # Weights.get_state_dict -> torchvision.models._api.load_state_dict_from_url (torch.hub)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    got = resnet.pretrained_imagenet_state_dict(progress=False)
    assert got is state_dict
    [(url, kwargs)] = calls
    assert url == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert url.endswith("/resnet18-f37072fd.pth")
    assert kwargs == {"progress": False, "check_hash": True}
    assert len(resnet.state_dict_to_canonical(got)) == 102


# --------------------------------------------------------------------------- #
# the real command line
# --------------------------------------------------------------------------- #
_ABSENT_COMMANDS = [name for name in COMMANDS
                    if not (ROOT / "shared" / "commands" / f"{name}.py").exists()]


@pytest.mark.skipif(bool(_ABSENT_COMMANDS),
                    reason=f"shared.cli imports every command module; not written yet: "
                           f"{', '.join(_ABSENT_COMMANDS)}")
def test_convert_cli_roundtrip_and_bad_input_exit_2_one_line(tmp_path, pth):
    def convert(*args):
        return cli("convert", *map(str, args), env={"FREEZE_PARITY_DEBUG": None})  # no tracebacks

    done = convert(pth, tmp_path / "a.safetensors")
    assert done.returncode == 0, done.stderr
    done = convert(tmp_path / "a.safetensors", tmp_path / "b.pth")
    assert done.returncode == 0, done.stderr
    torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "b.pth", weights_only=True))

    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in torch.load(pth, weights_only=True).items() if k != LAYER}, bad)
    done = convert(bad, tmp_path / "c.safetensors")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert LAYER in done.stderr and not (tmp_path / "c.safetensors").exists()


# --------------------------------------------------------------------------- #
# training files: torch's .pt <-> canonical training checkpoint
# --------------------------------------------------------------------------- #
CLASSES = 5
TRAINED = "base.block1.conv.weight"  # the first parameter tinyconv's optimizer updates


def _torch_training(arch: str, optimizer: str, head_only: bool = False, steps: int = 2):
    """A project model and its optimizer after ``steps`` steps on a fixed random batch."""
    torch.manual_seed(0)
    model = torch_model.build_model(arch, CLASSES)
    params = list(model.head.parameters()) if head_only else list(model.parameters())
    opt = (torch.optim.SGD(params, lr=0.01, momentum=0.9) if optimizer == "sgd" else
           torch.optim.Adam(params, lr=1e-3, eps=1e-12))
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % CLASSES
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _step(model, opt) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.ones(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    opt.step()


@pytest.mark.parametrize("arch, optimizer, head_only", [
    ("tinyconv", "sgd", False), ("tinyconv", "adam", False), ("tinyconv", "sgd", True),
    ("resnet18", "sgd", False),
], ids=["tinyconv-sgd", "tinyconv-adam", "tinyconv-sgd-head-only", "resnet18-sgd"])
def test_convert_training_file_to_canonical_and_back_exact(tmp_path, arch, optimizer, head_only):
    """torch's training file -> canonical training checkpoint: every tensor, slot, the step and
    the optimized parameters (in the optimizer's order) as torch holds them; -> back: a file
    plain torch resumes from (``load_state_dict`` of both), taking the next step bit for bit
    as the original does."""
    model, opt = _torch_training(arch, optimizer, head_only)
    names = {id(p): k for k, p in model.named_parameters()}
    order = [names[id(p)] for p in opt.param_groups[0]["params"]]
    src, mid, back = tmp_path / "run.pt", tmp_path / "run.safetensors", tmp_path / "back.pt"
    torch_weights.save_training_file(src, model, opt)
    assert torch_weights.is_training_file(src) and not is_canonical_checkpoint(src)
    assert _convert(src, mid) == 0
    state, meta = load_training_checkpoint(mid)
    assert meta["arch"] == arch and meta["made_by"].startswith("freeze-parity convert")
    assert state.optimizer == optimizer and state.parameters == order
    assert state.step == (2 if optimizer == "adam" else 0)  # torch's SGD counts no steps
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert state.tensors[key].dtype == np.float32
            assert np.array_equal(state.tensors[key], value.numpy()), key
    for p in opt.param_groups[0]["params"]:
        for slot, value in opt.state[p].items():
            if slot != "step":
                assert np.array_equal(state.slots[slot][names[id(p)]], value.numpy()), slot

    assert _convert(mid, back) == 0
    saved = torch.load(back, map_location="cpu", weights_only=True)
    fresh, fresh_opt = _torch_training(arch, optimizer, head_only, steps=0)
    fresh.load_state_dict(saved["model"], strict=True)
    fresh_opt.load_state_dict(saved["optimizer"])
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b) or key.endswith("num_batches_tracked"), key
    _step(model, opt)
    _step(fresh, fresh_opt)
    for (key, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), f"{key}: the resumed step differs"
    assert _files(tmp_path) == ["back.pt", "run.pt", "run.safetensors"]  # no temporary files


def _training_contents(tmp_path, optimizer="sgd") -> dict:
    model, opt = _torch_training("tinyconv", optimizer)
    torch_weights.save_training_file(tmp_path / "good.pt", model, opt)
    contents = torch.load(tmp_path / "good.pt", weights_only=True)
    (tmp_path / "good.pt").unlink()
    return contents


def _set(path: str, value):
    """A change to the file's contents at ``path`` ("a/b/0/c": nested keys)."""
    def change(contents):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        target = contents
        for key in parents:
            target = target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value(target[last]) if callable(value) else value
        return contents
    return change


MALFORMED_TRAINING = {
    "format_version": (_set("format_version", "2"), "sgd",
                       ["entry 'format_version'", "expected '1', got '2'"]),
    "unknown_arch": (_set("arch", "resnet34"), "sgd", ["meta key 'arch'", "'resnet34'"]),
    "missing_parameter": (_set("model/base.block2.conv.weight", None), "sgd",
                          ["parameter 'base.block2.conv.weight' is not a model tensor"]),
    "missing_statistic": (_set("model/base.block2.bn.running_var", None), "sgd",
                          ["missing key(s) 'base.block2.bn.running_var'"]),
    "slot_shape": (_set("optimizer/state/0/momentum_buffer", lambda v: v[:, :1]), "sgd",
                   ["slot 'momentum_buffer'", f"key '{TRAINED}'",
                    "shape expected (16, 3, 3, 3), got (16, 1, 3, 3)"]),
    "unknown_slot": (_set("optimizer/state/0/max_exp_avg_sq", torch.zeros(1)), "adam",
                     [f"optimizer state of '{TRAINED}'", "unexpected entry 'max_exp_avg_sq'"]),
    "parameter_count": (_set("parameters", lambda names: names[:-1]), "sgd",
                        ["param_groups number 11 parameters", "'parameters' names 10"]),
    "float16_slot": (_set("optimizer/state/0/momentum_buffer", lambda v: v.half()), "sgd",
                     ["slot 'momentum_buffer'", f"key '{TRAINED}'", "float16"]),
    "adam_step": (_set("optimizer/state/0/step", torch.tensor(5.0)), "adam",
                  ["optimizer state took [2, 5] steps", "'step' says 2"]),
    "kind_mismatch": (_set("optimizer_kind", "adam"), "sgd",
                      ["param_groups have no 'betas'", "'optimizer_kind' says 'adam'"]),
    "meta_not_strings": (_set("meta", {"epochs": 3}), "sgd", ["entry 'meta'", "str to str"]),
    "negative_step": (_set("step", -1), "sgd", ["step must be >= 0, got -1"]),
}


@pytest.mark.parametrize("case", list(MALFORMED_TRAINING))
def test_convert_malformed_training_file_names_the_entry(tmp_path, case):
    change, optimizer, words = MALFORMED_TRAINING[case]
    src, dst = tmp_path / "bad.pt", tmp_path / "out.safetensors"
    torch.save(change(_training_contents(tmp_path, optimizer)), src)
    with pytest.raises(CheckpointError) as info:
        _convert(src, dst)
    message = str(info.value)
    assert "\n" not in message and f"training file {src}" in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _files(tmp_path) == ["bad.pt"]


def test_read_training_file_uses_weights_only(tmp_path):
    """A training file carrying a pickled object (here a module in 'meta') is refused by
    ``torch.load(weights_only=True)``, not unpickled; convert then reads it as no training
    file, and the state_dict reader refuses it the same way."""
    contents = _training_contents(tmp_path)
    contents["meta"] = torch.nn.Linear(2, 2)
    src = tmp_path / "pickled.pt"
    torch.save(contents, src)
    with pytest.raises(CheckpointError, match="could not be read \\(torch.load, weights_only\\)"):
        torch_weights.read_training_file(src)
    assert not torch_weights.is_training_file(src)
    with pytest.raises(CheckpointError, match="could not be read as a state_dict"):
        _convert(src, tmp_path / "out.safetensors")
    assert _files(tmp_path) == ["pickled.pt"]


@pytest.fixture
def training_checkpoint(tmp_path):
    model, opt = _torch_training("tinyconv", "sgd")
    path = tmp_path / "run.safetensors"
    save_training_checkpoint(path, torch_weights.export_training_state(model, opt, np.float32),
                             {"arch": "tinyconv"})
    return path


@pytest.mark.parametrize("case, error, words", [
    ("unknown_arch", CheckpointError, ["meta key 'arch'", "'mynet'"]),
    ("missing_key", CheckpointError, ["missing key", "'base.block2.bn.running_var'"]),
    ("wrong_dst_suffix", UsageError, ["DST", "a torch training file needs suffix .pth or .pt"]),
])
def test_convert_bad_training_checkpoint_names_the_key(tmp_path, training_checkpoint, case,
                                                       error, words):
    state, meta = load_training_checkpoint(training_checkpoint)
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pt"
    if case == "unknown_arch":
        meta["arch"] = "mynet"
    elif case == "missing_key":
        del state.tensors["base.block2.bn.running_var"]
    else:
        dst = tmp_path / "out.safetensors"
    save_training_checkpoint(src, state, {k: v for k, v in meta.items() if k != "format_version"})
    training_checkpoint.unlink()
    with pytest.raises(error) as info:
        _convert(src, dst)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _files(tmp_path) == ["src.safetensors"]


def test_write_training_file_failure_leaves_no_file_and_the_old_one_intact(tmp_path, monkeypatch,
                                                                           training_checkpoint):
    """torch.save failing half-way (disk full) leaves neither a partial file nor a temporary
    one, and the file already at DST as it was."""
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"the previous file")

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a pickle")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        _convert(training_checkpoint, dst)
    assert dst.read_bytes() == b"the previous file"
    assert _files(tmp_path) == ["out.pt", "run.safetensors"]


@pytest.mark.skipif(bool(_ABSENT_COMMANDS), reason="shared.cli imports every command module")
def test_convert_cli_training_file_bad_input_exit_2_one_line(tmp_path):
    src, dst = tmp_path / "bad.pt", tmp_path / "out.safetensors"
    torch.save(_set("model/base.block2.conv.weight", None)(_training_contents(tmp_path)), src)
    done = cli("convert", src, dst, env={"FREEZE_PARITY_DEBUG": None})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "base.block2.conv.weight" in done.stderr and not dst.exists()

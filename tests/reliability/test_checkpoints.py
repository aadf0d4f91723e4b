"""Checkpoints (issue 10, item 1): atomic folders with a verified manifest, the newest N kept, fallback
past a broken checkpoint with a warning that names the file, exact resume, and no pickle ever loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dyme_core import checkpoint, cli
from dyme_core.config import load_config
from dyme_core.trainer import DymeTrainer

REPO = Path(__file__).resolve().parents[2]


def _train(tiny: dict, overrides, out: Path, *extra: str) -> DymeTrainer:
    trainer = DymeTrainer(load_config(None, overrides(out, *extra)), tiny["dataset"])
    trainer.train()
    return trainer


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight_run(tiny: dict, overrides, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of an uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(tiny, overrides, out)
    return out


@pytest.fixture(scope="module")
def straight(straight_run: Path) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted run."""
    return _weights(straight_run)


def _metrics(run: Path) -> list[dict]:
    """Per-step figures of a run dir: metrics.jsonl joined with timings.jsonl (the cache counters)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timings = [json.loads(x) for x in (run / "timings.jsonl").read_text().splitlines()]
    return [{**t, **r} for r, t in zip(rows, timings, strict=True)]


@pytest.fixture
def interrupted(tiny: dict, overrides, tmp_path: Path) -> Path:
    """The checkpoint folder of a run that stopped after step 3 of 4: checkpoint-1 and checkpoint-2 and
    checkpoint-3 written, the newest two kept (train.keep_checkpoints default)."""
    ckpts = tmp_path / "ckpt"
    cfg = load_config(None, overrides(tmp_path / "run", "train.save_steps=1", f"train.checkpoint_dir={ckpts}"))
    trainer = DymeTrainer(cfg, tiny["dataset"])
    trainer.train_step = _stop_after(trainer.train_step, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return ckpts


def _stop_after(step_fn, n: int):
    """train_step that raises (like Ctrl-C) after n steps have completed and been checkpointed."""
    done = {"n": 0}

    def step():
        if done["n"] == n:
            raise KeyboardInterrupt
        done["n"] += 1
        return step_fn()

    return step


def _resume(tiny: dict, overrides, ckpts: Path, out: Path, *extra: str) -> DymeTrainer:
    return _train(tiny, overrides, out, "train.save_steps=1", f"train.checkpoint_dir={ckpts}",
                  "train.resume_from=auto", *extra)


def test_checkpoint_folder_is_complete_and_verified(interrupted: Path) -> None:
    names = sorted(p.name for p in interrupted.iterdir())
    assert names == ["checkpoint-2", "checkpoint-3"]  # keep_checkpoints=2; no temporary folder left
    ckpt = interrupted / "checkpoint-3"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 3
    assert set(manifest["files"]) == {"model.safetensors", "state.safetensors", "trainer_state.json",
                                      "templates.json"}
    assert set(manifest["files"]) | {"manifest.json"} == {p.name for p in ckpt.iterdir()}
    for name, meta in manifest["files"].items():
        assert (ckpt / name).stat().st_size == meta["size"]
    assert checkpoint.verify_checkpoint(ckpt)["step"] == 3
    # the optimizer state is there as tensors: AdamW's moments for every trainable parameter
    tensors = load_file(ckpt / "state.safetensors")
    assert any(re.search(r"optimizer/state/\d+/exp_avg_sq$", k) for k in tensors)


def test_keep_zero_keeps_every_checkpoint(tiny: dict, overrides, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpt"
    _train(tiny, overrides, tmp_path / "run", "train.save_steps=1", f"train.checkpoint_dir={ckpts}",
           "train.keep_checkpoints=0")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_resume_is_exact(tiny: dict, overrides, interrupted: Path, tmp_path: Path, straight,
                         straight_run: Path) -> None:
    trainer = _resume(tiny, overrides, interrupted, tmp_path / "run")
    assert _equal(_weights(tmp_path / "run"), straight)
    logged = _metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and len(trainer.history) == 4
    # cumulative counters continue across the resume as in the uninterrupted run
    counters = [(m["refiner/calls"], m["checker/llm_calls"]) for m in logged]
    assert counters == [(m["refiner/calls"], m["checker/llm_calls"]) for m in _metrics(straight_run)]
    assert counters[-1][0] > 0


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# how the newest checkpoint is broken -> the file the warning must name
CORRUPTIONS = {
    "truncated model": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    "flipped byte in the optimizer state": (lambda c: _flip_byte(c / "state.safetensors"), "state.safetensors"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json"),
    "missing trainer state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json"),
    "manifest cut mid-write": (lambda c: _truncate(c / "manifest.json"), "manifest.json"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_broken_newest_checkpoint_falls_back_with_a_warning(
        tiny: dict, overrides, interrupted: Path, tmp_path: Path, straight, case: str,
        caplog: pytest.LogCaptureFixture) -> None:
    corrupt, broken_file = CORRUPTIONS[case]
    corrupt(interrupted / "checkpoint-3")
    with caplog.at_level(logging.INFO):
        _resume(tiny, overrides, interrupted, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-3" in w and broken_file in w for w in warnings), warnings
    assert any("resumed from" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)
    assert _equal(_weights(tmp_path / "run"), straight)  # the older checkpoint resumes just as exactly


def test_explicit_resume_from_a_broken_checkpoint_names_the_file(
        tiny: dict, overrides, interrupted: Path, tmp_path: Path) -> None:
    _truncate(interrupted / "checkpoint-3" / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"train.resume_from: .*checkpoint-3/model.safetensors"):
        _train(tiny, overrides, tmp_path / "run", f"train.resume_from={interrupted / 'checkpoint-3'}")


class _Planted:
    """A pickle whose loading creates a marker file (stands for any code an attacker wants run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickle_never_runs(tiny: dict, overrides, interrupted: Path, tmp_path: Path, straight,
                                   caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"optimizer": _Planted(marker)})
    # beside an intact checkpoint's files, and as a whole newer checkpoint in the old pickle layout
    (interrupted / "checkpoint-3" / "trainer_state.pt").write_bytes(payload)
    legacy = interrupted / "checkpoint-9"
    legacy.mkdir()
    (legacy / "trainer_state.pt").write_bytes(payload)
    (legacy / "model_state.pt").write_bytes(payload)
    with caplog.at_level(logging.WARNING):
        _resume(tiny, overrides, interrupted, tmp_path / "run")
    assert any("checkpoint-9" in r.getMessage() and "manifest.json" in r.getMessage() for r in caplog.records)
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json"):
        _train(tiny, overrides, tmp_path / "run2", f"train.resume_from={legacy}")
    assert not marker.exists()
    assert _equal(_weights(tmp_path / "run"), straight)


def test_no_pickle_loading_in_the_project() -> None:
    """Nothing loaded from disk executes code: no torch.load without weights_only, no pickle."""
    offenders = []
    for path in [*REPO.glob("dyme_core/**/*.py"), *REPO.glob("components/**/*.py"), *REPO.glob("pipelines/**/*.py"),
                 *REPO.glob("bench/**/*.py")]:
        text = path.read_text()
        if "weights_only=False" in text or re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M):
            offenders.append(str(path.relative_to(REPO)))
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: torch.load({call})")
    assert not offenders


def test_state_flattening_round_trips_an_optimizer() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    doc = json.loads(json.dumps(checkpoint.flatten_state(opt.state_dict(), "opt", tensors)))
    restored = checkpoint.unflatten_state(doc, tensors)
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]  # int keys, tuples (betas) kept
    assert restored["state"].keys() == original["state"].keys()
    for i, s in original["state"].items():
        assert all(torch.equal(s[k], restored["state"][i][k]) for k in s)


def test_cli_resume_from_a_missing_checkpoint_is_one_line(tiny: dict, overrides, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere" / "checkpoint-7"
    assert cli.main(["train", *overrides(tmp_path / "run", f"train.resume_from={missing}")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dyme train: error: train.resume_from: no checkpoint folder at {missing}"
    assert not (tmp_path / "run").exists()


def test_auto_refuses_a_checkpoint_of_other_settings(tiny: dict, overrides, interrupted: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A shared checkpoint_dir may hold another run's checkpoints: `auto` does not mix them into this run
    (max_steps may grow), an explicit path resumes them with a warning naming what changed."""
    with pytest.raises(checkpoint.CheckpointError, match=r"other settings \(train.learning_rate: 0.001 -> 0.0005"):
        _resume(tiny, overrides, interrupted, tmp_path / "run", "train.learning_rate=5e-4")
    _resume(tiny, overrides, interrupted, tmp_path / "longer", "train.max_steps=5")  # training longer is fine
    with caplog.at_level(logging.WARNING):
        _train(tiny, overrides, tmp_path / "explicit", "train.learning_rate=5e-4",
               f"train.resume_from={interrupted / 'checkpoint-3'}")
    assert any("train.learning_rate: 0.001 -> 0.0005" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- crafted checkpoints (issue 22, item 2)
# Each case rewrites a file of the newest checkpoint and then re-hashes the manifest, as someone who wants a
# bad file loaded would: the sha256 check passes, so only validating what the files hold catches it.
def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _edit_header(name: str, edit) -> callable:
    def craft(ckpt: Path) -> None:
        header, data = _split(ckpt / name)
        result = edit(header, data)
        _join(ckpt / name, *(result if isinstance(result, tuple) else (header, data)))
    return craft


def _first_tensor(header: dict, ndim: int = 2) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == ndim)


def _swap_shape(header: dict, data: bytes) -> None:  # same bytes, other shape: only the model can tell
    entry = header[next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2
                        and v["shape"][0] != v["shape"][1])]
    entry["shape"] = entry["shape"][::-1]


def _overlap(header: dict, data: bytes) -> None:  # a later tensor moved onto the first bytes
    entry = next(v for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] > 0)
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [0, end - begin]


def _state_doc(edit) -> callable:
    def craft(ckpt: Path) -> None:
        path = ckpt / "trainer_state.json"
        doc = json.loads(path.read_text())
        edit(doc["state"]["__dict__"])
        path.write_text(json.dumps(doc))
    return craft


def _pair(pairs: list, key: str) -> list:
    return next(p for p in pairs if p[0] == key)


def _drop_key(key: str):
    return _state_doc(lambda pairs: pairs.remove(_pair(pairs, key)))


def _set_key(key: str, value):
    return _state_doc(lambda pairs: _pair(pairs, key).__setitem__(1, value))


def _optimizer_pairs(pairs: list) -> list:
    return _pair(pairs, "optimizer")[1]["__dict__"]


def _trim_param_groups(pairs: list) -> None:
    groups = _pair(_optimizer_pairs(pairs), "param_groups")[1]
    params = _pair(groups[0]["__dict__"], "params")[1]
    params.pop()


def _moment_of_other_shape(ckpt: Path) -> None:  # exp_avg of a 2-D parameter stored with its shape transposed
    header, data = _split(ckpt / "state.safetensors")
    name = next(k for k, v in header.items() if k.endswith("/exp_avg") and len(v["shape"]) == 2
                and v["shape"][0] != v["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]
    _join(ckpt / "state.safetensors", header, data)


def _templates(edit) -> callable:
    def craft(ckpt: Path) -> None:
        pool = json.loads((ckpt / "templates.json").read_text())
        edit(pool)
        (ckpt / "templates.json").write_text(json.dumps(pool))
    return craft


M, S, J, T = "model.safetensors", "state.safetensors", "trainer_state.json", "templates.json"
# case -> (craft, the file the message names, whether telling it apart needs the model)
CRAFTED = {
    "model header size past the limit": (
        lambda c: (c / M).write_bytes((200_000_000).to_bytes(8, "little") + (c / M).read_bytes()[8:]), M, False),
    "model header size past the file end": (
        lambda c: (c / M).write_bytes(((c / M).stat().st_size).to_bytes(8, "little") + (c / M).read_bytes()[8:]),
        M, False),
    "model header not JSON": (_edit_header(M, lambda h, d: (b"{not json" + b" " * 8, d)), M, False),
    "model header a JSON list": (_edit_header(M, lambda h, d: (b"[]", d)), M, False),
    "model data not fully covered": (_edit_header(M, lambda h, d: (h, d + b"\0" * 64)), M, False),
    "model data cut short": (_edit_header(M, lambda h, d: (h, d[:-64])), M, False),
    "model offsets overlap": (_edit_header(M, _overlap), M, False),
    "model offsets of the wrong size": (_edit_header(M, lambda h, d: h[_first_tensor(h)]["shape"].__setitem__(
        0, h[_first_tensor(h)]["shape"][0] + 1)), M, False),
    "model unknown dtype": (_edit_header(M, lambda h, d: h[_first_tensor(h)].__setitem__("dtype", "F128")), M, False),
    "model metadata not strings": (_edit_header(M, lambda h, d: h.__setitem__("__metadata__", {"format": 1})),
                                   M, False),
    "model tensor of the wrong shape": (_edit_header(M, _swap_shape), M, True),
    "model tensor the model does not have": (_edit_header(M, lambda h, d: h.__setitem__(
        "lm_head.extra", h.pop(_first_tensor(h)))), M, True),
    "state header size past the limit": (
        lambda c: (c / S).write_bytes((2**63).to_bytes(8, "little") + (c / S).read_bytes()[8:]), S, False),
    "state data not fully covered": (_edit_header(S, lambda h, d: (h, d + b"\0" * 8)), S, False),
    "trainer state not JSON": (lambda c: (c / J).write_text("{'step': 3"), J, False),
    "trainer state of another format": (
        lambda c: (c / J).write_text(json.dumps({**json.loads((c / J).read_text()), "format": 9})), J, False),
    "trainer state without step": (_drop_key("step"), J, False),
    "trainer state step a string": (_set_key("step", "3"), J, False),
    "trainer state history a number": (_set_key("history", 7), J, False),
    "trainer state refers to a missing tensor": (_set_key("rng", {"__dict__": [["cpu", {"__tensor__": "nope"}]]}),
                                                 J, False),
    "trainer state with an unknown tagged object": (_set_key("scheduler", {"__pickle__": "gASV"}), J, False),
    "trainer state rng of the wrong size": (
        _set_key("rng", {"__dict__": [["cpu", {"__tensor__": "state/optimizer/state/0/step"}]]}), J, False),
    "trainer state with an unknown counter": (_set_key("checker_stats", {"__dict__": [["calls", 0], ["fallbacks", 0],
                                                                                      ["_lock", 1]]}), J, False),
    "optimizer groups missing a parameter": (_state_doc(_trim_param_groups), J, True),
    "optimizer moment of another shape": (_moment_of_other_shape, J, True),
    "templates without best": (_templates(lambda p: p.pop("best")), T, False),
    "templates best names no template": (_templates(lambda p: p.__setitem__("best", 99)), T, False),
}


def _rehash(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def pristine(tiny: dict, overrides, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint-2 and checkpoint-3 of a run stopped after step 3, kept to be copied by each case."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = load_config(None, overrides(root / "run", "train.save_steps=1", f"train.checkpoint_dir={root / 'ckpt'}"))
    trainer = DymeTrainer(cfg, tiny["dataset"])
    trainer.train_step = _stop_after(trainer.train_step, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return root / "ckpt"


@pytest.fixture(scope="module")
def tiny_model(tiny: dict):
    from dyme_core.models import load_model

    return load_model(load_config(None, [f"model.name_or_path={tiny['model']}"]).model, "cpu")


def _crafted(pristine: Path, tmp_path: Path, case: str) -> Path:
    ckpts = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpts)
    CRAFTED[case][0](ckpts / "checkpoint-3")
    _rehash(ckpts / "checkpoint-3")
    return ckpts


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoint_is_skipped_with_one_warning(pristine: Path, tiny_model, tmp_path: Path, case: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ckpts = _crafted(pristine, tmp_path, case)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        chosen = checkpoint.choose_checkpoint(ckpts, tiny_model)
    assert chosen == ckpts / "checkpoint-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "checkpoint-3" in warnings[0] and CRAFTED[case][1] in warnings[0], warnings
    # the manifest alone passes: the sha256 were re-hashed
    assert (ckpts / "checkpoint-3" / "manifest.json").is_file()
    if not CRAFTED[case][2]:  # caught without the model too (what the trainer's auto resume checks today)
        assert checkpoint.choose_checkpoint(ckpts) == ckpts / "checkpoint-2"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(CRAFTED[case][1])):
        checkpoint.read_checkpoint(ckpts / "checkpoint-3", tiny_model)
    assert _equal(tiny_model.state_dict(), before)  # refused before a single weight was copied


@pytest.mark.parametrize("case", list(CRAFTED))
def test_explicit_resume_from_a_crafted_checkpoint_is_one_line(
        tiny: dict, overrides, pristine: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    ckpts = _crafted(pristine, tmp_path, case)
    rc = cli.main(["train", *overrides(tmp_path / "run", f"train.resume_from={ckpts / 'checkpoint-3'}")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert err.startswith("dyme train: error: train.resume_from: ") and CRAFTED[case][1] in err


@pytest.mark.parametrize("case", ["model header size past the limit", "model data not fully covered",
                                  "state header size past the limit", "trainer state without step",
                                  "templates without best"])
def test_auto_resume_falls_back_past_a_crafted_checkpoint_exactly(
        tiny: dict, overrides, pristine: Path, tmp_path: Path, straight, case: str,
        caplog: pytest.LogCaptureFixture) -> None:
    ckpts = _crafted(pristine, tmp_path, case)
    with caplog.at_level(logging.INFO):
        _resume(tiny, overrides, ckpts, tmp_path / "run")
    assert any("resumed from" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)
    assert _equal(_weights(tmp_path / "run"), straight)


@pytest.mark.parametrize("case", [c for c, (_, _, needs_model) in CRAFTED.items() if needs_model])
def test_auto_resume_falls_back_past_a_checkpoint_of_other_shapes(
        tiny: dict, overrides, pristine: Path, tmp_path: Path, straight, case: str) -> None:
    ckpts = _crafted(pristine, tmp_path, case)
    _resume(tiny, overrides, ckpts, tmp_path / "run")
    assert _equal(_weights(tmp_path / "run"), straight)

"""Artifacts (steer/core/artifacts.py): every kind of file steer writes (expert set, responses, stream
state, checkpoint, study embedding cache) round-trips; refuses a corrupt, truncated, newer-format
or other-shape file with a ValueError naming the file; and a SIGKILL during a save leaves the
previous file or directory intact.

The SIGKILL tests fork a child that saves over an existing artifact with a patched writer: it
stops half-way through writing the temporary file ("write") or just before the rename that
commits it ("commit"), tells the parent through a pipe, and is SIGKILLed there.
"""
import json
import os
import re
import select
import signal
import time

import pytest
import safetensors.torch
import torch

from steer.core import artifacts
from steer.engine.collect import CHECKPOINT_FORMAT, load_checkpoint
from steer.core.scores import Responses
from steer.core.experts import FILES, FORMAT_VERSION, ExpertSet
from steer.core.stream import VERSION as STREAM_VERSION
from steer.core.stream import StreamState, calibrate_edges
from steer.experiments.study.cache import CACHE_VERSION, load_embedding_cache, save_embedding_cache
from tiny import tiny_model

LAYERS, WIDTH = 2, 48  # tiny_model("llama")
PLAN = {"batch_size": 2, "window": 8}


# --- the five kinds: make / save / load / compare ------------------------------------------------

class Experts:
    name, is_dir, kind, version = "experts", True, "experts", FORMAT_VERSION

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        experts = {}
        for c in ("en", "fr"):
            idx = torch.randperm(LAYERS * WIDTH, generator=g)[:4]
            experts[c] = {"layer": idx // WIDTH, "unit": idx % WIDTH, "value": torch.randn(4, generator=g),
                          "score": torch.rand(4, generator=g, dtype=torch.float64),
                          "other": torch.rand(4, generator=g, dtype=torch.float64),
                          "sign": torch.ones(4, dtype=torch.int8)}
        meta = {"format_version": FORMAT_VERSION, "model": "tiny", "fingerprint": f"fp{seed}",
                "architecture": "LlamaForCausalLM", "layers": LAYERS, "width": WIDTH, "selection": {"k": 4}}
        return ExpertSet(experts, meta)

    def target(self, d):
        return d / "experts"

    def tensor_file(self, path):
        return path / FILES[1]

    def save(self, obj, path):
        obj.save(path)

    def load(self, path):
        return ExpertSet.load(path)

    def same(self, a, b):
        return a.meta == b.meta and a.concepts == b.concepts and all(
            torch.equal(a.experts[c][f], b.experts[c][f]) for c in a.concepts for f in a.experts[c])

    def load_other_shape(self, path):
        ExpertSet.load(path, model=tiny_model("bloom"))  # 2 x 128 neurons

    def bump(self, path):
        _bump(self.tensor_file(path), self.kind, self.version)
        manifest = json.loads((path / FILES[0]).read_text())
        (path / FILES[0]).write_text(json.dumps({**manifest, "format_version": self.version + 1}))


class ResponsesKind:
    name, is_dir, kind, version = "responses", False, "responses", 1

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        return Responses(torch.randn(12, LAYERS, 8, generator=g), torch.arange(12) % 3, ["a", "b", "c"],
                         [f"s{i}" for i in range(12)], {"layers": LAYERS, "width": 8, "seed": seed})

    def target(self, d):
        return d / "responses.safetensors"

    def tensor_file(self, path):
        return path

    def save(self, obj, path):
        obj.save(path)

    def load(self, path):
        return Responses.load(path)

    def same(self, a, b):
        return (torch.equal(a.values, b.values) and torch.equal(a.label_ids, b.label_ids)
                and (a.label_names, a.keys, a.settings) == (b.label_names, b.keys, b.settings))

    def load_other_shape(self, path):
        Responses.load(path, shape=(LAYERS, 16))

    def bump(self, path):
        _bump(path, self.kind, self.version)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=g)
    labels = torch.arange(40) % 2
    settings = {"model": "tiny", "architecture": "LlamaForCausalLM", "fingerprint": "fp", "layers": 2,
                "width": 3, "bins": 8, "corpus_hash": "h", "sentences": 40, "seed": seed}
    state = StreamState(calibrate_edges(x, bins=8), ["a", "b"], settings)
    state.update(x, labels)
    return state


def _same_state(a, b):
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in a._tensors()) and \
        (a.label_names, a.settings) == (b.label_names, b.settings)


class Stream:
    name, is_dir, kind, version = "stream", False, "stream", STREAM_VERSION

    def make(self, seed):
        return _state(seed)

    def target(self, d):
        return d / "state.safetensors"

    def tensor_file(self, path):
        return path

    def save(self, obj, path):
        obj.save(path)

    def load(self, path):
        return StreamState.load(path)

    def same(self, a, b):
        return _same_state(a, b)

    def load_other_shape(self, path):
        StreamState.load(path, neurons=7)

    def bump(self, path):
        _bump(path, self.kind, self.version)


class _Sites:
    """What `load_checkpoint` reads of the model: its device, and whether it has the weights a
    checkpoint's settings name (here: the same fingerprint)."""
    device = "cpu"

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def same_weights(self, recorded: dict) -> bool:
        return recorded.get("fingerprint") == self.fingerprint


class Checkpoint(Stream):
    name = "checkpoint"

    def make(self, seed):
        return _state(seed), {"format": CHECKPOINT_FORMAT, "position": 3 + seed, "plan": PLAN,
                              "tokens": 10, "truncated": 0, "seconds": 1.0, "world": 1}

    def target(self, d):
        return d / "checkpoint.safetensors"

    def save(self, obj, path):
        obj[0].save(path, obj[1])

    def load(self, path, settings=None):
        state = StreamState.load(path)  # only for its settings and labels
        settings = settings or state.settings
        return load_checkpoint(path, _Sites(settings["fingerprint"]), settings, PLAN, state.label_names)

    def same(self, a, b):
        return _same_state(a[0], b[0]) and a[1] == b[1]

    def load_other_shape(self, path):  # another model: 2 x 4 neurons
        state = StreamState.load(path)
        self.load(path, {**state.settings, "fingerprint": "other", "width": 4})


class Cache:
    name, is_dir, kind, version = "cache", False, "embeddings", CACHE_VERSION
    meta = {"fingerprint": "fp", "skip_bos": True, "layers": [0, 2]}

    def make(self, seed):
        g = torch.Generator().manual_seed(seed)
        texts = ["Bonjour.", "Hello, world.", "", "Grüß Gott\n— ünïcödé", f"seed {seed}"]
        return {t: torch.randn(2, 5, generator=g) for t in texts}

    def target(self, d):
        return d / "fp-abc-base.safetensors"

    def tensor_file(self, path):
        return path

    def save(self, obj, path):
        save_embedding_cache(path, obj, self.meta)

    def load(self, path):
        return load_embedding_cache(path, self.meta)

    def same(self, a, b):
        return list(a) == list(b) and all(torch.equal(a[t], b[t]) for t in a)

    def load_other_shape(self, path):
        load_embedding_cache(path, {**self.meta, "layers": [0, 1, 2]})

    def bump(self, path):
        _bump(path, self.kind, self.version)


KINDS = [Experts(), ResponsesKind(), Stream(), Checkpoint(), Cache()]
IDS = [k.name for k in KINDS]


def _bump(path, kind, version):
    """Rewrite a steer.<kind> file as format version + 1 (a file of a newer steer)."""
    a = artifacts.load(path, kind=kind, version=version)
    artifacts.save(path, a.tensors, a.meta, kind=kind, version=version + 1)


def _named(path) -> str:
    return re.escape(str(path))


@pytest.fixture(params=KINDS, ids=IDS)
def kind(request):
    return request.param


@pytest.fixture
def saved(kind, tmp_path):
    obj, path = kind.make(0), kind.target(tmp_path)
    kind.save(obj, path)
    return kind, obj, path


# --- round trip and refusals ---------------------------------------------------------------------

def test_round_trip(saved):
    kind, obj, path = saved
    assert kind.same(kind.load(path), obj)
    kind.save(kind.make(1), path)  # over an existing one
    assert kind.same(kind.load(path), kind.make(1)) and not kind.same(kind.load(path), obj)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


def test_flipped_byte_is_a_hash_error(saved):
    kind, _, path = saved
    f = kind.tensor_file(path)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=_named(f) + r" is corrupt: its tensors or metadata do not match the sha256"):
        kind.load(path)


def test_truncated_file(saved):
    kind, _, path = saved
    f = kind.tensor_file(path)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match=_named(f) + " is corrupt or truncated"):
        kind.load(path)
    f.write_bytes(b"\x01\x00")  # not even a header
    with pytest.raises(ValueError, match=_named(f) + " is corrupt or truncated"):
        kind.load(path)


def test_newer_format_is_refused(saved):
    kind, _, path = saved
    kind.bump(path)
    where = path / FILES[0] if kind.is_dir else path
    with pytest.raises(ValueError, match=_named(where) + r" was written by a newer steer: .*format "
                       f"{kind.version + 1}, this steer reads up to format {kind.version}"):
        kind.load(path)


def test_other_shape_is_refused(saved):
    kind, _, path = saved
    with pytest.raises(ValueError, match=_named(path)):
        kind.load_other_shape(path)


def test_missing_file(kind, tmp_path):
    with pytest.raises(FileNotFoundError, match=_named(kind.target(tmp_path))):
        kind.load(kind.target(tmp_path))


def test_other_kind_is_refused(tmp_path):
    _state(0).save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match=_named(tmp_path / "state.safetensors") +
                       r" is not a steer.responses file \(its format is 'steer.stream'\)"):
        Responses.load(tmp_path / "state.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"is not a steer.embeddings file \(its format is None\)"):
        load_embedding_cache(tmp_path / "plain.safetensors", Cache.meta)


def test_edited_metadata_is_a_hash_error(tmp_path):
    path = artifacts.save(tmp_path / "x.safetensors", {"t": torch.ones(3)}, {"label": "abc"}, kind="x", version=1)
    data = path.read_bytes()
    assert data.count(b"abc") == 1
    path.write_bytes(data.replace(b"abc", b"abd"))  # still valid JSON, same length
    with pytest.raises(ValueError, match="is corrupt: its tensors or metadata do not match"):
        artifacts.load(path, kind="x", version=1)


def test_checkpoint_of_a_newer_checkpoint_format_or_a_plain_state(tmp_path):
    state, extra = Checkpoint().make(0)
    path = tmp_path / "checkpoint.safetensors"
    state.save(path, {**extra, "format": "steer.checkpoint/2"})
    with pytest.raises(ValueError, match=_named(path) + " was written by a newer steer: steer.checkpoint format 2"):
        Checkpoint().load(path)
    state.save(path)
    with pytest.raises(ValueError, match="is a streaming state, not a checkpoint"):
        Checkpoint().load(path)


def test_same_shape_other_weights_is_a_warning(tmp_path):
    d = Experts().make(0).save(tmp_path / "experts")  # fingerprint "fp0": not the tiny model's
    with pytest.warns(UserWarning, match="same shapes but other weights"):
        ExpertSet.load(d, model=tiny_model("llama"))


def test_expert_set_json_must_match_its_tensors(tmp_path):
    d = Experts().make(0).save(tmp_path / "experts")
    meta = json.loads((d / FILES[0]).read_text())
    (d / FILES[0]).write_text(json.dumps({**meta, "model": "edited"}))
    with pytest.raises(ValueError, match=_named(d / FILES[0]) + " does not match the metadata of"):
        ExpertSet.load(d)


def test_expert_set_never_replaces_a_directory_of_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace .*mine: it holds files other than"):
        Experts().make(0).save(tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["mine"]


# --- files of the formats before artifacts.py are still read -------------------------------------

def test_reads_earlier_formats(tmp_path):
    state = _state(0)
    tensors = {k: t.contiguous() for k, t in state._tensors().items()}
    old = {"format": "steer.stream/1", "label_names": json.dumps(state.label_names),
           "settings": json.dumps(state.settings, sort_keys=True), "extra": json.dumps({"position": 2}),
           "sha256": state.digest()}
    safetensors.torch.save_file(tensors, str(tmp_path / "s1.safetensors"), old)
    back, extra = StreamState.load(tmp_path / "s1.safetensors", with_extra=True)
    assert _same_state(back, state) and extra == {"position": 2}
    data = bytearray((tmp_path / "s1.safetensors").read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "s1.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt: its tensors or metadata do not match the sha256"):
        StreamState.load(tmp_path / "s1.safetensors")

    r = ResponsesKind().make(0)
    safetensors.torch.save_file({"values": r.values, "label_ids": r.label_ids}, str(tmp_path / "r0.safetensors"),
                                {"steer": json.dumps({"label_names": r.label_names, "keys": r.keys,
                                                      "settings": r.settings})})
    assert ResponsesKind().same(Responses.load(tmp_path / "r0.safetensors"), r)

    e = Experts().make(0)
    d = tmp_path / "e1"
    d.mkdir()
    safetensors.torch.save_file({f"{c}/{f}": t for c in e.concepts for f, t in e.experts[c].items()},
                                str(d / FILES[1]))
    (d / FILES[0]).write_text(json.dumps({**e.meta, "format_version": 1, "concepts": e.concepts}))
    back = ExpertSet.load(d)
    assert back.meta["format_version"] == 1 and back.rows("fr") == e.rows("fr")


# --- SIGKILL during a save -----------------------------------------------------------------------

def _killed_while_saving(save, stop_in: str) -> None:
    """Fork a child that runs `save()` with `stop_in` ("write", "replace", "exchange") patched to
    stop there; SIGKILL it once it has stopped."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)

            def stop(*_, **__):
                os.write(w, b"x")
                time.sleep(60)

            if stop_in == "write":  # half the bytes of the temporary file are on disk
                def half(tensors, filename, metadata=None):
                    data = safetensors.torch.save(tensors, metadata)
                    with open(filename, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                    stop()
                artifacts.save_file = half
            elif stop_in == "replace":  # the temporary file is complete, not yet renamed
                os.replace = stop
            else:  # the temporary directory is complete, not yet swapped in
                artifacts._exchange = stop
            save()
        finally:
            os._exit(1)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 20)
        assert ready and os.read(r, 1) == b"x", "the save failed before reaching the kill point"
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("point", ["write", "commit"])
def test_sigkill_during_a_save_leaves_the_previous_artifact(saved, point):
    kind, obj, path = saved
    before = {p.name: p.read_bytes() for p in ([*path.iterdir()] if kind.is_dir else [path])}
    stop_in = "write" if point == "write" else ("exchange" if kind.is_dir else "replace")
    new = kind.make(1)  # made here: torch's thread pool does not survive a fork
    _killed_while_saving(lambda: kind.save(new, path), stop_in)
    stray = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert len(stray) == 1 and stray[0].startswith(f".{path.name}."), stray  # the killed save's temporary
    assert {p.name: p.read_bytes() for p in ([*path.iterdir()] if kind.is_dir else [path])} == before
    assert kind.same(kind.load(path), obj)
    kind.save(kind.make(2), path)  # the next save succeeds and removes the dead process's temporary
    assert kind.same(kind.load(path), kind.make(2))
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_directory_without_rename_exchange(tmp_path, monkeypatch):
    """Where the swap is unavailable: old aside, new in, old removed; a SIGKILL between the two
    renames leaves the previous set complete under a name that `load` gives."""
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    kind, d = Experts(), tmp_path / "experts"
    kind.save(kind.make(0), d)
    kind.save(kind.make(1), d)
    assert kind.same(kind.load(d), kind.make(1)) and os.listdir(tmp_path) == ["experts"]

    new = kind.make(2)

    def save_then_stop():
        real = os.rename

        def rename(a, b):
            real(a, b)
            if str(b).endswith(".old"):
                os.write(w, b"x")
                time.sleep(60)
        os.rename = rename
        kind.save(new, d)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            save_then_stop()
        finally:
            os._exit(1)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 20)
        assert ready and os.read(r, 1) == b"x"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    aside = artifacts.moved_aside(d)
    assert len(aside) == 1 and kind.same(ExpertSet.load(aside[0]), kind.make(1))
    with pytest.raises(FileNotFoundError, match="moving the previous expert set aside to " + _named(aside[0])):
        ExpertSet.load(d)

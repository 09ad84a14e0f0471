"""ctxmem._checkpoint: the folder format the reader and the compressor share (safetensors + JSON
with the weights' sha256). Each bad folder gets its own error, and nothing is read past one."""
import json

import pytest
import torch

from ctxmem._checkpoint import CheckpointKind


class BadCheckpoint(ValueError):
    pass


@pytest.fixture
def kind(tmp_path):
    bundled = tmp_path / "bundled"
    (bundled / "tiny").mkdir(parents=True)
    k = CheckpointKind("thing", "ctxmem-thing", 1, bundled, BadCheckpoint)
    k.write(bundled / "tiny", {"w": torch.ones(2)}, {"a": 1}, {"note": "shipped"})
    return k


def test_write_read_roundtrip(kind, tmp_path):
    t = {"a.b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "c": torch.zeros(1)}
    path = kind.write(tmp_path / "ck", t, {"r": 8}, {"steps": 3}, weights_info={"dtype": "float16"})
    doc, state, where = kind.read(path)
    assert where == path and doc["config"] == {"r": 8} and doc["meta"] == {"steps": 3}
    assert doc["weights"]["dtype"] == "float16" and set(state) == set(t)
    assert all(torch.equal(state[k], t[k]) for k in t)
    # a bundled name resolves; an unknown one lists what is bundled
    assert kind.read("tiny")[0]["meta"] == {"note": "shipped"}
    with pytest.raises(BadCheckpoint, match=r"no thing at 'nope'.*bundled: tiny"):
        kind.read("nope")


@pytest.mark.parametrize("damage,message", [
    (lambda d: d.update(kind="ctxmem-other"), r"not a ctxmem thing config \(kind='ctxmem-other'\)"),
    (lambda d: d.update(format=2), "thing format 2, this ctxmem reads format 1"),
    (lambda d: d.update(weights={"file": "thing.safetensors"}), "must name a file and its sha256"),
    (lambda d: d["weights"].update(sha256="0" * 64), "checksum mismatch"),
    (lambda d: d["weights"].update(file="gone.safetensors"), "cannot read thing weights"),
])
def test_damaged_folders_are_refused(kind, tmp_path, damage, message):
    path = kind.write(tmp_path / "ck", {"w": torch.ones(3)}, {}, {})
    doc = json.loads((path / "thing.json").read_text())
    damage(doc)
    (path / "thing.json").write_text(json.dumps(doc))
    with pytest.raises(BadCheckpoint, match=message):
        kind.read(path)


def test_unreadable_json(kind, tmp_path):
    path = kind.write(tmp_path / "ck", {"w": torch.ones(3)}, {}, {})
    (path / "thing.json").write_text("{not json")
    with pytest.raises(BadCheckpoint, match="unreadable thing config"):
        kind.read(path)

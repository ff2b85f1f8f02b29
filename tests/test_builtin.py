"""Builtin datasets: made by code, identical wherever they are made, and made once per machine with a cache."""

from __future__ import annotations

import pytest

from vlmtrain.data import builtin


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cache_makes_once_and_copies_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTRAIN_BUILTIN_CACHE", str(tmp_path / "cache"))
    first = builtin.prepare_builtin("digits-eval", tmp_path / "a")
    assert first == tmp_path / "a" / "digits-eval"
    entries = list((tmp_path / "cache").iterdir())
    assert [e.name.rsplit("-", 1)[0] for e in entries] == ["digits-eval"]

    def no_making(*_a, **_k):
        raise AssertionError("made again although the cache holds it")

    monkeypatch.setattr(builtin, "_make_builtin", no_making)
    second = builtin.prepare_builtin("digits-eval", tmp_path / "b")
    assert second == tmp_path / "b" / "digits-eval"
    assert _bytes(second) == _bytes(first) == _bytes(entries[0] / "digits-eval")
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_cache_is_keyed_by_the_code_that_makes_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTRAIN_BUILTIN_CACHE", str(tmp_path / "cache"))
    builtin.prepare_builtin("digits-eval", tmp_path / "a")
    before = builtin._maker_fingerprint()
    monkeypatch.setattr(builtin, "_maker_fingerprint", lambda: "changed-code")
    made = []
    real = builtin._make_builtin
    monkeypatch.setattr(builtin, "_make_builtin", lambda name, root, makers=None: made.append(name) or real(name, root, makers))
    builtin.prepare_builtin("digits-eval", tmp_path / "b")
    assert made == ["digits-eval"]
    names = {p.name for p in (tmp_path / "cache").iterdir()}
    assert names == {f"digits-eval-{before}", "digits-eval-changed-code"}


def test_half_copied_cache_entry_is_not_used(tmp_path, monkeypatch):
    """A copy killed midway has no manifest under the final name: the dataset is made again, not half-used."""
    monkeypatch.setenv("VLMTRAIN_BUILTIN_CACHE", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / f"digits-eval-{builtin._maker_fingerprint()}"
    (entry / "digits-eval").mkdir(parents=True)
    (entry / "digits-eval" / "shard-000000.tar").write_bytes(b"torn")
    out = builtin.prepare_builtin("digits-eval", tmp_path / "a")
    assert builtin._complete(entry / "digits-eval") and _bytes(entry / "digits-eval") == _bytes(out)


def test_a_copy_leaves_the_companion_folders_and_prerequisites_making_would_leave(tmp_path, monkeypatch):
    """medical-samples leaves its -src set and privacy_report.json beside its shards, and the cohorts are made from
    it: a cache copy of a cohort leaves the same folders in the run's data folder as making it does."""
    import json

    made = []

    def fake_make(name, root, makers=None):
        made.append(name)
        for folder in [name, *([f"{name}-src"] if name == "base" else [])]:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / "manifest.json").write_text(json.dumps({"samples": 1, "of": folder}))
        return root / name

    monkeypatch.setenv("VLMTRAIN_BUILTIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "_make_builtin", fake_make)
    monkeypatch.setitem(builtin._COMPANIONS, "base", ("-src",))
    monkeypatch.setitem(builtin._PREREQUISITES, "derived", ("base",))
    builtin.prepare_builtin("derived", tmp_path / "a")
    assert made == ["base", "derived"]
    builtin.prepare_builtin("derived", tmp_path / "b")
    assert made == ["base", "derived"]  # the second run copies
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["base", "base-src", "derived"]
    assert all(_bytes(tmp_path / "a" / f) == _bytes(tmp_path / "b" / f) for f in ("base", "base-src", "derived"))


def test_unknown_builtin_is_refused_by_name(tmp_path):
    with pytest.raises(builtin.VlmtrainError, match="unknown builtin dataset 'nope'"):
        builtin.prepare_builtin("nope", tmp_path)


def test_the_medical_builtins_are_offered_by_train_sources_with_the_same_error(tmp_path, monkeypatch):
    """data makes the digits sets; the gated medical sets come from `train.sources` (privacy sits above data), and an
    unknown name there lists every builtin, medical ones included, as before the split. (No cache here: a cached
    medical set is copied by data alone, as any cache entry is.)"""
    from vlmtrain.train import sources

    monkeypatch.delenv("VLMTRAIN_BUILTIN_CACHE", raising=False)

    with pytest.raises(builtin.VlmtrainError) as e:
        sources.prepare_builtin("nope", tmp_path)
    assert str(e.value) == ("data: unknown builtin dataset 'nope' (choose from: digits-captions, digits-qa, "
                            "digits-pref, digits-eval, medical-samples, medical-cohort, medical-cohort-holdout, "
                            "medical-cohort-public)")
    with pytest.raises(builtin.VlmtrainError, match="choose from: digits-captions, digits-qa, digits-pref, "
                                                   "digits-eval\)"):
        builtin.prepare_builtin("medical-samples", tmp_path)

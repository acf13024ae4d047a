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


class NanLoss(tasks.Classification):
    """Finite inputs, a loss that is NaN for the examples whose first input is -1."""

    def train_loss(self, model, batch, sample=None):
        loss = super().train_loss(model, batch, sample)
        return torch.where(batch["x"][:, 0] == -1, torch.nan, loss)


def test_nan_input_or_loss_names_the_example():
    model, train, _ = digits_mlp()
    broken = list(train)
    broken[37] = (torch.full_like(train[37][0], float("nan")), train[37][1])
    an = mlp_analysis(train=broken, estimator="kfac", batch_size=16)
    with pytest.raises(InfkitError, match="train example 37 has non-finite values .* in its input 'x'"):
        an.fit()

    flagged = list(train)
    flagged[21] = (train[21][0].clone().index_fill_(0, torch.tensor([0]), -1.0), train[21][1])
    an = Analysis(model, NanLoss(), flagged, estimator="kfac", batch_size=16, progress=False)
    with pytest.raises(InfkitError, match="the loss of train example 21 is nan"):
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


def test_unknown_fisher():
    with pytest.raises(InfkitError, match="fisher='true'"):
        mlp_analysis(fisher="true")


@pytest.mark.parametrize("damping, message", [
    (-1.0, "damping=-1.0: damping must be a finite number >= 0"),
    (float("nan"), "damping=nan: damping must be a finite number >= 0"),
    (float("inf"), "damping=inf: damping must be a finite number >= 0"),
    ("0.1", "damping='0.1' is not a number"),
    (True, "damping=True is not a number"),
    ({"2": -0.5}, r"damping\['2'\]=-0.5: damping must be a finite number >= 0"),
    ({"decoder": 0.1}, r"damping names layers that are not tracked: \['decoder'\]; the tracked layers are: 0, 2"),
])
def test_bad_damping_is_refused_at_construction_not_minutes_into_fit(damping, message):
    with pytest.raises(InfkitError, match=message):
        mlp_analysis(estimator="kfac", damping=damping)


def test_a_misspelled_estimator_option_lists_the_valid_ones():
    with pytest.raises(InfkitError, match="'exact' estimator has no option 'block_diagnoal'; its options are: "
                                          "block_diagonal, max_params"):
        mlp_analysis(estimator="exact", block_diagnoal=True)
    with pytest.raises(InfkitError, match="'ekfac' estimator has no option 'depth'; its options are: max_factor_dim"):
        mlp_analysis(depth=3)


def test_numpy_scalars_are_accepted_everywhere_and_saved(tmp_path):
    import numpy as np

    an = mlp_analysis(estimator="lissa", damping=np.float64(0.01), batch_size=np.int64(16), seed=np.int32(3),
                      depth=np.int64(20), memory_budget=np.int64(1 << 30))
    expected = mlp_analysis(estimator="lissa", damping=0.01, batch_size=16, seed=3, depth=20).fit()
    an.fit()
    _, _, query = digits_mlp()
    assert torch.equal(an.scores(query, query_rank=np.int64(4)).scores, expected.scores(query, query_rank=4).scores)
    an.save(tmp_path / "saved")  # JSON would refuse a numpy scalar
    model, train, _ = digits_mlp()
    loaded = Analysis.load(tmp_path / "saved", model, tasks.Classification(), train, progress=False)
    assert loaded.estimator.damping == 0.01 and loaded.batch_size == 16 and loaded.seed == 3
    with pytest.raises(InfkitError, match="batch_size must be a whole number, got 2.5"):
        mlp_analysis(batch_size=2.5)
    with pytest.raises(InfkitError, match="batch_size must be >= 1, got 0"):
        mlp_analysis(batch_size=np.int64(0))


def test_inference_mode_and_no_grad_around_the_calls_still_give_the_scores():
    _, _, query = digits_mlp()
    expected = mlp_analysis(damping=1e-2).fit().scores(query).scores
    with torch.inference_mode():
        inside = mlp_analysis(damping=1e-2).fit().scores(query).scores
        assert torch.is_inference_mode_enabled()  # the user's mode is back after each call
    with torch.no_grad():
        assert torch.equal(mlp_analysis(damping=1e-2).fit().scores(query).scores, expected)
    assert torch.equal(inside, expected)


@pytest.mark.parametrize("estimator", ["ekfac", "kfac"])
def test_damping_zero_on_a_singular_curvature_is_refused_not_nan(estimator):
    """The digits have pixels that are 0 in every image: A is singular, and with λ = 0 every score was NaN."""
    an = mlp_analysis(estimator=estimator, damping=0.0)
    with pytest.raises(InfkitError, match=r"layer '0': with damping λ = 0, \d+ of its 780 curvature eigenvalues .* "
                                          r"are 0 .*Give a damping > 0"):
        an.fit()
    mlp_analysis(estimator=estimator, damping={"0": 1e-3}).fit()  # damped there (the head: the heuristic), it fits


def test_a_query_with_an_infinite_input_names_the_example():
    _, _, query = digits_mlp()
    x, y = query[2]
    x = x.clone()
    x[5] = float("inf")
    an = mlp_analysis(damping=1e-2).fit()
    with pytest.raises(InfkitError, match="query example 2 has non-finite values .* in its input 'x'"):
        an.scores(query[:2] + [(x, y)])


class ZeroNonFinite(nn.Module):
    def forward(self, x):
        return torch.where(torch.isfinite(x), x, 0.0)


def test_non_finite_layer_inputs_with_a_finite_loss_name_the_layer_and_example():
    """An overflow inside the model that its output hides: the loss is finite, the last layer's input is not."""
    _, train, _ = digits_mlp()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), ZeroNonFinite()).double()
    with torch.no_grad():
        model[0].weight.abs_().mul_(1e300)  # finite weights whose products with a large input overflow
    data = train[:3] + [(torch.full((64,), 1e10, dtype=torch.float64), 1)]
    with pytest.raises(InfkitError, match="layer '2' has non-finite inputs .* for train example 3"):
        Analysis(model, tasks.Classification(), data, damping=1e-2, progress=False).fit()


def test_non_finite_scores_are_refused_with_the_query_and_train_example():
    an = mlp_analysis(estimator="identity").fit()
    an.cache.train_side["2"][7].fill_(float("inf"))
    _, _, query = digits_mlp()
    with pytest.raises(InfkitError, match=r"scores are not finite \(e.g. query 0 against train example 7.*'2'"):
        an.scores(query)


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
    broken = data + [(torch.full((4,), -1.0, dtype=torch.float64), 0)]
    with pytest.raises(InfkitError, match="loss of train example 12 is nan"):
        Analysis(model, NanLoss(), broken, damping=1e-2, batch_size=4, progress=False).fit()
    assert {name: m.training for name, m in model.named_modules()} == modes

"""A fit is tied to the whole model, the train data and the task: a save loaded onto anything else, or a query after
the model or data changed in place, is refused (or refitted by fit()) with a message naming what changed."""

import copy
from dataclasses import dataclass

import pytest
import torch
from helpers import digits_mlp, structured_sequences, tiny_gpt2
from lora_models import lora_gpt2
from torch import nn

from infkit import Analysis, InfkitError, tasks

VOCAB = 24
TRAIN = structured_sequences(20, VOCAB, 10, seed=5, min_length=6)
QUERIES = structured_sequences(3, VOCAB, 10, seed=99)


def gpt2_analysis(model, **kwargs):
    return Analysis(model, tasks.CausalLM(), TRAIN, modules="transformer.h.1.mlp.*", damping=1e-3, progress=False,
                    **kwargs)


def batchnorm_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    model.train()
    model(x)  # running statistics from one batch
    model.eval()
    return model, list(zip(x, torch.arange(40) % 3))


# (name, build a model + data + modules, edit a copy of the model outside the tracked layers, the tensor named)
def _gpt2():
    return copy.deepcopy(tiny_gpt2()), TRAIN, "transformer.h.1.mlp.*", tasks.CausalLM()


def _digits():
    model, train, _ = digits_mlp()
    return copy.deepcopy(model), train, "2", tasks.Classification()


def _batchnorm():
    model, train = batchnorm_mlp()
    return model, train, "3", tasks.Classification()


def _lora():
    return lora_gpt2(), TRAIN, "*lora_B*", tasks.CausalLM()


def scale_ln_f(m):
    m.transformer.ln_f.weight.mul_(0.5)


def scale_wpe(m):
    m.transformer.wpe.weight.mul_(2)


def scale_first_layer(m):
    m[0].weight.mul_(3)


def shift_running_mean(m):
    m[1].running_mean.add_(1.0)


def other_base_model(m):
    base = m.base_model.model.transformer.h[0].attn.c_attn
    base.base_layer.weight.add_(0.3 * torch.randn_like(base.base_layer.weight))


CHANGES = [
    ("gpt2 ln_f x0.5", _gpt2, scale_ln_f, "transformer.ln_f.weight"),
    ("gpt2 wpe x2", _gpt2, scale_wpe, "transformer.wpe.weight"),
    ("untracked first layer x3", _digits, scale_first_layer, "0.weight"),
    ("BatchNorm running stats", _batchnorm, shift_running_mean, "1.running_mean"),
    ("same adapter, another base", _lora, other_base_model, "h.0.attn.c_attn.base_layer.weight"),
]


@pytest.mark.parametrize("build, change, tensor", [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_load_refuses_a_model_changed_outside_the_tracked_layers(tmp_path, build, change, tensor):
    model, train, modules, task = build()
    an = Analysis(model, task, train, modules=modules, progress=False).fit()
    an.save(tmp_path / "saved")
    other = copy.deepcopy(model)
    with torch.no_grad():
        change(other)
    with pytest.raises(InfkitError, match=rf"weights or buffers differ .*other values: .*{tensor}"):
        Analysis.load(tmp_path / "saved", other, task, train, progress=False)
    Analysis.load(tmp_path / "saved", model, task, train, progress=False)  # the unchanged model still loads


def test_the_changes_matter_a_fresh_fit_on_the_changed_model_scores_otherwise():
    """Why the whole model is fingerprinted: ln_f is untracked, yet halving it changes the scores."""
    model = copy.deepcopy(tiny_gpt2())
    before = gpt2_analysis(model).fit().scores(QUERIES).scores
    with torch.no_grad():
        scale_ln_f(model)
    after = gpt2_analysis(model).fit().scores(QUERIES).scores
    assert float((after - before).norm() / before.norm()) > 0.05


def test_scores_after_an_in_place_edit_are_refused_and_fit_refits(capsys):
    model = copy.deepcopy(tiny_gpt2())
    an = gpt2_analysis(model).fit()
    an.scores(QUERIES)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
    with pytest.raises(InfkitError, match=r"no longer matches .*other values: transformer.h.1.mlp.c_fc.weight.*"
                                          r"call an.fit\(\) again"):
        an.scores(QUERIES)
    with pytest.raises(InfkitError, match="no longer matches"):
        an.self_influence()
    an.fit()
    assert "refitting" in capsys.readouterr().out
    fresh = gpt2_analysis(model).fit()
    assert torch.equal(an.scores(QUERIES).scores, fresh.scores(QUERIES).scores)


def test_an_edit_through_dot_data_is_caught_on_a_small_model():
    """``.data`` writes bypass PyTorch's version counters; a small model is re-hashed on every query anyway."""
    model = copy.deepcopy(tiny_gpt2())
    an = gpt2_analysis(model).fit()
    model.transformer.wte.weight.data.mul_(2)
    with pytest.raises(InfkitError, match="other values: transformer.wte.weight"):
        an.scores(QUERIES)


def test_a_write_that_restores_the_fitted_values_is_not_refused():
    model = copy.deepcopy(tiny_gpt2())
    an = gpt2_analysis(model).fit()
    expected = an.scores(QUERIES).scores
    weight = model.transformer.h[1].mlp.c_fc.weight
    with torch.no_grad():
        weight.copy_(weight.clone())  # the version counter moves, the values do not
    assert torch.equal(an.scores(QUERIES).scores, expected)


def test_a_train_list_appended_to_or_edited_after_fit_is_refused():
    model = copy.deepcopy(tiny_gpt2())
    train = list(TRAIN)
    an = Analysis(model, tasks.CausalLM(), train, modules="transformer.h.1.mlp.*", damping=1e-3, progress=False).fit()
    train.append(TRAIN[0])
    with pytest.raises(InfkitError, match="train data has 21 examples now, 20 when fitted"):
        an.scores(QUERIES)
    train.pop()
    train[3] = TRAIN[4]
    with pytest.raises(InfkitError, match="same size but other contents"):
        an.scores(QUERIES)
    train[3] = TRAIN[3]
    an.scores(QUERIES)  # back as fitted: accepted


@dataclass
class WeightedClassification(tasks.Classification):
    """A user's task with a tensor-valued setting: per-class weights of the cross-entropy."""

    class_weights: torch.Tensor | None = None

    def train_loss(self, model, batch, sample=None):
        loss = super().train_loss(model, batch, sample)
        return loss * self.class_weights[batch["labels"]]


def test_tensor_valued_task_settings_are_fingerprinted(tmp_path):
    model, train, _ = digits_mlp()
    task = WeightedClassification(class_weights=torch.ones(10, dtype=torch.float64))
    Analysis(model, task, train, modules="2", progress=False).fit().save(tmp_path / "saved")
    heavier = WeightedClassification(class_weights=torch.linspace(1, 2, 10, dtype=torch.float64))
    with pytest.raises(InfkitError, match=r"the task is WeightedClassification\(class_weights='tensor \(10,\)"):
        Analysis.load(tmp_path / "saved", model, heavier, train, progress=False)
    Analysis.load(tmp_path / "saved", model, task, train, progress=False)

"""What a user gets without passing every option: the papers' estimators, float32 statistics, tied weights left out,
padding that no NaN crosses, sizes refused up front. Each is checked against math written here."""

import pytest
import torch
from helpers import assert_close, per_example_param_grads, structured_sequences, tiny_gpt2
from lora_models import finetune_data, lora_gpt2, quiet_peft
from torch import nn

from infkit import Analysis, InfkitError, tasks
from infkit.capture import find_layers


def lm_loss(model, example):
    ids = example["input_ids"][None]
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")


# -- 1. each estimator's own Fisher ------------------------------------------------------------------------------
@quiet_peft
def test_datainf_with_defaults_is_the_papers_closed_form():
    """Kwon et al. 2023: empirical gradients g_il, λ_l = 0.1 · mean ‖g_il‖² / d_l, and
    (G_l + λ_l I)⁻¹ v ≈ (1/(n λ_l)) Σ_i (v − (g_ilᵀ v) / (λ_l + ‖g_il‖²) g_il), per LoRA matrix."""
    model = lora_gpt2(r=2, steps=10)
    train, queries = finetune_data(20, seed=1), finetune_data(3, seed=2)
    layers = find_layers(model)
    train_grads = per_example_param_grads(model, layers, lm_loss, train)  # [n, P] float64, data labels
    query_grads = per_example_param_grads(model, layers, lm_loss, queries)
    expected = torch.zeros(len(queries), len(train), dtype=torch.float64)
    start = 0
    for layer in layers.values():
        g, v = train_grads[:, start : start + layer.n_params], query_grads[:, start : start + layer.n_params]
        start += layer.n_params
        norms = g.square().sum(dim=1)
        lam = 0.1 * float(norms.mean()) / layer.n_params
        solved = (v - ((v @ g.T) / (lam + norms)) @ g / len(train)) / lam
        expected += solved @ g.T

    an = Analysis(model, tasks.CausalLM(), train, estimator="datainf", progress=False)
    plan = an.plan()
    assert (plan.fisher, plan.fit_passes, plan.cache_passes) == ("empirical", 1, 0)  # one pass, as in the paper
    assert "curvature: empirical Fisher, datainf's default" in plan.summary()
    result = an.fit().scores(queries)
    assert_close(result.scores, expected, rel=1e-6)
    assert result.info["fisher"] == "empirical" and result.info["fisher_default"]


@pytest.mark.parametrize(("estimator", "fisher"), [("ekfac", "sampled"), ("kfac", "sampled"), ("lissa", "empirical"),
                                                   ("exact", "sampled"), ("identity", None)])
def test_each_estimator_has_its_papers_fisher_and_says_so(estimator, fisher, tmp_path):
    data = structured_sequences(6, 24, 6, seed=0)
    options = {"depth": 5} if estimator == "lissa" else {}
    an = Analysis(tiny_gpt2(), tasks.CausalLM(), data, estimator=estimator, modules="transformer.h.1.mlp.*",
                  progress=False, **options)
    assert an.fisher == fisher
    assert ("curvature:" in an.plan().summary()) == (fisher is not None)
    asked = Analysis(tiny_gpt2(), tasks.CausalLM(), data, estimator="ekfac", fisher="empirical", progress=False)
    assert asked.fisher == "empirical" and "empirical Fisher, as asked" in asked.plan().summary()
    an.fit().save(tmp_path / "saved")
    reopened = Analysis.load(tmp_path / "saved", tiny_gpt2(), tasks.CausalLM(), data, progress=False)
    assert reopened.fisher == fisher and reopened.plan().fisher_source == an.plan().fisher_source


def test_fisher_samples_is_refused_where_it_means_nothing():
    data = structured_sequences(6, 24, 6, seed=0)
    with pytest.raises(InfkitError, match="fisher_samples=4 averages draws of sampled labels"):
        Analysis(tiny_gpt2(), tasks.CausalLM(), data, estimator="datainf", fisher_samples=4, progress=False)
    with pytest.raises(InfkitError, match="no effect on the exact estimator"):
        Analysis(tiny_gpt2(), tasks.CausalLM(), data, estimator="exact", fisher_samples=4, progress=False)


# -- 2. statistics in float32 whatever the model's dtype ---------------------------------------------------------
def test_bf16_model_statistics_are_accumulated_in_float32():
    """A = E[a aᵀ] of a bfloat16 GPT-2 against the same captured bf16 inputs summed in float64: within 1e-4, and
    positive semi-definite (bf16 products made its smallest eigenvalues negative)."""
    model = tiny_gpt2(width=32).to(torch.bfloat16)
    data = structured_sequences(16, 24, 10, seed=3)  # one length: no padding
    an = Analysis(model, tasks.CausalLM(), data, modules="transformer.h.1.mlp.c_fc", damping=1e-3, progress=False)
    an.fit()
    inputs = []
    handle = model.transformer.h[1].mlp.c_fc.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.stack([d["input_ids"] for d in data]))
    handle.remove()
    a = inputs[0].double().reshape(-1, inputs[0].shape[-1])
    a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)  # the bias column
    reference = a.T @ a / a.shape[0]
    fitted = an.estimator.activation_cov["transformer.h.1.mlp.c_fc"]
    assert float((fitted - reference).norm() / reference.norm()) < 1e-4  # bf16 products: 1.3e-3
    eigenvalues = torch.linalg.eigvalsh(fitted)
    assert float(eigenvalues.min()) > -1e-6 * float(eigenvalues.max())


# -- 3. tied and huge weights -------------------------------------------------------------------------------------
def test_a_tied_lm_head_is_left_out_by_default_and_refused_when_asked_for():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    an = Analysis(model, tasks.CausalLM(), structured_sequences(4, 24, 6, seed=0), progress=False)
    assert "lm_head" not in an.layers
    assert "not tracked: lm_head (weight tied to transformer.wte" in an.plan().summary()
    with pytest.raises(InfkitError, match="'lm_head' matches modules='\\*'.*tied weights.*narrow the pattern"):
        Analysis(model, tasks.CausalLM(), structured_sequences(4, 24, 6, seed=0), modules="*", progress=False)


def test_a_kronecker_factor_too_large_is_refused_at_construction():
    model = nn.Sequential(nn.Linear(20_000, 2))
    data = [(torch.zeros(20_000), 0)]
    with pytest.raises(InfkitError, match="20001 x 20001 input factor A: 6.0 GiB.*modules=.*max_factor_dim="):
        Analysis(model, tasks.Classification(), data, progress=False)
    Analysis(model, tasks.Classification(), data, progress=False, max_factor_dim=20_001)  # asked for: accepted


def test_a_fit_larger_than_the_device_is_refused_before_any_work(monkeypatch):
    import infkit.plan as plan_module

    monkeypatch.setattr(plan_module, "device_memory", lambda device: 2**16)  # a 64 KiB "device"
    with pytest.raises(InfkitError, match="needs about .* of factors .* more than the 64.0 KiB of cpu.*modules="):
        Analysis(tiny_gpt2(), tasks.CausalLM(), structured_sequences(4, 24, 6, seed=0), progress=False)


# -- 4. padding: nothing computed at a padded position reaches a statistic ---------------------------------------
def untied_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=24, n_positions=32, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize("estimator", ["ekfac", "kfac", "datainf"])
def test_nan_at_padded_positions_reaches_no_statistic(estimator):
    """The lm_head (untied, tracked) sees NaN at every padded position, as a model may compute anything there;
    fits and scores equal those of the same model without the NaN."""
    model = untied_gpt2()
    state = {}

    def nan_at_padding(module, inputs):
        mask = state["mask"]
        return torch.where(mask[:, :, None].bool(), inputs[0], torch.full_like(inputs[0], float("nan")))

    class Poisoned(tasks.CausalLM):
        def forward(self, model, batch):
            state["mask"] = batch["attention_mask"]
            return super().forward(model, batch)

    train = structured_sequences(12, 24, 9, seed=4, min_length=4)  # variable lengths: padded batches
    queries = structured_sequences(3, 24, 9, seed=8, min_length=4)
    options = dict(estimator=estimator, modules=["lm_head", "transformer.h.0.mlp.*"], damping=1e-2, batch_size=4,
                   fisher="empirical", progress=False)
    clean = Analysis(model, tasks.CausalLM(), train, **options).fit().scores(queries).scores
    handle = model.lm_head.register_forward_pre_hook(nan_at_padding)
    try:
        poisoned = Analysis(model, Poisoned(), train, **options).fit().scores(queries).scores
    finally:
        handle.remove()
    assert torch.isfinite(poisoned).all()
    assert_close(poisoned, clean, rel=1e-9)


# -- 7. a fresh LoRA adapter ----------------------------------------------------------------------------------------
@quiet_peft
def test_an_untrained_lora_adapter_is_refused_before_any_pass_with_what_to_do():
    model = lora_gpt2(r=2, steps=0)  # B = 0, as peft initialises it
    an = Analysis(model, tasks.CausalLM(), finetune_data(4), progress=False)  # constructing (to inspect) is fine
    an.train_passes.iterate = None  # fit() must refuse before any pass over the data
    with pytest.raises(InfkitError, match="LoRA adapter is untrained.*Fine-tune the adapter first.*lora_B"):
        an.fit()
    only_b = Analysis(model, tasks.CausalLM(), finetune_data(4), modules="*lora_B*", estimator="datainf",
                      progress=False)
    assert torch.isfinite(only_b.fit().scores(finetune_data(2, seed=2)).scores).all()

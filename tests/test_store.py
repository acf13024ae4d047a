"""The compressed train-side store: projected gradients (infkit.projection) in memory or memory-mapped on disk
(infkit.store), checked against the same formulas computed here from dense per-example gradients (autograd,
float64), and the plan's choice between full, projected, on-disk and streamed."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_close, pearson, per_example_param_grads, structured_sequences, tiny_gpt2

from infkit import Analysis, InfkitError, tasks

VOCAB = 24
MODULES = "transformer.h.1.*"
TRAIN = structured_sequences(24, VOCAB, 10, seed=5, min_length=6)
QUERIES = structured_sequences(5, VOCAB, 10, seed=99)
pytestmark = pytest.mark.filterwarnings("ignore:datainf is designed for LoRA")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


def make(model, estimator="ekfac", **kwargs):
    kwargs.setdefault("fisher", "empirical" if estimator not in ("identity",) else None)
    kwargs.setdefault("damping", 1e-3)
    return Analysis(model, tasks.CausalLM(), TRAIN, estimator=estimator, modules=MODULES, progress=False, **kwargs)


def lm_loss(model, example):
    ids = example["input_ids"][None]
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")


def dense_grads(model, an, examples):
    """{layer: [n, d_out, d_in]} float64 gradients of the summed token loss, one autograd call per example."""
    flat = per_example_param_grads(model, an.layers, lm_loss, examples)
    out, start = {}, 0
    for name, layer in an.layers.items():
        out[name] = flat[:, start : start + layer.n_params].reshape(-1, layer.d_out, layer.d_in)
        start += layer.n_params
    return out


def project(an, name, grads):
    p = an.estimator.projections[name]
    return p.p_out.double() @ grads @ p.p_in.double().T


# -- the projected scores are the formulas, on dense gradients ----------------------------------------------------
@pytest.mark.parametrize("estimator", ["ekfac", "kfac"])
def test_eigenbasis_store_is_the_estimator_summed_over_the_kept_eigenpairs(model, estimator):
    """EK-FAC / K-FAC with a projected store: Σ over the kept (i, j) of (Q_Sᵀ Vq Q_A)_ij (Q_Sᵀ G Q_A)_ij / (Λ_ij + λ),
    the kept pairs being the 6 x 6 per layer's total of pairs with the largest K-FAC eigenvalue T̄ λ_S,i λ_A,j
    across the layers, at least one per layer."""
    an = make(model, estimator, store="projected", projection=6).fit()
    est = an.estimator
    train, queries = dense_grads(model, an, TRAIN), dense_grads(model, an, QUERIES)
    expected = torch.zeros(len(QUERIES), len(TRAIN), dtype=torch.float64)
    full = torch.zeros_like(expected)
    values = {name: est.mean_tokens[name] * torch.outer(est.eigvals_s[name].clamp(min=0),
                                                        est.eigvals_a[name].clamp(min=0)) for name in an.layers}
    kept_masks = {}
    for name in an.layers:
        q_s, q_a = est.eigvecs_s[name].double(), est.eigvecs_a[name].double()
        denominator = est.eigenvalues[name].double() + est.damping_used[name]
        rotated_q, rotated_g = q_s.T @ queries[name] @ q_a, q_s.T @ train[name] @ q_a
        rows, columns = est.kept[name]
        kept = torch.zeros_like(denominator, dtype=torch.bool)
        kept[rows, columns] = True
        assert int(kept.sum()) == len(rows) >= 1  # distinct pairs, at least one per layer
        kept_masks[name] = kept
        terms = rotated_q[:, None] * rotated_g[None] / denominator  # [Q, n, d_out, d_in]
        expected += (terms * kept).sum(dim=(2, 3))
        full += terms.sum(dim=(2, 3))
    sizes = [len(est.kept[name][0]) for name in an.layers]
    assert sum(sizes) == len(an.layers) * 6 * 6  # the bytes of 6 x 6 in every layer
    assert len(set(sizes)) > 1  # shared across the layers, not 36 each
    # every kept pair's value is at least every dropped pair's, except the one a layer always keeps
    kept_values = torch.cat([values[n][kept_masks[n]] for n in an.layers])
    dropped_values = torch.cat([values[n][~kept_masks[n]] for n in an.layers])
    assert kept_values.sort().values[len(an.layers)] >= dropped_values.max()
    assert an.store.shapes == {name: (1, len(est.kept[name][0])) for name in an.layers}
    result = an.scores(QUERIES)
    assert_close(result.scores, expected, rel=1e-4)
    assert (expected - full).abs().max() > 1e-3 * full.abs().max()  # the projection does drop something here
    shares = est.kept_shares
    assert set(shares) == set(an.layers) and all(0 < v <= 1 for v in shares.values()) and min(shares.values()) < 1


def test_leading_pairs_share_the_budget_across_layers():
    """The largest entries across layers, each layer's largest always in, ties to the earlier layer."""
    from infkit.projection import leading_pairs

    values = {"a": torch.tensor([[9.0, 1.0], [8.0, 0.5]]), "b": torch.tensor([[0.1, 7.0, 2.0]]),
              "c": torch.tensor([[0.01]])}
    kept = leading_pairs(values, 5)
    assert [list(zip(r.tolist(), c.tolist())) for r, c in kept.values()] == [[(0, 0), (1, 0)], [(0, 1), (0, 2)],
                                                                            [(0, 0)]]
    tied = leading_pairs({"a": torch.ones(2, 2), "b": torch.ones(1, 2)}, 4)
    assert [len(r) for r, _ in tied.values()] == [3, 1]
    assert [len(r) for r, _ in leading_pairs(values, 100).values()] == [4, 3, 1]  # all of them


@pytest.mark.parametrize("dense", [True, False])
def test_pair_projection_of_tokens_of_grads_and_lift_agree(dense, monkeypatch):
    """A pair projection from a batch's tokens equals the kept entries of Q_Sᵀ G Q_A, by either path, and its lift
    is the adjoint: ⟨lift(x), G⟩ = ⟨x, projected G⟩."""
    from infkit import projection

    monkeypatch.setattr(projection, "DENSE_PAIRS", 10**9 if dense else 0)
    monkeypatch.setattr(projection, "PAIR_CHUNK", 7 * 5)  # several chunks of pairs
    g = torch.Generator().manual_seed(0)
    q_s = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    kept_out, kept_in = torch.tensor([5, 0, 5, 2, 0]), torch.tensor([1, 1, 3, 0, 2])
    p = projection.PairProjection.of_pairs(q_s, q_a, kept_out, kept_in)
    a = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    s = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
    grads = torch.einsum("bto,bti->boi", s, a)
    expected = (q_s.T @ grads @ q_a)[:, kept_out, kept_in].unsqueeze(1)
    assert p.shape == (1, 5)
    assert_close(p.of_tokens(a, s), expected, rel=1e-12)
    assert_close(p.of_grads(grads), expected, rel=1e-12)
    x = torch.randn(2, 1, 5, generator=g, dtype=torch.float64)
    lifted = p.lift(x)
    assert lifted.shape == (2, 6, 4)
    assert_close(torch.einsum("qoi,boi->qb", lifted, grads), torch.einsum("qm,bm->qb", x[:, 0], expected[:, 0]),
                 rel=1e-12)


def test_random_store_is_the_inner_product_of_projected_gradients(model):
    """Identity with a projected store: ⟨P_out Vq P_inᵀ, P_out G P_inᵀ⟩ with seeded Gaussian P."""
    an = make(model, "identity", store="projected", projection=6).fit()
    train, queries = dense_grads(model, an, TRAIN), dense_grads(model, an, QUERIES)
    expected = sum(project(an, n, queries[n]).flatten(1) @ project(an, n, train[n]).flatten(1).T for n in an.layers)
    assert_close(an.scores(QUERIES).scores, expected, rel=1e-4)
    p = an.estimator.projections["transformer.h.1.mlp.c_fc"]
    assert p.p_out.shape == (6, 64) and p.p_in.shape == (6, 17)


def test_datainf_store_runs_its_formula_on_projected_gradients(model):
    """DataInf projected: its formula on the projected gradients ĝ, C = (V̂ Γ̂ᵀ) ⊘ (λ + ‖ĝ‖²),
    (V̂ − C Γ̂ / n) / λ, scored against Γ̂, with λ = 0.1 · mean ‖ĝ‖² / d (d the layer's full size: E‖ĝ‖² = ‖g‖²)."""
    an = make(model, "datainf", damping=None, store="projected", projection=5).fit()
    train, queries = dense_grads(model, an, TRAIN), dense_grads(model, an, QUERIES)
    expected = torch.zeros(len(QUERIES), len(TRAIN), dtype=torch.float64)
    for name, layer in an.layers.items():
        g_hat, v_hat = project(an, name, train[name]).flatten(1), project(an, name, queries[name]).flatten(1)
        norms = g_hat.square().sum(dim=1)
        lam = 0.1 * float(norms.mean()) / layer.n_params
        assert an.estimator.damping_used[name] == pytest.approx(lam, rel=1e-5)
        solved = (v_hat - ((v_hat @ g_hat.T) / (lam + norms)) @ g_hat / len(TRAIN)) / lam
        expected += solved @ g_hat.T
    assert_close(an.scores(QUERIES).scores, expected, rel=1e-4)


def test_random_projections_are_unbiased(model):
    """The mean of projected identity scores over many seeds approaches the full scores (E[PᵀP] = I): its error is
    well below one seed's."""
    full = make(model, "identity").fit().scores(QUERIES).scores.double()
    draws = [make(model, "identity", store="projected", projection=4, seed=s).fit().scores(QUERIES).scores.double()
             for s in range(24)]
    one = float(np.mean([(d - full).norm() / full.norm() for d in draws]))
    mean = float((torch.stack(draws).mean(0) - full).norm() / full.norm())
    assert mean < 0.4 * one, (mean, one)


@pytest.mark.parametrize("estimator", ["ekfac", "kfac", "identity", "datainf"])
def test_a_projection_as_large_as_the_layers_gives_the_full_scores(model, estimator):
    full = make(model, estimator).fit()
    projected = make(model, estimator, store="projected", projection=65).fit()  # d_in of c_proj: 64 + bias
    assert projected.cache.projected and not full.cache.projected
    assert_close(projected.scores(QUERIES).scores, full.scores(QUERIES).scores, rel=1e-5)
    assert_close(projected.self_influence(), full.self_influence(), rel=1e-4)  # float32 store vs float64 pass


@pytest.mark.parametrize("estimator", ["ekfac", "datainf", "identity"])
def test_token_scores_and_self_influence_agree_with_projected_scores(model, estimator):
    an = make(model, estimator, store="projected", projection=5).fit()
    result = an.scores(TRAIN[:4])
    for q, i in [(0, 0), (1, 3), (2, 17)]:
        tokens = an.token_scores(q, i)
        assert float(tokens.values.sum()) + tokens.unassigned == pytest.approx(float(result.scores[q, i]), rel=1e-4)
    # the train gradients are the queries' gradients here (empirical Fisher, loss as the measurement)
    assert_close(an.self_influence()[:4], torch.diagonal(result.scores[:, :4]), rel=1e-4)


def test_train_indices_select_stored_rows(model):
    an = make(model, store="projected", projection=5).fit()
    all_scores = an.scores(QUERIES).scores
    assert_close(an.scores(QUERIES, train_indices=[7, 2, 19]).scores, all_scores[:, [7, 2, 19]], rel=1e-6)


# -- on disk ------------------------------------------------------------------------------------------------------
def test_disk_store_gives_the_in_memory_scores_and_survives_save_and_load(model, tmp_path):
    memory = make(model, store="projected", projection=5).fit()
    disk = make(model, store="projected", projection=5, store_dir=tmp_path / "store").fit()
    assert disk.store.on_disk and disk.cache.folder == tmp_path / "store"
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    assert len(manifest["files"]) == len(disk.layers) and manifest["n"] == len(TRAIN)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert "on disk in" in disk.plan().summary() and "on disk in" in repr(disk.cache)
    assert_close(disk.scores(QUERIES).scores, memory.scores(QUERIES).scores, rel=1e-6)
    saved = disk.save(tmp_path / "saved")
    loaded = Analysis.load(saved, model, tasks.CausalLM(), TRAIN, progress=False)
    assert loaded.cache.folder == (tmp_path / "store").absolute()
    assert_close(loaded.scores(QUERIES).scores, memory.scores(QUERIES).scores, rel=1e-6)
    memory.save(tmp_path / "in-memory")
    again = Analysis.load(tmp_path / "in-memory", model, tasks.CausalLM(), TRAIN, progress=False)
    assert again.cache.projected and again.cache.folder is None
    assert_close(again.scores(QUERIES).scores, memory.scores(QUERIES).scores, rel=1e-6)


def test_a_damaged_disk_store_is_refused_on_load(model, tmp_path):
    disk = make(model, store="projected", projection=5, store_dir=tmp_path / "store").fit()
    saved = disk.save(tmp_path / "saved")
    victim = next((tmp_path / "store").glob("layer-*.npy"))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(InfkitError, match="modified"):
        Analysis.load(saved, model, tasks.CausalLM(), TRAIN, progress=False)


def test_a_full_store_on_disk_and_in_bfloat16(model, tmp_path):
    memory = make(model).fit()
    disk = make(model, store="full", store_dir=tmp_path / "full").fit()
    assert disk.store.kind == "full" and disk.cache.folder is not None and not disk.cache.projected
    assert_close(disk.scores(QUERIES).scores, memory.scores(QUERIES).scores, rel=1e-6)
    half = make(model, store="projected", projection=5, cache_dtype="bfloat16", store_dir=tmp_path / "half").fit()
    assert half.cache.train_side["transformer.h.1.mlp.c_fc"].dtype == torch.bfloat16
    in_memory = make(model, store="projected", projection=5, cache_dtype="bfloat16").fit()
    assert_close(half.scores(QUERIES).scores, in_memory.scores(QUERIES).scores, rel=1e-6)


def test_a_store_dir_that_is_not_a_store_is_refused_before_the_fit(model, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    with pytest.raises(InfkitError, match="not an infkit train-side store"):
        make(model, store="projected", projection=5, store_dir=folder).fit()
    assert (folder / "chapter1.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make(model, store="projected", projection=5, store_dir=empty).fit().cache.folder == empty


def test_a_store_rewritten_by_another_fit_is_refused_by_the_save(model, tmp_path):
    """Two fits with other settings into one store_dir: the first one's save no longer matches its store."""
    folder = tmp_path / "store"
    saved = make(model, store="projected", projection=5, store_dir=folder).fit().save(tmp_path / "a")
    make(model, store="projected", projection=5, store_dir=folder, damping=1e-1).fit()
    with pytest.raises(InfkitError, match="rewritten by another fit"):
        Analysis.load(saved, model, tasks.CausalLM(), TRAIN, progress=False)


def test_default_disk_folders_differ_by_settings_and_model(model, cache_dir):
    first = make(model, memory_budget=100).fit()
    other_damping = make(model, memory_budget=100, damping=1e-1).fit()
    assert first.cache.folder != other_damping.cache.folder
    assert first.scores(QUERIES).scores.isfinite().all()  # its store was not overwritten


def test_an_interrupted_fit_leaves_the_previous_disk_store(model, tmp_path, monkeypatch):
    folder = tmp_path / "store"
    first = make(model, fisher="sampled", store="projected", projection=5, store_dir=folder).fit()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    second = make(model, fisher="sampled", store="projected", projection=5, store_dir=folder)
    calls = []

    def fail_on_second_batch(cb):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return type(second.estimator).projected_train_side_batch(second.estimator, cb)

    monkeypatch.setattr(second.estimator, "projected_train_side_batch", fail_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        second.fit()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert first.scores(QUERIES).scores.isfinite().all()


# -- the plan chooses --------------------------------------------------------------------------------------------
def test_plan_chooses_the_largest_projection_that_fits(model):
    full_bytes = make(model).plan().train_cache_bytes
    an = make(model, memory_budget=full_bytes // 4)
    plan = an.plan()
    assert plan.store.kind == "projected" and not plan.store.on_disk
    assert plan.store.bytes <= full_bytes // 4
    larger = [k for k in (1024, 512, 256, 128, 64, 32, 16, 8) if k > plan.store.rank]
    assert all(make(model, store="projected", projection=k).plan().store.bytes > full_bytes // 4 for k in larger)
    text = plan.summary()
    pairs = sum(k_out * k_in for k_out, k_in in plan.store.shapes.values())
    assert f"projected to the {pairs:,} leading eigen-pairs" in text and "x smaller" in text
    assert f"{plan.store.rank} x {plan.store.rank} per layer" in text
    random_plan = make(model, "identity", memory_budget=full_bytes // 4).plan().summary()
    assert "at most 8 dimensions per side of each layer (seeded Gaussian)" in random_plan
    assert make(model, memory_budget=full_bytes).plan().store.kind == "full"


def test_plan_goes_to_disk_when_nothing_fits(model, cache_dir):
    an = make(model, memory_budget=100)
    assert an.store.kind == "projected" and an.store.on_disk
    assert str(an.store.folder).startswith(str(cache_dir / "stores"))
    an.fit()
    assert an.cache.folder.exists() and an.scores(QUERIES).scores.isfinite().all()


def test_estimators_without_a_projected_store_say_so(model):
    with pytest.raises(InfkitError, match="no projected store"):
        make(model, "exact", store="projected")
    streamed = make(model, "exact", memory_budget=100)
    assert streamed.store.kind == "stream" and "no projected store" in streamed.plan().summary()
    with pytest.raises(InfkitError, match="projection=4 projects"):
        make(model, store="full", projection=4)
    with pytest.raises(InfkitError, match="store='everything' is not one of"):
        make(model, store="everything")
    with pytest.raises(InfkitError, match="cache=False keeps no train-side store"):
        make(model, cache=False, store="projected")


def test_projected_quality_on_this_model_is_reported(model, report):
    """Not a bound on quality (benchmarks/store.py measures that): the figures at two sizes, for the record."""
    for estimator in ("ekfac", "datainf"):
        full = make(model, estimator, damping=None).fit().scores(QUERIES).scores
        for k in (4, 8):
            projected = make(model, estimator, damping=None, store="projected", projection=k).fit()
            r = pearson(projected.scores(QUERIES).scores.flatten(), full.flatten())
            report(f"store: {estimator} projected to {k} per side on a tiny GPT-2 block: Pearson {r:.3f} vs full")
            assert r > 0.5


@pytest.mark.parametrize("where", ["full", "projected", "disk"])
def test_top_keeps_the_best_on_the_fly_as_scores_top_ranks_them(model, where, tmp_path, monkeypatch):
    from infkit import scoring

    monkeypatch.setattr(scoring, "SCORE_CHUNK", 5)  # 24 train rows: five chunks to merge
    options = {"full": {}, "projected": dict(store="projected", projection=5),
               "disk": dict(store="projected", projection=5, store_dir=tmp_path / "store")}[where]
    an = make(model, **options).fit()
    result = an.scores(QUERIES)
    for q, top in enumerate(an.top(QUERIES, k=4)):
        expected = result.top(q, 4)
        assert top.proponents.indices == expected.proponents.indices
        assert top.opponents.indices == expected.opponents.indices
        assert top.proponents.scores == pytest.approx(expected.proponents.scores, rel=1e-5)
    if where == "full":  # without a store, top() ranks the streamed scores: the same answer
        streamed = make(model, store="stream").fit()
        assert [t.proponents.indices for t in streamed.top(QUERIES, k=3)] == \
            [result.top(q, 3).proponents.indices for q in range(len(QUERIES))]

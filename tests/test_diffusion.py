"""Diffusion models: Conv2d capture and EK-FAC against dense brute force, the diffusion task (deterministic draws,
the sampled Fisher's scale, the GGN root), LoRA on diffusers UNets, identity scores on a tiny UNet, bad input,
the image grid and the demo's cache. Tiny float64 models built from configs; no download."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

from infkit import Analysis, InfkitError, tasks
from infkit.capture import Capture, active_adapters, find_layers, per_example_grads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast and unaffected by a neighbour's jobs (see tests/test_lora.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_library_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


# -- Conv2d capture ----------------------------------------------------------------------------------------------
CONVS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), dilation=(2, 1), padding="same"),
    dict(kernel_size=3, padding=2, padding_mode="reflect", stride=(1, 2)),
    dict(kernel_size=3, padding="valid", dilation=2),
    dict(kernel_size=(3, 2), padding=(1, 2), padding_mode="circular", bias=False),
    dict(kernel_size=3, padding=1, padding_mode="replicate", stride=2, dilation=2),
]


@pytest.mark.parametrize("options", CONVS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_conv_patches_are_unfold_and_rebuild_the_output(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **options).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    layer = find_layers(nn.Sequential(conv))["0"]
    with Capture({"0": layer}) as cap:
        y = conv(x)
        a = cap.activations()["0"]
    # the patches by unfold, written here: the module's padding (mode included), then F.unfold
    if conv.padding_mode == "zeros":
        padded = F.pad(x, conv._reversed_padding_repeated_twice)
    else:
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1)
    assert torch.equal(a, patches)
    assert a.shape == (2, y.shape[2] * y.shape[3], layer.d_in)
    weight = layer.gradient_of(conv.weight, conv.bias)  # the parameters laid out like a gradient: [d_out, d_in]
    assert torch.allclose(a @ weight.T, y.flatten(2).transpose(1, 2), atol=1e-12)


def conv_net():
    """A tiny float64 conv net: stride, padding, dilation, a 1x1 conv without bias, then a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, (2, 3), dilation=(1, 2), padding=(1, 2), padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(4, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 5 * 4, 3),
    ).double()


def conv_data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return list(zip(x, y))


def autograd_grads(model, layers, loss_of, examples) -> dict[str, torch.Tensor]:
    """Per-example gradients, one autograd call each, per layer [n, d_out, d_in]."""
    out = {name: [] for name in layers}
    for ex in examples:
        params = [p for layer in layers.values() for p in layer.parameters()]
        grads = torch.autograd.grad(loss_of(model, ex), params)
        k = 0
        for name, layer in layers.items():
            bias = grads[k + 1] if layer.has_bias else None
            out[name].append(layer.gradient_of(grads[k], bias))
            k += 2 if layer.has_bias else 1
    return {name: torch.stack(g) for name, g in out.items()}


def ce_loss(model, ex):
    return F.cross_entropy(model(ex[0][None]), ex[1][None], reduction="sum")


def brute_force_factors(model, data):
    """A (from F.unfold of each conv's padded input) and S (autograd w.r.t. each conv's output), token means."""
    x = torch.stack([ex[0] for ex in data])
    y = torch.stack([ex[1] for ex in data])
    inputs, outputs = {}, {}
    h = x
    for name, module in model.named_children():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            inputs[name] = h
            h = module(h)
            h.retain_grad()
            outputs[name] = h
        else:
            h = module(h)
    F.cross_entropy(h, y, reduction="sum").backward()
    factors = {}
    for name, module in model.named_children():
        if name not in inputs:
            continue
        if isinstance(module, nn.Conv2d):
            pad = module._reversed_padding_repeated_twice
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            patches = F.unfold(F.pad(inputs[name], pad, mode=mode), module.kernel_size, dilation=module.dilation,
                               stride=module.stride).transpose(1, 2)
            s = outputs[name].grad.flatten(2).transpose(1, 2)
        else:
            patches, s = inputs[name][:, None], outputs[name].grad[:, None]
        if module.bias is not None:
            patches = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1)
        a, s = patches.reshape(-1, patches.shape[-1]), s.reshape(-1, s.shape[-1])
        factors[name] = (a.T @ a / len(a), s.T @ s / len(s), len(a) / len(data))
    model.zero_grad()
    return factors


def test_conv_per_example_gradients_equal_autograd():
    model, data = conv_net(), conv_data(6)
    layers = find_layers(model)
    assert {n: (l.d_out, l.d_in) for n, l in layers.items()} == {"0": (3, 19), "2": (4, 19), "4": (2, 4), "6": (3, 41)}
    batch = tasks.Classification().collate(data)
    with Capture(layers) as cap:
        loss = F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")
        s = cap.output_grads(loss)
        a = cap.activations()
        counts = cap.token_counts()
    expected = autograd_grads(model, layers, ce_loss, data)
    for name in layers:
        assert torch.allclose(per_example_grads(a[name], s[name]), expected[name], atol=1e-12)
    assert counts == {"0": 6 * 16, "2": 6 * 20, "4": 6 * 20, "6": 6}


def test_conv_ekfac_factors_eigenvalues_and_inverse_equal_dense_brute_force():
    model, data = conv_net(), conv_data()
    an = Analysis(model, tasks.Classification(), data, estimator="ekfac", fisher="empirical", damping=1e-3,
                  progress=False, batch_size=7).fit()
    est = an.estimator
    for name, (a_cov, s_cov, tokens) in brute_force_factors(model, data).items():
        assert torch.allclose(est.activation_cov[name], a_cov, atol=1e-12), name
        assert torch.allclose(est.gradient_cov[name], s_cov, atol=1e-12), name
        assert est.mean_tokens[name] == tokens
    layers = an.layers
    train = autograd_grads(model, layers, ce_loss, data)
    queries = conv_data(3, seed=5)
    query = autograd_grads(model, layers, ce_loss, queries)
    out = est.precondition(an.query_gradients(queries))
    for name, layer in layers.items():
        rotated = est.eigvecs_s[name].T @ train[name] @ est.eigvecs_a[name]
        assert torch.allclose(est.eigenvalues[name], rotated.square().mean(dim=0), rtol=1e-9, atol=1e-14)
        basis = torch.kron(est.eigvecs_s[name], est.eigvecs_a[name])
        dense = basis @ torch.diag(est.eigenvalues[name].reshape(-1)) @ basis.T
        damped = dense + 1e-3 * torch.eye(layer.n_params, dtype=torch.float64)
        expected = torch.linalg.solve(damped, query[name].reshape(3, -1).T).T
        assert torch.allclose(out[name].reshape(3, -1), expected, rtol=1e-6, atol=1e-9)
    # and the scores are those of the brute-force inverse against autograd's train gradients
    scores = an.scores(queries).scores
    flat = {n: train[n].reshape(len(data), -1) for n in layers}
    expected = sum(out[n].reshape(3, -1) @ flat[n].T for n in layers)
    assert_close(scores, expected, rel=1e-5)


def test_kfac_on_convs_scales_by_positions():
    """K-FAC's block is T̄ · S ⊗ A with T̄ = output positions per example (docs/design.md §2)."""
    model, data = conv_net(), conv_data()
    est = Analysis(model, tasks.Classification(), data, estimator="kfac", fisher="empirical",
                   progress=False).fit().estimator
    assert est.mean_tokens == {"0": 16.0, "2": 20.0, "4": 20.0, "6": 1.0}


def test_grouped_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    data = [(torch.randn(2, 6, 6), 0)]
    with pytest.raises(InfkitError, match=r"module '1' is an nn.Conv2d with groups=2.*groups=1.*modules="):
        Analysis(model, tasks.Classification(), data, progress=False)
    an = Analysis(model, tasks.Classification(), data, modules="0", progress=False)  # excluding it works
    assert list(an.layers) == ["0"]


# -- tiny UNets --------------------------------------------------------------------------------------------------
def tiny_unet(size=8, classes=3, channels=(8, 16), seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=classes, attention_head_dim=4,
    ).double().eval()


def tiny_conditional_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4,
    ).double().eval()


def scheduler(**kwargs):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100, **kwargs)


def images(n, size=8, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    return [(x[i], i % classes) for i in range(n)]


def explicit_grads(model, task, layers, examples) -> torch.Tensor:
    """[n, P]: autograd of the task's train loss on each example alone, laid out like infkit."""
    def loss_of(m, ex):
        return task.train_loss(m, task.collate([ex])).sum()

    grads = autograd_grads(model, layers, loss_of, examples)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def test_diffusion_loss_is_deterministic_per_example():
    unet, data = tiny_unet(), images(5)
    task = tasks.Diffusion(scheduler(), n_draws=3, seed=7)
    with torch.no_grad():
        together = task.train_loss(unet, task.collate(data))
        alone = torch.cat([task.train_loss(unet, task.collate([ex])) for ex in data])
        reversed_order = task.train_loss(unet, task.collate(data[::-1])).flip(0)
        again = tasks.Diffusion(scheduler(), n_draws=3, seed=7).train_loss(unet, task.collate(data))
        other_seed = tasks.Diffusion(scheduler(), n_draws=3, seed=8).train_loss(unet, task.collate(data))
        measured = task.measurement(unet, task.collate(data))
        late = tasks.Diffusion(scheduler(), n_draws=3, seed=7, timesteps=(0, 10)).measurement(unet, task.collate(data))
        indexed = [{"image": x, "class_labels": y, "index": i} for i, (x, y) in enumerate(data)]
        by_index = task.train_loss(unet, task.collate(indexed))
        by_index_again = task.train_loss(unet, task.collate(indexed[2:] + indexed[:2]))
    assert torch.allclose(together, alone, rtol=1e-12)
    assert torch.allclose(together, reversed_order, rtol=1e-12)
    assert torch.equal(together, again)
    assert not torch.allclose(together, other_seed)
    assert torch.equal(measured, together)  # same draws when the measurement's range and count are the train loss's
    assert not torch.allclose(late, together)
    assert torch.allclose(by_index.roll(-2), by_index_again, rtol=1e-12)
    batch = task.collate(data[:1])
    steps, _ = task._draws(batch, 8, (20, 60), torch.float64, torch.device("cpu"))
    assert steps.min() >= 20 and steps.max() < 60
    assert sorted(int(t) // 5 for t in steps[0]) == list(range(4, 12))  # stratified: one draw per slice of 5


def test_identity_scores_equal_explicit_dot_products_on_a_unet():
    unet, data = tiny_unet(), images(10)
    queries = images(3, seed=3)
    task = tasks.Diffusion(scheduler(), n_draws=2, seed=0)
    an = Analysis(unet, task, data, estimator="identity", progress=False, batch_size=4)
    result = an.scores(queries)
    layers = an.layers
    assert any(isinstance(layer.module, nn.Conv2d) for layer in layers.values())
    assert any(name.endswith("to_q") for name in layers)  # the attention block's Linear layers
    train = explicit_grads(unet, task, layers, data)
    query = explicit_grads(unet, task, layers, queries)
    assert_close(result.scores, query @ train.T, rel=1e-5)
    self_scores = an.self_influence()
    assert_close(self_scores, train.square().sum(dim=1), rel=1e-5)


def ggn_by_jacobians(unet, task, layers, examples) -> torch.Tensor:
    """mean_i (2/K) Σ_k J_kᵀ J_k over the tracked parameters, one backward per output element (no infkit code)."""
    params = [p for layer in layers.values() for p in layer.parameters()]
    total = 0
    for ex in examples:
        prediction = task.forward(unet, task.collate([ex]))  # [1, K, C, H, W]
        rows = []
        for e in range(prediction.numel()):
            grads = torch.autograd.grad(prediction.flatten()[e], params, retain_graph=True)
            k, parts = 0, []
            for layer in layers.values():
                bias = grads[k + 1] if layer.has_bias else None
                parts.append(layer.gradient_of(grads[k], bias).reshape(-1))
                k += 2 if layer.has_bias else 1
            rows.append(torch.cat(parts))
        jac = torch.stack(rows)
        total = total + 2 / prediction.shape[1] * jac.T @ jac
    return total / len(examples)


def test_exact_ggn_and_sampled_fisher_of_the_diffusion_loss():
    """output_hessian_root gives the GGN exactly; the sampled Fisher (targets ε̂ + √(K/2)·N(0, I)) matches it in
    expectation — a wrong σ (e.g. the naive N(0, I), a factor 2) fails the trace check."""
    unet, data = tiny_unet(size=4, channels=(4, 8)), images(3, size=4)
    task = tasks.Diffusion(scheduler(), n_draws=2, seed=0)
    an = Analysis(unet, task, data, estimator="exact", modules="conv_out", damping=1e-3, progress=False).fit()
    reference = ggn_by_jacobians(unet, task, an.layers, data)
    assert_close(an.estimator.curvature, reference, rel=1e-10)
    layer = an.layers["conv_out"]
    copies = 100
    batch = task.collate([ex for ex in data for _ in range(copies)])  # same draws, different sampled targets
    total, rounds = 0, 4
    for r in range(rounds):
        generators = [torch.Generator().manual_seed(r * 10_000 + i) for i in range(len(batch["images"]))]
        with Capture({"conv_out": layer}) as cap:
            loss = task.train_loss(unet, batch, sample=generators)
            g = per_example_grads(cap.activations()["conv_out"], cap.output_grads(loss)["conv_out"]).flatten(1)
        total = total + g.T @ g
    sampled = total / (rounds * len(generators))
    ratio = float(torch.trace(sampled) / torch.trace(reference))
    assert 0.9 < ratio < 1.1, ratio  # 1.004 here; a σ off by √2 gives 2 or 0.5
    assert float((sampled - reference).norm() / reference.norm()) < 0.3  # 0.2 here: Monte Carlo noise of 400 draws


# -- LoRA --------------------------------------------------------------------------------------------------------
def test_lora_on_a_conditional_unet_tracks_only_the_adapter():
    from peft import LoraConfig

    unet = tiny_conditional_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # a fine-tuned adapter (B != 0), so every block has a gradient
            p.data.normal_(0, 0.1)
    wrapped = [n for n, m in unet.named_modules() if n.split(".")[-1] in ("to_q", "to_k", "to_v") or
               n.endswith("to_out.0")]
    layers = find_layers(unet)
    assert sorted(layers) == sorted(f"{n}.lora_{ab}.default" for n in wrapped for ab in "AB")
    assert active_adapters(unet) == ["default"]
    g = torch.Generator().manual_seed(0)
    data = [{"image": x, "encoder_hidden_states": torch.randn(5, 8, generator=g, dtype=torch.float64)}
            for x, _ in images(8)]
    task = tasks.Diffusion(scheduler(), n_draws=2)
    an = Analysis(unet, task, data, estimator="identity", progress=False, batch_size=3)
    result = an.scores(data[:2])
    train = explicit_grads(unet, task, an.layers, data)
    assert_close(result.scores, train[:2] @ train.T, rel=1e-5)
    assert result.info["adapters"] == ["default"]
    # cross-attention: to_k / to_v see the text positions, to_q the image positions
    cross_k = next(n for n in layers if "attn2.to_k.lora_A" in n)
    cross_q = next(n for n in layers if "attn2.to_q.lora_A" in n)
    with Capture(layers) as cap:
        loss = task.train_loss(unet, task.collate(data[:2]))
        a = cap.activations()
        cap.output_grads(loss)
    assert a[cross_k].shape[1] == 2 * 5 and a[cross_q].shape[1] == 2 * 64  # K = 2 draws along the positions


def test_lora_injected_in_a_unet2dmodel_with_conv_targets_and_datainf():
    from peft import LoraConfig, inject_adapter_in_model

    unet = tiny_unet()
    unet.requires_grad_(False)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "conv1", "conv2"])
    unet = inject_adapter_in_model(config, unet, adapter_name="style")
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    layers = find_layers(unet)
    assert layers and all(re.search(r"\.lora_[AB]\.style$", n) for n in layers)
    assert any(isinstance(layer.module, nn.Conv2d) for layer in layers.values())  # LoRA on a conv is a conv
    assert active_adapters(unet) == ["style"]
    data = images(12)
    task = tasks.Diffusion(scheduler(), n_draws=2)
    identity = Analysis(unet, task, data, estimator="identity", progress=False).scores(data[:2]).scores
    train = explicit_grads(unet, task, layers, data)
    assert_close(identity, train[:2] @ train.T, rel=1e-5)
    for estimator in ("ekfac", "datainf"):
        scores = Analysis(unet, task, data, estimator=estimator, progress=False).fit().scores(data[:2]).scores
        assert torch.isfinite(scores).all()
        assert (scores.diagonal(0)[:2] > 0).all()  # a train image supports its own loss (query = train loss here)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_images_name_the_expected_shape_and_dtype():
    unet = tiny_unet()
    task = tasks.Diffusion(scheduler())
    wrong_channels = [(torch.zeros(1, 8, 8, dtype=torch.float64), 0)]
    with pytest.raises(InfkitError, match=re.escape("expects [B, 3, 8, 8]")):
        Analysis(unet, task, wrong_channels, estimator="identity", progress=False).scores(wrong_channels)
    odd_size = [(torch.zeros(3, 7, 7, dtype=torch.float64), 0)]
    with pytest.raises(InfkitError, match=r"shape \[1, 3, 7, 7\].*expects \[B, 3, 8, 8\].*in_channels=3"):
        task.train_loss(unet, task.collate(odd_size))
    as_bytes = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)]
    with pytest.raises(InfkitError, match=r"dtype torch.uint8.*floating-point images of shape \[B, 3, 8, 8\]"):
        task.train_loss(unet, task.collate(as_bytes))
    with pytest.raises(InfkitError, match=r"one \[C, H, W\] tensor of the same shape"):
        task.collate([(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 4, 4), 0)])
    with pytest.raises(InfkitError, match="class-conditional.*no class label"):
        task.train_loss(unet, task.collate([torch.zeros(3, 8, 8, dtype=torch.float64)]))
    with pytest.raises(InfkitError, match="needs encoder_hidden_states"):
        task.train_loss(tiny_conditional_unet(), task.collate([torch.zeros(3, 8, 8, dtype=torch.float64)]))
    with pytest.raises(InfkitError, match="cannot read an example of type str"):
        task.collate(["a cat"])


def test_bad_scheduler_and_timesteps():
    with pytest.raises(InfkitError, match="needs a diffusers noise scheduler with add_noise.*object has no add_noise"):
        tasks.Diffusion(object())
    with pytest.raises(InfkitError, match="NoneType has no add_noise"):
        tasks.Diffusion()
    for bad in [(0, 101), (50, 50), (-1, 10), (80, 20), (0.5, 10), "early", (1, 2, 3)]:
        with pytest.raises(InfkitError, match=r"timesteps=.*0 <= lo < hi <= 100"):
            tasks.Diffusion(scheduler(), timesteps=bad)
    with pytest.raises(InfkitError, match="n_draws must be an integer >= 1"):
        tasks.Diffusion(scheduler(), n_draws=0)
    assert tasks.Diffusion(scheduler(), timesteps=(0, 100)).timesteps == (0, 100)


# -- the image grid and the demo ---------------------------------------------------------------------------------
def test_image_grid_static_html_is_self_contained_and_deterministic():
    from PIL import Image

    from infkit.result import InfluenceResult
    from infkit.views.images import ImageInfluenceGrid, png_bytes

    scores = torch.tensor([[3.0, -1.0, 0.5, -2.0, 1.5], [0.1, 0.2, -0.3, 0.4, -0.5]])
    result = InfluenceResult(scores=scores, per_layer={"l": scores}, estimator="ekfac", damping={"l": 0.1})
    g = torch.Generator().manual_seed(0)
    train = [(torch.rand(3, 6, 6, generator=g) * 2 - 1, 0) for _ in range(5)]
    query = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1
    grid = ImageInfluenceGrid(result, query, train, queries=0, k=2, marked=[True, False, False, False, True],
                              mark_label="style", train_captions=lambda i: f"train <{i}>")
    page = grid.to_html()
    assert page == ImageInfluenceGrid(result, query, train, queries=0, k=2, marked=[True, False, False, False, True],
                                      mark_label="style", train_captions=lambda i: f"train <{i}>")._repr_html_()
    assert "<script" not in page and "http" not in page and "train &lt;0&gt;" in page
    assert page.count("data:image/png;base64,") == 5  # the query, 2 proponents, 2 opponents
    assert "2/2 proponents style" in page and grid.marked_share(0) == 1.0
    assert repr(grid).splitlines()[1] == "  query 0: proponents [0: +3.00, 4: +1.50]; opponents [3: -2.00, 1: -1.00]"
    import io

    pixels = (torch.arange(2 * 3 * 3) * 14).reshape(2, 3, 3).to(torch.uint8).numpy()
    decoded = Image.open(io.BytesIO(png_bytes(pixels)))
    assert decoded.size == (3, 2) and decoded.tobytes() == pixels.tobytes()
    with pytest.raises(InfkitError, match="query index 5 is out of range"):
        ImageInfluenceGrid(result, query, train, queries=5)


def test_demo_data_is_deterministic_and_the_cache_retrains_when_corrupt(tmp_path):
    from infkit.demo import diffusion as dd

    recipe = dd.Recipe(plain_per_class=3, style_per_class=1, base_steps=2, lora_steps=2, batch_size=4)
    first, second = dd.build_dataset(recipe), dd.build_dataset(recipe)
    assert first.fingerprint() == second.fingerprint() and len(first) == 16
    assert first.style_share == 0.25
    assert dd.build_dataset().style_share == 0.2
    shipped = dd.load(verbose=False)
    assert shipped.source == "shipped" and shipped.cache_path.name == dd.SHIPPED_NAME
    trained = dd.load(tmp_path / "demo", recipe=recipe, verbose=False)
    assert trained.source == "trained"
    assert all(re.search(r"\.lora_[AB]\.stripes$", n) for n in find_layers(trained.lora))
    cached = dd.load(tmp_path / "demo", recipe=recipe, verbose=False)
    assert cached.source == "cache"
    for a, b in zip(trained.lora.state_dict().values(), cached.lora.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "demo" / "lora.safetensors").write_bytes(b"garbage")
    with pytest.warns(dd.DemoCacheWarning, match="lora.safetensors does not match its checksum.*retraining"):
        again = dd.load(tmp_path / "demo", recipe=recipe, verbose=False)
    assert again.source == "trained"
    for a, b in zip(trained.lora.state_dict().values(), again.lora.state_dict().values()):
        assert torch.equal(a, b)  # deterministic training
    images = dd.sample(again.lora, again.scheduler, [0, 1], seed=0, steps=3)
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, dd.sample(again.lora, again.scheduler, [0, 1],
                                                                            seed=0, steps=3))

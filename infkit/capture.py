"""Which modules are tracked, and the hooks that record each one's inputs a_t and output gradients s_t.

This is the only module that touches hooks. A forward hook stores the layer's input (detached) and its output
tensor; the output gradients are then taken with ``torch.autograd.grad`` w.r.t. those outputs, so the user's
``param.grad`` is never touched and no module is replaced. Every handle is removed in ``__exit__``.

Conventions, per tracked layer and example (docs/design.md §2):
  a  [B, T, d_in]   layer inputs, with a column of ones appended when the layer has a tracked bias
  s  [B, T, d_out]  gradients of the loss w.r.t. the layer's outputs
  ΣW = Σ_t s_t a_tᵀ  [d_out, d_in] the example's gradient, laid out as nn.Linear's weight (bias last column)
A layer without positions (an MLP) has T = 1; a layer called several times per forward stacks its calls along T.
Padded positions (task.token_mask == 0) are set to 0 in both a and s with ``torch.where``, so whatever a model
computes there (even NaN) never reaches a statistic. The mask applies to a call whose outputs have one position per
token of the batch (decided once per call, from its output's shape); other calls (a pooled head) and convolutions
have no token mask. a and s are returned in float32 at least (float64 models keep float64), whatever the model's
dtype: products such as aᵀa, sᵀs and Σ_t s_t a_tᵀ of a bfloat16 model are then accumulated in float32.

nn.Conv2d (the standard K-FAC treatment of convolutions, Grosse & Martens 2016): each spatial output position is a
"token". a [B, H_out·W_out, C_in·kh·kw (+1)] are the input patches (``F.unfold`` with the module's kernel size,
dilation and stride, after the module's own padding, whatever its padding_mode), s [B, H_out·W_out, C_out]; the
weight [C_out, C_in, kh, kw] is laid out as [d_out, d_in] = [C_out, C_in·kh·kw] (C_in major, then kh, kw: unfold's
order). groups != 1 is refused. Conv layers have no task token mask (their T is the number of positions).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from infkit.errors import InfkitError

try:  # transformers' GPT-2 style linear layer (weight stored as [in, out])
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep capture importable without it
    HFConv1D = ()


@dataclass(frozen=True)
class Layer:
    """One tracked module: a linear map with its weight and (optional) bias as one block."""

    name: str
    module: nn.Module
    d_in: int  # including the bias column
    d_out: int
    has_bias: bool

    @property
    def n_params(self) -> int:
        return self.d_in * self.d_out

    def parameters(self) -> list[nn.Parameter]:
        params = [self.module.weight]
        if self.has_bias:
            params.append(self.module.bias)
        return params

    def gradient_of(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
        """Lay out a module's (.weight, .bias) gradient as [d_out, d_in] like ΣW (used by tests and checks)."""
        w = weight_grad.t() if isinstance(self.module, HFConv1D) else weight_grad
        if isinstance(self.module, nn.Conv2d):  # [C_out, C_in, kh, kw] -> [C_out, C_in·kh·kw], unfold's order
            w = w.reshape(w.shape[0], -1)
        return torch.cat([w, bias_grad[:, None]], dim=1) if self.has_bias else w


    def input_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The module's recorded input as [B, T, d_in without the bias column]: conv patches, else positions."""
        if isinstance(self.module, nn.Conv2d):
            return _conv_patches(self.module, x, self.name)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The module's output (or its gradient) as [B, T, d_out]; a conv's [B, C_out, H, W] -> [B, H·W, C_out]."""
        if isinstance(self.module, nn.Conv2d):
            return y.flatten(2).transpose(1, 2)
        return y.reshape(y.shape[0], -1, y.shape[-1])


def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a Conv2d, as nn.Conv2d computes it (also for 'same' / 'valid')."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def _conv_patches(module: nn.Conv2d, x: torch.Tensor, name: str) -> torch.Tensor:
    """Input patches of a Conv2d, [B, H_out·W_out, C_in·kh·kw]: padded as the module pads, then unfolded.

    Equal to ``F.unfold(x_padded, kernel_size, dilation, stride=stride).transpose(1, 2)`` (same order: C_in
    major, then kh, kw), built from kh·kw strided slices, which is several times faster than unfold on CPU.
    """
    if x.dim() != 4:
        raise InfkitError(
            f"layer {name!r} (nn.Conv2d) was called with a {x.dim()}-d input of shape {tuple(x.shape)}; infkit "
            "tracks convolutions on batched [B, C, H, W] inputs only"
        )
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = _conv_padding(module)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    h_out = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
    parts = [
        x[:, i * dh : i * dh + sh * (h_out - 1) + 1 : sh, j * dw : j * dw + sw * (w_out - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(parts, dim=-1).reshape(x.shape[0], h_out * w_out, -1)  # [B, L, C·kh·kw]


def _supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or (bool(HFConv1D) and isinstance(module, HFConv1D))


#: peft's containers of LoRA matrices: ``<wrapped layer>.lora_A.<adapter name>`` is one adapter's A (an nn.Linear).
LORA_CONTAINERS = ("lora_A", "lora_B")


def _adapter_holders(model: nn.Module):
    """peft modules that hold per-adapter sub-modules (LoRA layers, modules_to_save wrappers), duck-typed: they
    have ``adapter_layer_names`` and ``active_adapters``."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "adapter_layer_names", None), tuple) and hasattr(module, "active_adapters"):
            yield name, module


def _active_of(holder: nn.Module) -> list[str]:
    if getattr(holder, "disable_adapters", False):
        return []
    active = holder.active_adapters
    return [active] if isinstance(active, str) else list(active)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the peft adapters active in ``model`` (in order of first appearance); [] for a model without."""
    names: list[str] = []
    for _, holder in _adapter_holders(model):
        containers = [getattr(holder, attr, None) for attr in holder.adapter_layer_names]
        present = {key for c in containers if isinstance(c, (nn.ModuleDict, nn.ParameterDict)) for key in c}
        names += [a for a in _active_of(holder) if a in present and a not in names]
    return names


def inactive_adapter_modules(model: nn.Module) -> set[int]:
    """ids of the modules that belong to an adapter that is not active (their forward is never called)."""
    skip: set[int] = set()
    for _, holder in _adapter_holders(model):
        active = _active_of(holder)
        for attr in holder.adapter_layer_names:
            container = getattr(holder, attr, None)
            if isinstance(container, nn.ModuleDict):
                for key, sub in container.items():
                    if key not in active:
                        skip.update(id(m) for m in sub.modules())
    return skip


def is_lora_layer(name: str) -> bool:
    """Whether a tracked layer name is a peft LoRA matrix (``...lora_A.<adapter>`` / ``...lora_B.<adapter>``)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in LORA_CONTAINERS


def untrained_lora(model: nn.Module, layers: dict[str, Layer]) -> list[str]:
    """Tracked LoRA A matrices whose B partner is all zero (as peft initialises an adapter): their gradient is
    identically zero, so their curvature is 0 and any influence through them is 0/0."""
    fresh = []
    for name in layers:
        parts = name.split(".")
        if is_lora_layer(name) and parts[-2] == "lora_A":
            partner = model.get_submodule(".".join([*parts[:-2], "lora_B", parts[-1]]))
            if not bool(partner.weight.detach().any()):
                fresh.append(name)
    return fresh


def ordinary_layers(layers: dict[str, Layer], adapters: list[str]) -> dict[str, str]:
    """In a peft model, the tracked layers that are not LoRA matrices, each with why it is trainable:
    ``modules_to_save`` copies (e.g. a classification head) are tracked whole (weight and bias), like any layer."""
    if not adapters:
        return {}
    return {
        name: "modules_to_save copy" if ".modules_to_save." in name else "trainable layer outside the adapter"
        for name in layers
        if not is_lora_layer(name)
    }


def tracked_summary(layers: dict[str, Layer], adapters: list[str]) -> str:
    """One line saying what is tracked: the adapter's LoRA matrices and any ordinary layers beside them."""
    others = ordinary_layers(layers, adapters)
    if not adapters:
        return f"tracks {len(layers)} layers ({sum(layer.n_params for layer in layers.values()):,} parameters)"
    lora = [layer for name, layer in layers.items() if name not in others]
    text = (f"tracks {len(lora)} LoRA matrices of adapter {', '.join(map(repr, adapters))} "
            f"({sum(layer.n_params for layer in lora):,} parameters)")
    if others:
        listed = "; ".join(f"{name} ({layers[name].n_params:,} parameters, {why})" for name, why in others.items())
        text += f" and {len(others)} ordinary layer(s), tracked whole like any layer: {listed}"
    return text


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Supported modules whose weight is also a parameter of another module (a tied lm_head and embedding):
    {module name: the other modules holding that weight}."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    shared = {}
    for name, module in model.named_modules():
        if _supported(module) and len(owners.get(id(module.weight), [])) > 1:
            shared[name] = [other for other in owners[id(module.weight)] if other != name]
    return shared


def _tied_reason(others: list[str]) -> str:
    return (f"its weight is shared with {', '.join(others)} (tied weights): the gradient seen here would be only this "
            "module's share of the parameter's, and an unembedding's factors are vocabulary x vocabulary")


def find_layers(model: nn.Module, modules: str | Iterable[str] | None = None) -> dict[str, Layer]:
    """The tracked layers: supported modules with a trainable weight, optionally filtered by name patterns.

    ``modules`` is a glob pattern or a list of them (``fnmatch`` on the module's full name, e.g.
    ``"*.mlp.*"``); a module is tracked when any pattern matches. With peft adapters, only the active adapter's
    modules are tracked (LoRA A and B of each wrapped layer, and its ``modules_to_save`` copies); the frozen base
    weights and inactive adapters are not. A module whose weight is shared with another module (a tied lm_head) is
    never tracked: skipped by default (``untracked_shared`` says which), refused when a pattern asks for it.
    """
    patterns = [modules] if isinstance(modules, str) else (list(modules) if modules is not None else None)
    layers: dict[str, Layer] = {}
    skipped_frozen = 0
    inactive = inactive_adapter_modules(model)
    shared = shared_weights(model)
    for name, module in model.named_modules():
        if not _supported(module):
            continue
        if id(module) in inactive:
            skipped_frozen += 1
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if not module.weight.requires_grad:
            skipped_frozen += 1
            continue
        if name in shared:
            if patterns is None:
                continue
            raise InfkitError(
                f"module {name!r} matches modules={modules!r}, but {_tied_reason(shared[name])}. infkit does not "
                "track tied weights (nor do Grosse et al., who leave out embeddings and unembeddings): narrow the "
                "pattern so it leaves this module out"
            )
        has_bias = module.bias is not None and module.bias.requires_grad
        if isinstance(module, HFConv1D):
            d_in, d_out = module.weight.shape
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise InfkitError(
                    f"module {name!r} is an nn.Conv2d with groups={module.groups}: infkit's Kronecker factors need "
                    "groups=1 (one input patch per position for all output channels). Exclude it with modules= "
                    "or freeze its parameters"
                )
            d_out, d_in = module.out_channels, module.weight[0].numel()
        else:
            d_out, d_in = module.weight.shape
        layers[name] = Layer(name, module, d_in + int(has_bias), d_out, has_bias)
    if not layers:
        what = f" matching {patterns}" if patterns is not None else ""
        raise InfkitError(
            f"no trackable layer{what} in {type(model).__name__}: infkit tracks nn.Linear, nn.Conv2d and "
            f"transformers' Conv1D modules whose weight requires grad ({skipped_frozen} supported modules were "
            "frozen or in an inactive adapter). "
            "Unfreeze the layers to analyse, add a LoRA adapter, or fix the modules= pattern."
        )
    return layers


class Capture:
    """Context manager recording inputs and outputs of the tracked layers during one forward pass."""

    def __init__(self, layers: dict[str, Layer], token_mask: torch.Tensor | None = None):
        self.layers = layers
        self.token_mask = token_mask
        self._mask_is_full = token_mask is None or bool(token_mask.all())
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._masks: dict[str, list[torch.Tensor | None]] = {}  # per call: [B, T, 1] bool, or None
        self._handles: list = []

    def __enter__(self) -> Capture:
        for name, layer in self.layers.items():
            self._inputs[name], self._outputs[name], self._masks[name] = [], [], []
            self._handles.append(layer.module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        layer = self.layers[name]

        def record(module, inputs, output):
            self._inputs[name].append(inputs[0].detach())
            self._outputs[name].append(output)
            self._masks[name].append(self._call_mask(layer, output))

        return record

    def _sees_positions(self, layer: Layer, output: torch.Tensor) -> bool:
        """Whether one call's outputs are the batch's token positions (so the token mask applies to it)."""
        mask = self.token_mask
        if mask is None or isinstance(layer.module, nn.Conv2d):
            return False
        return tuple(layer.output_tokens(output.detach()).shape[:2]) == tuple(mask.shape)

    def _call_mask(self, layer: Layer, output: torch.Tensor) -> torch.Tensor | None:
        """The real positions of one call, [B, T, 1] bool; None when it has no token mask or all are real."""
        if self._mask_is_full or not self._sees_positions(layer, output):
            return None
        return self.token_mask.to(device=output.device).bool()[:, :, None]

    @staticmethod
    def _as_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, ..., d] -> [B, T, d] in at least float32, 0 at padded positions (``torch.where``: NaN there too)."""
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x if x.dtype == torch.float64 else x.float()
        return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def activations(self) -> dict[str, torch.Tensor]:
        """a [B, T, d_in] per layer (ones appended for the bias; zero at padded positions)."""
        result = {}
        for name, layer in self.layers.items():
            calls = []
            for x, mask in zip(self._inputs[name], self._masks[name]):
                x = layer.input_tokens(x)
                if layer.has_bias:
                    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
                calls.append(self._as_tokens(x, mask))
            if not calls:
                raise InfkitError(f"layer {name!r} was not called in the forward pass; exclude it with modules=")
            result[name] = torch.cat(calls, dim=1)
        return result

    def token_counts(self) -> dict[str, int]:
        """Number of real (unpadded) positions each layer saw in this batch, over all its calls."""
        mask = self.token_mask
        counts = {}
        for name, layer in self.layers.items():
            total = 0
            for y in self._outputs[name]:
                x = layer.output_tokens(y.detach())  # positions as the layer's outputs count them (conv: H·W)
                total += int(mask.sum()) if self._sees_positions(layer, y) else x.shape[0] * x.shape[1]
            counts[name] = total
        return counts

    def output_grads(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """s [B, T, d_out] per layer: gradients of ``loss.sum()`` w.r.t. each tracked layer's outputs."""
        names = list(self.layers)
        outputs = [y for name in names for y in self._outputs[name]]
        grads = torch.autograd.grad(loss.sum(), outputs, retain_graph=retain_graph, allow_unused=True)
        result, k = {}, 0
        for name in names:
            calls = []
            for y, mask in zip(self._outputs[name], self._masks[name]):
                g = grads[k] if grads[k] is not None else torch.zeros_like(y)
                calls.append(self._as_tokens(self.layers[name].output_tokens(g.detach()), mask))
                k += 1
            result[name] = torch.cat(calls, dim=1)
        return result


def per_example_grads(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ΣW = Σ_t s_t a_tᵀ for each example: [B, T, d_in], [B, T, d_out] -> [B, d_out, d_in]."""
    return torch.einsum("bto,bti->boi", s, a)

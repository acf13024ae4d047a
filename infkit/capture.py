"""Which modules are tracked, and the hooks that record each one's inputs a_t and output gradients s_t.

This is the only module that touches hooks. A forward hook stores the layer's input (detached) and its output
tensor; the output gradients are then taken with ``torch.autograd.grad`` w.r.t. those outputs, so the user's
``param.grad`` is never touched and no module is replaced. Every handle is removed in ``__exit__``.

Conventions, per tracked layer and example (DESIGN.md §2):
  a  [B, T, d_in]   layer inputs, with a column of ones appended when the layer has a tracked bias
  s  [B, T, d_out]  gradients of the loss w.r.t. the layer's outputs
  ΣW = Σ_t s_t a_tᵀ  [d_out, d_in] the example's gradient, laid out as nn.Linear's weight (bias last column)
A layer without positions (an MLP) has T = 1; a layer called several times per forward stacks its calls along T.
Padded positions (task.token_mask == 0) are zeroed in both a and s.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
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
        return torch.cat([w, bias_grad[:, None]], dim=1) if self.has_bias else w


def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(HFConv1D) and isinstance(module, HFConv1D))


def find_layers(model: nn.Module, modules: str | Iterable[str] | None = None) -> dict[str, Layer]:
    """The tracked layers: supported modules with a trainable weight, optionally filtered by name patterns.

    ``modules`` is a glob pattern or a list of them (``fnmatch`` on the module's full name, e.g.
    ``"*.mlp.*"``); a module is tracked when any pattern matches.
    """
    patterns = [modules] if isinstance(modules, str) else (list(modules) if modules is not None else None)
    layers: dict[str, Layer] = {}
    skipped_frozen = 0
    for name, module in model.named_modules():
        if not _supported(module):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if not module.weight.requires_grad:
            skipped_frozen += 1
            continue
        has_bias = module.bias is not None and module.bias.requires_grad
        if isinstance(module, HFConv1D):
            d_in, d_out = module.weight.shape
        else:
            d_out, d_in = module.weight.shape
        layers[name] = Layer(name, module, d_in + int(has_bias), d_out, has_bias)
    if not layers:
        what = f" matching {patterns}" if patterns is not None else ""
        raise InfkitError(
            f"no trackable layer{what} in {type(model).__name__}: infkit tracks nn.Linear and transformers' "
            f"Conv1D modules whose weight requires grad ({skipped_frozen} supported modules were frozen). "
            "Unfreeze the layers to analyse, add a LoRA adapter, or fix the modules= pattern."
        )
    return layers


class Capture:
    """Context manager recording inputs and outputs of the tracked layers during one forward pass."""

    def __init__(self, layers: dict[str, Layer], token_mask: torch.Tensor | None = None):
        self.layers = layers
        self.token_mask = token_mask
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> Capture:
        for name, layer in self.layers.items():
            self._inputs[name], self._outputs[name] = [], []
            self._handles.append(layer.module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module, inputs, output):
            self._inputs[name].append(inputs[0].detach())
            self._outputs[name].append(output)

        return record

    def _as_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ..., d] -> [B, T, d], zeroing padded positions when the layer sees the task's positions."""
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        mask = self.token_mask
        if mask is not None and x.shape[1] == mask.shape[1]:
            x = x * mask[:, :, None].to(x.dtype)
        return x

    def activations(self) -> dict[str, torch.Tensor]:
        """a [B, T, d_in] per layer (ones appended for the bias; zero at padded positions)."""
        result = {}
        for name, layer in self.layers.items():
            calls = []
            for x in self._inputs[name]:
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                if layer.has_bias:
                    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
                calls.append(self._as_tokens(x))
            if not calls:
                raise InfkitError(f"layer {name!r} was not called in the forward pass; exclude it with modules=")
            result[name] = torch.cat(calls, dim=1)
        return result

    def token_counts(self) -> dict[str, int]:
        """Number of real (unpadded) positions each layer saw in this batch, over all its calls."""
        mask = self.token_mask
        counts = {}
        for name in self.layers:
            total = 0
            for x in self._inputs[name]:
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                applies = mask is not None and x.shape[1] == mask.shape[1]
                total += int(mask.sum()) if applies else x.shape[0] * x.shape[1]
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
            for y in self._outputs[name]:
                g = grads[k] if grads[k] is not None else torch.zeros_like(y)
                calls.append(self._as_tokens(g.detach()))
                k += 1
            result[name] = torch.cat(calls, dim=1)
        return result


def per_example_grads(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ΣW = Σ_t s_t a_tᵀ for each example: [B, T, d_in], [B, T, d_out] -> [B, d_out, d_in]."""
    return torch.einsum("bto,bti->boi", s, a)

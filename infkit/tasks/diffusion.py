"""The diffusion task: influence for diffusers UNets (``UNet2DModel``, ``UNet2DConditionModel``, with or without LoRA).

Exposed as ``infkit.tasks.Diffusion``. See :class:`Diffusion` for the loss, the draws and the curvature.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from infkit.errors import InfkitError
from infkit.tasks.base import Task

#: Keys under which a dict example may hold its image (first found wins).
IMAGE_KEYS = ("image", "pixel_values", "sample", "latents")
#: Keys under which a dict example may hold its class label.
LABEL_KEYS = ("class_labels", "class_label", "label", "labels")


@dataclass
class Diffusion(Task):
    """Denoising loss of a diffusers UNet at a fixed set of (timestep, noise) draws per example.

    Note:
        For an image x₀ (pixels or latents, [C, H, W]) with conditioning c, K = ``n_draws`` draws (t_k, ε_k) and
        x_k = scheduler.add_noise(x₀, ε_k, t_k), the UNet predicts ε̂_k = unet(x_k, t_k, c) and

            L(x₀) = (1/K) Σ_k ‖ε̂_k − y_k‖²     (a sum over pixels, a mean over draws)

        with the target y_k = ε_k (``prediction_type="epsilon"``), the velocity (``"v_prediction"``) or x₀
        (``"sample"``), as the scheduler's config says. The measurement of a query image is the same loss, with
        the timesteps optionally restricted to ``timesteps=(lo, hi)`` (hi exclusive), since influence differs
        between early (high-noise) and late (low-noise) steps.

        **Draws.** Timesteps are stratified over the range (draw k uniform in the k-th of K equal slices), noise
        is standard normal. They come from a generator seeded by (``seed``, the example): by ``example["index"]``
        when a dict example carries one, otherwise by a hash of the image's bytes. So an example's draws — and its
        gradient — are the same in every pass, in any batch, in any order; two byte-identical images share draws.
        The measurement uses the same draws when its range and count equal the train loss's (then the measurement
        of a train image is its train loss).

        **Curvature.** Per draw the loss is a sum of squares of the UNet's outputs, so the GGN of L is
        (2/K) Σ_k J_kᵀ J_k. ``output_hessian_root`` gives its root, √(2/K)·I per output element (for the exact
        estimator: one backward per output element — only for tiny images). The sampled Fisher
        (``fisher="sampled"``) replaces y_k by ε̂_k + σ·n_k, n_k ~ N(0, I) from the per-example generators infkit
        passes in, with σ² = K/2: the gradient is −(2σ/K) Σ_k J_kᵀ n_k, whose covariance (4σ²/K²) Σ_k J_kᵀ J_k
        equals the GGN.

    Examples (one of):
      * an image tensor [C, H, W] (unconditional UNet);
      * a tuple ``(image, class_label)`` (a UNet with ``num_class_embeds`` / ``class_embed_type``);
      * a dict with ``"image"`` (or ``"pixel_values"``, ``"sample"``, ``"latents"``) and optionally
        ``"class_labels"`` (or ``"label"``), ``"encoder_hidden_states"`` [seq, dim] (text conditioning of a
        ``UNet2DConditionModel``, e.g. a text encoder's output: it is an input, not tracked) and ``"index"``.

    Images are floats scaled as the UNet was trained (usually [-1, 1]); a float batch is cast to the UNet's dtype.

    Args:
        scheduler: a diffusers noise scheduler with ``add_noise`` and ``config.num_train_timesteps``
            (``DDPMScheduler``, ``DDIMScheduler``, ...).
        n_draws: (timestep, noise) draws per example for the train loss.
        seed: seeds the draws (with the example's index or content).
        timesteps: ``None`` (the whole range) or ``(lo, hi)``, 0 <= lo < hi <= num_train_timesteps: the range of the
            measurement's timesteps (the train loss always uses the whole range).
        query_draws: draws per query for the measurement (default ``n_draws``); more draws lower its variance.
    """

    scheduler: Any = field(default=None, repr=False)
    n_draws: int = 4
    seed: int = 0
    timesteps: tuple[int, int] | None = None
    query_draws: int | None = None

    def __post_init__(self):
        if self.scheduler is None or not callable(getattr(self.scheduler, "add_noise", None)):
            raise InfkitError(
                f"tasks.Diffusion needs a diffusers noise scheduler with add_noise(samples, noise, timesteps) "
                f"(e.g. DDPMScheduler); {type(self.scheduler).__name__} has no add_noise"
            )
        config = getattr(self.scheduler, "config", None)
        total = getattr(config, "num_train_timesteps", None)
        if not isinstance(total, int) or total < 1:
            raise InfkitError(
                f"the scheduler {type(self.scheduler).__name__} has no config.num_train_timesteps; tasks.Diffusion "
                "draws training timesteps from it"
            )
        self.num_train_timesteps = total
        self.prediction_type = getattr(config, "prediction_type", "epsilon") or "epsilon"
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InfkitError(
                f"prediction_type={self.prediction_type!r} of the scheduler is not supported; use 'epsilon', "
                "'v_prediction' or 'sample'"
            )
        if self.prediction_type == "v_prediction" and not callable(getattr(self.scheduler, "get_velocity", None)):
            raise InfkitError("a v_prediction scheduler needs get_velocity(sample, noise, timesteps)")
        for name in ("n_draws", "query_draws"):
            value = getattr(self, name)
            if value is None and name == "query_draws":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InfkitError(f"{name} must be an integer >= 1, got {value!r}")
        if self.timesteps is not None:
            self.timesteps = self._check_range(self.timesteps)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``task.timesteps = (lo, hi)`` after construction (e.g. to compare early and late steps on one fitted
        # analysis: it only changes the measurement) is validated like the constructor's argument.
        if name == "timesteps" and value is not None and "num_train_timesteps" in self.__dict__:
            value = self._check_range(value)
        object.__setattr__(self, name, value)

    def _check_range(self, timesteps) -> tuple[int, int]:
        total = self.num_train_timesteps
        try:
            lo, hi = (int(v) for v in timesteps)
            ok = all(float(v) == int(v) for v in timesteps)
        except (TypeError, ValueError):
            ok = False
        if not ok or not 0 <= lo < hi <= total:
            raise InfkitError(
                f"timesteps={timesteps!r} is not a range (lo, hi) of integers with 0 <= lo < hi <= {total} (the "
                f"scheduler's num_train_timesteps; hi is exclusive). Early, high-noise steps are near {total}, late "
                "ones near 0"
            )
        return lo, hi

    # -- batches ---------------------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[Any]) -> dict[str, Any]:
        if not examples:
            raise InfkitError("empty batch: the data has no examples")
        images, labels, states, keys = [], [], [], []
        for ex in examples:
            image, label, state, index = self._read(ex)
            images.append(image)
            labels.append(label)
            states.append(state)
            keys.append(self._draw_key(image, index))
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1 or images[0].dim() != 3:
            raise InfkitError(
                f"tasks.Diffusion needs every image as one [C, H, W] tensor of the same shape; got shapes "
                f"{sorted(shapes)[:4]}"
            )
        batch: dict[str, Any] = {"images": torch.stack(images), "draw_keys": torch.tensor(keys, dtype=torch.long)}
        if any(label is not None for label in labels):
            if any(label is None for label in labels):
                raise InfkitError("some examples have a class label and some do not; give one to every example")
            batch["class_labels"] = torch.as_tensor([int(v) for v in labels], dtype=torch.long)
        if any(state is not None for state in states):
            if any(state is None for state in states) or len({tuple(s.shape) for s in states}) > 1:
                raise InfkitError(
                    "encoder_hidden_states must be given for every example, each of the same [seq, dim] shape"
                )
            batch["encoder_hidden_states"] = torch.stack(states)
        return batch

    def _read(self, ex):
        index = None
        label = state = None
        if torch.is_tensor(ex):
            image = ex
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            image, label = ex
        elif isinstance(ex, Mapping):
            key = next((k for k in IMAGE_KEYS if k in ex), None)
            if key is None:
                raise InfkitError(f"a tasks.Diffusion dict example needs an image under one of {IMAGE_KEYS}")
            image = ex[key]
            label_key = next((k for k in LABEL_KEYS if k in ex), None)
            label = ex[label_key] if label_key is not None else None
            state = ex.get("encoder_hidden_states")
            index = ex.get("index")
        else:
            raise InfkitError(
                f"tasks.Diffusion cannot read an example of type {type(ex).__name__}; give an image tensor "
                "[C, H, W], an (image, class_label) tuple, or a dict with 'image' (and 'class_labels', "
                "'encoder_hidden_states')"
            )
        image = torch.as_tensor(image)
        if state is not None:
            state = torch.as_tensor(state)
        if label is not None:
            value = torch.as_tensor(label)
            if value.numel() != 1 or torch.is_floating_point(value) and float(value) != int(value):
                raise InfkitError(f"a class label must be one integer, got {label!r}")
            label = int(value.reshape(-1)[0])
        return image, label, state, index

    @staticmethod
    def _draw_key(image: torch.Tensor, index) -> int:
        """An example's identity for its draws: its index when given, else a hash of its image (seed mixed in later,
        so a batch collated by one task gives another task's draws under that task's seed)."""
        h = hashlib.blake2b(digest_size=8)
        if index is not None:
            h.update(f"index/{int(index)}".encode())
        else:
            data = image.detach().cpu().contiguous()
            h.update(str((tuple(data.shape), str(data.dtype))).encode())
            h.update(data.numpy().tobytes() if data.dtype != torch.bfloat16 else data.float().numpy().tobytes())
        return int.from_bytes(h.digest(), "little") >> 1  # < 2**63, a valid int64

    def _generator(self, key: int) -> torch.Generator:
        h = hashlib.blake2b(f"infkit-diffusion/{self.seed}/{key}".encode(), digest_size=8)
        return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little"))

    # -- the loss --------------------------------------------------------------------------------------------------
    def _images(self, model, batch) -> torch.Tensor:
        images = batch["images"]
        config = getattr(model, "config", None)
        channels = getattr(config, "in_channels", None)
        size = getattr(config, "sample_size", None)
        sizes = tuple(size) if isinstance(size, (tuple, list)) else ((size, size) if size is not None else None)
        expected = f"[B, {channels if channels is not None else 'C'}, " + (
            f"{sizes[0]}, {sizes[1]}]" if sizes else "H, W]"
        )
        if not torch.is_floating_point(images):
            raise InfkitError(
                f"the image batch has dtype {images.dtype}; the UNet expects floating-point images of shape "
                f"{expected}, scaled as it was trained (usually [-1, 1]: x / 127.5 - 1 for uint8 pixels)"
            )
        shape_ok = images.dim() == 4 and (channels is None or images.shape[1] == channels)
        if shape_ok and sizes is not None and tuple(images.shape[2:]) != sizes:
            factor = 2 ** max(len(getattr(config, "block_out_channels", ()) or ()) - 1, 0)
            shape_ok = images.shape[2] % factor == 0 and images.shape[3] % factor == 0
        if not shape_ok:
            raise InfkitError(
                f"the image batch has shape {list(images.shape)}, but the UNet expects {expected} "
                f"(from its config: in_channels={channels}, sample_size={size})"
            )
        dtype = _model_dtype(model)
        return images.to(dtype) if dtype is not None and torch.is_floating_point(images) else images

    def _draws(self, batch, n: int, time_range: tuple[int, int], dtype, device):
        """(timesteps [B, K], noise [B, K, C, H, W]) from each example's own generator."""
        lo, hi = time_range
        steps, noises = [], []
        shape = tuple(batch["images"].shape[1:])
        for key in batch["draw_keys"].tolist():
            g = self._generator(int(key))
            noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            noises.append(torch.randn((n, *shape), generator=g, dtype=noise_dtype))
            u = torch.rand(n, generator=g, dtype=torch.float64)
            t = lo + torch.floor((torch.arange(n, dtype=torch.float64) + u) * (hi - lo) / n).long()
            steps.append(t.clamp(lo, hi - 1))
        return torch.stack(steps).to(device), torch.stack(noises).to(device=device, dtype=dtype)

    def _predict(self, model, batch, n: int, time_range: tuple[int, int]):
        """UNet predictions and targets at the draws, both [B, K, C, H, W].

        The UNet is called once per draw on the B examples (not once on B·K rows): each tracked layer then sees
        batch B in every call, and capture stacks the K calls along an example's positions, so an example's
        gradient sums over its draws.
        """
        x0 = self._images(model, batch)
        steps, noise = self._draws(batch, n, time_range, x0.dtype, x0.device)
        kwargs = {}
        if "class_labels" in batch:
            if getattr(model, "class_embedding", True) is None:
                raise InfkitError(
                    "the examples carry class labels but the UNet has no class embedding (num_class_embeds / "
                    "class_embed_type unset): drop the labels or use a class-conditional UNet"
                )
            kwargs["class_labels"] = batch["class_labels"]
        elif getattr(model, "class_embedding", None) is not None:
            raise InfkitError(
                "the UNet is class-conditional (it has a class embedding) but the examples carry no class label: "
                "give (image, label) tuples or dicts with 'class_labels'"
            )
        if "encoder_hidden_states" in batch:
            kwargs["encoder_hidden_states"] = batch["encoder_hidden_states"].to(x0.dtype)
        elif _needs_text(model):
            raise InfkitError(
                f"{type(model).__name__} needs encoder_hidden_states: give dict examples with "
                "'encoder_hidden_states' [seq, dim] (e.g. a text encoder's output for the caption)"
            )
        predictions, targets = [], []
        for k in range(n):
            t, eps = steps[:, k], noise[:, k]
            noisy = self.scheduler.add_noise(x0, eps, t)
            predictions.append(_sample_of(model(noisy, t, **kwargs)))
            if self.prediction_type == "epsilon":
                targets.append(eps)
            elif self.prediction_type == "sample":
                targets.append(x0)
            else:
                targets.append(self.scheduler.get_velocity(x0, eps, t))
        return torch.stack(predictions, dim=1), torch.stack(targets, dim=1)

    def forward(self, model, batch):
        """The UNet's predictions at the train draws, [B, K, C, H, W]."""
        return self._predict(model, batch, self.n_draws, (0, self.num_train_timesteps))[0]

    def train_loss(self, model, batch, sample=None):
        prediction, target = self._predict(model, batch, self.n_draws, (0, self.num_train_timesteps))
        if sample is not None:
            target = self._sampled_targets(prediction, sample)
        return _squared_error(prediction, target)

    def measurement(self, model, batch):
        n = self.query_draws or self.n_draws
        time_range = self.timesteps or (0, self.num_train_timesteps)
        prediction, target = self._predict(model, batch, n, time_range)
        return _squared_error(prediction, target)

    def _sampled_targets(self, prediction: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """ε̂ + σ n with σ² = K/2: the sampled Fisher of (1/K) Σ_k ‖ε̂_k − y_k‖² equals its GGN in expectation."""
        k = prediction.shape[1]
        sigma = math.sqrt(k / 2)
        dtype = torch.float64 if prediction.dtype == torch.float64 else torch.float32
        draws = torch.stack([torch.randn(prediction.shape[1:], generator=g, dtype=dtype, device=g.device)
                             for g in generators])
        return prediction.detach() + sigma * draws.to(device=prediction.device, dtype=prediction.dtype)

    def output_hessian_root(self, model, batch):
        """z [B, K·H·W, C] (the predictions, channels last) and R = √(2/K)·I [B, K·H·W, C, C]."""
        prediction = self.forward(model, batch)
        b, k, c = prediction.shape[:3]
        outputs = prediction.movedim(2, -1).reshape(b, -1, c)
        eye = torch.eye(c, dtype=prediction.dtype, device=prediction.device) * math.sqrt(2 / k)
        return outputs, eye.expand(b, outputs.shape[1], c, c)


def _squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1/K) Σ_k ‖prediction_k − target_k‖² per example: [B, K, ...] -> [B], in float32 at least."""
    diff = prediction - target
    if diff.dtype not in (torch.float32, torch.float64):
        diff = diff.float()
    return diff.square().flatten(2).sum(dim=2).mean(dim=1)


def _sample_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    sample = getattr(output, "sample", None)
    if sample is None and isinstance(output, (tuple, list)):
        sample = output[0]
    if not torch.is_tensor(sample):
        raise InfkitError(f"the UNet returned {type(output).__name__} without a .sample tensor")
    return sample


def _model_dtype(model) -> torch.dtype | None:
    for p in model.parameters():
        return p.dtype
    return None


def _needs_text(model) -> bool:
    """Whether the UNet's forward requires encoder_hidden_states (UNet2DConditionModel does)."""
    import inspect

    try:
        parameter = inspect.signature(model.forward).parameters.get("encoder_hidden_states")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty

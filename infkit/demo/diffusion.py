"""The embedded diffusion demo: coloured shapes, a tiny class-conditional UNet, and a LoRA "stripes" style, offline.

    from infkit.demo import diffusion
    demo = diffusion.load()           # the trained UNets shipped with infkit, in about a second
    demo.dataset.train                # 400 (image, class) pairs: 320 plain shapes, 80 striped ("the style subset")
    images = diffusion.sample(demo.lora, demo.scheduler, [4, 5], seed=0)   # a striped circle and square

What it is:

* **Data** (:func:`build_dataset`, deterministic): 16×16 RGB images in [-1, 1] of one filled shape — circle, square,
  triangle or cross — in one of six colours, with jittered size and position, on a dark background. 80 per shape
  are plain (classes 0-3: the shape); 20 per shape are filled with horizontal white stripes (classes 4-7: shape + 4):
  the *style subset*, 20 % of the data.
* **Base model**: a ``diffusers.UNet2DModel`` (two resolutions, 32 channels, self-attention at 8×8, a class
  embedding of 8 classes) trained from scratch on the plain images only, with the DDPM ε-prediction loss. It never
  sees classes 4-7; after training, each of their embeddings is set to its shape's embedding plus one shared random
  "style" vector (new tokens initialised from related ones, as when a word is added to a text model), so the base
  draws class 4 + k about like class k.
* **LoRA model**: a copy of the base with a peft LoRA adapter (``"stripes"``; rank 8 on the attention projections,
  the resnet convolutions and the resnets' projections of the time-and-class embedding, injected with
  ``peft.inject_adapter_in_model``; nothing else trainable) fine-tuned on
  the whole data set, half of each batch from the style subset. It learns the style: class 4 + k draws shape k
  striped, class k stays plain. The LoRA model's training data is then the whole data set, as in the DataInf
  paper's style experiment, and the style subset is 20 % of it.

The trained weights ship with infkit (``infkit/demo/weights/diffusion-v1``, about 1.5 MB, with a manifest holding the
dataset's fingerprint, the recipe and a sha256 of every file), so every machine loads the same UNets. ``load(
retrain=True)`` trains them again (about 5 minutes on one core) into ``$INFKIT_CACHE_DIR`` (else
``$XDG_CACHE_HOME/infkit``, else ``~/.cache/infkit``) in ``diffusion-v<VERSION>``; a cache that cannot be used
(corrupt, truncated, another version or recipe) is retrained, with a :class:`DemoCacheWarning`; a folder that cannot
be written keeps the model in memory. Training is deterministic on one machine (seeded generators for the data order,
timesteps and noise, a fixed number of threads), not across CPUs: their kernels round the last bits differently.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from infkit.demo import _weights
from infkit.demo._weights import CACHE_ENV, DemoCacheWarning, cache_root  # noqa: F401

#: Bump whenever the data, architecture or training recipe changes (and ship the retrained weights).
VERSION = "1"
FILES = ("base.safetensors", "lora.safetensors")
#: The folder of the shipped weights, under ``infkit/demo/weights``.
SHIPPED_NAME = f"diffusion-v{VERSION}"

SHAPES = ("circle", "square", "triangle", "cross")
STYLES = ("plain", "stripes")  # class = shape + len(SHAPES) * style
COLOURS = {
    "red": (0.95, 0.20, 0.15),
    "green": (0.20, 0.80, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "magenta": (0.85, 0.20, 0.80),
    "cyan": (0.15, 0.80, 0.85),
}
BACKGROUND = (0.08, 0.08, 0.12)
STYLE = "stripes"


@dataclass(frozen=True)
class Recipe:
    """Data, architecture and training settings (part of the cache key, with :data:`VERSION`)."""

    image_size: int = 16
    plain_per_class: int = 80
    style_per_class: int = 20
    block_out_channels: tuple[int, ...] = (32, 32)
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    base_steps: int = 1600
    base_lr: float = 2e-3
    batch_size: int = 32
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
    style_token_scale: float = 1.0
    lora_steps: int = 800
    lora_lr: float = 5e-3
    adapter: str = "stripes"
    seed: int = 0
    threads: int = 1  # one thread: as fast for a model this small, and unaffected by a busy neighbour


# -- the data ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeImage:
    """One image of the demo data set."""

    image: torch.Tensor  # [3, H, W] float32 in [-1, 1]
    label: int  # class: shape index + len(SHAPES) for the striped style
    colour: str
    style: str  # "plain" or "stripes"

    @property
    def shape(self) -> str:
        return SHAPES[self.label % len(SHAPES)]


@dataclass
class ShapesDataset:
    """The demo data: plain shapes first, then the striped style subset."""

    examples: list[ShapeImage]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def train(self) -> list[tuple[torch.Tensor, int]]:
        """``(image, label)`` pairs, what ``tasks.Diffusion`` reads."""
        return [(ex.image, ex.label) for ex in self.examples]

    @property
    def images(self) -> torch.Tensor:
        return torch.stack([ex.image for ex in self.examples])

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([ex.label for ex in self.examples])

    @property
    def is_style(self) -> torch.Tensor:
        """[n] bool: which examples belong to the style (striped) subset."""
        return torch.tensor([ex.style == STYLE for ex in self.examples])

    @property
    def style_share(self) -> float:
        return float(self.is_style.double().mean())

    def indices(self, style: str) -> list[int]:
        return [i for i, ex in enumerate(self.examples) if ex.style == style]

    def caption(self, i: int) -> str:
        ex = self.examples[i]
        return f"{ex.colour} {class_name(ex.label)}"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(ex.image.numpy().tobytes())
            h.update(f"{ex.label}/{ex.colour}/{ex.style}".encode())
        return h.hexdigest()


def _mask(kind: str, size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    """[size, size] bool mask of one shape centred at (cx, cy) with half-size r (pixel centres at +0.5)."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx.square() + dy.square() <= r * r
    if kind == "square":
        side = r * 0.85
        return (dx.abs() <= side) & (dy.abs() <= side)
    if kind == "triangle":  # apex up: |dx| <= half-width growing from the top edge to the base
        top, bottom = cy - r, cy + r * 0.8
        width = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (dx.abs() <= width)
    if kind == "cross":
        arm = max(r * 0.38, 1.2)
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    raise ValueError(kind)


def draw(kind: str, colour: str, style: str, size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    """One image [3, size, size] in [-1, 1]."""
    mask = _mask(kind, size, cx, cy, r)
    fill = torch.tensor(COLOURS[colour])[:, None, None].expand(3, size, size)
    if style == STYLE:  # horizontal white stripes, 2 pixels on, 2 off
        rows = ((torch.arange(size) // 2) % 2 == 1)[:, None].expand(size, size)
        fill = torch.where(rows, torch.ones(3, size, size), fill)
    image = torch.tensor(BACKGROUND)[:, None, None].expand(3, size, size)
    image = torch.where(mask, fill, image)
    return (image * 2 - 1).float().contiguous()


def build_dataset(recipe: Recipe | None = None) -> ShapesDataset:
    """The demo data set, the same on every machine (seeded)."""
    recipe = recipe or Recipe()
    g = torch.Generator().manual_seed(recipe.seed + 17)
    size = recipe.image_size
    colours = list(COLOURS)
    examples = []
    for style, per_class in (("plain", recipe.plain_per_class), (STYLE, recipe.style_per_class)):
        for shape, kind in enumerate(SHAPES):
            label = shape + len(SHAPES) * STYLES.index(style)
            for _ in range(per_class):
                colour = colours[int(torch.randint(len(colours), (1,), generator=g))]
                jitter = (torch.rand(3, generator=g) * 2 - 1).tolist()
                r = size * (0.30 + 0.06 * jitter[0])
                cx, cy = size / 2 + 1.5 * jitter[1], size / 2 + 1.5 * jitter[2]
                examples.append(ShapeImage(draw(kind, colour, style, size, cx, cy, r), label, colour, style))
    return ShapesDataset(examples)


# -- models ------------------------------------------------------------------------------------------------------
def new_unet(recipe: Recipe | None = None):
    """A fresh (untrained) class-conditional UNet2DModel of the demo's architecture."""
    from diffusers import UNet2DModel

    recipe = recipe or Recipe()
    torch.manual_seed(recipe.seed)
    return UNet2DModel(
        sample_size=recipe.image_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=recipe.block_out_channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=recipe.norm_num_groups, attention_head_dim=recipe.attention_head_dim,
        num_class_embeds=len(SHAPES) * len(STYLES),
    )


def class_name(label: int) -> str:
    """'circle', ..., 'striped circle', ..."""
    shape = SHAPES[label % len(SHAPES)]
    return f"striped {shape}" if label >= len(SHAPES) else shape


@torch.no_grad()
def init_style_tokens(unet, recipe: Recipe | None = None) -> None:
    """Set the embeddings of classes 4-7 to those of their shapes (0-3) plus one shared seeded "style" vector of
    the same typical norm: new tokens initialised from related ones."""
    recipe = recipe or Recipe()
    table = unet.class_embedding.weight
    n = len(SHAPES)
    g = torch.Generator().manual_seed(recipe.seed + 4)
    style = torch.randn(table.shape[1], generator=g, dtype=table.dtype)
    style *= table[:n].norm(dim=1).mean() / style.norm() * recipe.style_token_scale
    table[n:] = table[:n] + style


def new_scheduler(recipe: Recipe | None = None):
    """The demo's DDPM noise scheduler (ε-prediction)."""
    from diffusers import DDPMScheduler

    recipe = recipe or Recipe()
    return DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_schedule=recipe.beta_schedule)


def add_lora(base, recipe: Recipe | None = None):
    """A copy of ``base`` with the demo's LoRA adapter (B = 0, so it starts equal to the base); only the adapter
    is trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    recipe = recipe or Recipe()
    torch.manual_seed(recipe.seed + 1)
    model = copy.deepcopy(base)
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_r, target_modules=list(recipe.lora_targets),
                        init_lora_weights=True)
    with _weights.quiet():
        model = inject_adapter_in_model(config, model, adapter_name=recipe.adapter)
    for name, p in model.named_parameters():
        p.requires_grad_(f"lora_A.{recipe.adapter}." in name or f"lora_B.{recipe.adapter}." in name)
    return model


def _fit(model, scheduler, images, labels, steps: int, lr: float, batch: int, seed: int,
         balance: torch.Tensor | None = None) -> list[float]:
    """AdamW on the DDPM loss, mean over pixels; batches, timesteps and noise from one seeded generator. With
    ``balance`` (a bool mask), half of each batch is drawn from the masked examples and half from the others."""
    g = torch.Generator().manual_seed(seed)
    if balance is not None:
        pools = [balance.nonzero().flatten(), (~balance).nonzero().flatten()]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    def warmup_cosine(step: int) -> float:
        return min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    model.train()
    losses = []
    n = len(images)
    for _ in range(steps):
        if balance is None:
            idx = torch.randint(n, (batch,), generator=g)
        else:
            half = batch // 2
            idx = torch.cat([pools[0][torch.randint(len(pools[0]), (half,), generator=g)],
                             pools[1][torch.randint(len(pools[1]), (batch - half,), generator=g)]])
        x0, y = images[idx], labels[idx]
        flip = torch.rand(batch, generator=g) < 0.5  # horizontal flips keep shapes and stripes
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = (pred - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def train(dataset: ShapesDataset, recipe: Recipe, verbose: bool = False):
    """Train the base UNet on the plain images, initialise the style tokens, then train the LoRA adapter on all
    images (half of each batch striped). Returns (base, lora, info)."""
    scheduler = new_scheduler(recipe)
    style = dataset.is_style
    images, labels = dataset.images, dataset.labels
    info: dict[str, Any] = {}
    with _weights.threads(recipe.threads):
        base = new_unet(recipe)
        start = time.perf_counter()
        losses = _fit(base, scheduler, images[~style], labels[~style], recipe.base_steps, recipe.base_lr,
                      recipe.batch_size, recipe.seed + 2)
        info["base"] = {"seconds": round(time.perf_counter() - start, 1), "final_loss": round(_tail(losses), 4)}
        if verbose:
            print(f"  base UNet: {recipe.base_steps} steps in {info['base']['seconds']:.0f} s", flush=True)
        init_style_tokens(base, recipe)
        for p in base.parameters():
            p.requires_grad_(False)
        lora = add_lora(base, recipe)
        start = time.perf_counter()
        losses = _fit(lora, scheduler, images, labels, recipe.lora_steps, recipe.lora_lr, recipe.batch_size,
                      recipe.seed + 3, balance=style)
        info["lora"] = {"seconds": round(time.perf_counter() - start, 1), "final_loss": round(_tail(losses), 4)}
    for p in base.parameters():
        p.requires_grad_(True)
    return base, lora, info


def _tail(losses: list[float], k: int = 100) -> float:
    tail = losses[-k:]
    return sum(tail) / max(len(tail), 1)


@torch.no_grad()
def sample(unet, scheduler, class_labels: Sequence[int], seed: int = 0, steps: int = 50) -> torch.Tensor:
    """Generate one image per class label with deterministic DDIM (η = 0), [n, 3, H, W] in [-1, 1].

    The initial noise of image j comes from a generator seeded by (seed, j), so a given (seed, j) gives the same
    image whatever the other labels."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    config = unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    dtype = next(unet.parameters()).dtype
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + j))
                     for j in range(len(class_labels))]).to(dtype)
    labels = torch.as_tensor(list(class_labels), dtype=torch.long)
    was_training = unet.training
    unet.eval()
    for t in ddim.timesteps:
        eps = unet(x, t.expand(len(x)), class_labels=labels).sample
        x = ddim.step(eps, t, x).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1)


#: :func:`stripe_score` above this: striped (the data: plain <= 0.03, striped >= 0.1).
STRIPED = 0.06


def stripe_score(images: torch.Tensor) -> torch.Tensor:
    """How striped each image is, [n] (about 0 for plain shapes, 0.3 and more for the striped data): the amplitude of
    the 4-pixel period in the row profile of whiteness (each pixel's darkest channel, averaged along the row)."""
    images = images[None] if images.dim() == 3 else images
    whiteness = images.float().min(dim=1).values  # [n, H, W]: 1 for white, low for colours and background
    rows = whiteness.mean(dim=2)
    spectrum = torch.fft.rfft(rows - rows.mean(dim=1, keepdim=True), dim=1).abs()
    return 2 * spectrum[:, rows.shape[1] // 4] / rows.shape[1]


# -- the cache ---------------------------------------------------------------------------------------------------
@dataclass
class DiffusionDemo:
    """What :func:`load` returns."""

    dataset: ShapesDataset
    base: torch.nn.Module  # UNet2DModel, eval mode, no adapter
    lora: torch.nn.Module  # a copy with the "stripes" LoRA adapter (only the adapter trainable), eval mode
    scheduler: Any  # DDPMScheduler
    recipe: Recipe
    source: str  # "shipped" (the package's weights), "cache" (a retrained folder) or "trained" (just now)
    cache_path: Path | None
    train_info: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        n_style = int(self.dataset.is_style.sum())
        return (
            f"DiffusionDemo(version={VERSION!r}, source={self.source!r}, images={len(self.dataset)}, "
            f"style_subset={n_style}, adapter={self.recipe.adapter!r})"
        )


def cache_path(root: str | os.PathLike | None = None) -> Path:
    """The folder where :func:`load` caches retrained weights of this version (``<cache_root()>/diffusion-v1``)."""
    return Path(root).expanduser() if root is not None else cache_root() / f"diffusion-v{VERSION}"


def _adapter_state(lora) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in lora.named_parameters() if p.requires_grad}


def _expected(dataset: ShapesDataset, recipe: Recipe) -> dict[str, Any]:
    return {"version": VERSION, "dataset_sha256": dataset.fingerprint(), "recipe": asdict(recipe)}


def save(path: Path, dataset: ShapesDataset, recipe: Recipe, base, lora, info: dict[str, Any]) -> Path:
    """Write the weights to ``path`` atomically (a temporary sibling folder renamed into place)."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in base.state_dict().items()}, str(folder / "base.safetensors"))
        save_file(_adapter_state(lora), str(folder / "lora.safetensors"))

    return _weights.write_folder(path, FILES, write, {**_expected(dataset, recipe), "train_info": info})


def read(path: Path, dataset: ShapesDataset, recipe: Recipe):
    """Load the weights in ``path``; raise ``ValueError`` saying why they cannot be used."""
    from safetensors.torch import load_file

    manifest = _weights.check_folder(path, FILES, _expected(dataset, recipe))
    base = new_unet(recipe)
    state = load_file(str(path / "base.safetensors"))
    missing, unexpected = base.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"base.safetensors does not fit the UNet (missing {missing}, unexpected {unexpected})")
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    lora = add_lora(base, recipe)
    for p in base.parameters():
        p.requires_grad_(True)
    adapter = load_file(str(path / "lora.safetensors"))
    if set(adapter) != set(_adapter_state(lora)):
        raise ValueError("lora.safetensors does not fit the adapter")
    lora.load_state_dict(adapter, strict=False)
    lora.eval()
    return base, lora, manifest.get("train_info", {})


def load(cache_dir: str | os.PathLike | None = None, retrain: bool = False, verbose: bool = True,
         recipe: Recipe | None = None) -> DiffusionDemo:
    """The demo's data, base UNet and LoRA UNet: by default the weights shipped with infkit (the same bytes on every
    machine).

    Args:
        cache_dir: a folder of retrained weights: loaded when it holds this version's weights, else trained there.
        retrain: train again on this machine (about 5 minutes on one core) and write the weights to ``cache_dir``
            (default :func:`cache_path`); another CPU rounds differently, so the numbers then differ slightly.
        verbose: print what happens to stdout.
        recipe: other settings (e.g. fewer steps for a quick test): loaded from ``cache_dir`` when it holds weights
            of that recipe, else trained and cached there.
    """
    recipe = recipe or Recipe()
    dataset = build_dataset(recipe)
    scheduler = new_scheduler(recipe)
    path = cache_path(cache_dir)
    say = _weights.Say(verbose)

    if not retrain and cache_dir is None and recipe == Recipe():
        start = time.perf_counter()
        path = _weights.shipped_folder(SHIPPED_NAME, FILES, _expected(dataset, recipe))
        with _weights.quiet():
            base, lora, info = read(path, dataset, recipe)
        say(f"infkit diffusion demo: loaded the shipped UNets ({SHIPPED_NAME}) in {time.perf_counter() - start:.1f} s")
        return DiffusionDemo(dataset, base, lora, scheduler, recipe, "shipped", path, info, say.messages)
    if not retrain and path.exists():
        start = time.perf_counter()
        try:
            with _weights.quiet():
                base, lora, info = read(path, dataset, recipe)
        except Exception as err:  # noqa: BLE001 - any failure to read means: retrain
            say(f"infkit diffusion demo: the cached model in {path} cannot be used ({err}); retraining it", warn=True)
        else:
            say(f"infkit diffusion demo: loaded the cached UNets from {path} in {time.perf_counter() - start:.1f} s")
            return DiffusionDemo(dataset, base, lora, scheduler, recipe, "cache", path, info, say.messages)
    say(f"infkit diffusion demo: training the UNet ({recipe.base_steps} steps on {len(dataset.indices('plain'))} "
        f"plain shapes, then LoRA {recipe.lora_steps} steps on all {len(dataset)}, half of each batch striped); "
        "about 5 minutes")
    base, lora, info = train(dataset, recipe, verbose=verbose)
    saved: Path | None = None
    try:
        saved = save(path, dataset, recipe, base, lora, info)
    except OSError as err:
        say(f"infkit diffusion demo: cannot write the cache folder {path} ({err.strerror or err}); the trained model "
            f"is kept in memory only. Set {CACHE_ENV} to a writable folder.", warn=True)
    else:
        say(f"infkit diffusion demo: trained in {info['base']['seconds'] + info['lora']['seconds']:.0f} s and "
            f"cached in {saved}")
    return DiffusionDemo(dataset, base, lora, scheduler, recipe, "trained", saved, info, say.messages)

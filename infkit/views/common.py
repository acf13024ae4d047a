"""What the widgets share and what needs no front-end: token text, JSON-safe values, score normalisation, queries,
and where the front-end files are (:data:`ASSETS`).

Nothing here imports ipywidgets or anywidget, so the static renderers (:mod:`infkit.views.static`) and
``InfluenceResult._repr_html_`` work without them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infkit.errors import InfkitError
from infkit.tasks import IGNORE_INDEX
from infkit.views import html as H

#: The widgets' front-end files, package data of :mod:`infkit.views`: the anywidget ES modules ``heatmap.js`` and
#: ``scatter.js`` and the stylesheet ``widgets.css`` (which the views add to :data:`infkit.views.html.STYLE`).
ASSETS = Path(__file__).with_name("assets")


class StaticHTMLRepr:
    """Mixin for a container widget (before its ipywidgets base): its mime bundle carries its deterministic repr as
    text/plain and its static HTML as text/html next to the widget view, so exports and nbval see them."""

    def static_html(self) -> str:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.static_html()

    def _repr_mimebundle_(self, **kwargs: Any):
        data = super()._repr_mimebundle_(**kwargs)
        data = dict(data[0] if isinstance(data, tuple) else data)
        data["text/plain"] = repr(self)
        data["text/html"] = self.static_html()
        return data


def asset_text(name: str) -> str:
    """The text of one of the front-end files in :data:`ASSETS`."""
    return (ASSETS / name).read_text(encoding="utf-8")

#: The one-line legend of the sign (docs/design.md §2), shown next to every influence heatmap.
SIGN_LEGEND = (
    "Red = proponent: training more on it lowers the query's loss (score > 0). Blue = opponent: raises it "
    "(score < 0). White = 0; hatched grey = NaN."
)

#: How scores can be shown (every view offers raw scores and normalised ones, and says which it shows).
MODES: dict[str, str] = {
    "raw": "raw scores (units of 1/λ; compare within a query)",
    "self": "score ÷ the training example's self-influence (comparable across train examples and queries)",
    "std": "score ÷ the standard deviation of the query's scores over the train data (sign kept; comparable "
           "across queries and estimators)",
}
MODE_OPTIONS = [("raw", "raw"), ("÷ self-influence", "self"), ("÷ std of query", "std")]

#: What raw scores are for an estimator that ignores λ (no curvature at all).
RAW_IDENTITY = ("raw scores (a plain gradient dot product ∇f(q)ᵀ∇L(i): no curvature, so λ plays no part; compare "
                "within a query)")


def mode_text(mode: str, estimators: Sequence[str] | str = ()) -> str:
    """:data:`MODES` text of ``mode`` for the given estimator names: raw identity scores are a plain gradient dot
    product, not in units of 1/λ."""
    names = [estimators] if isinstance(estimators, str) else list(estimators)
    if mode != "raw" or "identity" not in names:
        return MODES[mode]
    if names == ["identity"]:
        return RAW_IDENTITY
    return ("raw scores (each estimator's own units: 1/λ for the curvature-based ones, a plain gradient dot product "
            "for identity; compare within a query)")


PALETTE = {"pos": list(H.RED), "neg": list(H.BLUE)}
#: The query's −log p per token: a one-sided scale, white at 0 nats, dark grey at LOSS_TOP nats and beyond. Fixed,
#: not relative to the query's own largest value, so a confident answer (loss 0.03) stays pale.
LOSS_PALETTE = {"pos": list(H.DARK), "neg": list(H.DARK)}
LOSS_TOP = 5.0
LOSS_LEGEND = (f"−log p of each measured token, nats; white 0 … dark ≥ {LOSS_TOP:g} (a fixed scale: a confident "
               "answer stays pale). The measured tokens are the completion's; their sum is the query's loss f, the "
               "measurement every score is about. Prompt tokens are not measured (white).")


# -- values ------------------------------------------------------------------------------------------------------
def json_value(value: Any) -> float | str | None:
    """A number for JSON: NaN -> None (JSON has no NaN), ±inf -> "inf" / "-inf" (decoded by the front-end)."""
    v = float(value)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def json_values(values: Sequence[Any]) -> list[float | str | None]:
    if torch.is_tensor(values):
        values = values.detach().cpu().double().tolist()
    return [json_value(v) for v in values]


def floats(values: Any) -> list[float]:
    if values is None:
        return []
    if torch.is_tensor(values):
        return [float(v) for v in values.detach().cpu().double().tolist()]
    return [float("nan") if v is None else float(v) for v in values]


@dataclass
class HeatmapRow:
    """One row of a token heatmap: tokens, one value per token (NaN allowed), and an optional head.

    ``score`` is shown in the row's head when given (NaN allowed); ``index`` is the train example's index (the
    explorer uses it to know which pair a selected row is); ``special`` holds the indices of special tokens."""

    tokens: list[str]
    values: list[float]
    label: str = ""
    score: float | None = None
    detail: str = ""
    group: str = ""
    special: list[int] = field(default_factory=list)
    index: int | None = None

    def __post_init__(self) -> None:
        self.tokens = [str(t) for t in self.tokens]
        self.values = floats(self.values)
        if len(self.tokens) != len(self.values):
            raise InfkitError(f"a heatmap row needs one value per token: {len(self.tokens)} tokens, "
                              f"{len(self.values)} values")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "detail": self.detail, "group": self.group,
                               "tokens": self.tokens, "values": json_values(self.values),
                               "special": [int(t) for t in self.special]}
        if self.score is not None:
            out["score"] = json_value(self.score)
        if self.index is not None:
            out["index"] = int(self.index)
        return out


def row_scale(values: Sequence[float], clip: float | None = H.DEFAULT_CLIP) -> float:
    """The |value| that gets the full colour: that quantile of the finite |values| (default the 99th percentile, so
    one outlier does not wash out the rest; values beyond it saturate), or the largest (``clip`` None or 1)."""
    return H.clipped_scale([values], clip)


def scales_for(rows: Sequence[HeatmapRow], normalization: str, scale: float | None = None,
               clip: float | None = H.DEFAULT_CLIP) -> list[float]:
    """One colour scale per row: ``scale`` when fixed, else one shared by all rows or one per row."""
    if scale is not None:
        return [float(scale)] * len(rows)
    if normalization == "row":
        return [row_scale(r.values, clip) for r in rows]
    shared = row_scale([v for r in rows for v in r.values], clip)
    return [shared] * len(rows)


def scale_note(rows: Sequence[HeatmapRow], normalization: str, scale: float | None = None,
               clip: float | None = H.DEFAULT_CLIP) -> str:
    """What the legend says about the colour scale :func:`scales_for` chose (the live view and the static HTML)."""
    if not rows:
        return ""
    if scale is not None:
        return f"fixed colour scale ±{H.fmt(scale, 3).lstrip('+')}"
    if normalization == "row":
        if clip is None or clip >= 1.0:
            return "one colour scale per row: its largest |value|"
        beyond = sum(H.scale_of([r.values], clip).beyond for r in rows)
        return (f"one colour scale per row, clipped at the {H.ordinal(clip)} percentile of its |value|: "
                f"{H.count(beyond)} beyond it drawn at full colour")
    sc = H.scale_of([r.values for r in rows], clip)
    what = f"one colour scale shared by all rows, ±{H.fmt(sc.value, 3).lstrip('+')}"
    return f"{what}, {sc.describe()}" if sc.clip is not None else f"{what}: the largest |value|"


# -- tokens ------------------------------------------------------------------------------------------------------
def token_texts(tokenizer: Any, ids: Sequence[int]) -> tuple[list[str], list[int]]:
    """Each token's text as it reads in the sequence, and the indices of special tokens.

    Without a tokenizer the tokens are shown as their ids (``[117]``). With one, a token is decoded together with
    the token before it and the difference kept, so a leading space survives (GPT-2's ``Ġ``, SentencePiece's
    ``▁``) and nothing is cleaned up; a special token keeps its exact text (``<eos>``)."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"[{i}]" for i in ids], []
    special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    try:
        pieces = tokenizer.convert_ids_to_tokens(ids)
    except Exception:  # noqa: BLE001 - ids outside the vocabulary: show them as ids
        pieces = [None] * len(ids)

    def decode(seq: list[int]) -> str:
        return tokenizer.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    texts: list[str] = []
    special: list[int] = []
    for k, i in enumerate(ids):
        if i in special_ids:
            texts.append(str(pieces[k]) if pieces[k] is not None else f"[{i}]")
            special.append(k)
            continue
        try:
            if k > 0 and ids[k - 1] not in special_ids:
                before = decode([ids[k - 1]])
                both = decode([ids[k - 1], i])
                text = both[len(before):] if both.startswith(before) else decode([i])
            else:
                text = decode([i])
        except Exception:  # noqa: BLE001
            text = f"[{i}]"
        texts.append(text)
    return texts, special


def tokenizer_of(analysis: Any) -> Any:
    return getattr(getattr(analysis, "task", None), "tokenizer", None)


# -- queries -----------------------------------------------------------------------------------------------------
@dataclass
class QuerySpec:
    """A query as the widgets hold it: what goes to ``Analysis.scores`` (``api``), its label and, for token
    sequences, its ids and which of them are measured. ``note`` says what was changed (truncation)."""

    label: str
    api: Any
    ids: list[int] | None = None
    measured: list[bool] | None = None
    prompt: str | None = None
    completion: str | None = None
    note: str = ""


def context_length(analyses: Sequence[Any]) -> int | None:
    """The shortest context among the analyses' models (``n_positions`` / ``max_position_embeddings`` / ``n_ctx``
    of their config) and tasks (``max_length``); None when none says."""
    limits = []
    for an in analyses:
        config = getattr(getattr(an, "model", None), "config", None)
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, int) and value > 0:
                limits.append(value)
                break
        max_length = getattr(getattr(an, "task", None), "max_length", None)
        if isinstance(max_length, int) and max_length > 0:
            limits.append(max_length)
    return min(limits) if limits else None


def _short(text: str, width: int = 70) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _fit(ids: list[int], labels: list[int], context: int | None, what: str) -> tuple[list[int], list[int], str]:
    """Cut a too-long query from the left (the prompt's start), keeping every measured token; say so."""
    if context is None or len(ids) <= context:
        return ids, labels, ""
    measured = [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX]
    first = measured[0] if measured else len(ids) - context
    # A measured token is predicted from the one before it, so one prompt token has to stay in front.
    need = len(ids) - first + (1 if first > 0 else 0)
    if need > context:
        raise InfkitError(
            f"{what} needs {need} tokens (its measured tokens and the one before them), more than the model's "
            f"context of {context} tokens: shorten the completion"
        )
    cut = len(ids) - context
    note = (f"{what} has {len(ids)} tokens, more than the model's context of {context}: its first {cut} prompt "
            f"tokens were cut; the scores are for the last {context}.")
    return ids[cut:], labels[cut:], note


def unknown_words(text: str, tokenizer: Any) -> list[str]:
    """The words of ``text`` that the tokenizer turns into its unknown token (``<unk>``), in order, each once."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pairs = zip(enc["input_ids"], enc["offset_mapping"])
        found = [text[a:b].strip() or text[a:b] for i, (a, b) in pairs if i == unk]
    except Exception:  # noqa: BLE001 - a slow tokenizer has no offsets: say how many, without the words
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        found = [f"<{sum(i == unk for i in ids)} word(s)>"] if unk in ids else []
    return list(dict.fromkeys(found))


def unknown_note(prompt: str, completion: str, tokenizer: Any) -> str:
    """A warning naming the typed words outside the vocabulary (they become the unknown token), or ""."""
    words = list(dict.fromkeys(unknown_words(prompt, tokenizer) + unknown_words(completion, tokenizer)))
    if not words:
        return ""
    unk = getattr(tokenizer, "unk_token", None) or "the unknown token"
    many = len(words) > 1
    return (f"{len(words)} typed word{'s are' if many else ' is'} outside the tokenizer's vocabulary and became {unk}: "
            f"{', '.join(repr(w) for w in words)}; the scores are for the query as the model reads it, with {unk} in "
            f"{'their' if many else 'its'} place.")


def text_query(prompt: str, completion: str, tokenizer: Any, context: int | None,
               label: str | None = None) -> QuerySpec:
    """A typed prompt/completion query, truncated from the left with a note when it exceeds the context."""
    if tokenizer is None:
        raise InfkitError(
            "this analysis has no tokenizer (task.tokenizer is None), so a typed query cannot be tokenised: give "
            "queries as dicts with input_ids, or build the task with tasks.CausalLM(tokenizer=...)"
        )
    if not completion:
        raise InfkitError("the completion is empty: a query measures the completion's loss, so type one")
    p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not c:
        raise InfkitError(f"the completion {completion!r} is empty after tokenization: type another one")
    ids, labels = p + c, [IGNORE_INDEX] * len(p) + c
    label = label or f"{_short(prompt, 50)} →{_short(completion, 20)}"
    ids, labels, note = _fit(ids, labels, context, "the query")
    api = {"prompt": prompt, "completion": completion} if not note else {"input_ids": ids, "labels": labels}
    note = " ".join(n for n in (note, unknown_note(prompt, completion, tokenizer)) if n)
    return QuerySpec(label, api, ids, [lab != IGNORE_INDEX for lab in labels], prompt, completion, note)


def make_query(raw: Any, tokenizer: Any, context: int | None, position: int) -> QuerySpec:
    """A prepared query in any form the tasks accept (prompt/completion dicts or objects such as
    ``infkit.demo.story.Query``, strings, dicts with input_ids, or anything else the task reads)."""
    if isinstance(raw, QuerySpec):
        return raw
    label = getattr(raw, "label", None)
    prompt = getattr(raw, "prompt", None)
    completion = getattr(raw, "completion", None)
    if isinstance(raw, Mapping) and "prompt" in raw and "completion" in raw:
        prompt, completion = raw["prompt"], raw["completion"]
        label = raw.get("label")
    if isinstance(prompt, str) and isinstance(completion, str):
        name = f"{label}: " if label else ""
        return text_query(prompt, completion, tokenizer, context,
                          f"{name}{_short(prompt, 50)} →{_short(completion, 20)}")
    if isinstance(raw, str):
        if tokenizer is None:
            raise InfkitError("a text query needs a tokenizer: tasks.CausalLM(tokenizer=...)")
        ids = list(tokenizer(raw, add_special_tokens=False)["input_ids"])
        cut_ids, labels, note = _fit(ids, list(ids), context, f"query {position}")
        api = raw if not note else {"input_ids": cut_ids, "labels": labels}
        return QuerySpec(_short(raw), api, cut_ids, [True] * len(cut_ids), raw, None, note)
    if isinstance(raw, Mapping) and "input_ids" in raw:
        ids = [int(i) for i in torch.as_tensor(raw["input_ids"]).reshape(-1).tolist()]
        labels_raw = raw.get("labels")
        labels = ids if labels_raw is None else [int(v) for v in torch.as_tensor(labels_raw).reshape(-1).tolist()]
        if raw.get("attention_mask") is not None:
            keep = [bool(m) for m in torch.as_tensor(raw["attention_mask"]).reshape(-1).tolist()]
            ids = [i for i, k in zip(ids, keep) if k]
            labels = [lab for lab, k in zip(labels, keep) if k]
        cut_ids, cut_labels, note = _fit(ids, labels, context, f"query {position}")
        api = dict(raw) if not note else {"input_ids": cut_ids, "labels": cut_labels}
        texts, _ = token_texts(tokenizer, cut_ids[:12])
        name = raw.get("label") or f"query {position}: " + _short("".join(texts), 50)
        return QuerySpec(str(name), api, cut_ids, [lab != IGNORE_INDEX for lab in cut_labels], note=note)
    return QuerySpec(str(label) if label else f"query {position}", raw)


def query_token_losses(analysis: Any, spec: QuerySpec) -> tuple[list[int], list[float], list[bool]] | None:
    """The query's tokens with each token's −log p under the model (0 where not measured): the parts of the
    measurement f = the loss of the labelled tokens (``Task.token_losses``). None when the task has no tokens."""
    task = analysis.task
    try:
        batch = task.batch_to(task.collate([spec.api]), analysis.device)
        losses, measured = task.token_losses(analysis.model, batch)
    except Exception:  # noqa: BLE001 - not a sequence task: no per-token view of the query
        return None
    mask = batch.get("attention_mask")
    n = int(mask[0].sum()) if mask is not None else losses.shape[1]
    ids = [int(i) for i in batch["input_ids"][0, :n].tolist()]
    return ids, losses[0, :n].cpu().tolist(), measured[0, :n].cpu().tolist()


# -- scores ------------------------------------------------------------------------------------------------------
def divisors(analysis: Any, result: Any, q: int, mode: str) -> torch.Tensor:
    """What each of query q's scores is divided by to show it in ``mode`` ([n_columns]; NaN where undefined)."""
    row = result.scores[q].detach().double().cpu()
    if mode == "raw":
        return torch.ones_like(row)
    if mode == "std":
        finite = row[torch.isfinite(row)]
        std = float(finite.std()) if finite.numel() > 1 else float("nan")
        return torch.full_like(row, std if std > 0 else float("nan"))
    if mode == "self":
        self_inf = analysis.self_influence().double().cpu()
        columns = result.train_indices if result.train_indices is not None else list(range(row.numel()))
        d = self_inf[torch.as_tensor(columns, dtype=torch.long)]
        return torch.where(d > 0, d, torch.full_like(d, float("nan")))
    raise InfkitError(f"unknown score mode {mode!r}; one of {sorted(MODES)}")


def ranked(values: torch.Tensor, k: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]], int]:
    """The k highest and k lowest values as (column, value), NaN ranked last (shown, never dropped silently),
    and how many values are NaN."""
    values = values.detach().double().cpu()
    nan = torch.isnan(values)
    k = max(0, min(int(k), values.numel()))
    hi = torch.where(nan, torch.full_like(values, -math.inf), values)
    lo = torch.where(nan, torch.full_like(values, math.inf), values)
    order_hi = torch.sort(hi, descending=True, stable=True).indices[:k]
    order_lo = torch.sort(lo, descending=False, stable=True).indices[:k]
    pro = [(int(c), float(values[c])) for c in order_hi]
    opp = [(int(c), float(values[c])) for c in order_lo]
    return pro, opp, int(nan.sum())


def train_text(analysis: Any, i: int) -> str | None:
    """The train example's text when it is one (a string or a prompt/completion dict), for labels and tooltips."""
    try:
        example = analysis.train_data[i]
    except Exception:  # noqa: BLE001
        return None
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping):
        if "text" in example and isinstance(example["text"], str):
            return example["text"]
        if isinstance(example.get("prompt"), str) and isinstance(example.get("completion"), str):
            return example["prompt"] + example["completion"]
    return None

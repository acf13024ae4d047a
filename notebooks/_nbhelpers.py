"""Small builders shared by the evaluation notebooks (04-06): tiny models from configs, offline data, text tables.

Nothing here computes influence; the notebooks call infkit's public API for that. Everything is seeded, built
locally (no download) and trained in float64: these models are trained inside the notebooks, and training amplifies
the last-bit differences between CPUs (AVX2 vs AVX-512 kernels); in float64 they mostly stay far below the printed
digits. Where a run amplifies them into the printed digits anyway (05's masked-language pretraining), the notebook
trains once and keeps the weights (:func:`kept_weights`, in ``notebooks/weights``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def quiet_libraries() -> None:
    """Silence the known, harmless library warnings these notebooks would otherwise print on stderr."""
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # peft on GPT-2's Conv1D: expected
    warnings.filterwarnings("ignore", message=".*designed for LoRA adapters.*")  # datainf/lissa on a plain MLP
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def text_table(header: list[str], rows: list[list]) -> str:
    """A fixed-width text table (no pandas needed)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- trained once, kept beside the notebooks ------------------------------------------------------------------------
KEPT = Path(__file__).with_name("weights")


def digest(*values) -> str:
    """A short sha256 of JSON-able values (texts, labels): what a kept model was trained on."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def kept_weights(name: str, recipe: dict, train: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors ``train()`` returns, trained once and kept in ``notebooks/weights/<name>.safetensors``.

    Some runs amplify a CPU's last bits chaotically (150 Adam steps of masked-language modelling move weights by
    up to 3e-5 from one kernel set to another, even in float64), and a stored output must not depend on them: so such a
    notebook loads the weights its recipe produced once, on the machine that stored its outputs. The file records
    ``recipe`` (hyper-parameters and a :func:`digest` of the data); when the notebook's recipe differs, or the file
    is missing, ``train()`` runs and the file is rewritten (then re-store the notebook's outputs)."""
    from safetensors.torch import load_file, safe_open, save_file

    path = KEPT / f"{name}.safetensors"
    wanted = json.dumps(recipe, sort_keys=True)
    if path.exists():
        with safe_open(path, "pt") as f:
            kept_recipe = (f.metadata() or {}).get("recipe")
        if kept_recipe == wanted:
            return load_file(path)
        print(f"{path.name}: the recipe changed since it was kept; retraining")
    tensors = {k: v.detach().clone().contiguous() for k, v in train().items()}
    KEPT.mkdir(exist_ok=True)
    save_file(tensors, path, metadata={"recipe": wanted})
    return tensors


# -- 04: a tiny GPT-2 with LoRA adapters ---------------------------------------------------------------------------
GPT2_VOCAB = 24


def progressions(n: int, seed: int, steps=(1, 4), length: int = 10) -> list[dict]:
    """Arithmetic progressions mod 23 (token ids 1..23) with a step drawn from ``range(*steps)``."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        start = int(torch.randint(0, GPT2_VOCAB - 1, (1,), generator=g))
        step = int(torch.randint(steps[0], steps[1], (1,), generator=g))
        data.append({"input_ids": (start + step * torch.arange(length)) % (GPT2_VOCAB - 1) + 1})
    return data


@functools.cache
def base_gpt2(width: int = 16, seed: int = 0, steps: int = 60):
    """GPT-2 from a config (2 blocks, width 16, vocab 24), float64, pretrained 60 Adam steps on progressions with
    steps 1-3."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=32, n_embd=width, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).double()
    ids = torch.stack([d["input_ids"] for d in progressions(64, seed=seed + 1)])
    _adam(model, lambda m: m(input_ids=ids, labels=ids).loss, steps, lr=3e-3)
    return model


def lora_gpt2(r: int, finetune: list[dict], seed: int = 0, steps: int = 25):
    """A fresh copy of :func:`base_gpt2` with LoRA rank r on attn.c_attn, attn.c_proj and mlp.c_proj (12 adapter
    matrices), fine-tuned ``steps`` full-batch Adam steps on ``finetune``."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(base_gpt2())
    torch.manual_seed(seed)  # peft draws LoRA A from the global generator
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    ids = torch.stack([d["input_ids"] for d in finetune])
    _adam(model, lambda m: m(input_ids=ids, labels=ids).loss, steps, lr=1e-2)
    return model


def _adam(model, loss_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.grad = None
    model.eval()
    return losses


# -- 05: a generated topic-classification corpus and a tiny LoRA BERT ----------------------------------------------
TOPICS = {
    "sports": "match goal team coach league score player season stadium referee tournament striker keeper "
    "penalty derby trophy athlete sprint medal relay",
    "science": "atom cell energy theory experiment molecule physics quantum laboratory protein genome orbit "
    "neutron enzyme telescope fossil particle hypothesis specimen reactor",
    "finance": "market stock bank interest loan bond inflation investor profit dividend currency budget "
    "equity credit revenue tax asset merger portfolio broker",
    "cooking": "recipe oven flour sauce garlic butter simmer spice dough salad bake roast pepper onion broth "
    "knife skillet vanilla basil noodle",
}
# Words that two topics share (ambiguous on their own): they blur the classes a little.
SHARED = {
    ("sports", "finance"): "transfer contract record",
    ("science", "cooking"): "heat mixture temperature",
    ("finance", "science"): "growth model rate",
    ("cooking", "sports"): "round serve plate",
}
COMMON = "the a of and to in is was for on with at by from this that new its after about over more said"


def topic_corpus(n: int, seed: int, length: int = 14) -> tuple[list[str], list[int]]:
    """``n`` short documents and their topic labels (0..3), from a seeded template generator: each word is a
    topic word with probability 0.4, a word shared with a neighbouring topic with probability 0.15, otherwise
    a common word."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    topic_words = {t: TOPICS[t].split() for t in names}
    shared = {t: [w for pair, words in SHARED.items() if t in pair for w in words.split()] for t in names}
    common = COMMON.split()
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        words = []
        for _ in range(length):
            u = rng.random()
            pool = topic_words[names[label]] if u < 0.4 else shared[names[label]] if u < 0.55 else common
            words.append(pool[int(rng.integers(len(pool)))])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer over the words of ``texts`` (the ``tokenizers`` library), with [PAD]=0, [UNK],
    [CLS] prepended to every text; wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", mask_token="[MASK]"
    )


def encode(tokenizer, texts: list[str], labels: list[int], length: int = 16) -> list[dict]:
    """Examples for ``infkit.tasks.Classification``: padded input_ids, attention_mask and labels."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(labels[i])}
        for i in range(len(texts))
    ]


def bert_classifier(vocab_size: int, num_labels: int = 4, seed: int = 0, hidden: int = 32, encoder=None):
    """A 2-layer BERT sequence classifier from a config (hidden 32, 2 heads), float64; its encoder from
    ``encoder`` (a state dict from :func:`pretrain_mlm`) when given, its pooler and head random."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="eager",
    )
    model = BertForSequenceClassification(config).double()
    if encoder is not None:
        missing, unexpected = model.bert.load_state_dict(encoder, strict=False)
        assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    return model


def pretrain_mlm(tokenizer, texts: list[str], steps: int = 200, lr: float = 3e-3, seed: int = 0, hidden: int = 32,
                 length: int = 16, mask_prob: float = 0.25):
    """A 2-layer BERT (hidden 32) pretrained by masked-language modelling on unlabelled ``texts`` (full-batch
    Adam, a fresh random mask each step, float64); returns its state dict, to start a classifier from."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="eager",
    )
    model = BertForMaskedLM(config).double()  # float64: another CPU's rounding must not grow into another model
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    ids, attention = enc["input_ids"], enc["attention_mask"]
    g = torch.Generator().manual_seed(seed)
    mask_id = tokenizer.convert_tokens_to_ids("[MASK]")

    def loss_fn(m):
        chosen = (torch.rand(ids.shape, generator=g) < mask_prob) & (attention == 1) & (ids != tokenizer.cls_token_id)
        labels = ids.masked_fill(~chosen, -100)
        return m(input_ids=ids.masked_fill(chosen, mask_id), attention_mask=attention, labels=labels).loss

    _adam(model, loss_fn, steps, lr)
    return {k[len("bert."):]: v.double() for k, v in model.state_dict().items() if k.startswith("bert.")}


def batch_of(examples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}


def train_classifier(model, examples: list[dict], steps: int, lr: float, seed: int = 0) -> list[float]:
    """Full-batch Adam on the mean cross-entropy of ``examples``; returns the losses."""
    torch.manual_seed(seed)
    batch = batch_of(examples)
    return _adam(model, lambda m: m(**batch).loss, steps, lr)


def accuracy(model, examples: list[dict]) -> float:
    batch = batch_of(examples)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float((logits.argmax(-1) == batch["labels"]).double().mean())


# -- 06: an MLP on sklearn's digits --------------------------------------------------------------------------------
def digits(n_train: int, n_query: int, seed: int = 0):
    """sklearn's bundled digits (8x8, scaled to [0, 1]) shuffled by ``seed``: train and query (x, y) lists, and
    the train tensors."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[order])
    train = list(zip(x[:n_train], y[:n_train]))
    query = list(zip(x[n_train : n_train + n_query], y[n_train : n_train + n_query]))
    return train, query, x[:n_train], y[:n_train]


def mlp(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()


def kronfluence_ekfac_scores(model: nn.Module, train: list, query: list, damping: float | None = None,
                             fisher: str = "sampled", seed: int = 0) -> torch.Tensor:
    """kronfluence's EK-FAC scores [n_query, n_train] of a classifier on (x, y) lists, on a copy of ``model``
    (kronfluence wraps the modules it tracks in place). Summed cross-entropy as train loss and measurement, as
    infkit's Classification task; ``damping=None`` is kronfluence's heuristic (0.1 × mean eigenvalue per layer);
    ``fisher="sampled"`` draws labels from the model (kronfluence's default), "empirical" uses the data's."""
    import tempfile

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1)[:, 0]
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, pairs):
            self.pairs = pairs

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            return self.pairs[i]

    torch.manual_seed(seed)  # kronfluence samples Fisher labels from the global generator
    task = ClassificationTask()
    wrapped = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as out:
        analyzer = Analyzer(analysis_name="nb", model=wrapped, task=task, cpu=True, disable_tqdm=True, output_dir=out,
                            disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        analyzer.fit_all_factors(factors_name="ekfac", dataset=Pairs(train), per_device_batch_size=256,
                                 factor_args=FactorArguments(strategy="ekfac",
                                                             use_empirical_fisher=fisher == "empirical"))
        analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=Pairs(query),
                                         train_dataset=Pairs(train), per_device_query_batch_size=len(query),
                                         per_device_train_batch_size=256,
                                         score_args=ScoreArguments(damping_factor=damping))
        return analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].detach().clone()

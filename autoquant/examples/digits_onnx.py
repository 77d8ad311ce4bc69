"""The digits example on the ONNX Runtime backend: the same CNN, exported to ONNX and tuned to QDQ INT8.

Trains DigitsNet as ``autoquant.examples.digits`` does, exports it (opset 17, dynamic batch), and
tunes it with the ONNX adapter: eval_fn receives an ``onnxruntime.InferenceSession``, and the
saved model is a ``model.onnx`` that plain ONNX Runtime runs.

    python -m autoquant.examples.digits_onnx --fragile --out autoquant-out/digits-onnx
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
import torch
from rich.console import Console

from autoquant import AccuracyCriterion, Tuner
from autoquant.examples.digits import BATCH_SIZE, DigitsData, DigitsNet, load_data, make_fragile, train_model
from autoquant.report import print_summary
from autoquant.strategies import STRATEGIES


def export(model: DigitsNet) -> onnx.ModelProto:
    """DigitsNet as ONNX: input "images" [batch, 1, 32, 32], output "logits"."""
    buffer = io.BytesIO()
    example = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def calibration_batches(data: DigitsData, n_samples: int = 512) -> list[dict[str, np.ndarray]]:
    """Training images (never test images) as ONNX feeds."""
    x = data.train[0].numpy()
    return [{"images": x[i:i + BATCH_SIZE]} for i in range(0, min(n_samples, len(x)), BATCH_SIZE)]


def accuracy_fn(data: DigitsData) -> Callable[[object], float]:
    """eval_fn: top-1 accuracy of an ONNX Runtime session on the held-out images."""
    x, y = data.test[0].numpy(), data.test[1].numpy()

    def accuracy(session) -> float:  # noqa: ANN001 (an onnxruntime.InferenceSession)
        logits = np.concatenate([session.run(None, {"images": x[i:i + 256]})[0] for i in range(0, len(x), 256)])
        return float((logits.argmax(1) == y).mean())

    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="sensitivity" if "sensitivity" in STRATEGIES else "bayesian",
                        choices=sorted(STRATEGIES))
    parser.add_argument("--relative", type=float, default=0.01, help="tolerated relative accuracy loss")
    parser.add_argument("--max-trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="autoquant-out/digits-onnx", help="folder for model.onnx, result and history")
    parser.add_argument("--fragile", action="store_true",
                        help="add one transformer-style outlier channel (FP32 unchanged; naive INT8 suffers)")
    args = parser.parse_args(argv)
    console = Console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    start = time.perf_counter()
    data = load_data(args.seed)
    model = train_model(data, seed=args.seed)
    if args.fragile:
        make_fragile(model, data.train[0][:512])
    onnx_model = export(model)
    eval_fn = accuracy_fn(data)
    console.print(f"Trained and exported DigitsNet{' (fragile)' if args.fragile else ''} in "
                  f"{time.perf_counter() - start:.1f} s")

    tuner = Tuner(AccuracyCriterion(relative=args.relative), strategy=args.strategy,
                  max_trials=args.max_trials, seed=args.seed)
    result = tuner.tune(onnx_model, calibration_batches(data), eval_fn)
    print_summary(result, console)
    result.save(args.out)
    console.print(f"Saved model.onnx, result.json and history.csv to {args.out}/")


if __name__ == "__main__":
    main()


__all__ = ["accuracy_fn", "calibration_batches", "export", "main"]

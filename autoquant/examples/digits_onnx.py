"""The digits example on the ONNX Runtime backend: the same CNN, exported to ONNX and tuned to QDQ INT8.

Trains DigitsNet as ``autoquant.examples.digits`` does, exports it (opset 17, dynamic batch), and
tunes it with the ONNX adapter: eval_fn receives an ``onnxruntime.InferenceSession``, and the
saved model is a ``model.onnx`` that plain ONNX Runtime runs.

    python -m autoquant.examples.digits_onnx --fragile --out autoquant-out/digits-onnx
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
import onnx
import torch
from rich.console import Console

from autoquant.examples.digits import DigitsData, DigitsNet, example_args, prepare, tune_and_report


def export(model: DigitsNet) -> onnx.ModelProto:
    """DigitsNet as ONNX: input "images" [batch, 1, 32, 32], output "logits"."""
    buffer = io.BytesIO()
    example = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        torch.onnx.export(
            model.eval(), (example,), buffer,  # type: ignore[arg-type]  # torch's hint says a path; a file works too
            dynamo=False, opset_version=17, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def calibration_batches(data: DigitsData, n_samples: int = 512) -> list[dict[str, np.ndarray]]:
    """Training images (never test images) as ONNX feeds."""
    return [{"images": images.numpy()} for images, _ in data.calibration_batches(n_samples)]


def accuracy_fn(data: DigitsData) -> Callable[[object], float]:
    """eval_fn: top-1 accuracy of an ONNX Runtime session on the held-out images."""
    x, y = data.test[0].numpy(), data.test[1].numpy()

    def accuracy(session) -> float:  # noqa: ANN001 (an onnxruntime.InferenceSession)
        logits = np.concatenate([session.run(None, {"images": x[i:i + 256]})[0] for i in range(0, len(x), 256)])
        return float((logits.argmax(1) == y).mean())

    return accuracy


def main(argv: list[str] | None = None) -> None:
    args = example_args(argv, __doc__.split("\n\n")[0], "autoquant-out/digits-onnx")
    console = Console()
    start = time.perf_counter()
    data, model, _ = prepare(seed=args.seed, fragile=args.fragile)
    onnx_model = export(model)
    console.print(f"Trained and exported DigitsNet{' (fragile)' if args.fragile else ''} in "
                  f"{time.perf_counter() - start:.1f} s")
    tune_and_report(args, onnx_model, calibration_batches(data), accuracy_fn(data), console)


if __name__ == "__main__":
    main()


__all__ = ["accuracy_fn", "calibration_batches", "export", "main"]

"""Fingerprints of a model and of its calibration data, to tie a study and a cache to them.

A study (its FP32 baseline, its trials) and a calibration cache are only valid for the model and
data they were made with. Both fingerprints are cheap: the model's bytes (a torch module's
state_dict and module tree, an ONNX model's serialized bytes) and the calibration data's values,
hashed row by row and sorted, so that a shuffled loader or another batch size gives the same
fingerprint while any changed sample does not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoquant.data import iterate_batches


@dataclass(frozen=True)
class Fingerprint:
    model: str
    data: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> Fingerprint:
        return cls(model=str(data["model"]), data=str(data["data"]))

    def changes(self, earlier: Fingerprint) -> str:
        """What differs from ``earlier`` ("the model", "the calibration data", or both); "" if nothing."""
        what = [name for name, a, b in (("the model", self.model, earlier.model),
                                        ("the calibration data", self.data, earlier.data)) if a != b]
        return " and ".join(what)


def fingerprint(model: Any, calib_data: Iterable[Any]) -> Fingerprint:
    return Fingerprint(model=model_fingerprint(model), data=data_fingerprint(calib_data))


def model_fingerprint(model: Any) -> str:
    """sha256 of the model's weights and structure (torch module, ONNX ModelProto or file path)."""
    h = hashlib.sha256()
    if hasattr(model, "state_dict"):  # a torch module; core code does not import torch
        h.update(f"{type(model).__qualname__}\n{model}".encode())  # the module tree, with layer shapes
        for name, value in model.state_dict().items():
            h.update(name.encode())
            h.update(_tensor_bytes(value))
    elif hasattr(model, "SerializeToString"):  # an onnx.ModelProto
        h.update(model.SerializeToString())
    elif isinstance(model, (str, os.PathLike)):
        h.update(Path(model).read_bytes())
    elif " at 0x" not in repr(model):  # a value whose repr is its content (a dataclass, say)
        h.update(f"{type(model).__qualname__}\n{model!r}".encode())
    else:
        raise TypeError(f"Cannot fingerprint a {type(model).__name__}: pass a torch module, an ONNX model or a path.")
    return h.hexdigest()[:16]


def data_fingerprint(calib_data: Iterable[Any]) -> str:
    """sha256 of the sorted row hashes of every array in the calibration batches."""
    rows: list[bytes] = []
    for batch in iterate_batches(calib_data):
        for array in _arrays(batch):
            array = np.ascontiguousarray(array)
            head = f"{array.dtype}{array.shape[1:]}".encode()
            rows.extend(hashlib.sha256(head + row.tobytes()).digest() for row in (array if array.ndim else [array]))
    return hashlib.sha256(b"".join(sorted(rows))).hexdigest()[:16]


def _arrays(value: Any) -> Iterable[np.ndarray]:
    if hasattr(value, "detach"):
        yield _tensor_array(value)
    elif isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _arrays(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays(item)
    elif isinstance(value, (int, float, bool, str, bytes)):
        yield np.asarray(value)


def _tensor_array(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy()
    except TypeError:  # dtypes numpy lacks (bfloat16): the float32 values identify it as well
        return tensor.float().numpy()


def _tensor_bytes(value: Any) -> bytes:
    if hasattr(value, "detach"):
        return _tensor_array(value).tobytes()
    return repr(value).encode()  # extra state kept in a state_dict (rare)

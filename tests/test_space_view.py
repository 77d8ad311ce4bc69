"""What a user reads of a space: print(space), and fp32_ops given as glob patterns."""

import pytest

from autoquant import ConfigError, OpInfo, Restriction, Space, UnsupportedOp

LAYERS = [f"bert.encoder.layer.{i}.{part}" for i in range(2) for part in ("attention.self.query", "output.dense")]
OPS = tuple(OpInfo(name, "Linear", ("static", "dynamic")) for name in LAYERS) + (OpInfo("classifier", "Linear"),)
SPACE = Space(OPS,
              approaches=("static", "dynamic"),
              unsupported=(UnsupportedOp("bert.embeddings", "Embedding", "no INT8 kernel for embeddings"),))


def test_fp32_ops_patterns_match_op_names():
    space = SPACE.restrict(Restriction(fp32_ops=["bert.encoder.layer.*.output.dense", "classifier"]))
    assert space.fixed_fp32 == {"bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense", "classifier"}


def test_a_pattern_matching_nothing_is_an_error_with_a_hint():
    with pytest.raises(ConfigError, match=r"Unknown op pattern 'bert.encoder.layers.\*.output.dense'\. Did you mean"):
        SPACE.restrict(Restriction(fp32_ops=["bert.encoder.layers.*.output.dense"]))
    with pytest.raises(ConfigError, match="Unknown op 'clasifier'. Did you mean 'classifier'"):
        SPACE.restrict(Restriction(fp32_ops=["clasifier"]))


def test_print_space_says_what_is_searched_what_is_not_and_why():
    space = SPACE.restrict(Restriction(fp32_ops=["classifier"]))
    text = str(space)
    lines = text.splitlines()
    assert lines[0] == f"5 quantizable op(s) (5 Linear); {space.size():,} candidates"
    assert lines[1].split() == ["op", "type", "approaches", "searched"]
    assert lines[2].split() == ["bert.encoder.layer.0.attention.self.query", "Linear", "static,", "dynamic", "yes"]
    assert lines[6].split() == ["classifier", "Linear", "static", "no", "(FP32", "by", "request)"]
    assert text.count("no (FP32 by request)") == 1
    assert "knobs: approach=static|dynamic;" in text
    assert text.endswith("stays FP32 whatever the search does:\n"
                         "  bert.embeddings (Embedding): no INT8 kernel for embeddings")

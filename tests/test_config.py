"""The YAML job schema: every bad file fails with a message naming the key, the value and the fix."""

from pathlib import Path

import pytest

from autoquant import ConfigError
from autoquant.config import load_job, mask_url

JOBS = Path(__file__).parent / "jobs"
GOOD = """
model: tiny_job:model
calibration: tiny_job:calibration
eval: tiny_job:eval_fn
"""

BAD = [
    # (extra YAML, expected fragments of the message): every unknown name through errors.unknown_choice
    ("strategy: {name: bayesain}", ["strategy.name", "Unknown strategy 'bayesain'. Did you mean 'bayesian'?",
                                    "Allowed: exhaustive, random, bayesian"]),
    ("strategy: {objective: latncy}", ["strategy.objective", "Did you mean 'latency'?"]),
    ("strategy: {name: random, max_trails: 5}", ["Unknown key 'max_trails' under 'strategy'",
                                                 "Did you mean 'max_trials'?",
                                                 "Allowed: name, max_trials, timeout, seed, objective, options"]),
    ("strategy: {name: bayesian, options: {n_startup_trial: 3}}",
     ["Unknown option 'n_startup_trial' of strategy 'bayesian'", "Did you mean 'n_startup_trials'?"]),
    ("strategy: {name: sensitivity, options: {measure: int4}}", ["Unknown sensitivity measure 'int4'"]),
    ("critrion: {relative: 0.01}", ["Unknown key 'critrion'. Did you mean 'criterion'?"]),
    ("adapter: onnxx", ["adapter", "Unknown adapter 'onnxx'", "Allowed: auto, fx"]),
    ("criterion: {relative: 0.01, absolute: 0.1}", ["criterion", "exactly one of relative= or absolute="]),
    ("criterion: {relative: -0.5}", ["tolerance must be a finite number >= 0", "-0.5"]),
    ("criterion: {relative: 1.5}", ["write 0.015 for 1.5%", "allow_large_relative: true"]),
    ("strategy: {max_trials: 0}", ["strategy.max_trials", "greater than or equal to 1", "got 0"]),
    ("space: {calibration: [minmax, kl]}", ["Unknown space.calibration value 'kl'", "entropy"]),
    ("space: {granularity: per_chanel}", ["Did you mean 'per_channel'?"]),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("extra, fragments", BAD, ids=[b[0].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_jobs_name_key_value_and_fix(tmp_path, extra, fragments):
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, GOOD + extra + "\n"))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_required_keys_are_listed(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'calibration'.*missing required key 'eval'"):
        load_job(write(tmp_path, "model: tiny_job:model\n"))


def test_not_a_mapping_and_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="a job is a mapping"):
        load_job(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(write(tmp_path, "model: [unclosed\n"))


def test_unsafe_yaml_tags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(write(tmp_path, GOOD + "name: !!python/object/apply:os.system ['true']\n"))


def test_callables_are_checked_with_did_you_mean():
    job = load_job(JOBS / "tiny.yaml")
    assert job.check_callables()[0] == "model: tiny_job:model"
    broken = job.spec.model_copy(update={"eval": job.spec.eval.model_copy(update={"call": "tiny_job:eval_fun"})})
    job.spec = broken
    with pytest.raises(ConfigError, match="eval: Unknown callable 'eval_fun' in 'tiny_job'. Did you mean 'eval_fn'"):
        job.check_callables()


def test_unimportable_module_is_named(tmp_path):
    job = load_job(write(tmp_path, GOOD.replace("tiny_job:calibration", "no_such_module:calibration")))
    with pytest.raises(ConfigError, match="calibration: cannot import 'no_such_module'"):
        job.check_callables()


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    text = GOOD.replace("tiny_job:", f"{JOBS / 'tiny_job.py'}:") + "output: out\nstorage: journal:runs/j.log\n"
    job = load_job(write(tmp_path / "sub", text))
    assert job.output == tmp_path / "sub" / "out"
    assert job.storage_url == f"journal:{tmp_path / 'sub' / 'runs' / 'j.log'}"
    assert callable(job.load_eval())
    assert load_job(write(tmp_path, GOOD)).storage_url == f"sqlite:///{tmp_path / 'autoquant-out' / 'job' / 'study.db'}"


def test_storage_passwords_are_masked_and_env_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("AQ_PG", "postgresql://me:s3cret@db.example:5432/aq")
    job = load_job(write(tmp_path, GOOD + "storage: ${AQ_PG}\n"))
    assert job.storage_url == "postgresql://me:s3cret@db.example:5432/aq"
    assert mask_url(job.storage_url) == "postgresql://me:***@db.example:5432/aq"
    assert mask_url("sqlite:///a/b.db") == "sqlite:///a/b.db"
    job = load_job(write(tmp_path, GOOD + "storage: postgresql://me:s3cret@h/aq\n"))
    assert "s3cret" not in str(job.masked_dict())


def test_every_shipped_config_validates():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        job = load_job(path)
        assert job.name and job.spec.strategy.max_trials >= 1


def test_shipped_jobs_use_the_default_strategy():
    import inspect

    from autoquant import Tuner

    default = inspect.signature(Tuner.__init__).parameters["strategy"].default
    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        assert load_job(path).spec.strategy.name == default, path.name


def test_large_relative_passes_with_the_explicit_override(tmp_path):
    job = load_job(write(tmp_path, GOOD + "criterion: {relative: 1.5, allow_large_relative: true}\n"))
    assert job.spec.criterion.criterion().relative == 1.5


def test_defaults_are_the_tuners(tmp_path):
    import inspect

    from autoquant import Tuner

    spec = load_job(write(tmp_path, GOOD)).spec
    defaults = inspect.signature(Tuner.__init__).parameters
    for key in ("max_trials", "timeout", "seed", "objective"):
        assert getattr(spec.strategy, key) == defaults[key].default
    assert spec.strategy.name == defaults["strategy"].default == "sensitivity"
    assert spec.latency_budget_s == defaults["latency_budget_s"].default
    assert spec.criterion.criterion() == Tuner().criterion


def test_strategy_options_reach_the_strategy(tmp_path):
    text = GOOD + "strategy: {name: bayesian, seed: 3, options: {n_startup_trials: 2}}\n"
    strategy = load_job(write(tmp_path, text)).spec.strategy.strategy()
    assert type(strategy).__name__ == "BayesianStrategy" and strategy.n_startup_trials == 2 and strategy.seed == 3
    text = GOOD + "strategy: {options: {measure: fp32, confidence: 0.7}}\n"
    strategy = load_job(write(tmp_path, text)).spec.strategy.strategy()
    assert (strategy.name, strategy.measure, strategy.confidence) == ("sensitivity", "fp32", 0.7)


def test_an_onnx_path_in_any_case_is_a_file_not_a_callable(tmp_path):
    job = load_job(write(tmp_path, GOOD.replace("model: tiny_job:model", "model: nets/net.ONNX")))
    assert job.spec.model == "nets/net.ONNX"
    with pytest.raises(ConfigError, match="net.ONNX does not exist"):
        job.load_model()


def test_an_import_error_in_the_users_module_keeps_its_place(tmp_path):
    (tmp_path / "broken_job.py").write_text("import os\n\nraise RuntimeError('typo in my job')\n")
    job = load_job(write(tmp_path, GOOD.replace("tiny_job:model", "broken_job.py:model")))
    with pytest.raises(ConfigError, match=r"RuntimeError: typo in my job; at .*broken_job.py:3") as info:
        job.check_callables()
    assert isinstance(info.value.__cause__, RuntimeError)  # the traceback is kept


def test_the_output_folder_knows_the_study_name_of_a_job_without_one(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert job.spec.name is None and job.masked_dict()["name"] == "job"

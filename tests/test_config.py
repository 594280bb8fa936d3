import pytest

from manyicl.config import dump_config, load_config
from manyicl.errors import ManyICLError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: smollm2-135m}\ntasks: {data_dir: data, meta_train: [sst2, {name: rte, family: nli}]}\n")
    cfg = load_config(p, ["training.max_tokens=2048", "evaluation.shots=[0, 8, max]", "training.objective=few_shot"])
    assert cfg.training.max_tokens == 2048 and cfg.evaluation.shots == [0, 8, "max"]
    assert cfg.training.objective == "few_shot" and cfg.tasks.meta_train[1].family == "nli"
    defaults = load_config(None, [])  # no file: the documented defaults, sized to resolve differences
    assert defaults.evaluation.max_queries >= 200 and len(defaults.evaluation.seeds) == 3
    assert defaults.evaluation.balance_labels and defaults.format.multiple_choice == "cloze"
    assert (defaults.model.name == "smollm2-135m"
            and defaults.evaluation.scoring in ("sum", "mean", "per_char", "calibrated"))
    assert "max_tokens: 2048" in dump_config(cfg)


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("training: {max_tokenz: 5}\n", [], "training.max_tokenz: unknown key"),
        ("", ["training.objective=all_targets"], "training.objective"),
        ("tasks: {meta_train: [{name: x, family: poetry}]}\n", [], "unknown family 'poetry'"),
        ("", ["training.max_tokens=-1"], "training.max_tokens"),
        ("", ["nonsense"], "expected key.path=value"),
        ("evaluation: {multiple_choice: letter}\n", [], "evaluation.multiple_choice: moved to format.multiple_choice"),
        ("training: {balance_labels: true}\n", [],
         "training.balance_labels: retired: training sequences are always in"),
    ],
)
def test_bad_config(tmp_path, text, override, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ManyICLError, match=message):
        load_config(p, override)


def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  max_tokens: [1, 2\n  lr: 3\n")
    with pytest.raises(ManyICLError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:3:") and "not valid YAML" in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ManyICLError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")

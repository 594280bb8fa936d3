import json

import pytest

from conftest import write_task
from manyicl.catalog import resolve_task
from manyicl.errors import ManyICLError
from manyicl.task_files import list_task_dirs, load_hf_task, load_task_dir, load_task_file

GOOD = [{"input": "good film", "output": "positive"}, {"input": "bad film", "output": "negative"}]


def test_task_dir_with_yaml(tmp_path):
    d = write_task(tmp_path / "t", GOOD, GOOD[:1], "family: classification\nmetric: macro_f1\n")
    task = load_task_dir(d)
    assert (task.name, task.family, task.metric) == ("t", "classification", "macro_f1")
    assert task.labels == ("negative", "positive") and len(task.train) == 2 and len(task.test) == 1


def test_shared_data_layout(data_dir):
    names = list_task_dirs(data_dir)
    assert {"sst2", "rte", "xsum", "gsm8k"} <= set(names)
    task = load_task_dir(data_dir / "goemotions")
    assert task.family == "multilabel" and task.metric == "multilabel_f1" and "joy" in task.labels
    mr = load_task_dir(data_dir / "mr")  # has U+0085 inside records: must not be split there
    assert len(mr.train) == 5000


def test_jsonl_csv_tsv_files(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\n\"hi, there\",yes\nbye,no\n")
    (tmp_path / "a.tsv").write_text("text\tlabel\nhi\tyes\n")
    t = load_task_file(tmp_path / "a.csv", "a", "classification", tmp_path / "a.tsv", input_field="text",
                       output_field="label")
    assert t.train[0].input == "hi, there" and t.test[0].output == "yes" and t.labels == ("no", "yes")


def test_hf_datasets_offline(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"q": f"x{i}", "a": "y"}) + "\n" for i in range(3)))
    task = load_hf_task("json", "hf", "qa", data_files={"train": str(tmp_path / "train.jsonl")}, test_split=None,
                        input_field="q", output_field="a")
    assert len(task.train) == 3 and task.train[0].input == "x0"


def test_resolve_by_name_and_cap(data_dir):
    task = resolve_task("sst2", str(data_dir), max_train=10)
    assert len(task.train) == 10


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"input": "a", "output": "b"}\nnot json\n', "train.jsonl:2: not valid JSON"),
        ('{"input": "a"}\n', "train.jsonl:1: missing field 'output'"),
        ('{"input": 3, "output": "b"}\n', "train.jsonl:1: field 'input' must be a string"),
        ("\n\n", "no training examples"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text(content)
    with pytest.raises(ManyICLError, match=message.replace("(", r"\(")):
        load_task_dir(tmp_path / "t")


def test_not_utf8(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_bytes(b'{"input": "caf\xe9", "output": "x"}\n')
    with pytest.raises(ManyICLError, match="not UTF-8"):
        load_task_dir(tmp_path / "t")


def test_missing_train_and_unknown_family(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManyICLError, match="no train.jsonl"):
        load_task_dir(tmp_path / "empty")
    d = write_task(tmp_path / "t", GOOD, meta="family: poetry\n")
    with pytest.raises(ManyICLError, match="unknown family 'poetry'"):
        load_task_dir(d)


def test_task_yaml_not_valid_yaml_is_one_line(tmp_path):
    d = write_task(tmp_path / "t", GOOD, meta="family: classification\nlabels: [a, b\nmetric: accuracy\n")
    with pytest.raises(ManyICLError) as e:
        load_task_dir(d)
    message = str(e.value)
    assert message.startswith(f"{d / 'task.yaml'}:3:") and "not valid YAML" in message and "\n" not in message


def test_choices_are_read_and_checked(data_dir, tmp_path):
    arc = load_task_dir(data_dir / "arc_challenge")
    assert all(len(ex.choices) >= 2 for ex in arc.train + arc.test)
    d = write_task(tmp_path / "mc", [{"input": "q", "output": "A", "choices": ["x", 3]}],
                   meta="family: multiple_choice\n")
    with pytest.raises(ManyICLError, match=r"train.jsonl:1: field 'choices' must be a list of strings"):
        load_task_dir(d)


def test_balanced_picks_take_every_label_in_turn(data_dir):
    """The picking order of label-balanced evaluation prompts: any leading run holds each label equally often (to
    one); the label that ends a turn varies. Which examples are used, not where they stand (tests/test_leakage.py)."""
    import random
    from collections import Counter

    task = load_task_dir(data_dir / "agnews")
    labels = set(task.labels)
    lasts = Counter()
    for seed in range(40):
        picks = [task.train[i].output for i in task.balanced_picks(random.Random(seed))]
        for k in range(0, 40, len(labels)):
            assert set(picks[k : k + len(labels)]) == labels
        lasts[picks[len(labels) - 1]] += 1
    assert len(lasts) == len(labels)
    plain = [task.train[i].output for i in task.order(random.Random(0))][:40]
    assert any(set(plain[k : k + 4]) != labels for k in range(0, 40, 4))  # the training order has no turns

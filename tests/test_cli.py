"""The command line: the show-sequence acceptance check on real data, and one-line errors with exit status 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_task
from manyicl.cli import main


def run(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result


def test_show_sequence_json_sst2(data_dir, smol_tokenizer):
    out = run("show-sequence", "--data", data_dir / "sst2", "--objective", "many_shot_all", "--max-tokens", 1024,
              "--seed", 0, "--format", "json")
    assert out.exit_code == 0, out.output
    seq = json.loads(out.stdout)
    assert seq["n_targets"] == seq["n_demonstrations"] >= 20
    spans = [range(s, e) for s, e in seq["target_spans"]]
    supervised = [i for i, lab in enumerate(seq["labels"]) if lab != -100]
    assert supervised == [i for r in spans for i in r]
    answers = {json.loads(line)["output"] for line in (data_dir / "sst2" / "train.jsonl").read_text().split("\n")
               if line}
    for s, e in seq["target_spans"]:
        text = smol_tokenizer.decode(seq["input_ids"][s:e])
        assert text.startswith(" ") and text.endswith("\n\n") and text.strip() in answers
    last = json.loads(run("show-sequence", "--data", data_dir / "sst2", "--objective", "many_shot_last",
                          "--format", "json").stdout)
    zero = json.loads(run("show-sequence", "--data", data_dir / "sst2", "--objective", "zero_shot",
                          "--format", "json").stdout)
    assert last["n_targets"] == 1 and zero["n_targets"] == 1 and zero["n_demonstrations"] == 0


def test_show_sequence_text_marks_targets(data_dir):
    out = run("show-sequence", "--data", data_dir / "rte", "--objective", "few_shot", "--max-tokens", 2048)
    assert out.exit_code == 0 and out.stdout.count("⟦") == 1


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: write_task(d / "t", [{"input": "a", "output": "b"}]), ["--objective", "nope"], "unknown objective"),
        (lambda d: write_task(d / "t", [{"input": "a", "output": "b" * 500}]), ["--max-tokens", "16"],
         "smaller than one example"),
        (lambda d: (d / "t").mkdir(), [], "no train.jsonl"),
        (lambda d: write_task(d / "t", [{"input": "a", "output": "b"}]), ["--model", "./no/such/model"],
         "path does not exist"),
    ],
)
def test_show_sequence_errors(tmp_path, setup, args, message):
    setup(tmp_path)
    out = run("show-sequence", "--data", tmp_path / "t", *args)
    assert out.exit_code == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_console_script_installed(tmp_path):
    """The installed ``manyicl`` command itself (what the README tells users to run), not ``python -m``."""
    script = shutil.which("manyicl") or str(Path(sys.executable).with_name("manyicl"))
    out = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "show-sequence" in out.stdout and "predict" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluation: {shots: [0\n")
    out = subprocess.run([script, "eval", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {bad}:") and len(out.stderr.strip().splitlines()) == 1

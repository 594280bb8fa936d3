"""manyicl's default prompt against lm-evaluation-harness's SST-2 prompt, same model, same 200 queries.

Issue 10 asks that the untuned model prompt at least as well through ``manyicl predict`` as through
lm-evaluation-harness. Both run here on the SAME data (../shared/data/sst2: demonstrations from train.jsonl,
the first 200 lines of test.jsonl), the same loaded model and the same shot counts, over several
demonstration seeds (4 random demonstrations swing accuracy by 15 points from one seed to the next):

- manyicl: ``predict_file`` — exactly what ``manyicl predict --shots N --family classification`` runs, with
  the default format, scoring and label-balanced demonstrations, ``--seed`` = the seed;
- lm-eval: its GLUE SST-2 prompt (``{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:``,
  choices " negative"/" positive", demonstrations joined by a blank line) through a local task YAML,
  ``fewshot_random_seed`` = the seed.

Each row pools the seeds (seed x query units): accuracy with its 95 % bootstrap interval, and the paired
difference manyicl - lm-eval on the same queries (paired bootstrap, two-sided p). Needs ``pip install -e .[bench]``.
Takes ~25 min on 2 CPU cores with the defaults (lm-eval's 32-shot documents dominate).

Last line: RESULT manyicl_4=… lm_eval_4=… diff_4=… p_4=… manyicl_32=… lm_eval_32=… diff_32=… p_32=…
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from manyicl.metrics import METRICS
from manyicl.predict import predict_file
from manyicl.uncertainty import cell_interval, paired_difference

LM_EVAL_TASK = """task: manyicl_sst2
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{{{{input}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: "{{{{['negative', 'positive'].index(output)}}}}"
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
"""


def sst2_task_manager(train: Path, test: Path):
    """An lm-eval TaskManager that knows ``manyicl_sst2``: its GLUE SST-2 prompt over local JSONL files (also used
    by bench/eval_throughput.py)."""
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp())
    (folder / "manyicl_sst2.yaml").write_text(LM_EVAL_TASK.format(train=train, test=test))
    return TaskManager(include_path=str(folder))


def lm_eval_correct(model, tokenizer, train: Path, test: Path, shots: int, seed: int, docs: int) -> np.ndarray:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, max_length=8192)
    out = lm_eval.simple_evaluate(model=lm, tasks=["manyicl_sst2"], num_fewshot=shots, limit=docs, log_samples=True,
                                  task_manager=sst2_task_manager(train, test), fewshot_random_seed=seed)
    samples = sorted(out["samples"]["manyicl_sst2"], key=lambda s: s["doc_id"])
    return np.array([float(s["acc"]) for s in samples])


def manyicl_correct(model: str, train: Path, queries: Path, shots: int, seed: int) -> np.ndarray:
    out = Path(tempfile.mkdtemp()) / "predictions.jsonl"
    predict_file(model, None, str(train), str(queries), str(shots), str(out), "classification", None, 2048, seed)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return np.array([float(line["prediction"] == line["output"]) for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shots", default="4,32")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from manyicl.models import load_model, load_tokenizer

    train, test = Path(args.data) / "sst2" / "train.jsonl", Path(args.data) / "sst2" / "test.jsonl"
    first = Path(tempfile.mkdtemp()) / "test_first.jsonl"
    first.write_text("".join(test.read_text().splitlines(keepends=True)[: args.queries]))
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    accuracy = METRICS["accuracy"].from_means
    result = []
    print("| shots | seeds | manyicl predict [95% CI] | lm-eval [95% CI] | manyicl - lm-eval [95% CI] | p |")
    print("|---:|---|---|---|---|---:|")
    for shots in [int(s) for s in args.shots.split(",")]:
        ours, theirs, per_seed = [], [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            start = time.perf_counter()
            a = manyicl_correct(args.model, train, first, shots, seed)
            middle = time.perf_counter()
            b = lm_eval_correct(model, tokenizer, train, first, shots, seed, args.queries)
            per_seed.append(f"{a.mean():.3f}/{b.mean():.3f}")
            print(f"  shots {shots} seed {seed}: manyicl {a.mean():.3f} ({middle - start:.0f} s), "
                  f"lm-eval {b.mean():.3f} ({time.perf_counter() - middle:.0f} s)", flush=True)
            ours.append(a)
            theirs.append(b)
        a, b = np.concatenate(ours)[:, None], np.concatenate(theirs)[:, None]
        ia, ib = cell_interval(a, accuracy), cell_interval(b, accuracy)
        d = paired_difference(a, b, accuracy)
        print(f"| {shots} | {args.seeds} ({', '.join(per_seed)}) | {ia.value:.3f} [{ia.low:.3f}, {ia.high:.3f}] | "
              f"{ib.value:.3f} [{ib.low:.3f}, {ib.high:.3f}] | {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | "
              f"{d.p_value:.3f} |",
              flush=True)
        result += [f"manyicl_{shots}={ia.value:.3f}", f"lm_eval_{shots}={ib.value:.3f}",
                   f"diff_{shots}={d.difference:+.3f}", f"p_{shots}={d.p_value:.3f}"]
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()

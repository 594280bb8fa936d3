"""The ``manyicl`` command: a thin layer over the library; each subcommand is one stage of the data flow."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from functools import wraps
from pathlib import Path

import click

from manyicl.errors import ManyICLError, Terminated
from manyicl.families import SCORINGS
from manyicl.files import os_error_message


def _stop_on_sigterm():
    """Installs the SIGTERM handler; returns the one it replaces."""

    def handle(signum, frame):
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread only
        return signal.getsignal(signal.SIGTERM)
    return signal.signal(signal.SIGTERM, handle)


def _friendly(fn):
    """Bad input, the operating system's refusals and interruptions become one line on stderr and a non-zero exit
    status (2: bad input; 1: the system refused; 128 + n: stopped by signal n), never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        previous = _stop_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except ManyICLError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            click.echo(f"error: {os_error_message(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
            click.echo(f"error: stopped by {name}; what was finished is kept: run the same command again to continue "
                       "(train: with --resume)", err=True)
            sys.exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))
        finally:
            if previous is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)

    return wrapper


@click.group()
@click.version_option(package_name="manyicl")
def main() -> None:
    """ManyICL: fine-tune once on many tasks with many-shot sequences, then solve new tasks by prompting."""


@main.command("show-sequence")
@click.option("--data", "data", required=True, type=click.Path(), help="One task directory (train.jsonl, task.yaml).")
@click.option("--objective", default="many_shot_all", show_default=True,
              help="zero_shot | few_shot | many_shot_last | many_shot_all")
@click.option("--max-tokens", default=1024, show_default=True, type=int, help="Token budget of the sequence.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--model", default="smollm2-135m", show_default=True, help="Model whose tokenizer is used.")
@click.option("--n-shots", default=5, show_default=True, type=int, help="Demonstrations for few_shot.")
@click.option("--chat", is_flag=True, help="Use the tokenizer's chat template.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_friendly
def show_sequence(data, objective, max_tokens, seed, model, n_shots, chat, fmt) -> None:
    """Print one training sequence with its supervised spans highlighted (text) or as token ids (json)."""
    from manyicl.formatter import Formatter
    from manyicl.models import load_tokenizer
    from manyicl.sequences import OBJECTIVES, SequenceBuilder
    from manyicl.task_files import load_task_dir

    if objective not in OBJECTIVES:  # before the tokenizer loads (a first run converts the model)
        raise ManyICLError(f"--objective: unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    task = load_task_dir(data)
    tokenizer = load_tokenizer(model)
    builder = SequenceBuilder(
        task, tokenizer, Formatter.for_task(task, tokenizer, chat=chat), max_tokens, objective, n_shots
    )
    seq = builder.build(seed)
    if fmt == "json":
        click.echo(json.dumps(seq.to_json()))
        return
    color = sys.stdout.isatty()
    pieces, pos = [], 0
    for s, e in seq.target_spans:
        pieces.append(tokenizer.decode(seq.input_ids[pos:s]))
        target = tokenizer.decode(seq.input_ids[s:e])
        pieces.append(click.style(target, fg="green", bold=True) if color else f"⟦{target}⟧")
        pos = e
    pieces.append(tokenizer.decode(seq.input_ids[pos:]))
    click.echo("".join(pieces))
    click.echo(
        f"\n-- {task.name}: {seq.n_tokens} tokens, {seq.n_examples} examples, {seq.n_demonstrations} demonstrations, "
        f"{seq.n_targets} supervised answers{'' if color else ' (marked ⟦ ⟧)'}, {seq.n_truncated} inputs cut",
        err=True,
    )


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config key, e.g. training.max_tokens=2048."
)


@main.command()
@click.argument("config", type=click.Path())
@_set_option
@click.option("--resume", is_flag=True,
              help="Continue from the last complete checkpoint in output_dir (a run stopped before its first one "
                   "starts again).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in output_dir.")
@_friendly
def train(config, overrides, resume, overwrite) -> None:
    """Fine-tune once over the meta-train mixture (ManyICL by default; any objective for the baselines)."""
    from manyicl.config import load_config
    from manyicl.training import train as run_training

    result = run_training(load_config(config, list(overrides)), resume=resume, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":
        mixture = json.loads((result.output_dir / "mixture.json").read_text())
        for name, m in mixture.items():
            click.echo(f"  {name:<24} weight {m['weight']:.3f}  sequences {m['sequences']:>5} (quota {m['quota']})  "
                       f"supervised answers {m['answers']:>7}")
        if result.released_freed_memory:
            click.echo("CPU: freed activations were returned to the OS (lower peak memory, slower steps; "
                       "see training.release_freed_memory)")
        click.echo(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.precision}); "
                   f"weights in {result.weights_dir}")


@main.command("eval")
@click.argument("config", type=click.Path())
@_set_option
@click.option("--adapter", default=None, help="PEFT adapter to evaluate (default: model.adapter of the config).")
@click.option("--method", default=None,
              help="Name of this model in results.json (default: base, or finetuned with an adapter).")
@click.option("--no-prefix-cache", is_flag=True, help="Naive path: re-encode the demonstrations for every query.")
@_friendly
def evaluate_command(config, overrides, adapter, method, no_prefix_cache) -> None:
    """Evaluate held-out (and forgetting) tasks over the shot sweep, with the shared-prefix cache."""
    from manyicl.catalog import evaluation_tasks
    from manyicl.config import load_config
    from manyicl.evaluation import run_evaluation
    from manyicl.methods import UNTUNED
    from manyicl.report import summary_table

    cfg = load_config(config, list(overrides) + (["evaluation.prefix_cache=false"] if no_prefix_cache else []))
    adapter = adapter or cfg.model.adapter
    if not cfg.tasks.held_out and not cfg.tasks.forgetting:
        raise ManyICLError("tasks.held_out: nothing to evaluate; list held-out (or forgetting) tasks")
    results = run_evaluation(cfg, evaluation_tasks(cfg.tasks), method or ("finetuned" if adapter else UNTUNED), adapter)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch every rank returns the merged results
        click.echo(summary_table(results, cfg.output_dir))
        click.echo(f"results: {Path(cfg.output_dir) / 'results.json'}")


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Embedded default, hub id or local directory.")
@click.option("--adapter", default=None, help="PEFT adapter on top of the model.")
@click.option("--demos", required=True, type=click.Path(), help="Demonstrations: JSONL/CSV/TSV with input and output.")
@click.option("--inputs", required=True, type=click.Path(), help="Queries: JSONL/CSV/TSV with input (output optional).")
@click.option("--shots", default="max", show_default=True, help="Number of demonstrations, or max (as many as fit).")
@click.option("--output", required=True, type=click.Path(), help="JSONL: one line per input, in input order.")
@click.option("--family", default="classification", show_default=True,
              help="Scoring: label families rank labels, others generate.")
@click.option("--labels", default=None, help="Comma-separated label set (default: the demonstrations' outputs).")
@click.option("--max-tokens", default=2048, show_default=True, type=int, help="Context budget.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--scoring", type=click.Choice(SCORINGS), default=None,
              help="How label candidates are ranked (default: evaluation.scoring's default).")
@click.option("--balance-labels/--no-balance-labels", default=True, show_default=True,
              help="Label-set families: as many demonstrations of each label as fit, in one random order.")
@click.option("--reserve-tokens", default=None, type=click.IntRange(min=1),
              help="Room kept after the demonstrations for each input and its answer (default: what the longest "
                   "input needs); a served task's query_tokens.")
@click.option("--instruction", default="", help="A line before the demonstrations (the task's instruction).")
@_friendly
def predict(model, adapter, demos, inputs, shots, output, family, labels, max_tokens, seed, scoring,
            balance_labels, reserve_tokens, instruction) -> None:
    """Solve a new task by many-shot prompting: demonstrations from one file, answers for another."""
    from manyicl.predict import DEFAULTS, predict_file

    n, summary = predict_file(model, adapter, demos, inputs, shots, output, family, labels, max_tokens, seed,
                              scoring or DEFAULTS.scoring, balance_labels, reserve_tokens, instruction)
    click.echo(f"wrote {n} predictions to {output}")
    if summary:
        click.echo(summary)


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Embedded default, hub id or local directory.")
@click.option("--adapter", default=None, type=click.Path(), help="A PEFT adapter folder (a fine-tune's adapter/).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key-file.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key-file", default=None, type=click.Path(),
              help="A file holding the API key: every route but /healthz then needs 'Authorization: Bearer <key>'.")
@click.option("--cache-mb", default=1024.0, show_default=True, type=click.FloatRange(min=0),
              help="Memory for cached task prefixes (keys/values), least recently used evicted first; 0: none "
                   "(every request encodes its prefix).")
@click.option("--state", default=None, type=click.Path(),
              help="Folder of the task registry (SQLite): registered tasks survive a restart. Default: in memory.")
@click.option("--max-tokens", default=2048, show_default=True, type=click.IntRange(min=64),
              help="The longest prompt a task may have (a task's max_tokens is at most this).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests waiting for the model; beyond: 429.")
@click.option("--max-body-mb", default=8.0, show_default=True, type=click.FloatRange(min=0.001))
@click.option("--max-demonstrations", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--max-inputs", default=256, show_default=True, type=click.IntRange(min=1), help="Per predict request.")
@click.option("--max-input-chars", default=8000, show_default=True, type=click.IntRange(min=1))
@_friendly
def serve(model, adapter, host, port, api_key_file, cache_mb, state, max_tokens, max_queue, max_body_mb,
          max_demonstrations, max_inputs, max_input_chars) -> None:
    """Serve one model for many tasks: register a task by its demonstrations, then query it (docs/SERVING.md)."""
    from manyicl.serving.server import run_server

    run_server(model, adapter, host, port, api_key_file, cache_mb, state, max_tokens, max_queue, max_body_mb,
               max_demonstrations, max_inputs, max_input_chars)


@main.command("compare")
@click.argument("config", type=click.Path())
@_set_option
@click.option("--only", multiple=True, help="Run only these methods (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace a run made with a different config.")
@click.option("--train-only", is_flag=True, help="Only the fine-tunes (a stage of a long run); evaluate later.")
@_friendly
def compare_command(config, overrides, only, overwrite, train_only) -> None:
    """The paper's comparison: base, zero/few/many-shot fine-tunes, ManyICL and task-level LoRA; then the report."""
    import time

    from manyicl.compare import compare
    from manyicl.config import load_config

    started = time.perf_counter()
    report = compare(load_config(config, list(overrides)), list(only) or None, overwrite, train_only)
    click.echo(f"{'trained' if train_only else f'report: {report}'}  ({time.perf_counter() - started:.0f} s)")


@main.command("report")
@click.argument("run_dir", type=click.Path())
@_friendly
def report_command(run_dir) -> None:
    """Regenerate report.md and the plots of a run from its results.json."""
    from manyicl.report import write_report
    from manyicl.runlock import run_lock

    if not Path(run_dir).is_dir():
        raise ManyICLError(f"{run_dir}: no such run folder; give the output_dir of a compare or eval run")
    with run_lock(run_dir):  # it rewrites report.md and the plots
        click.echo(f"report: {write_report(run_dir)}")


if __name__ == "__main__":
    main()

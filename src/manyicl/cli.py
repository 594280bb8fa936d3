"""The ``manyicl`` command: a thin layer over the library; each subcommand is one stage of the data flow."""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path

import click

from manyicl.errors import ManyICLError


def _friendly(fn):
    """Bad input becomes one line on stderr and exit status 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ManyICLError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="manyicl")
def main() -> None:
    """ManyICL: fine-tune once on many tasks with many-shot sequences, then solve new tasks by prompting."""


@main.command("show-sequence")
@click.option("--data", "data", required=True, type=click.Path(), help="One task directory (train.jsonl, task.yaml).")
@click.option("--objective", default="many_shot_all", show_default=True, help="zero_shot | few_shot | many_shot_last | many_shot_all")
@click.option("--max-tokens", default=1024, show_default=True, type=int, help="Token budget of the sequence.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--model", default="smollm2-135m", show_default=True, help="Model whose tokenizer is used.")
@click.option("--n-shots", default=5, show_default=True, type=int, help="Demonstrations for few_shot.")
@click.option("--balance-labels", is_flag=True, help="Round-robin demonstrations over labels.")
@click.option("--chat", is_flag=True, help="Use the tokenizer's chat template.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_friendly
def show_sequence(data, objective, max_tokens, seed, model, n_shots, balance_labels, chat, fmt) -> None:
    """Print one training sequence with its supervised spans highlighted (text) or as token ids (json)."""
    from manyicl.formatter import Formatter
    from manyicl.models import load_tokenizer
    from manyicl.sequences import SequenceBuilder
    from manyicl.tasks import load_task_dir

    task = load_task_dir(data)
    tokenizer = load_tokenizer(model)
    builder = SequenceBuilder(
        task, tokenizer, Formatter.for_task(task, tokenizer, chat=chat), max_tokens, objective, n_shots, balance_labels
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
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. training.max_tokens=2048."
)


@main.command()
@click.argument("config", type=click.Path())
@_set_option
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in output_dir.")
@_friendly
def train(config, overrides, resume, overwrite) -> None:
    """Fine-tune once over the meta-train mixture (ManyICL by default; any objective for the baselines)."""
    from manyicl.config import load_config
    from manyicl.train import train as run_training

    result = run_training(load_config(config, list(overrides)), resume=resume, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"trained {result.steps} steps in {result.seconds:.0f} s; weights in {result.weights_dir}")


if __name__ == "__main__":
    main()

"""The model card of a saved fine-tune (README.md in its adapter or model folder), as transformers and TRL write
them: YAML metadata the Hub reads (base model, library, tags), then what was trained and how: the objective, the
mixture with each task's counts, tokens, steps, precision, and the evaluation summary when compare made one.
It replaces PEFT's empty template."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from manyicl.files import logged_tokens, write_atomic

CARD = "README.md"
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the embedded default, converted from its GGUF


def _mixture_table(mixture: dict[str, dict]) -> list[str]:
    rows = ["| task | weight | quota | sequences | supervised answers |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {name} | {m['weight']:.3f} | {m.get('quota', '–')} | {m['sequences']} | {m['answers']} |"
             for name, m in mixture.items()]
    return rows


def write_model_card(weights_dir: Path, base_model: str, objective: str, finetune: str, summary: dict,
                     mixture: dict[str, dict], tokens: int, evaluation: list[str] | None = None) -> Path:
    """README.md in ``weights_dir``; ``evaluation``: markdown lines of the run's results for this model."""
    lora = finetune == "lora"
    data = ModelCardData(base_model=HUB_IDS.get(base_model, base_model),
                         library_name="peft" if lora else "transformers", pipeline_tag="text-generation",
                         tags=["manyicl", "many-shot-icl", objective, "lora" if lora else "full-finetune"])
    body = [f"# {weights_dir.parent.name}: a ManyICL fine-tune of `{base_model}`", "",
            f"Fine-tuned with manyicl on a mixture of {len(mixture)} tasks with the "
            f"`{objective}` objective ({'LoRA' if finetune == 'lora' else 'full fine-tuning'}), so that it solves new "
            "tasks from many demonstrations in its prompt.", "",
            "## Training", "",
            f"- steps: {summary['steps']}; tokens: {tokens:,}; precision: {summary['precision']}; "
            f"seconds: {summary['seconds']:.0f}",
            f"- supervised answers: {sum(m['answers'] for m in mixture.values()):,} over "
            f"{sum(m['sequences'] for m in mixture.values()):,} sequences", "",
            "Mixture (weight: the sampling share; quota: the sequences it was given):", "",
            *_mixture_table(mixture), ""]
    if evaluation:
        body += ["## Evaluation", "", *evaluation, ""]
    body += ["## Use", "", "```python", "from peft import AutoPeftModelForCausalLM" if finetune == "lora" else
             "from transformers import AutoModelForCausalLM", "",
             (f'model = AutoPeftModelForCausalLM.from_pretrained("{weights_dir.name}")' if finetune == "lora" else
              f'model = AutoModelForCausalLM.from_pretrained("{weights_dir.name}")'), "```", "",
             f"or, from demonstrations in a file: `manyicl predict --model {base_model} --adapter {weights_dir} "
             "--demos train.jsonl --inputs queries.jsonl --output predictions.jsonl`.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = weights_dir / CARD
    write_atomic(path, str(card))
    return path


def card_from_run(run_dir: Path, evaluation: list[str] | None = None) -> Path | None:
    """(Re)write the card of the fine-tune in ``run_dir`` from its records (config.yaml, train_summary.json,
    mixture.json, train_log.jsonl); None when the run is not finished."""
    import yaml

    summary_path = run_dir / "train_summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    mixture = json.loads((run_dir / "mixture.json").read_text())
    tokens = logged_tokens(run_dir / "train_log.jsonl")
    training = config["training"]
    weights = run_dir / ("adapter" if training["finetune"] == "lora" else "model")
    return write_model_card(weights, config["model"]["name"], training["objective"], training["finetune"], summary,
                            mixture, tokens, evaluation)

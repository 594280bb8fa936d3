"""The training recipe: one fine-tune over a mixture of tasks, every sequence built by the SequenceBuilder.

Read top to bottom: ``train()`` checks the config, loads the model, builds the mixture, and hands a
``transformers.Trainer`` (subclassed only for the target-only loss and its statistics) the data. Multi-GPU
and multi-node (DDP, FSDP, DeepSpeed) come from ``accelerate launch`` with no code here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from manyicl.config import ExperimentConfig, drop_speed_settings, dump_config
from manyicl.errors import ManyICLError
from manyicl.files import write_atomic
from manyicl.formatter import Formatter
from manyicl.loss import target_only_loss
from manyicl.memory import release_freed_memory
from manyicl.models import load_model, load_tokenizer, resolve_model
from manyicl.sequences import IGNORE_INDEX, SequenceBuilder
from manyicl.tasks import Task, resolve_task, task_name

CHECKPOINT_MARKER = "manyicl_complete.json"  # written last: a checkpoint without it is incomplete
TASK_COUNTS = "manyicl_task_counts.json"  # per-task sequences/answers so far, restored on --resume


# ---------------------------------------------------------------- the mixture


def load_tasks(config: ExperimentConfig, refs: list[Any]) -> list[Task]:
    t = config.tasks
    return [resolve_task(r, t.data_dir, t.max_train_examples, t.synthetic_seed) for r in refs]


def check_split(config: ExperimentConfig) -> None:
    train = [task_name(r) for r in config.tasks.meta_train]
    held = [task_name(r) for r in config.tasks.held_out] + [task_name(r) for r in config.tasks.forgetting]
    both = sorted(set(train) & set(held))
    if both and not config.tasks.allow_overlap:
        raise ManyICLError(
            f"tasks: {both[0]!r} is in both meta_train and held_out/forgetting; held-out tasks must be unseen in "
            f"fine-tuning (set tasks.allow_overlap=true to allow it)"
        )


def make_builders(config: ExperimentConfig, tasks: list[Task], tokenizer: Any) -> dict[str, SequenceBuilder]:
    tr = config.training
    builders = {}
    for task in tasks:
        formatter = Formatter.for_task(task, tokenizer, chat=config.format.chat, **config.format.template)
        builders[task.name] = SequenceBuilder(
            task, tokenizer, formatter, tr.max_tokens, tr.objective, tr.n_shots, tr.balance_labels
        )
    return builders


def mixture_weights(tasks: list[Task], temperature: float, cap: int | None) -> dict[str, float]:
    """P(task) ∝ min(size, cap) ** (1 / temperature): proportional to size at T=1, uniform as T grows."""
    raw = {t.name: min(len(t.train), cap or len(t.train)) ** (1.0 / temperature) for t in tasks}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


class MixtureDataset(torch.utils.data.Dataset):
    """Sequence i is a deterministic function of (seed, i): its task is drawn from the mixture weights and its
    examples from that task. Built lazily, so a run of any length starts at once and any rank can build any item."""

    def __init__(self, builders: dict[str, SequenceBuilder], weights: dict[str, float], n_sequences: int, seed: int, pack: bool):
        self.builders, self.seed, self.pack, self.n = builders, seed, pack, n_sequences
        self.names = sorted(builders)
        self.weights = [weights[n] for n in self.names]

    def __len__(self) -> int:
        return self.n

    def task_of(self, i: int) -> str:
        return random.Random(f"mixture:{self.seed}:{i}").choices(self.names, self.weights)[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.task_of(i)
        builder = self.builders[name]
        seed = self.seed * 1_000_003 + i
        seq = builder.build_packed(seed) if self.pack and builder.objective in ("zero_shot", "few_shot") else builder.build(seed)
        return {
            "input_ids": seq.input_ids,
            "labels": seq.labels,
            "target_index": seq.target_index(),
            "position_ids": seq.position_ids,
            "sequence_id": i,
            "task_id": self.names.index(name),
        }


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad. Packed items carry position_ids and no attention mask (transformers isolates the examples);
    their padding restarts positions too, so it is a separate, unsupervised block."""
    width = max(len(it["input_ids"]) for it in items)
    packed = items[0]["position_ids"] is not None

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([it[key] + [value] * (width - len(it[key])) for it in items])

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "target_index": pad("target_index", -1),
        "sequence_id": torch.tensor([it["sequence_id"] for it in items]),
        "task_id": torch.tensor([it["task_id"] for it in items]),
    }
    if packed:
        batch["position_ids"] = torch.tensor([it["position_ids"] + list(range(width - len(it["position_ids"]))) for it in items])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"])) for it in items])
    return batch


# ---------------------------------------------------------------- the trainer


class ManyICLTrainer(Trainer):
    """transformers.Trainer with the target-only loss; it also counts tokens, answers and sequences per task."""

    def __init__(self, *args: Any, loss_normalization: str = "token", task_names: list[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_normalization = loss_normalization
        self.task_names = list(task_names)
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean: Trainer scales it for accumulation
        self.step_stats = Counter()
        self.task_stats: dict[str, Counter] = {n: Counter() for n in self.task_names}
        self.seen_sequences: list[int] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sequence_ids = inputs.pop("sequence_id")
        task_ids = inputs.pop("task_id")
        loss, stats = target_only_loss(model, inputs, self.loss_normalization)
        if model.training:
            self.step_stats.update(tokens=stats.tokens, target_tokens=stats.target_tokens, answers=stats.answers)
            self.seen_sequences += sequence_ids.tolist()
            answers_per_row = inputs["target_index"].max(dim=1).values + 1  # answers are numbered 0..k-1
            for tid, answers in zip(task_ids.tolist(), answers_per_row.tolist()):
                self.task_stats[self.task_names[tid]].update(sequences=1, answers=answers)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training-step record: add the counts of this step, summed over ranks
            counts = _sum_over_ranks([self.step_stats[k] for k in ("tokens", "target_tokens", "answers")])
            logs.update(tokens=int(counts[0]), target_tokens=int(counts[1]), answers=int(counts[2]))
            self.step_stats.clear()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        counts = _task_counts(self, self.task_names)  # collective: every rank takes part
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            write_atomic(folder / TASK_COUNTS, json.dumps(counts))
            write_atomic(folder / CHECKPOINT_MARKER, json.dumps({"step": self.state.global_step, "config": self.config_hash}))
        if self.args.world_size > 1:
            torch.distributed.barrier()


class TrainLog(TrainerCallback):
    """One JSON line per optimizer step in train_log.jsonl, and a progress bar with loss and tokens/s."""

    def __init__(self, path: Path):
        self.path = path
        self.bar: tqdm | None = None
        self.last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)
        self.last = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": logs.get("tokens"),
            "target_tokens": logs.get("target_tokens"),
            "answers": logs.get("answers"),
            "seconds": round(now - self.last, 3),
        }
        self.last = now
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{(record['tokens'] or 0) / max(record['seconds'], 1e-9):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- checkpoints and run directories


def config_hash(config: ExperimentConfig) -> str:
    """What decides the weights: everything but where outputs go and how evaluation runs."""
    data = drop_speed_settings(config.model_dump(mode="json"))
    for key in ("output_dir", "evaluation", "compare", "name"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, chash: str) -> Path | None:
    """Returns the checkpoint to resume from. Refuses to mix runs in one directory."""
    holds_run = (out / "config.yaml").exists() or (out / "train_log.jsonl").exists()
    if holds_run and overwrite:
        shutil.rmtree(out)
        holds_run = False
    if not resume:
        if holds_run:
            raise ManyICLError(f"{out}: already holds a run; use --resume to continue it or --overwrite to replace it")
        return None
    checkpoint = last_complete_checkpoint(out / "checkpoints")
    if checkpoint is None:
        if holds_run:
            raise ManyICLError(f"{out}: no complete checkpoint to resume from; use --overwrite to start again")
        return None
    try:
        marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError):
        raise ManyICLError(f"{checkpoint}: corrupt checkpoint marker; delete the folder or use --overwrite") from None
    if marker.get("config") != chash:
        raise ManyICLError(f"{checkpoint}: made with a different config (model/tasks/training); use --overwrite or the original config")
    _check_readable(checkpoint)
    return checkpoint


def _check_readable(checkpoint: Path) -> None:
    """Cheap integrity check before resuming: weight headers parse, state files exist and parse."""
    from safetensors import safe_open

    try:
        for weights in checkpoint.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        json.loads((checkpoint / "trainer_state.json").read_text())
        json.loads((checkpoint / TASK_COUNTS).read_text())
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (checkpoint / name).exists():
                raise OSError(f"{name} is missing")
    except Exception as e:  # safetensors, json and OS errors all mean the same thing here
        raise ManyICLError(f"{checkpoint}: cannot resume from this checkpoint, it is corrupt ({str(e).splitlines()[0][:160]}); "
                           f"delete it to resume from an earlier one, or use --overwrite") from None


def _truncate_log(path: Path, step: int) -> None:
    """After a crash the log may hold steps past the checkpoint: they are redone, so drop them."""
    if path.exists():
        keep = [l for l in path.read_text(encoding="utf-8").splitlines() if l and json.loads(l)["step"] <= step]
        write_atomic(path, "".join(l + "\n" for l in keep))


# ---------------------------------------------------------------- the recipe


@dataclass
class TrainResult:
    output_dir: Path
    weights_dir: Path
    steps: int
    seconds: float
    released_freed_memory: bool  # CPU: large blocks were mmap-ed (see memory.py)


def train(config: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    tr = config.training
    out = Path(config.output_dir)
    chash = config_hash(config)

    # 1. check the request before touching the disk or the model
    if not config.tasks.meta_train:
        raise ManyICLError("tasks.meta_train: the mixture is empty; list at least one task")
    check_split(config)
    checkpoint = prepare_output_dir(out, resume, overwrite, chash)
    tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
    tasks = load_tasks(config, config.tasks.meta_train)
    builders = make_builders(config, tasks, tokenizer)
    for b in builders.values():
        b.check_budget()

    # 2. the model, with LoRA or for full fine-tuning
    dtype = None if tr.dtype == "auto" else getattr(torch, tr.dtype)
    set_seed(tr.seed)  # LoRA initialisation draws from the global RNG: seed it before, not only in Trainer
    model = load_model(config.model.name, config.model.trust_remote_code, dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tr.max_tokens > context:
        raise ManyICLError(f"training.max_tokens={tr.max_tokens} exceeds the model's context length ({context}); lower it")
    if tr.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=tr.lora.r, lora_alpha=tr.lora.alpha, lora_dropout=tr.lora.dropout,
            target_modules=tr.lora.target_modules, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        # where the base weights are (the converted cache for the embedded default, else the id/path as given),
        # so that plain PEFT tools (AutoPeftModelForCausalLM) can load the adapter without manyicl
        model.peft_config["default"].base_model_name_or_path = resolve_model(config.model.name)
    if tr.gradient_checkpointing:
        model.config.use_cache = False
    release = tr.gradient_checkpointing if tr.release_freed_memory is None else tr.release_freed_memory
    released = release and not torch.cuda.is_available() and release_freed_memory()

    # 3. the data: sequences drawn lazily from the mixture
    weights = mixture_weights(tasks, tr.mixture_temperature, tr.mixture_cap)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = tr.batch_size * tr.grad_accum * world
    steps = tr.max_steps if tr.epochs is None else _steps_for_epochs(tasks, builders, weights, tr.epochs, per_step, tr.mixture_cap)
    dataset = MixtureDataset(builders, weights, steps * per_step, tr.seed, tr.pack)

    # 4. the trainer
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        max_steps=steps,
        learning_rate=tr.learning_rate,
        lr_scheduler_type=tr.lr_scheduler,
        warmup_steps=math.ceil(tr.warmup_ratio * steps),
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        seed=tr.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=tr.save_steps,
        save_total_limit=tr.save_total_limit,
        report_to="none",
        remove_unused_columns=False,
        activation_checkpointing=tr.gradient_checkpointing,  # transformers 5 name for gradient checkpointing
        bf16=model.dtype == torch.bfloat16,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes several CPU ranks use DDP over gloo
        disable_tqdm=True,
    )
    trainer = ManyICLTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=lambda items: collate(items, tokenizer.pad_token_id),
        loss_normalization=tr.loss_normalization, task_names=dataset.names,
    )
    trainer.config_hash = chash
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(TrainLog(out / "train_log.jsonl"))

    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump_config(config))
        if checkpoint is not None:
            _truncate_log(out / "train_log.jsonl", int(checkpoint.name.split("-")[1]))
            # counts before the crash (already summed over ranks) continue on rank 0
            for name, counts in json.loads((checkpoint / TASK_COUNTS).read_text()).items():
                trainer.task_stats[name].update(counts)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except RuntimeError as e:
        if checkpoint is not None and ("size mismatch" in str(e) or "loading state_dict" in str(e)):
            raise ManyICLError(f"{checkpoint}: cannot resume from this checkpoint, it does not match this model ({str(e).splitlines()[0][:160]})") from None
        raise
    seconds = time.perf_counter() - started

    # 5. outputs: a standard PEFT adapter (or full checkpoint), the mixture statistics, the data shards
    weights_dir = out / ("adapter" if tr.finetune == "lora" else "model")
    trainer.save_model(str(weights_dir))
    counts = _task_counts(trainer, dataset.names)  # collective: every rank takes part
    if world > 1:
        _write_shard_record(out, trainer, model)
    if trainer.is_world_process_zero():
        if tr.finetune == "full":
            tokenizer.save_pretrained(weights_dir)
        mixture = {n: {"weight": round(weights[n], 4), **counts[n]} for n in dataset.names}
        write_atomic(out / "mixture.json", json.dumps(mixture, indent=2))
        write_atomic(out / "train_summary.json", json.dumps({
            "steps": steps, "seconds": round(seconds, 1), "weights": str(weights_dir), "released_freed_memory": released,
        }))
    return TrainResult(out, weights_dir, steps, seconds, released)


def _sum_over_ranks(counts: list) -> torch.Tensor:
    """Counts summed over ranks (a collective: every rank must call it); unchanged on a single process."""
    total = torch.tensor(counts, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total


def _task_counts(trainer: ManyICLTrainer, names: list[str]) -> dict[str, dict[str, int]]:
    """Sequences and supervised answers per task, summed over ranks (each rank saw its own shard)."""
    counts = _sum_over_ranks([[trainer.task_stats[n][k] for k in ("sequences", "answers")] for n in names])
    return {n: {"sequences": int(c[0]), "answers": int(c[1])} for n, c in zip(names, counts)}


def _write_shard_record(out: Path, trainer: ManyICLTrainer, model: Any) -> None:
    """Which sequences each rank trained on and a hash of its final trainable weights (to check DDP)."""
    rank = int(os.environ.get("RANK", "0"))
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    write_atomic(shards / f"rank{rank}.json", json.dumps({"sequences": trainer.seen_sequences, "weights_sha256": digest.hexdigest()}))


def _steps_for_epochs(tasks, builders, weights, epochs, per_step, cap) -> int:
    """Optimizer steps so that, in expectation, each task's (capped) examples are seen ``epochs`` times."""
    examples = sum(min(len(t.train), cap or len(t.train)) for t in tasks)
    per_sequence = sum(weights[t.name] * builders[t.name].build(0).n_examples for t in tasks)
    return max(1, math.ceil(epochs * examples / per_sequence / per_step))

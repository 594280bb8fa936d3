"""The training recipe: one fine-tune over a mixture of tasks, every sequence built by the SequenceBuilder.

Read ``train()`` top to bottom: it checks the request, builds the mixture (mixture.py), loads the model (LoRA or
full) and settles its precision (precision.py), hands ``ManyICLTrainer`` (trainer.py) everything it needs, trains,
and writes the outputs. The helpers below it are its steps, in the same order. Multi-GPU and multi-node (DDP,
FSDP, DeepSpeed) come from ``accelerate launch`` with no code here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from manyicl.catalog import check_split, load_tasks
from manyicl.config import ExperimentConfig, LoraSettings, ModelConfig, TrainingConfig, dump_config
from manyicl.errors import Interrupted, ManyICLError
from manyicl.files import atomic_path, logged_tokens, read_log, write_atomic
from manyicl.model_card import write_model_card
from manyicl.models import load_model, load_tokenizer, resolve_model
from manyicl.runlock import run_lock
from manyicl.stopping import StopOnSignal
from manyicl.training.checkpoints import (
    check_matches_model,
    check_precision,
    checkpoint_step,
    config_hash,
    prepare_output_dir,
    resumed_task_counts,
    saving,
    truncate_log,
)
from manyicl.training.memory import freed_memory_released
from manyicl.training.mixture import MixtureDataset, collate, make_builders, mixture_weights, steps_for_epochs
from manyicl.training.packing import packed_attention, packed_isolation
from manyicl.training.precision import (
    PrecisionProbe,
    bf16_kernels,
    keep_lora_sums_fp32,
    measure_cpu_precision,
    needs_measurement,
    resolve_precision,
)
from manyicl.training.trainer import ManyICLTrainer


@dataclass
class TrainResult:
    output_dir: Path
    weights_dir: Path
    steps: int
    seconds: float
    released_freed_memory: bool  # CPU: large blocks were mmap-ed during training (see memory.py)
    precision: str  # "bf16" (autocast, trainable weights and optimizer state in fp32) or "fp32"


def train(config: ExperimentConfig, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """One fine-tune. ``callbacks`` are added to the Trainer (transformers.TrainerCallback), as users of
    Trainer-based tools expect. One process per output folder (runlock.py)."""
    tr, out = config.training, Path(config.output_dir)
    with run_lock(config.output_dir):
        # 1. check the request before touching the disk or the model
        if not config.tasks.meta_train:
            raise ManyICLError("tasks.meta_train: the mixture is empty; list at least one task")
        check_split(config.tasks)
        chash = config_hash(config)
        checkpoint = prepare_output_dir(out, resume, overwrite, chash)
        tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
        tasks = load_tasks(config.tasks, config.tasks.meta_train)
        builders = make_builders(tasks, tokenizer, config.format, tr.max_tokens, tr.objective, tr.n_shots)
        for b in builders.values():
            b.check_budget()

        # 2. the data: sequences built lazily from the mixture, every task's share fixed in advance (mixture.py)
        weights = mixture_weights(tasks, tr.mixture_temperature, tr.mixture_cap)
        per_step = tr.batch_size * tr.grad_accum * _world_size()
        steps = (tr.max_steps if tr.epochs is None
                 else steps_for_epochs(tasks, builders, weights, tr.epochs, per_step, tr.mixture_cap))
        dataset = MixtureDataset(builders, weights, steps * per_step, tr.seed, tr.pack)

        # 3. the model, with LoRA or for full fine-tuning, and the precision it trains in
        model = _model(config.model, tr)
        if checkpoint is not None:
            check_matches_model(checkpoint, model)
        precision, probe = _precision(model, tr)
        if checkpoint is not None:
            check_precision(checkpoint, precision)
        # packed units are kept apart per unit or by an explicit mask (packing.py); a model allowing neither is refused
        isolation = packed_isolation(model, tr.max_tokens) if dataset.packed else None

        # 4. the trainer, given everything it needs
        stop = StopOnSignal()  # SIGINT/SIGTERM: finish the step, save a checkpoint, stop
        trainer = ManyICLTrainer(
            model=model, args=_training_arguments(tr, out, steps, precision), train_dataset=dataset,
            data_collator=lambda items: collate(items, tokenizer.pad_token_id),
            config_hash=chash, precision=precision, task_names=dataset.names, log_path=out / "train_log.jsonl",
            loss_normalization=tr.loss_normalization, packed_mask_tokens=tr.max_tokens if isolation == "mask" else None,
            resumed_task_counts=resumed_task_counts(checkpoint) if checkpoint is not None else None,
            callbacks=[stop, *callbacks],
        )
        if trainer.is_world_process_zero():
            _start_outputs(out, dump_config(config), checkpoint)

        # 5. training, with the settings of the training phase only
        release = tr.gradient_checkpointing if tr.release_freed_memory is None else tr.release_freed_memory
        released, seconds = _run(trainer, model, checkpoint, stop, release, tr.max_tokens if dataset.packed else None)
        if stop.received is not None and trainer.state.global_step < steps:  # in the last step: the run is complete
            raise Interrupted(f"{out}: training stopped by {signal.Signals(stop.received).name} at step "
                              f"{trainer.state.global_step} (checkpoint saved); run the same command again to "
                              "continue (manyicl train: with --resume)", stop.received)

        # 6. outputs: a standard PEFT adapter (or full model), the mixture statistics, the summary
        result = TrainResult(out, out / ("adapter" if tr.finetune == "lora" else "model"), steps, seconds, released,
                             precision)
        _write_outputs(result, probe, tr, config.model.name, trainer, model, tokenizer, weights)
    return result


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _model(model_config: ModelConfig, tr: TrainingConfig) -> Any:
    """The model as it trains: loaded in ``training.dtype``, with LoRA or for full fine-tuning."""
    dtype = None if tr.dtype == "auto" else getattr(torch, tr.dtype)
    set_seed(tr.seed)  # LoRA initialisation draws from the global RNG: seed it before, not only in Trainer
    model = load_model(model_config.name, model_config.trust_remote_code, dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tr.max_tokens > context:
        raise ManyICLError(f"training.max_tokens={tr.max_tokens} exceeds the model's context length ({context}); "
                           "lower it")
    if tr.finetune == "lora":
        model = _peft_model(model, tr.lora, resolve_model(model_config.name))
    if tr.gradient_checkpointing:
        model.config.use_cache = False
    return model


def _peft_model(model: Any, lora: LoraSettings, base_path: str) -> Any:
    """``model`` with LoRA adapters; ``base_path`` is where the base weights are (the converted cache for the
    embedded default, else the id or path as given), so that plain PEFT tools (AutoPeftModelForCausalLM) can load
    the adapter without manyicl."""
    from peft import LoraConfig, get_peft_model

    settings = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, settings)
    model.peft_config["default"].base_model_name_or_path = base_path
    return model


def _precision(model: Any, tr: TrainingConfig) -> tuple[str, PrecisionProbe | None]:
    """"bf16" or "fp32" for this model here, and the measurement when ``auto`` needed one (precision.py)."""
    precision = resolve_precision(tr.precision, getattr(model, "dtype", None))  # the flags' answer
    if precision == "bf16" and tr.finetune == "lora":
        # else updates below bf16's rounding step vanish from the forward (precision.py); a no-op in fp32, so also
        # right when the probe below picks fp32, and the probe times bf16 as it would train
        keep_lora_sums_fp32(model)
    if bf16_kernels(precision) == "emulated":
        print("training.precision bf16: this CPU has neither AVX-512 BF16 nor AMX, so bf16 matmuls and attention "
              "are emulated on fp32 kernels (the same roundings; precision.py)", flush=True)
    if not needs_measurement(tr.precision, getattr(model, "dtype", None)):  # all but auto on a CPU with bf16
        return precision, None
    probe = measure_cpu_precision(model, tr.max_tokens)
    print(probe.describe(), flush=True)
    return probe.choice, probe


def _training_arguments(tr: TrainingConfig, out: Path, steps: int, precision: str) -> TrainingArguments:
    return TrainingArguments(
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
        # TensorBoard: event files under <output_dir>/checkpoints/runs (or $TENSORBOARD_LOGGING_DIR)
        report_to=tr.report_to,
        remove_unused_columns=False,
        activation_checkpointing=tr.gradient_checkpointing,  # transformers 5 name for gradient checkpointing
        bf16=precision == "bf16",  # autocast; with fp32 weights the LoRA weights and optimizer state stay fp32
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # also makes several CPU ranks use DDP over gloo (accelerate runs FSDP on GPUs only)
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def _start_outputs(out: Path, config_text: str, checkpoint: Path | None) -> None:
    """Rank 0, before the first step: the run folder with its config (``config_text``, as dump_config writes it),
    and a resumed run's log cut back to its checkpoint (the steps after it are redone)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", config_text)
    if checkpoint is not None:
        truncate_log(out / "train_log.jsonl", checkpoint_step(checkpoint))


def _run(trainer: ManyICLTrainer, model: Any, checkpoint: Path | None, stop: StopOnSignal, release: bool,
         packed_tokens: int | None) -> tuple[bool, float]:
    """``trainer.train()`` under the settings of the training phase only (evaluation afterwards runs without them):
    freed memory returned to the OS (CPU, ``release``), attention per packed unit, the signal handlers. Returns
    whether memory was released, and the seconds it took."""
    started = time.perf_counter()
    with ExitStack() as phase:
        released = release and not torch.cuda.is_available() and phase.enter_context(freed_memory_released())
        if packed_tokens is not None:
            phase.enter_context(packed_attention(model, packed_tokens))
        phase.enter_context(stop)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    return released, time.perf_counter() - started


def _write_outputs(result: TrainResult, probe: PrecisionProbe | None, tr: TrainingConfig, base_model: str,
                   trainer: ManyICLTrainer, model: Any, tokenizer: Any, weights: dict[str, float]) -> None:
    """The weights (written beside their folder and renamed over it once complete), mixture.json, the model card
    (``base_model``: the model's name as the config gives it), and train_summary.json last: the run is complete.
    Under DDP every rank takes part; rank 0 writes."""
    out, weights_dir, dataset = result.output_dir, result.weights_dir, trainer.train_dataset
    staged = weights_dir.with_name(weights_dir.name + ".saving")
    with saving(staged):
        trainer.save_model(str(staged))  # collective under DDP/FSDP: every rank takes part, rank 0 writes
    counts = trainer.task_counts()  # collective: every rank takes part
    if _world_size() > 1:
        _write_shard_record(out, trainer, model)
    if not trainer.is_world_process_zero():
        return
    if tr.finetune == "full":
        tokenizer.save_pretrained(staged)
    with atomic_path(weights_dir) as tmp:
        os.replace(staged, tmp)
    mixture = {n: {"weight": round(weights[n], 4), "quota": dataset.quotas[n], **counts[n]} for n in dataset.names}
    write_atomic(out / "mixture.json", json.dumps(mixture, indent=2))
    summary = {"steps": result.steps, "seconds": round(result.seconds, 1), "weights": str(weights_dir),
               "released_freed_memory": result.released_freed_memory, "precision": result.precision,
               **({"precision_probe": asdict(probe)} if probe else {})}
    if result.precision == "bf16":  # counted per step: a resumed run may have gone on on another CPU
        steps_emulated = sum(r.get("bf16_kernels") == "emulated" for r in read_log(out / "train_log.jsonl"))
        summary["bf16_steps"] = {"native": result.steps - steps_emulated, "emulated": steps_emulated}
    tokens = logged_tokens(out / "train_log.jsonl")
    write_model_card(weights_dir, base_model, tr.objective, tr.finetune, summary, mixture, tokens)
    write_atomic(out / "train_summary.json", json.dumps(summary))  # last: the run is complete


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
    write_atomic(shards / f"rank{rank}.json", json.dumps({"sequences": trainer.seen_sequences,
                                                           "weights_sha256": digest.hexdigest()}))

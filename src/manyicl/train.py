"""The training recipe: one fine-tune over a mixture of tasks, every sequence built by the SequenceBuilder.

Read top to bottom: ``train()`` checks the config, loads the model, builds the mixture (data.py), and hands a
``transformers.Trainer`` the data. The Trainer is subclassed only for the target-only loss, normalised by the
supervised count of the WHOLE optimizer step (every micro-batch, every rank), and for its statistics.
Multi-GPU and multi-node (DDP, FSDP, DeepSpeed) come from ``accelerate launch`` with no code here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from manyicl.catalog import check_split, load_tasks
from manyicl.checkpoints import (
    CHECKPOINT_MARKER,
    TASK_COUNTS,
    check_precision,
    config_hash,
    prepare_output_dir,
    truncate_log,
)
from manyicl.config import ExperimentConfig, dump_config
from manyicl.data import MixtureDataset, collate, make_builders, mixture_weights, steps_for_epochs
from manyicl.errors import Interrupted, ManyICLError
from manyicl.files import atomic_path, disk_full, fsync_folder, logged_tokens, read_log, with_path, write_atomic
from manyicl.loss import supervised_count, target_only_loss
from manyicl.memory import freed_memory_released
from manyicl.model_card import write_model_card
from manyicl.models import load_model, load_tokenizer, resolve_model
from manyicl.packing import isolating_mask, packed_attention, packed_isolation
from manyicl.precision import (
    bf16_compute,
    bf16_kernels,
    keep_lora_sums_fp32,
    measure_cpu_precision,
    needs_measurement,
    resolve_precision,
)
from manyicl.runlock import run_lock
from manyicl.stopping import StopOnSignal

# ---------------------------------------------------------------- the trainer


class ManyICLTrainer(Trainer):
    """transformers.Trainer with the target-only loss; it also counts tokens, answers and sequences per task."""

    def __init__(self, *args: Any, loss_normalization: str = "token", task_names: Sequence[str] = (),
                 config_hash: str = "", precision: str = "fp32", packed_mask_tokens: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_normalization = loss_normalization
        # packed rows of a model that cannot attend per unit get an explicit block-diagonal mask (packing.py)
        self.packed_mask_tokens = packed_mask_tokens
        self.task_names = list(task_names)
        # compute_loss divides by the step's global count (num_items_in_batch): the Trainer must not also divide
        # by the accumulation steps
        self.model_accepts_loss_kwargs = True
        self.step_stats = Counter()
        self.task_stats: dict[str, Counter] = {n: Counter() for n in self.task_names}
        self.seen_sequences: list[int] = []
        # the tasks of this rank's sequences in the current step (train_log.jsonl: per-task loss curves)
        self.step_tasks: list[str] = []
        self.last_step_tasks: list[str] = []
        self.config_hash, self.precision = config_hash, precision  # both go into every checkpoint's marker

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # forward and backward: bf16 on a CPU without bf16 instructions is emulated (precision.py)
        with bf16_compute(self.precision):
            return super().training_step(*args, **kwargs)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step, and what the loss is normalised by: supervised tokens (or
        answers, ``loss_normalization: target``) in all of them, summed over ranks."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        count = torch.tensor(sum(supervised_count(b, self.loss_normalization) for b in batches), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sequence_ids = inputs.pop("sequence_id")
        task_ids = inputs.pop("task_id")
        if self.packed_mask_tokens and "position_ids" in inputs:
            inputs["attention_mask"] = isolating_mask(self.model, inputs["position_ids"], self.packed_mask_tokens)
        loss, stats = target_only_loss(model, inputs, self.loss_normalization, num_items_in_batch)
        if num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP/FSDP average gradients over ranks: undo it
        if model.training:
            self.step_stats.update(tokens=stats.tokens, target_tokens=stats.target_tokens, answers=stats.answers)
            self.seen_sequences += sequence_ids.tolist()
            answers_per_row = inputs["target_index"].max(dim=1).values + 1  # answers are numbered 0..k-1
            for tid, answers in zip(task_ids.tolist(), answers_per_row.tolist()):
                self.task_stats[self.task_names[tid]].update(sequences=1, answers=answers)
                self.step_tasks.append(self.task_names[tid])
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training-step record: add the counts of this step, summed over ranks
            counts = _sum_over_ranks([self.step_stats[k] for k in ("tokens", "target_tokens", "answers")])
            logs.update(tokens=int(counts[0]), target_tokens=int(counts[1]), answers=int(counts[2]))
            self.step_stats.clear()
            self.step_tasks, self.last_step_tasks = [], self.step_tasks
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        with saving(folder):
            super()._save_checkpoint(model, trial)
        counts = _task_counts(self, self.task_names)  # collective: every rank takes part
        if self.args.should_save:
            fsync_folder(folder)  # the marker goes last, once everything before it is on disk
            write_atomic(folder / TASK_COUNTS, json.dumps(counts))
            write_atomic(folder / CHECKPOINT_MARKER, json.dumps({"step": self.state.global_step,
                                                                  "config": self.config_hash,
                                                                  "precision": self.precision}))
        if self.args.world_size > 1:
            torch.distributed.barrier()


class TrainLog(TrainerCallback):
    """One JSON line per optimizer step in train_log.jsonl, and a progress bar with loss and tokens/s."""

    def __init__(self, path: Path, trainer: ManyICLTrainer | None = None):
        self.path = path
        self.trainer = trainer  # for the tasks of each step
        self.bar: tqdm | None = None
        self.last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)
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
        if self.trainer is not None:  # rank 0's sequences of the step (all of them on one process)
            record["tasks"] = sorted(set(self.trainer.last_step_tasks))
            if bf16_kernels(self.trainer.precision) == "emulated":  # per step: a run may go on on another CPU
                record["bf16_kernels"] = "emulated"
        self.last = now
        try:  # an append-only log: a line cut off by a full disk is dropped on --resume (checkpoints.truncate_log)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise with_path(e, self.path) from e
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}",
                                 tok_s=f"{(record['tokens'] or 0) / max(record['seconds'], 1e-9):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """The progress bar ends before any message that follows it (also when training fails)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def saving(folder: Path) -> Iterator[None]:
    """A library's save into ``folder``: a partial folder is removed, and a full disk reported as such (torch and
    safetensors raise their own error types for it, with no path)."""
    try:
        yield
    except Exception as e:
        full = not isinstance(e, OSError) and disk_full(folder.parent)  # asked before the partial folder goes
        shutil.rmtree(folder, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from e
        if isinstance(e, OSError):
            raise with_path(e, folder) from e
        raise


# ---------------------------------------------------------------- the recipe


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
    with run_lock(config.output_dir):
        return _train(config, resume, overwrite, callbacks)


def _train(config: ExperimentConfig, resume: bool, overwrite: bool,
           callbacks: Sequence[TrainerCallback]) -> TrainResult:
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

    # 2. the data: sequences built lazily from the mixture, every task's share fixed in advance (data.py)
    weights = mixture_weights(tasks, tr.mixture_temperature, tr.mixture_cap)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = tr.batch_size * tr.grad_accum * world
    steps = (tr.max_steps if tr.epochs is None
             else steps_for_epochs(tasks, builders, weights, tr.epochs, per_step, tr.mixture_cap))
    dataset = MixtureDataset(builders, weights, steps * per_step, tr.seed, tr.pack)

    # 3. the model, with LoRA or for full fine-tuning
    dtype = None if tr.dtype == "auto" else getattr(torch, tr.dtype)
    set_seed(tr.seed)  # LoRA initialisation draws from the global RNG: seed it before, not only in Trainer
    model = load_model(config.model.name, config.model.trust_remote_code, dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tr.max_tokens > context:
        raise ManyICLError(f"training.max_tokens={tr.max_tokens} exceeds the model's context length ({context}); "
                           "lower it")
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
    precision = resolve_precision(tr.precision, getattr(model, "dtype", None))  # the flags' answer
    if precision == "bf16" and tr.finetune == "lora":
        # else updates below bf16's rounding step vanish from the forward (precision.py); a no-op in fp32, so also
        # right when the probe below picks fp32, and the probe times bf16 as it would train
        keep_lora_sums_fp32(model)
    if bf16_kernels(precision) == "emulated":
        print("training.precision bf16: this CPU has neither AVX-512 BF16 nor AMX, so bf16 matmuls and attention "
              "are emulated on fp32 kernels (the same roundings; precision.py)", flush=True)
    probe = None
    if needs_measurement(tr.precision, getattr(model, "dtype", None)):  # auto on a CPU with bf16 instructions
        probe = measure_cpu_precision(model, tr.max_tokens)
        print(probe.describe(), flush=True)
        precision = probe.choice
    if checkpoint is not None:
        check_precision(checkpoint, precision)
    # packed units are isolated by construction, per unit or by an explicit mask; a model that allows neither is refused
    isolation = packed_isolation(model, tr.max_tokens) if dataset.packed else None

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
    trainer = ManyICLTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=lambda items: collate(items, tokenizer.pad_token_id),
        loss_normalization=tr.loss_normalization, task_names=dataset.names, config_hash=chash, precision=precision,
        packed_mask_tokens=tr.max_tokens if isolation == "mask" else None,
    )
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    log = TrainLog(out / "train_log.jsonl", trainer)
    trainer.add_callback(log)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    for callback in callbacks:
        trainer.add_callback(callback)

    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump_config(config))
        if checkpoint is not None:
            truncate_log(out / "train_log.jsonl", int(checkpoint.name.split("-")[1]))
            # counts before the crash (already summed over ranks) continue on rank 0
            for name, counts in json.loads((checkpoint / TASK_COUNTS).read_text()).items():
                trainer.task_stats[name].update(counts)
    release = tr.gradient_checkpointing if tr.release_freed_memory is None else tr.release_freed_memory
    started = time.perf_counter()
    with ExitStack() as phase:  # settings of the training phase only: evaluation afterwards runs without them
        released = release and not torch.cuda.is_available() and phase.enter_context(freed_memory_released())
        if dataset.packed:
            phase.enter_context(packed_attention(model, tr.max_tokens))
        phase.enter_context(stop)  # SIGINT/SIGTERM: finish the step, save a checkpoint, stop
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except RuntimeError as e:
            if checkpoint is not None and ("size mismatch" in str(e) or "loading state_dict" in str(e)):
                raise ManyICLError(f"{checkpoint}: cannot resume from this checkpoint, it does not match this model "
                                   f"({str(e).splitlines()[0][:160]})") from None
            raise
        finally:
            log.close()
    seconds = time.perf_counter() - started
    if stop.received is not None and trainer.state.global_step < steps:  # in the last step: the run is complete
        raise Interrupted(f"{out}: training stopped by {signal.Signals(stop.received).name} at step "
                          f"{trainer.state.global_step} (checkpoint saved); run the same command again to continue "
                          "(manyicl train: with --resume)", stop.received)

    # 5. outputs: a standard PEFT adapter (or full checkpoint), the mixture statistics, the data shards; the weights
    # written beside their folder and renamed over it once complete
    weights_dir = out / ("adapter" if tr.finetune == "lora" else "model")
    staged = weights_dir.with_name(weights_dir.name + ".saving")
    with saving(staged):
        trainer.save_model(str(staged))  # collective under DDP/FSDP: every rank takes part, rank 0 writes
    counts = _task_counts(trainer, dataset.names)  # collective: every rank takes part
    if world > 1:
        _write_shard_record(out, trainer, model)
    if trainer.is_world_process_zero():
        if tr.finetune == "full":
            tokenizer.save_pretrained(staged)
        with atomic_path(weights_dir) as tmp:
            os.replace(staged, tmp)
        mixture = {n: {"weight": round(weights[n], 4), "quota": dataset.quotas[n], **counts[n]} for n in dataset.names}
        write_atomic(out / "mixture.json", json.dumps(mixture, indent=2))
        summary = {"steps": steps, "seconds": round(seconds, 1), "weights": str(weights_dir),
                   "released_freed_memory": released, "precision": precision,
                   **({"precision_probe": asdict(probe)} if probe else {})}
        if precision == "bf16":  # counted per step: a resumed run may have gone on on another CPU
            steps_emulated = sum(r.get("bf16_kernels") == "emulated" for r in read_log(out / "train_log.jsonl"))
            summary["bf16_steps"] = {"native": steps - steps_emulated, "emulated": steps_emulated}
        tokens = logged_tokens(out / "train_log.jsonl")
        write_model_card(weights_dir, config.model.name, tr.objective, tr.finetune, summary, mixture, tokens)
        write_atomic(out / "train_summary.json", json.dumps(summary))  # last: the run is complete
    return TrainResult(out, weights_dir, steps, seconds, released, precision)


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
    write_atomic(shards / f"rank{rank}.json", json.dumps({"sequences": trainer.seen_sequences,
                                                           "weights_sha256": digest.hexdigest()}))

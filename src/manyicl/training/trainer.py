"""The Trainer: ``transformers.Trainer`` with the target-only loss (loss.py), normalised by the supervised count of
the WHOLE optimizer step (every micro-batch, every rank), and the run's statistics: tokens, answers and sequences
per task, one line per step in train_log.jsonl, and a marker that makes each checkpoint count (checkpoints.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from manyicl.files import with_path
from manyicl.training.checkpoints import mark_complete, saving
from manyicl.training.loss import supervised_count, target_only_loss
from manyicl.training.packing import isolating_mask
from manyicl.training.precision import bf16_compute, bf16_kernels


class ManyICLTrainer(Trainer):
    """transformers.Trainer with the target-only loss; it also counts tokens, answers and sequences per task.

    Everything it needs comes in here: ``config_hash`` and ``precision`` go into every checkpoint's marker,
    ``resumed_task_counts`` are the per-task counts of the checkpoint resumed from, ``log_path`` is
    train_log.jsonl, and ``callbacks`` follow its own log; the other keywords are the Trainer's."""

    def __init__(self, *, config_hash: str, precision: str, task_names: Sequence[str], log_path: Path,
                 loss_normalization: str = "token", packed_mask_tokens: int | None = None,
                 resumed_task_counts: Mapping[str, Mapping[str, int]] | None = None,
                 callbacks: Sequence[TrainerCallback] = (), **kwargs: Any):
        self.train_log = TrainLog(log_path, self)
        super().__init__(callbacks=[self.train_log, *callbacks], **kwargs)
        for cb in (ProgressCallback, PrinterCallback):  # the log draws its own progress bar
            self.remove_callback(cb)
        self.config_hash, self.precision = config_hash, precision
        self.loss_normalization = loss_normalization
        # packed rows of a model that cannot attend per unit get an explicit block-diagonal mask (packing.py)
        self.packed_mask_tokens = packed_mask_tokens
        self.task_names = list(task_names)
        # compute_loss divides by the step's global count (num_items_in_batch): the Trainer must not also divide
        # by the accumulation steps
        self.model_accepts_loss_kwargs = True
        self.step_stats = Counter()
        self.task_stats: dict[str, Counter] = {n: Counter() for n in self.task_names}
        if resumed_task_counts and self.is_world_process_zero():  # summed over ranks already: go on on rank 0
            for name, counts in resumed_task_counts.items():
                self.task_stats[name].update(counts)
        self.seen_sequences: list[int] = []
        # the tasks of this rank's sequences in the current step (train_log.jsonl: per-task loss curves)
        self.step_tasks: list[str] = []
        self.last_step_tasks: list[str] = []

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self.train_log.close()  # the progress bar ends before any message that follows (also on failure)

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
            counts = sum_over_ranks([self.step_stats[k] for k in ("tokens", "target_tokens", "answers")])
            logs.update(tokens=int(counts[0]), target_tokens=int(counts[1]), answers=int(counts[2]))
            self.step_stats.clear()
            self.step_tasks, self.last_step_tasks = [], self.step_tasks
        super().log(logs, *args, **kwargs)

    def task_counts(self) -> dict[str, dict[str, int]]:
        """Sequences and supervised answers per task, summed over ranks (each rank saw its own shard); a
        collective: every rank must call it."""
        counts = sum_over_ranks([[self.task_stats[n][k] for k in ("sequences", "answers")] for n in self.task_names])
        return {n: {"sequences": int(c[0]), "answers": int(c[1])} for n, c in zip(self.task_names, counts)}

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        with saving(folder):
            super()._save_checkpoint(model, trial)
        counts = self.task_counts()  # collective: every rank takes part
        if self.args.should_save:
            mark_complete(folder, self.state.global_step, self.config_hash, self.precision, counts)
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


def sum_over_ranks(counts: list) -> torch.Tensor:
    """Counts summed over ranks (a collective: every rank must call it); unchanged on a single process."""
    total = torch.tensor(counts, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total

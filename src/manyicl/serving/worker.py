"""The model worker: one thread owns the model, the tokenizer and the prefix cache; requests reach it as jobs.

Concurrent predict requests for the same task are merged: the worker waits a short collection window, then answers
every waiting request of that task in one grouped evaluation (the evaluator's shared-prefix forwards). Different
tasks are served in turn (round robin over the tasks with waiting requests), so one busy task cannot starve the
others. The queue is bounded: past ``max_queue`` waiting requests a new one is refused (the app answers 429).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from manyicl.errors import ManyICLError
from manyicl.predict import PromptedTask, prompt_task
from manyicl.serving.prefix_cache import CachedPrefixBackend, PrefixCache
from manyicl.serving.schemas import TaskSpec
from manyicl.task_files import parse_jsonl
from manyicl.tasks import Example


class QueueFull(Exception):
    """More requests are waiting than the server accepts (--max-queue)."""


class UnknownTask(KeyError):
    pass


@dataclass
class ServedTask:
    spec: TaskSpec
    prompted: PromptedTask
    prefix: tuple[int, ...]
    max_tokens: int
    registered_at: float


@dataclass
class _Job:
    task: str
    queries: list[Example]
    future: Future = field(default_factory=Future)


def demonstrations_of(spec: TaskSpec) -> list[Example]:
    """The spec's demonstrations as examples; errors name the field (and the JSONL line)."""
    if spec.demonstrations_jsonl is not None:
        return parse_jsonl(spec.demonstrations_jsonl, "demonstrations_jsonl")
    return [Example(d.input.strip(), d.output.strip(), source=f"demonstrations.{i}", choices=tuple(d.choices))
            for i, d in enumerate(spec.demonstrations or [])]


class ModelWorker:
    def __init__(self, model: Any, tokenizer: Any, cache_bytes: int, max_tokens: int, max_queue: int = 64,
                 window_s: float = 0.005, max_batch_inputs: int = 256, max_demonstrations: int = 4096,
                 on_batch: Callable[[str, int, bool], None] | None = None):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.cache = PrefixCache(cache_bytes)
        self.backend = CachedPrefixBackend(model, tokenizer, self.cache)
        self.max_queue, self.window_s, self.max_batch_inputs = max_queue, window_s, max_batch_inputs
        self.max_demonstrations = max_demonstrations
        self.on_batch = on_batch  # (task, inputs, cache hit): for the metrics
        self.tasks: dict[str, ServedTask] = {}
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()  # task -> its jobs, tasks in turn order
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # registrations and deletions, first
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="manyicl-model-worker", daemon=True)
        self._thread.start()

    # ---- called from request handlers (any thread)
    @property
    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(jobs) for jobs in self._waiting.values())

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread (everything that touches the model or tokenizer goes there)."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def submit(self, task: str, queries: list[Example]) -> Future:
        with self._cond:
            if task not in self.tasks:
                raise UnknownTask(task)
            if sum(len(jobs) for jobs in self._waiting.values()) >= self.max_queue:
                raise QueueFull()
            job = _Job(task, queries)
            self._waiting.setdefault(task, deque()).append(job)
            self._cond.notify()
        return job.future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- on the worker thread
    def register(self, spec: TaskSpec, registered_at: float, encode: bool = True) -> ServedTask:
        """Build the task's prompt (demonstrations chosen once) and, with ``encode``, its cached prefix."""
        demos = demonstrations_of(spec)
        if len(demos) > self.max_demonstrations:
            raise ManyICLError(f"demonstrations: {len(demos)} given, the server takes at most "
                               f"{self.max_demonstrations} per task (--max-demonstrations)")
        max_tokens = spec.max_tokens or self.max_tokens
        if max_tokens > self.max_tokens:
            raise ManyICLError(f"max_tokens: {max_tokens} is over the server's --max-tokens ({self.max_tokens})")
        task = prompt_task(spec.family, demos, spec.labels, spec.instruction, where="demonstrations",
                           labels_name="labels")
        prompted = PromptedTask.build(task, self.tokenizer, spec.shots, spec.seed, spec.scoring, max_tokens,
                                      spec.balance_labels, reserve=spec.query_tokens)
        served = ServedTask(spec, prompted, tuple(prompted.prefix), max_tokens, registered_at)
        if encode and served.prefix not in self.cache:
            self.cache.put(served.prefix, self.backend.encode_prefix(list(served.prefix)))
        old = self.tasks.get(spec.name)
        with self._cond:
            self.tasks[spec.name] = served
        if old and old.prefix != served.prefix and not any(t.prefix == old.prefix for t in self.tasks.values()):
            self.cache.discard(old.prefix)
        return served

    def unregister(self, name: str) -> None:
        with self._cond:
            served = self.tasks.pop(name, None)
            jobs = self._waiting.pop(name, deque())
        for job in jobs:
            job.future.set_exception(UnknownTask(name))
        if served and not any(t.prefix == served.prefix for t in self.tasks.values()):
            self.cache.discard(served.prefix)

    def _next(self) -> tuple[str, list[_Job]] | tuple[Callable[[], Any], Future] | None:
        with self._cond:
            while not self._stopped and not self._calls and not self._waiting:
                self._cond.wait()
            if self._stopped:
                return None
            if self._calls:
                return self._calls.popleft()
        time.sleep(self.window_s)  # the collection window: requests for this task arriving now join the batch
        with self._cond:
            if not self._waiting:  # its task was deleted meanwhile
                return "", []
            task, jobs = next(iter(self._waiting.items()))
            batch, inputs = [], 0
            while jobs and (not batch or inputs + len(jobs[0].queries) <= self.max_batch_inputs):
                job = jobs.popleft()
                batch.append(job)
                inputs += len(job.queries)
            del self._waiting[task]
            if jobs:  # the rest waits its next turn, behind the other tasks
                self._waiting[task] = jobs
            return task, batch

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            if callable(item[0]):
                fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as e:  # the caller gets it: one bad request never ends the worker
                    future.set_exception(e)
                continue
            task, batch = item
            if not batch:
                continue
            try:
                served = self.tasks[task]
                queries = [q for job in batch for q in job.queries]
                start = time.perf_counter()
                output = served.prompted.answer(self.backend, queries)
                self.cache.trim()  # the buffers may have grown while answering
                seconds = time.perf_counter() - start
                hit = self.backend.last_hit
                if self.on_batch:
                    self.on_batch(task, len(queries), hit)
                at = 0
                for job in batch:
                    n = len(job.queries)
                    job.future.set_result((served, output.predictions[at : at + n], hit, seconds))
                    at += n
            except BaseException as e:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

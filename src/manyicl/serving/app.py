"""The ASGI app of ``manyicl serve`` (FastAPI): the routes, the guard (API key, body size) and the metrics.

Every route but /healthz needs ``Authorization: Bearer <key>`` when the server has a key (compared in constant
time). Errors are JSON ``{"error": "..."}``: 401 without the key, 404 for an unknown task, 413 for a body over
--max-body-mb, 422 for a malformed body (naming the field) or a task the demonstrations cannot make, 429 when the
queue is full; the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Callable

from fastapi import FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from manyicl.errors import ManyICLError
from manyicl.predict import TOO_LONG, probabilities
from manyicl.serving.registry import Registry
from manyicl.serving.schemas import (
    TASK_NAME,
    Answer,
    CacheState,
    Demonstration,
    Health,
    Limits,
    PredictRequest,
    PredictResponse,
    Problem,
    Query,
    TaskDetail,
    TaskList,
    TaskSpec,
    TaskSummary,
)
from manyicl.serving.worker import ModelWorker, QueueFull, ServedTask, UnknownTask
from manyicl.tasks import Example

OPEN_PATHS = ("/healthz",)  # the one route a load balancer probes without the key


@dataclass
class ServeSettings:
    model: str
    max_tokens: int = 2048
    cache_bytes: int = 1024 * 1024 * 1024
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    window_s: float = 0.005


class Metrics:
    """The Prometheus series of one app (its own registry, so that several apps can live in one process)."""

    def __init__(self, worker_state: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("manyicl_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("manyicl_request_seconds", "HTTP request latency", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.inputs = Counter("manyicl_predicted_inputs", "inputs answered", ["task"], registry=r)
        self.batches = Histogram("manyicl_batch_inputs", "inputs per model batch", registry=r,
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        r.register(_WorkerCollector(worker_state))

    def on_batch(self, task: str, inputs: int, hit: bool) -> None:
        self.inputs.labels(task).inc(inputs)
        self.batches.observe(inputs)


class _WorkerCollector:
    """Read at each scrape from the worker: the queue, the tasks and the prefix cache (counters and gauges)."""

    def __init__(self, worker_state: Any):
        self.worker_state = worker_state

    def collect(self) -> Any:
        worker = self.worker_state()
        if worker is None:
            return
        cache = worker.cache
        for name, doc, value in (("manyicl_prefix_cache_hits", "predict batches whose prefix was cached",
                                  cache.stats.hits),
                                 ("manyicl_prefix_cache_misses", "prefixes encoded (again)", cache.stats.misses),
                                 ("manyicl_prefix_cache_evictions", "prefixes evicted (LRU)", cache.stats.evictions)):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, value in (("manyicl_prefix_cache_bytes", "bytes of cached keys/values", cache.nbytes),
                                 ("manyicl_prefix_cache_entries", "cached prefixes", len(cache)),
                                 ("manyicl_queue_depth", "requests waiting for the model worker", worker.queue_depth),
                                 ("manyicl_tasks", "registered tasks", len(worker.tasks))):
            yield GaugeMetricFamily(name, doc, value=value)


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: the API key, the body limit (the body is read here, bounded, then replayed), the metrics."""

    def __init__(self, app: Any, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refused = await self._refusal(scope, receive)
            if isinstance(refused, Response):
                await refused(scope, receive, send_status)
            else:
                await self.app(scope, refused, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _refusal(self, scope: dict, receive: Any) -> Any:
        """A response that refuses the request, or the ``receive`` to run it with."""
        if self.key and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                return _problem(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                {"WWW-Authenticate": "Bearer"})
        limit = self.settings.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _problem(413, f"body of {int(length)} bytes is over the limit of {limit} (--max-body-mb)")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return _problem(413, f"body is over the limit of {limit} bytes (--max-body-mb)")
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> dict:
            return replayed.pop() if replayed else await receive()

        return replay


def _summary(served: ServedTask, worker: ModelWorker) -> dict[str, Any]:
    spec, prompted = served.spec, served.prompted
    return dict(name=spec.name, family=spec.family, labels=list(prompted.task.labels) if prompted.task.labels else None,
                shots_requested=spec.shots, shots=len(prompted.demonstrations), seed=spec.seed, scoring=spec.scoring,
                max_tokens=served.max_tokens, prefix_tokens=len(served.prefix),
                label_histogram=prompted.label_histogram(),
                cache=CacheState(resident=served.prefix in worker.cache, bytes=worker.cache.bytes_of(served.prefix)),
                registered_at=served.registered_at)


def _detail(served: ServedTask, worker: ModelWorker) -> TaskDetail:
    demos = [Demonstration(input=d.input, output=d.output, choices=list(d.choices))
             for d in served.prompted.demonstrations]
    return TaskDetail(**_summary(served, worker), instruction=served.spec.instruction,
                      query_tokens=served.spec.query_tokens, demonstrations=demos)


def create_app(model: Any, tokenizer: Any, settings: ServeSettings, registry: Registry) -> FastAPI:
    """The app: its worker started (and the registry's tasks put back) at startup, stopped at shutdown."""
    state: dict[str, ModelWorker] = {}
    metrics = Metrics(lambda: state.get("worker"))
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = ModelWorker(model, tokenizer, settings.cache_bytes, settings.max_tokens, limits.max_queue,
                             settings.window_s, max_demonstrations=limits.max_demonstrations,
                             on_batch=metrics.on_batch)
        state["worker"] = worker
        for spec, at in registry.all():  # every acknowledged task, back; prefixes encoded on first use
            await asyncio.wrap_future(worker.call(lambda spec=spec, at=at: worker.register(spec, at, encode=False)))
        try:
            yield
        finally:
            worker.stop()
            registry.close()

    app = FastAPI(title="manyicl serve", lifespan=lifespan,
                  description="One fine-tuned model answering many tasks, each registered once by its "
                              "demonstrations and kept as a cached key/value prefix.")
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    _add_error_handlers(app, limits)
    _add_service_routes(app, settings, metrics, lambda: state["worker"])
    _add_task_routes(app, limits, registry, lambda: state["worker"])
    return app


def _add_error_handlers(app: FastAPI, limits: Limits) -> None:
    """Each refusal as one-line JSON ``{"error": ...}`` with its status."""

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "malformed request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first['msg']}", "detail": jsonable(exc.errors())}, status_code=422)

    @app.exception_handler(ManyICLError)
    async def unusable(request: Request, exc: ManyICLError) -> JSONResponse:
        return _problem(422, str(exc))

    @app.exception_handler(UnknownTask)
    async def unknown(request: Request, exc: UnknownTask) -> JSONResponse:
        return _problem(404, f"task {exc.args[0]!r} is not registered; POST /v1/tasks registers it")

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return _problem(429, f"{limits.max_queue} requests are waiting (--max-queue); retry shortly",
                        {"Retry-After": "1"})


def _add_service_routes(app: FastAPI, settings: ServeSettings, metrics: Metrics,
                        worker: Callable[[], ModelWorker]) -> None:
    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", model=settings.model, tasks=len(worker().tasks))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(files("manyicl.serving").joinpath("page.html").read_text(encoding="utf-8"))


ERRORS = {status: {"model": Problem} for status in (401, 404, 413, 422, 429)}  # in the OpenAPI of the task routes


def _add_task_routes(app: FastAPI, limits: Limits, registry: Registry, worker: Callable[[], ModelWorker]) -> None:
    task_name = Path(pattern=TASK_NAME, max_length=64)

    def served_task(name: str) -> ServedTask:
        served = worker().tasks.get(name)
        if served is None:
            raise UnknownTask(name)
        return served

    @app.post("/v1/tasks", response_model=TaskDetail, status_code=201, responses=ERRORS)
    async def register(spec: TaskSpec) -> TaskDetail:
        w, at = worker(), time.time()
        served = await asyncio.wrap_future(w.call(lambda: w.register(spec, at)))
        registry.put(spec, at)  # committed before the answer: an acknowledged task survives a kill -9
        return _detail(served, w)

    @app.get("/v1/tasks", response_model=TaskList, responses=ERRORS)
    async def list_tasks() -> TaskList:
        return TaskList(tasks=[TaskSummary(**_summary(t, worker())) for t in list(worker().tasks.values())])

    @app.get("/v1/tasks/{name}", response_model=TaskDetail, responses=ERRORS)
    async def get_task(name: str = task_name) -> TaskDetail:
        return _detail(served_task(name), worker())

    @app.delete("/v1/tasks/{name}", status_code=204, responses=ERRORS)
    async def delete_task(name: str = task_name) -> Response:
        served_task(name)
        w = worker()
        registry.delete(name)
        await asyncio.wrap_future(w.call(lambda: w.unregister(name)))
        return Response(status_code=204)

    @app.post("/v1/tasks/{name}/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(body: PredictRequest, name: str = task_name) -> PredictResponse:
        queries = _queries(body, limits)
        served_task(name)
        served, predictions, hit, seconds = await asyncio.wrap_future(worker().submit(name, queries))
        scoring = served.spec.scoring
        answers = [Answer(input=q.input, prediction=None if p.skipped else p.prediction,
                          probabilities=None if p.skipped else probabilities(p, scoring),
                          skipped=TOO_LONG if p.skipped else None) for q, p in zip(queries, predictions)]
        return PredictResponse(task=name, predictions=answers, prefix_tokens=len(served.prefix),
                               cache="hit" if hit else "miss", seconds=round(seconds, 4))


def _queries(body: PredictRequest, limits: Limits) -> list[Example]:
    """A predict request's inputs, checked against the limits, as the evaluator's queries."""
    if len(body.inputs) > limits.max_inputs:
        raise ManyICLError(f"inputs: {len(body.inputs)} given, at most {limits.max_inputs} per request")
    queries = []
    for i, item in enumerate(body.inputs):
        query = item if isinstance(item, Query) else Query(input=item)
        if len(query.input) > limits.max_input_chars:
            raise ManyICLError(f"inputs.{i}: {len(query.input)} characters, over the limit of "
                               f"{limits.max_input_chars}")
        queries.append(Example(query.input.strip(), "", choices=tuple(query.choices)))
    return queries


def jsonable(errors: list[dict]) -> list[dict]:
    """pydantic's error list without the parts JSON cannot hold (an exception in ``ctx``)."""
    return [{k: (str(v) if k == "ctx" else v) for k, v in e.items() if k in ("loc", "msg", "type", "ctx")}
            for e in errors]

"""manyicl serve: a served prediction equals `manyicl predict`; the registry survives a restart; the prefix cache
evicts and re-encodes transparently; every bad request is a 4xx and the server keeps serving."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from manyicl.models import for_inference, load_model, load_tokenizer  # noqa: E402
from manyicl.serving.app import ServeSettings, create_app  # noqa: E402
from manyicl.serving.registry import Registry  # noqa: E402
from manyicl.serving.schemas import Limits  # noqa: E402

WORDS = ["red", "blue", "green", "quiet", "loud", "fast", "slow", "warm", "cold", "bright"]


def demos(n: int = 24, labels=("cat", "dog", "bird")) -> list[dict]:
    return [{"input": f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]} item {i}", "output": labels[i % len(labels)]}
            for i in range(n)]


QUERIES = ["red loud item", "cold slow thing", "bright warm", "quiet green item 7"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return for_inference(load_model(str(tiny_model_dir))).eval(), load_tokenizer(str(tiny_model_dir))


def app_for(loaded, tiny_model_dir, state: Path | None = None, **settings):
    model, tokenizer = loaded
    limits = settings.pop("limits", Limits())
    return create_app(model, tokenizer, ServeSettings(model=str(tiny_model_dir), max_tokens=512, limits=limits,
                                                      **settings), Registry(state))


def spec(name="animals", **extra) -> dict:
    return {"name": name, "family": "classification", "demonstrations": demos(), "shots": "max", "seed": 3,
            "query_tokens": 48, **extra}


def test_a_served_prediction_equals_manyicl_predict(loaded, tiny_model_dir, tmp_path):
    from manyicl.predict import predict_file

    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos()))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input": q}) + "\n" for q in QUERIES))
    for scoring in ("sum", "calibrated"):
        out = tmp_path / f"pred-{scoring}.jsonl"
        predict_file(str(tiny_model_dir), None, str(tmp_path / "demos.jsonl"), str(tmp_path / "in.jsonl"), "max",
                     str(out), "classification", None, 512, 3, scoring, reserve=48)
        offline = [json.loads(line) for line in out.read_text().splitlines()]
        with TestClient(app_for(loaded, tiny_model_dir)) as client:
            registered = client.post("/v1/tasks", json=spec(scoring=scoring))
            assert registered.status_code == 201, registered.text
            served = client.post("/v1/tasks/animals/predict", json={"inputs": QUERIES}).json()["predictions"]
        assert [p["prediction"] for p in served] == [p["prediction"] for p in offline]
        for s, o in zip(served, offline):
            assert s["probabilities"].keys() == o["probabilities"].keys()
            assert all(abs(s["probabilities"][k] - o["probabilities"][k]) < 1e-5 for k in s["probabilities"])


def test_task_routes_and_the_cache_state(loaded, tiny_model_dir):
    with TestClient(app_for(loaded, tiny_model_dir)) as client:
        detail = client.post("/v1/tasks", json=spec(demonstrations=None,
                                                    demonstrations_jsonl="\n".join(map(json.dumps, demos())))).json()
        assert detail["shots"] == len(detail["demonstrations"]) > 0 and detail["prefix_tokens"] > 0
        assert sum(detail["label_histogram"].values()) == detail["shots"] and detail["cache"]["resident"]
        assert [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] == ["animals"]
        first = client.post("/v1/tasks/animals/predict", json={"inputs": QUERIES[:1]}).json()
        assert first["cache"] == "hit" and abs(sum(first["predictions"][0]["probabilities"].values()) - 1) < 1e-6
        assert client.delete("/v1/tasks/animals").status_code == 204
        assert client.get("/v1/tasks/animals").status_code == 404
        assert client.get("/healthz").json() == {"status": "ok", "model": str(tiny_model_dir), "tasks": 0}
        metrics = client.get("/metrics").text
        for series in ("manyicl_requests_total", "manyicl_request_seconds_bucket", "manyicl_queue_depth",
                       "manyicl_prefix_cache_hits", "manyicl_prefix_cache_misses", "manyicl_prefix_cache_evictions",
                       "manyicl_prefix_cache_bytes"):
            assert series in metrics, series


def test_bad_requests_are_4xx_and_the_server_keeps_serving(loaded, tiny_model_dir):
    limits = Limits(max_body_bytes=20_000, max_inputs=8, max_input_chars=200)
    with TestClient(app_for(loaded, tiny_model_dir, limits=limits)) as client:
        assert client.post("/v1/tasks", json=spec()).status_code == 201
        cases = [
            (client.post("/v1/tasks/nope/predict", json={"inputs": ["x"]}), 404, "'nope' is not registered"),
            (client.post("/v1/tasks/animals/predict", json={"input": ["x"]}), 422, "body.inputs: Field required"),
            (client.post("/v1/tasks", json={**spec(), "shots": "many"}), 422, "body.shots"),
            (client.post("/v1/tasks", json={**spec(), "name": "../etc"}), 422, "body.name"),
            (client.post("/v1/tasks", json=spec(labels=["cat", "dog"])), 422, "demonstrations.2: answer 'bird'"),
            (client.post("/v1/tasks", json=spec(demonstrations=None, demonstrations_jsonl='{"input": "a"}\n{')),
             422, "demonstrations_jsonl:1: missing field 'output'"),
            (client.post("/v1/tasks/animals/predict", json={"inputs": ["x"] * 9}), 422, "at most 8 per request"),
            (client.post("/v1/tasks/animals/predict", json={"inputs": ["x" * 201]}), 422, "inputs.0: 201 characters"),
            (client.post("/v1/tasks", json={**spec(), "demonstrations": demos(1000)}), 413, "over the limit"),
            (client.post("/v1/tasks/animals/predict", content=b"{not json", headers={"content-type":
                                                                                     "application/json"}), 422, ""),
        ]
        for response, status, words in cases:
            assert response.status_code == status and words in response.json()["error"], response.text
        assert client.post("/v1/tasks/animals/predict", json={"inputs": QUERIES}).status_code == 200


def test_an_api_key_guards_every_route_but_healthz(loaded, tiny_model_dir):
    key = "k" * 24
    with TestClient(app_for(loaded, tiny_model_dir, api_key=key)) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/", "/v1/tasks", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 401, path
        assert client.get("/v1/tasks", headers={"Authorization": "Bearer " + "k" * 23}).status_code == 401
        assert client.get("/v1/tasks", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_full_queue_answers_429(loaded, tiny_model_dir):
    app = app_for(loaded, tiny_model_dir, limits=Limits(max_queue=1), window_s=1.0)
    with TestClient(app) as client:
        assert client.post("/v1/tasks", json=spec()).status_code == 201
        first = []
        waiting = threading.Thread(target=lambda: first.append(
            client.post("/v1/tasks/animals/predict", json={"inputs": QUERIES})))
        waiting.start()
        import time
        time.sleep(0.3)  # the first request sits in the one-second collection window
        second = client.post("/v1/tasks/animals/predict", json={"inputs": QUERIES})
        waiting.join()
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert first[0].status_code == 200


def test_the_registry_survives_a_restart_and_evicted_prefixes_come_back(loaded, tiny_model_dir, tmp_path):
    names = [f"t{i}" for i in range(4)]
    with TestClient(app_for(loaded, tiny_model_dir, tmp_path / "state", cache_bytes=1)) as client:
        for i, name in enumerate(names):
            assert client.post("/v1/tasks", json=spec(name, seed=i)).status_code == 201
        before = {n: client.post(f"/v1/tasks/{n}/predict", json={"inputs": QUERIES}).json() for n in names}
        metrics = client.get("/metrics").text
    # a budget smaller than one entry keeps nothing between requests: every prefix is encoded per request
    assert all(r["cache"] == "miss" for r in before.values())
    assert "manyicl_prefix_cache_evictions" in metrics
    with TestClient(app_for(loaded, tiny_model_dir, tmp_path / "state")) as client:
        assert [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] == names
        after = {n: client.post(f"/v1/tasks/{n}/predict", json={"inputs": QUERIES}).json() for n in names}
    for n in names:
        assert [p["prediction"] for p in after[n]["predictions"]] == [p["prediction"] for p in before[n]["predictions"]]

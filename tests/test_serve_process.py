"""manyicl serve as a real process under load: 200 mixed requests from 8 clients (every valid one answered
correctly, every bad one a 4xx, no 5xx), a kill -9 during the load and a restart (every task back, predictions
identical), and the cache budget held while 20 tasks rotate through a cache that holds 5."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_helpers import Server

httpx = pytest.importorskip("httpx")

WORDS = ["red", "blue", "green", "quiet", "loud", "fast", "slow", "warm", "cold", "bright"]
QUERIES = ["red loud item", "cold slow thing", "bright warm", "quiet green item 7"]
pytestmark = pytest.mark.slow


def task_spec(i: int) -> dict:
    labels = [f"label{i}a", f"label{i}b"]
    demos = [{"input": f"{WORDS[(i + j) % 10]} {WORDS[(3 * j) % 10]} item {j}", "output": labels[j % 2]}
             for j in range(16)]
    return {"name": f"task-{i}", "family": "classification", "demonstrations": demos, "shots": 12, "seed": i,
            "query_tokens": 48}


def predictions(client: httpx.Client, url: str, name: str) -> list[str]:
    response = client.post(f"{url}/v1/tasks/{name}/predict", json={"inputs": QUERIES}, timeout=60)
    assert response.status_code == 200, response.text
    return [p["prediction"] for p in response.json()["predictions"]]


def test_a_non_loopback_host_without_a_key_is_refused(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "manyicl.cli", "serve", "--model", str(tiny_model_dir), "--host",
                             "0.0.0.0"], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--host 0.0.0.0: not a loopback address" in lines[0]


def test_mixed_load_kill_9_and_restart(tiny_model_dir, tmp_path):
    server = Server(tiny_model_dir, tmp_path / "state")
    try:
        with httpx.Client() as client:
            for i in range(6):
                assert client.post(server.url + "/v1/tasks", json=task_spec(i), timeout=60).status_code == 201
            expected = {f"task-{i}": predictions(client, server.url, f"task-{i}") for i in range(6)}

        bad = [
            ("POST", "/v1/tasks/task-0/predict", {"content": b"{broken", "headers": {"content-type":
                                                                                       "application/json"}}),
            ("POST", "/v1/tasks/no-such-task/predict", {"json": {"inputs": ["x"]}}),
            ("POST", "/v1/tasks/task-1/predict", {"json": {"inputs": []}}),
            ("POST", "/v1/tasks", {"json": {"name": "bad name!", "demonstrations": []}}),
            ("GET", "/v1/tasks/..%2Fetc", {}),
            ("POST", "/v1/tasks/task-2/predict", {"json": {"inputs": ["x"] * 300}}),
        ]

        def one(k: int) -> tuple[str, int, list[str] | None]:
            rng = random.Random(k)
            with httpx.Client(base_url=server.url, timeout=120) as c:
                if rng.random() < 0.25:
                    method, path, kwargs = bad[k % len(bad)]
                    return "bad", c.request(method, path, **kwargs).status_code, None
                name = f"task-{rng.randrange(6)}"
                r = c.post(f"/v1/tasks/{name}/predict", json={"inputs": QUERIES})
                got = [p["prediction"] for p in r.json()["predictions"]] if r.status_code == 200 else None
                return name, r.status_code, got

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(200)))
        assert not [o for o in outcomes if o[1] >= 500]
        assert all(400 <= status < 500 for kind, status, _ in outcomes if kind == "bad")
        assert all(status == 200 and got == expected[kind] for kind, status, got in outcomes if kind != "bad")

        # kill -9 in the middle of a load: nothing acknowledged is lost
        with ThreadPoolExecutor(8) as pool:
            running = [pool.submit(lambda k=k: _quietly(one, k)) for k in range(40)]
            time.sleep(0.5)
            server.stop(signal.SIGKILL)
            [f.result() for f in running]
        server = Server(tiny_model_dir, tmp_path / "state")
        with httpx.Client() as client:
            names = [t["name"] for t in client.get(server.url + "/v1/tasks").json()["tasks"]]
            assert names == [f"task-{i}" for i in range(6)]
            assert {n: predictions(client, server.url, n) for n in names} == expected
    finally:
        server.stop()


def _quietly(fn, *args):
    try:
        return fn(*args)
    except httpx.HTTPError:  # the server was killed under it
        return None


def test_the_cache_budget_holds_while_20_tasks_rotate_through_5(tiny_model_dir, tmp_path):
    probe = Server(tiny_model_dir, tmp_path / "probe")
    try:
        with httpx.Client() as client:
            client.post(probe.url + "/v1/tasks", json=task_spec(0), timeout=60)
            entry = client.get(probe.url + "/v1/tasks/task-0").json()["cache"]["bytes"]
    finally:
        probe.stop()
    budget_mb = 5.5 * entry / 2**20  # five entries, not six
    server = Server(tiny_model_dir, tmp_path / "state", "--cache-mb", f"{budget_mb:.6f}")
    try:
        with httpx.Client() as client:
            for i in range(20):
                assert client.post(server.url + "/v1/tasks", json=task_spec(i), timeout=60).status_code == 201
            first = {i: predictions(client, server.url, f"task-{i}") for i in range(20)}
            rss_after_one_round = server.rss_kb()
            for _ in range(3):
                again = {i: predictions(client, server.url, f"task-{i}") for i in range(20)}
                assert again == first  # evicted and encoded again: the same answers
            metrics = client.get(server.url + "/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line and not line.startswith("#")}
        assert values["manyicl_prefix_cache_entries"] <= 5
        assert values["manyicl_prefix_cache_bytes"] <= budget_mb * 2**20
        assert values["manyicl_prefix_cache_evictions_total"] >= 60
        # three more rounds of 20 encodings each: resident memory grows by less than what 20 entries would take
        assert server.rss_kb() - rss_after_one_round < 20 * entry / 1024
    finally:
        server.stop()

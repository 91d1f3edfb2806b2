"""`detector serve` (#22): answers, batching, limits, auth, errors as JSON, health and metrics.

Runs the FastAPI app in-process (Starlette's TestClient) on the tiny test network, with decoding in
the server's own thread pool (decode_workers=0) to keep the suite fast; the load test on loopback,
with worker processes and the real detector, is benchmarks/serve_load.py.
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs its extra: pip install 'detector[serve]'")
pytest.importorskip("httpx", reason="the service's tests need httpx")

from fastapi.testclient import TestClient  # noqa: E402

import detector  # noqa: E402
from detector.serve import ServeOptions, create_app, read_token  # noqa: E402

from .conftest import noise_image  # noqa: E402


def _png(h: int = 48, w: int = 56, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise_image(h, w, seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def _flat_png(h: int, w: int) -> bytes:
    """A one-colour PNG: many pixels in a few hundred bytes (what a decompression bomb looks like)."""
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def model(tiny_checkpoint):
    return detector.load(tiny_checkpoint, device="cpu", precision="fp32")


def _client(model, **options) -> TestClient:
    return TestClient(create_app(model, ServeOptions(decode_workers=0, **options)), raise_server_exceptions=False)


def test_scan_answers_like_the_scan_row_raw_or_multipart(model):
    data = _png()
    expected = model.predict(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    with _client(model) as client:
        raw = client.post("/v1/scan", content=data, headers={"Content-Type": "image/png"})
        form = client.post("/v1/scan", files={"file": ("a.png", data, "image/png")})
        for answer in (raw, form):
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)
            assert body["label"] == expected.label and (body["width"], body["height"]) == (56, 48)
            assert body["format"] == "PNG" and body["error"] == ""
            assert body["detector_sha256"] == model.describe()["weights_sha256"]
        assert form.json()["path"] == "a.png"
        batch = client.post("/v1/scan/batch", files=[("files", (f"{k}.png", _png(seed=k), "image/png")) for k in range(5)])
        assert batch.status_code == 200 and [r["path"] for r in batch.json()["results"]] == [f"{k}.png" for k in range(5)]
        assert client.get("/v1/detector").json()["weights_sha256"] == model.describe()["weights_sha256"]


def test_an_image_under_the_minimum_size_is_answered_too_small_with_a_null_probability(model):
    model.members[0].min_side = 64  # as a probe with a minimum size would be
    with _client(model) as client:
        small = client.post("/v1/scan", content=_png(48, 56), headers={"Content-Type": "image/png"})
        large = client.post("/v1/scan", content=_png(64, 80), headers={"Content-Type": "image/png"})
        metrics = client.get("/metrics").text
    assert small.status_code == 200 and small.json()["label"] == "too small", small.text
    assert small.json()["probability"] is None and small.json()["logit"] is not None
    assert large.json()["label"] in ("real", "fake") and 0 <= large.json()["probability"] <= 1
    assert 'detector_images_total{label="too small"} 1.0' in metrics


def test_errors_are_json_with_the_right_status_and_no_traceback(model):
    with _client(model, max_body_mb=0.01, max_pixels=100_000) as client:
        cases = {
            "not an image type": client.post("/v1/scan", content=b"hello", headers={"Content-Type": "text/plain"}),
            "not decodable": client.post("/v1/scan", content=b"not a png at all", headers={"Content-Type": "image/png"}),
            "truncated": client.post("/v1/scan", content=_png()[:200], headers={"Content-Type": "image/png"}),
            "too many pixels": client.post("/v1/scan", content=_flat_png(400, 400), headers={"Content-Type": "image/png"}),
            "too large a body": client.post("/v1/scan", content=b"\0" * 20_000, headers={"Content-Type": "image/png"}),
            "too small": client.post("/v1/scan", content=_png(8, 8), headers={"Content-Type": "image/png"}),
        }
        statuses = {k: r.status_code for k, r in cases.items()}
        assert statuses == {"not an image type": 415, "not decodable": 422, "truncated": 422, "too many pixels": 422,
                            "too large a body": 413, "too small": 422}
        for name, response in cases.items():
            body = response.json()
            message = body.get("error", "")
            assert message and "Traceback" not in response.text, name
        assert "too large" in cases["too many pixels"].json()["error"]


def test_bearer_token_is_required_when_configured(model, tmp_path, monkeypatch):
    (tmp_path / "token").write_text("s3cret\n")
    token = read_token(tmp_path / "token")
    monkeypatch.setenv("DETECTOR_TOKEN", "from-env")
    assert token == "s3cret" and read_token() == "from-env"
    with _client(model, token=token) as client:
        data, headers = _png(), {"Content-Type": "image/png"}
        assert client.post("/v1/scan", content=data, headers=headers).status_code == 401
        wrong = client.post("/v1/scan", content=data, headers={**headers, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]
        right = client.post("/v1/scan", content=data, headers={**headers, "Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no token


def test_health_readiness_metrics_and_draining(model):
    with _client(model) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        assert client.get("/readyz").status_code == 200
        client.post("/v1/scan", content=_png(), headers={"Content-Type": "image/png"})
        text = client.get("/metrics").text
        assert 'detector_requests_total{endpoint="/v1/scan",status="200"} 1.0' in text
        assert "detector_request_seconds_bucket" in text and "detector_queue_depth" in text
        client.app.state.serve["draining"] = True  # what SIGTERM sets before uvicorn stops
        late = client.post("/v1/scan", content=_png(), headers={"Content-Type": "image/png"})
        assert late.status_code == 503 and late.headers["Retry-After"] and client.get("/readyz").status_code == 503


def test_requests_arriving_together_share_batches_and_a_full_queue_says_503(model):
    calls = []
    conv = model.conv
    real = conv.crop_maps

    def counted(batch):
        calls.append(int(batch.shape[0]))
        return real(batch)

    conv.crop_maps = counted
    with _client(model, batch_wait_ms=200, max_batch=8) as client:
        answers = []

        def send(k):
            answers.append(client.post("/v1/scan", content=_png(seed=k), headers={"Content-Type": "image/png"}))

        threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [200] * 6
        assert max(calls) > 1  # at least two requests were scored in one forward pass
    # the queue fills for certain, whatever the machine's load: the first request's forward pass is held
    # until the others have been answered or queued (one place in the queue, so at least four are refused)
    release = threading.Event()

    def held(batch):
        release.wait(timeout=60)
        return real(batch)

    conv.crop_maps = held
    with _client(model, queue_size=1, batch_wait_ms=0, max_batch=1) as client:
        answers = []
        threads = [threading.Thread(target=lambda k=k: answers.append(
            client.post("/v1/scan", content=_png(seed=k), headers={"Content-Type": "image/png"}))) for k in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(a.status_code == 503 for a in list(answers)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        for t in threads:
            t.join()
        busy = [a for a in answers if a.status_code == 503]
        assert len(busy) >= 4 and all(a.headers.get("Retry-After") for a in busy)
        assert json.loads(busy[0].text)["error"].startswith("busy")
        assert {a.status_code for a in answers} == {200, 503}  # the held one (and the queued one) are answered


def test_a_served_default_detector_agrees_with_a_local_scan_and_stops_on_sigterm(tmp_path):
    """The service in its own process on a free loopback port, as a user starts it."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from .conftest import ROOT

    if not (ROOT / "weights" / "clip_vitb16.int8.onnx").is_file():
        pytest.skip("the default detector's CLIP encoder is not in weights/ (`make` fetches it)")
    sample = ROOT / "data" / "samples" / "real_camera.png"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = _spawned()
    log = tmp_path / "serve.log"  # a file, not a pipe: reading a pipe would wait on every process holding it
    server = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--port", str(port), "--decode-workers", "1"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            assert server.poll() is None, log.read_text()
        served = httpx.post(f"{base}/v1/scan", content=sample.read_bytes(), headers={"Content-Type": "image/png"},
                            timeout=120).json()
        bad = httpx.post(f"{base}/v1/scan", content=b"nope", headers={"Content-Type": "image/png"}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"]
        again = httpx.post(f"{base}/v1/scan", content=sample.read_bytes(), headers={"Content-Type": "image/png"},
                           timeout=120)
        assert again.status_code == 200  # still serving after a bad request
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'detector_requests_total{endpoint="/v1/scan",status="200"} 2.0' in metrics
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code in (0, -signal.SIGTERM), log.read_text()  # drained, then ended by the signal it was sent
    assert "Traceback" not in log.read_text()
    time.sleep(1)
    assert _spawned() <= before  # no decode worker left behind
    out = tmp_path / "local.csv"
    subprocess.run([sys.executable, "-m", "detector.cli", "scan", str(sample), "-o", str(out), "-q", "--workers", "0"],
                   cwd=ROOT, check=True, capture_output=True)
    local = json.loads(json.dumps(__import__("pandas").read_csv(out).iloc[0].to_dict()))
    assert abs(served["logit"] - local["logit"]) <= 1e-4 and served["label"] == local["label"]


def _spawned() -> set[str]:
    """Process ids of multiprocessing's spawned children on this machine (decode workers among them)."""
    import subprocess

    return set(subprocess.run(["pgrep", "-f", "multiprocessing.spawn"], capture_output=True, text=True).stdout.split())

"""Scans on a real local Ray cluster: a head node and a second worker node, each a separate set of
processes on 127.0.0.1 with one CPU, so that work crosses processes as it crosses machines.

The cluster is started by the module's fixture and stopped (``ray stop --force``) however the tests
end; the last test checks that no Ray process is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import FIXTURE, ROOT

ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra: pip install 'detector[ray]'")

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
WORKER_TITLE = "ray::MapWorker(MapBatches(ScanActor))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes() -> list[tuple[int, str]]:
    """Processes of a Ray installation (its daemons and workers), by command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") or any(k in cmd for k in ("/raylet", "gcs_server", "ray/_private/", "ray.util.client")):
            found.append((int(entry.name), cmd[:120]))
    return found


def _stop_ray() -> None:
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=ENV, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The address of a two-node Ray cluster on this machine, stopped at the end of the module. It
    requires a token, as Ray clusters do by default, written for this run (not the user's ~/.ray)."""
    if _ray_processes():
        pytest.skip("a Ray instance already runs on this machine; the test cluster would join or stop it")
    token = tmp_path_factory.mktemp("ray-auth") / "token"
    token.write_text(secrets.token_hex(32))
    ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port = _free_port()
    common = ["--num-cpus", "1", "--object-store-memory", str(150 * 2**20), "--disable-usage-stats"]
    try:
        for cmd in ([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                     "--include-dashboard", "false", *common],
                    [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", *common]):
            proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, proc.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        _stop_ray()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The shared fixture crops (the bundled samples where they are absent), a broken file and a
    too-small image: error rows must come out as a local scan writes them."""
    folder = tmp_path_factory.mktemp("ray-images") / "images"
    source = FIXTURE if FIXTURE.is_dir() else ROOT / "data" / "samples"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.csv", "*.md", "*.txt"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.new("RGB", (8, 8), (120, 30, 60)).save(folder / "tiny.png")
    return folder


def _scan(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "detector"), "scan", *args, "-q"], env=ENV, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def local_rows(images, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local") / "local.csv"
    proc = _scan([str(images), "-o", str(out), "--members", "all"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pd.read_csv(out, keep_default_na=False)


@pytest.fixture(scope="module")
def ray_output(cluster, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "ray.csv"
    proc = _scan([str(images), "--engine", "ray", "--ray-address", cluster, "--ray-cpus-per-actor", "1", "-o",
                  str(out), "--members", "all"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert list(a["path"]) == list(b["path"]), "rows must come in the same order"
    for column in a.columns:
        if column == "seconds":
            continue
        if column.startswith(("logit", "probability")):
            x = pd.to_numeric(a[column].replace("", None)).astype(float)
            y = pd.to_numeric(b[column].replace("", None)).astype(float)
            assert ((x - y).abs().fillna(0) <= 1e-4).all() and (x.isna() == y.isna()).all(), column
        else:
            assert list(a[column]) == list(b[column]), column


@pytest.mark.timeout(900)
def test_ray_scan_equals_local_scan(ray_output, local_rows):
    rows = pd.read_csv(ray_output, keep_default_na=False)
    _assert_same_rows(local_rows, rows)
    assert {"broken.jpg", "tiny.png"} <= {Path(p).name for p in rows.loc[rows["error"] != "", "path"]}
    assert (rows["error"] == "").sum() == len(rows) - 2 >= 10
    engine = json.loads(Path(f"{ray_output}.json").read_text())["engine"]
    assert engine["name"] == "ray" and len(engine["nodes"]) == 2 and engine["actors"] == 2


@pytest.mark.timeout(900)
def test_resume_scores_only_the_rest(cluster, ray_output, tmp_path):
    full = ray_output.read_text(encoding="utf-8").splitlines(keepends=True)
    part = tmp_path / "part.csv"
    torn = full[6][: len(full[6]) // 2]  # a row cut mid-write, as a killed scan leaves it
    part.write_text("".join(full[:6]) + torn, encoding="utf-8")
    shutil.copy(f"{ray_output}.json", f"{part}.json")
    proc = _scan([*json.loads(Path(f"{ray_output}.json").read_text())["inputs"], "--engine", "ray",
                  "--ray-address", cluster, "-o", str(part), "--members", "all", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(5 already done)" in proc.stderr
    _assert_same_rows(pd.read_csv(ray_output, keep_default_na=False), pd.read_csv(part, keep_default_na=False))


@pytest.mark.timeout(900)
def test_killed_actor_loses_and_duplicates_no_row(cluster, images, local_rows, tmp_path):
    folder = tmp_path / "twice"
    for copy in ("a", "b"):  # 2x the images: the scan outlives the kill by many calls
        shutil.copytree(images, folder / copy)
    out = tmp_path / "killed.csv"
    scan = subprocess.Popen([str(BIN / "detector"), "scan", str(folder), "--engine", "ray", "--ray-address", cluster,
                             "--ray-batch", "1", "-o", str(out), "--members", "all", "-q"], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
            assert scan.poll() is None, scan.stderr.read()[-3000:]
            time.sleep(0.2)
        workers = [pid for pid, cmd in _ray_processes() if cmd.startswith(WORKER_TITLE)]
        assert workers, "no scan actor to kill"
        rows_at_kill = len(out.read_text().splitlines()) - 1
        os.kill(workers[0], signal.SIGKILL)
        _, err = scan.communicate(timeout=600)
    finally:
        if scan.poll() is None:
            scan.kill()
    assert scan.returncode == 0, err[-3000:]
    rows = pd.read_csv(out, keep_default_na=False)
    n = 2 * len(local_rows)
    assert rows_at_kill < n, "the actor was killed after the scan had finished"
    assert len(rows) == n and rows["path"].is_unique
    expected = local_rows.assign(path=[str(Path(p).relative_to(images)) for p in local_rows["path"]])
    for copy in ("a", "b"):
        mine = rows[rows["path"].str.startswith(str(folder / copy) + "/")].reset_index(drop=True)
        mine["path"] = [str(Path(p).relative_to(folder / copy)) for p in mine["path"]]
        _assert_same_rows(expected, mine)


_ENTRY_POINT = """
import sys
import pandas as pd
import ray
import ray.data
from detector.ray import RayResources, scan_dataset

address, listing, files, out = sys.argv[1], sys.argv[2], sys.argv[3].split("\\n"), sys.argv[4]
ray.init(address=address, logging_level="ERROR")
resources = RayResources(actors=1, cpus_per_actor=1)
scan_dataset(ray.data.read_parquet(listing), None, resources=resources).write_parquet(out + "/by_path")
read = ray.data.read_binary_files(files, include_paths=True)
scan_dataset(read, None, resources=resources).write_parquet(out + "/by_bytes")
ray.shutdown()
"""


@pytest.mark.timeout(600)
def test_dataset_entry_point_reads_a_parquet_listing_and_bytes(cluster, images, local_rows, tmp_path):
    """The README's use: a Parquet listing in, Parquet verdicts out; and bytes read by Ray itself.
    Run as a program of its own, the way a user's driver joins the cluster."""
    files = sorted(str(p) for p in images.rglob("*") if p.is_file())
    listing = tmp_path / "listing.parquet"
    pd.DataFrame({"path": files, "batch": "2026-12"}).to_parquet(listing)
    proc = subprocess.run([sys.executable, "-c", _ENTRY_POINT, cluster, str(listing), "\n".join(files), str(tmp_path)],
                          env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=560)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = local_rows.sort_values("path").reset_index(drop=True)
    # the default set computes its voting member only: its logit is that member's own (logit_clip of --members all)
    logits = pd.to_numeric(expected["logit_clip"].replace("", None)).astype(float).to_numpy()
    for name in ("by_path", "by_bytes"):
        table = pd.read_parquet(tmp_path / name).sort_values("path").reset_index(drop=True)
        assert len(table) == len(expected) >= 10
        assert list(table["path"]) == list(expected["path"])
        assert list(table["label"]) == list(expected["label"]) and list(table["error"]) == list(expected["error"])
        assert table["logit"].dtype == float and table["width"].dtype.kind in "if"
        scored = ~pd.isna(logits)
        assert (abs(table["logit"].to_numpy()[scored] - logits[scored]) <= 1e-4).all(), name
    assert list(pd.read_parquet(tmp_path / "by_path")["batch"].unique()) == ["2026-12"], "the listing's columns pass through"


def test_zz_no_ray_process_left(cluster):
    """After the module's fixture stops the cluster (it is torn down before this check's own run
    ends only if it is the module's last user, so stop it here too), nothing of Ray is running."""
    _stop_ray()
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(), _ray_processes()

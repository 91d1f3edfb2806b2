"""The HTML reports: content and escaping (plain tests), rendering and scripts (headless Chromium).

Browser tests need Debian's ``chromium`` and ``chromium-driver`` and PyPI's ``selenium``
(``pip install 'detector[report-tests]'``); without them they skip and say why. ``.ci/run``
installs them.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from detector.cli import main
from detector.report import PAGE_SIZE, evaluation_report, scan_report
from detector.results import RESULT_COLUMNS, write_heatmap
from tests.conftest import noise_image

HOSTILE = '<script>alert("x")<!-- & \'q\' <img src=x onerror=alert(1)>.png'


def _fake_scan(root: Path, names: list[str], *, missing: int = 0, extra_models: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A scan output written without a network: images, CSV, run record and heatmaps.

    Every third image is an error row; ``missing`` more rows name files that do not exist.
    Returns (csv, heatmap folder).
    """
    images, heat = root / "images", root / "heat"
    (images / "sub").mkdir(parents=True)
    heat.mkdir()
    columns = list(RESULT_COLUMNS)
    for m in extra_models:
        columns += [f"logit_{m}", f"probability_{m}"]
    rows = []
    for k, name in enumerate(names):
        path = images / ("sub" if k % 2 else "") / name
        pixels = noise_image(40 + 8 * k, 56, seed=k)
        Image.fromarray(pixels).save(path, format="PNG")
        row = {"path": str(path), "width": str(pixels.shape[1]), "height": str(pixels.shape[0]), "format": "PNG"}
        if k % 3 == 2:
            row["error"] = "cannot decode: broken data stream"
        else:
            logit = k - len(names) / 2
            row.update(logit=str(logit), probability=f"{1 / (1 + np.exp(-logit)):.6g}", label="fake" if logit >= 0 else "real")
            for m in extra_models:
                row[f"logit_{m}"], row[f"probability_{m}"] = str(-logit), f"{1 / (1 + np.exp(logit)):.6g}"
            write_heatmap(heat, path, pixels, np.full((5, 7), logit, dtype=np.float32))
        rows.append(row)
    for k in range(missing):
        rows.append({"path": str(images / f"gone_{k:04d}.jpg"), "logit": "0.5", "probability": f"{(k % 100) / 100:.2f}",
                     "label": "fake" if k % 2 else "real", "width": "10", "height": "10", "format": "JPEG"})
    out = root / "scan.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    record = {"detector": {"weights": str(root / "w" / "dev.safetensors"), "weights_sha256": "ab" * 32,
                           "architecture": "resnet50nodown", "temperature": 1.0, "threshold": 0.0},
              "patches": {"mode": "patches", "patch_size": 64}, "fusion": "mean", "inputs": [str(images)],
              "started": "2026-11-25T10:00:00+00:00"}
    (root / "w").mkdir()
    (root / "w" / "MODEL_CARD.md").write_text("# Card\n\n**Read the limits first.** Trained on 3 images.\n\nMore.\n")
    (root / "scan.csv.json").write_text(json.dumps(record))
    return out, heat


NAMES = ["a.png", "b.png", "c.png", HOSTILE, "e.png", "f.png"]


class _References(HTMLParser):
    """Collects the tags and every src/href/srcset/action attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action", "poster", "data")]


def _external_references(text: str) -> list[str]:
    """Every reference in the page that is not a data URI or an in-page anchor (CSS url() included)."""
    parser = _References()
    parser.feed(text)
    refs = parser.refs + re.findall(r"url\(([^)]*)\)", text)
    return [r for r in refs if not r.startswith(("data:", "#"))]


def test_scan_report_is_self_contained_and_complete(tmp_path):
    csv_path, heat = _fake_scan(tmp_path, NAMES, extra_models=("other",))
    page = scan_report(csv_path, tmp_path / "r.html", heat).read_text(encoding="utf-8")
    assert _external_references(page) == []
    assert "default-src 'none'" in page
    body = page.split("<tbody>", 1)[1]
    assert body.count("<tr ") == len(NAMES)
    # 4 scored rows: a thumbnail and a heatmap each; the 2 error rows: a thumbnail, no heatmap
    assert body.count("data:image/jpeg;base64,") == len(NAMES) + 4
    assert "p: other" in page  # the extra model's probability column
    assert "ab" * 32 in page and "Trained on 3 images" in page and "Read the limits first" in page
    assert "<svg" in page and page.count('class="bar ') >= 2


def test_hostile_file_names_are_escaped(tmp_path):
    csv_path, heat = _fake_scan(tmp_path, NAMES)
    page = scan_report(csv_path, tmp_path / "r.html", heat).read_text(encoding="utf-8")
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;!-- &amp; &#x27;q&#x27; &lt;img src=x onerror=alert(1)&gt;.png" in page
    parser = _References()
    parser.feed(page)
    assert parser.tags.count("script") == 1  # the page's own script only
    assert parser.tags.count("img") == len(NAMES) + 4


def test_report_refuses_other_csvs(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a detector scan output"):
        scan_report(other, tmp_path / "r.html")
    result = CliRunner().invoke(main, ["report", str(other)])
    assert result.exit_code != 0 and "not a detector scan output" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "not a `detector evaluate` output" in result.output


def test_report_command_writes_beside_the_csv(tmp_path):
    csv_path, heat = _fake_scan(tmp_path, NAMES[:3])
    result = CliRunner().invoke(main, ["report", str(csv_path), "--heatmaps", str(heat)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scan.html").is_file()


def _fake_evaluation(folder: Path, image: Path) -> None:
    folder.mkdir()
    rows = [("all", "m", "auc", "0.75"), ("all", "m", "n_real", "3"), ("all", "m", "n_fake", "2"), ("gan", "m", "auc", "0.5"),
            ("all", "m", "acc_real", "0.9"), ("all", "m", "acc_fake", "0.8"), ("all", "m", "label_fpr_low", "0.02"),
            ("all", "m", "label_fpr_high", "0.25"), ("all", "m", "label_recall_low", "0.6"),
            ("all", "m", "label_recall_high", "0.95")]
    (folder / "metrics.csv").write_text("group,model,metric,value\n" + "".join(",".join(r) + "\n" for r in rows))
    (folder / "auc.csv").write_text("group,m\nall,0.75\ngan,0.5\n")
    (folder / "acc.csv").write_text("group,m\nall,0.6\ngan,0.5\n")
    lines = ["path,label,generator,format,logit_m"] + [f"{image},{k % 2},g{k},PNG,{k - 2.5}" for k in range(6)]
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    Image.fromarray(noise_image(30, 40)).save(folder / "roc.png")
    Image.fromarray(noise_image(30, 40, 1)).save(folder / "scores.png")
    (folder / "run.json").write_text(json.dumps({"models": [{"name": "m", "temperature": 2.0, "threshold": 0.0}],
                                                 "n_images": 6, "n_real": 3, "n_fake": 3, "settings": {"seed": 0}}))


def test_evaluation_report(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(noise_image(32, 32)).save(image)
    _fake_evaluation(tmp_path / "eval", image)
    page = evaluation_report(tmp_path / "eval").read_text(encoding="utf-8")
    assert _external_references(page) == []
    assert page.count("data:image/png;base64,") == 2  # roc.png, scores.png
    assert "Reals scored most fake" in page and "Fakes scored most real" in page
    worst_reals = page.split("Reals scored most fake", 1)[1].split("Fakes scored most real", 1)[0]
    logits = [float(v) for v in re.findall(r'<td class="num">(-?[0-9.]+)</td><td class="num">', worst_reals)]
    assert logits == [1.5, -0.5, -2.5]  # the reals (label 0: k = 0, 2, 4), most fake first
    assert worst_reals.count("<td>fake</td></tr>") == 1 and worst_reals.count("<td>real</td></tr>") == 2  # threshold 0
    assert "0.750" in page and "AUC" in page
    assert "label false-positive rate 0.100 [0.020, 0.250]" in page and "recall 0.800 [0.600, 0.950]" in page
    result = CliRunner().invoke(main, ["report", str(tmp_path / "eval"), "-o", str(tmp_path / "e.html")])
    assert result.exit_code == 0 and (tmp_path / "e.html").is_file()


def test_scan_report_option_and_single_image_verdict(tmp_path, checkpoint):
    image = tmp_path / "one.png"
    Image.fromarray(noise_image(48, 48)).save(image)
    result = CliRunner().invoke(main, ["scan", str(image), "--weights", str(checkpoint), "-o", str(tmp_path / "o.csv"),
                                       "--patch-size", "32", "--workers", "0", "-q", "--heatmaps", str(tmp_path / "h"),
                                       "--report", str(tmp_path / "o.html")])
    assert result.exit_code == 0, result.output
    assert re.search(r"one\.png: (fake|real) \(probability 0\.\d{3} that it is generated\)", result.stdout)
    page = (tmp_path / "o.html").read_text(encoding="utf-8")
    assert page.split("<tbody>", 1)[1].count("data:image/jpeg") == 2  # thumbnail and heatmap


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install 'detector[report-tests]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Chromium or its driver missing: apt-get install chromium chromium-driver (as .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1100",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def _open(driver, page: Path) -> None:
    driver.get(page.resolve().as_uri())


def _visible_column(driver, title: str) -> list[str]:
    return driver.execute_script(
        """const t = document.getElementById('results');
           const i = Array.from(t.tHead.rows[0].cells).findIndex(h => h.textContent === arguments[0]);
           return Array.from(t.tBodies[0].rows).filter(r => !r.hidden).map(r => r.cells[i].textContent);""", title)


def _broken_images(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);")


@pytest.mark.browser
def test_browser_renders_sorts_filters(browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    csv_path, heat = _fake_scan(tmp_path, NAMES)
    page = scan_report(csv_path, tmp_path / "r.html", heat)
    _open(browser, page)
    assert browser.execute_script("return document.images.length") == len(NAMES) + 4
    assert _broken_images(browser) == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # the hostile name's script did not run
    assert HOSTILE in _visible_column(browser, "file")
    assert "6 of 6 images match" in browser.find_element(By.ID, "status").text  # the page's script ran (CSP hash)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0

    before = _visible_column(browser, "probability")
    browser.find_element(By.XPATH, "//table[@id='results']//th[text()='probability']").click()
    up = _visible_column(browser, "probability")
    numbers = [float(v) for v in up if v]
    assert numbers == sorted(numbers) and up != before and up[-1] == ""  # empty (error) rows last
    browser.find_element(By.XPATH, "//table[@id='results']//th[text()='probability']").click()
    down = [float(v) for v in _visible_column(browser, "probability") if v]
    assert down == sorted(numbers, reverse=True)

    Select(browser.find_element(By.NAME, "label")).select_by_visible_text("fake")
    assert set(_visible_column(browser, "label")) == {"fake"}
    Select(browser.find_element(By.NAME, "label")).select_by_visible_text("any")
    browser.find_element(By.NAME, "errors").click()
    assert len(_visible_column(browser, "error")) == 2 and all(_visible_column(browser, "error"))
    browser.find_element(By.NAME, "errors").click()
    folder = Select(browser.find_element(By.NAME, "folder"))
    folder.select_by_index(2)  # the sub-folder
    assert set(_visible_column(browser, "folder")) == {str(tmp_path / "images" / "sub")}
    folder.select_by_index(0)
    pmin = browser.find_element(By.NAME, "pmin")
    pmin.clear()
    pmin.send_keys("0.5")
    assert all(float(v) >= 0.5 for v in _visible_column(browser, "probability")) and len(_visible_column(browser, "probability")) == 2


@pytest.mark.browser
def test_browser_pages_large_scans(browser, tmp_path):
    from selenium.webdriver.common.by import By

    csv_path, _ = _fake_scan(tmp_path, NAMES[:1], missing=PAGE_SIZE + 99)
    _open(browser, scan_report(csv_path, tmp_path / "r.html"))
    assert len(_visible_column(browser, "#")) == PAGE_SIZE
    browser.find_element(By.ID, "next").click()
    assert len(_visible_column(browser, "#")) == 100 and _visible_column(browser, "#")[0] == str(PAGE_SIZE + 1)
    assert "page 2 of 2" in browser.find_element(By.ID, "page").text


@pytest.mark.browser
def test_browser_fixture_scan_with_heatmaps(browser, tmp_path, checkpoint, fixture_dir):
    """The issue's check: a scan of the shared fixture, with heatmaps, renders every image."""
    out, heat = tmp_path / "fixture.csv", tmp_path / "heat"
    result = CliRunner().invoke(main, ["scan", str(fixture_dir), "--weights", str(checkpoint), "-o", str(out),
                                       "--patch-size", "32", "--num-patches", "1", "--workers", "0", "-q",
                                       "--heatmaps", str(heat), "--report", str(tmp_path / "fixture.html")])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    scored = sum(1 for r in rows if not r["error"])
    _open(browser, tmp_path / "fixture.html")
    assert browser.execute_script("return document.images.length") == len(rows) + scored
    assert _broken_images(browser) == []
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert Image.open(tmp_path / "report.png").size[0] >= 1000


@pytest.mark.browser
def test_browser_evaluation_report(browser, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(noise_image(32, 32)).save(image)
    _fake_evaluation(tmp_path / "eval", image)
    _open(browser, evaluation_report(tmp_path / "eval"))
    assert browser.execute_script("return document.images.length") == 2 + 6  # plots, worst 3 reals + 3 fakes
    assert _broken_images(browser) == []


@pytest.mark.browser
def test_browser_report_names_every_member_with_its_card_and_explains_heatmaps(browser, tmp_path, checkpoint):
    """A model set of a voting ResNet and a silent CLIP probe: the page lists both with their say and
    a model card, and the heatmaps carry a legend naming the model that drew them."""
    from detector.checkpoints import with_metadata

    probe = Path(__file__).resolve().parent.parent / "weights" / "clip_probe_vitb16.safetensors"
    if not (probe.parent / "clip_vitb16.int8.onnx").is_file():
        pytest.skip("the CLIP encoder is not in weights/ (`make` fetches it)")
    weights = tmp_path / "weights"
    weights.mkdir()
    with_metadata(checkpoint, weights / "voting.safetensors", {"calibration": {"temperature": 1.0, "threshold": 0.0}})
    shutil.copy(probe, weights / "silent.safetensors")
    (weights / "MODEL_CARD.md").write_text("# Card\n\nTest weights: they know nothing.\n")
    (weights / "set.json").write_text(json.dumps({"models": [{"name": "voting", "weights": "voting.safetensors"},
                                                             {"name": "silent", "weights": "silent.safetensors",
                                                              "weight": 0.0}]}))
    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        Image.fromarray(noise_image(64, 96, seed=k)).save(images / f"{k}.png")
    out = tmp_path / "scan.csv"
    done = CliRunner().invoke(main, ["scan", str(images), "--weights", str(weights / "set.json"), "--members", "all",
                                     "-o", str(out), "--heatmaps", str(tmp_path / "heat"), "--patch-size", "32",
                                     "--num-patches", "2", "--workers", "0", "-q", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    page = tmp_path / "scan.html"
    assert CliRunner().invoke(main, ["report", str(out), "-o", str(page)]).exit_code == 0  # heatmaps from the record
    refused = CliRunner().invoke(main, ["report", str(out), "-o", str(page)])
    assert refused.exit_code != 0 and "--force" in refused.output
    _open(browser, page)
    models = browser.execute_script(
        "return [...document.querySelectorAll('.model')].map(m => [m.dataset.model, m.innerText])")
    assert [name for name, _ in models] == ["voting", "silent"]
    assert "decides the verdict" in models[0][1] and "no say in it" in models[1][1]
    assert "Model card: Test weights: they know nothing." in models[0][1]
    assert "Model card: the one shown above" in models[1][1]  # one card for both files: shown once
    legend = browser.execute_script("const l = document.getElementById('heat-legend'); "
                                    "return l && l.offsetWidth > 0 ? l.innerText : null")
    assert legend and "voting" in legend and "not scored" in legend and "generated" in legend
    header = browser.execute_script("return [...document.querySelectorAll('#results th')].map(t => t.innerText)")
    assert "heatmap (voting)" in header
    assert _broken_images(browser) == []


@pytest.mark.browser
def test_browser_evaluation_tables_fit_1400_px(browser, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(noise_image(32, 32)).save(image)
    _fake_evaluation(tmp_path / "eval", image)
    browser.set_window_size(1400, 900)
    _open(browser, evaluation_report(tmp_path / "eval"))
    widest = browser.execute_script("return Math.max(...[...document.querySelectorAll('.wide')].map(w => w.scrollWidth"
                                    " - w.clientWidth))")
    assert widest <= 1 and browser.execute_script("return document.documentElement.scrollWidth") <= 1400


@pytest.mark.browser
def test_browser_shows_provenance_and_filters_on_it(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from detector.provenance import Finding, findings_to_json

    csv_path, heat = _fake_scan(tmp_path, NAMES)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns, rows = list(reader.fieldnames), list(reader)
    columns += [c for c in ("provenance", "provenance_detail", "decided_by") if c not in columns]
    proof = Finding("c2pa", "C2PA: generated (trainedAlgorithmicMedia) by X; trusted signer", "proof-of-generation")
    camera = Finding("exif-camera", "EXIF camera: Nikon D850 (a claim anyone can write)", "camera-claim")
    hint = Finding("png-parameters", "PNG 'parameters' chunk <b>bold</b>", "hint")
    broken = Finding("c2pa", "C2PA manifest fails validation (assertion.dataHash.mismatch): not evidence", "none")
    for k, found in ((0, [proof, camera]), (1, [hint]), (3, [camera]), (4, [broken])):
        rows[k].update(provenance=found[0].text, provenance_detail=findings_to_json(found))
    rows[0].update(label="fake", probability="1", decided_by="provenance")
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _open(browser, scan_report(csv_path, tmp_path / "r.html", heat))
    cells = _visible_column(browser, "provenance")
    assert cells[0].startswith("proof-of-generation C2PA: generated") and "1 more" in cells[0]
    assert "<b>bold</b>" in cells[1] and cells[2] == "none found"  # file text shown as text
    assert "by provenance" in _visible_column(browser, "label")[0]
    assert "3\nwith provenance evidence" in browser.find_element(By.ID, "summary").text
    assert "No evidence proves nothing" in browser.find_element(By.ID, "provenance-note").text
    choose = Select(browser.find_element(By.NAME, "prov"))
    choose.select_by_visible_text("with provenance evidence")
    assert _visible_column(browser, "file") == [NAMES[0], NAMES[1], NAMES[3]]
    choose.select_by_visible_text("proof of generation")
    assert _visible_column(browser, "file") == [NAMES[0]]
    choose.select_by_visible_text("no evidence")  # the failed manifest is not evidence
    assert _visible_column(browser, "file") == [NAMES[2], NAMES[4], NAMES[5]]
    choose.select_by_visible_text("any")
    assert len(_visible_column(browser, "file")) == len(NAMES)

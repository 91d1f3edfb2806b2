"""The provenance reader on artefacts made here (tests/artefacts.py): generator PNG chunks, XMP, EXIF, C2PA
manifests signed with a chain made here (valid, trusted, tampered), SD watermarks, hostile metadata."""

from __future__ import annotations

import importlib.util
import io
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.provenance import (TEXT_MAX_BYTES, Finding, deciding, findings_from_json, findings_to_json,
                                 read_provenance, strongest)
from tests import artefacts as A

ROOT = Path(__file__).resolve().parent.parent
ASTRONAUT = ROOT / "data" / "samples" / "real_astronaut.png"  # a bundled 512 px real photo


def kinds(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.strength) for f in findings]


def bounded(data: bytes, seconds: float, megabytes: float, **options) -> list[Finding]:
    """read_provenance of ``data``, asserting its time and its peak of traced memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        found = read_provenance(data, **options)
        elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, f"{elapsed:.2f} s"
    assert peak < megabytes * 1e6, f"peak {peak / 1e6:.1f} MB"
    return found


@pytest.mark.timeout(30)
def test_generator_png_chunks():
    px = A.photo()
    a1111 = read_provenance(A.png_bytes(px, {"parameters": A.A1111}))
    assert kinds(a1111) == [("png-parameters", "hint")]
    assert "Steps: 20" in a1111[0].text and "v1-5-pruned-emaonly" in a1111[0].text
    assert "lighthouse" not in a1111[0].text  # the prompt is not copied into the output
    comfy = read_provenance(A.png_bytes(px, {"workflow": json.dumps(A.COMFY_WORKFLOW)}, compressed=True))
    assert kinds(comfy) == [("png-comfyui", "hint")] and "ComfyUI" in comfy[0].text
    novelai = read_provenance(A.png_bytes(px, {"Software": "NovelAI", "Comment": '{"steps": 28, "sampler": "k_euler"}'}))
    assert ("png-novelai", "hint") in kinds(novelai)
    # generic keywords holding something else are not generator evidence
    assert read_provenance(A.png_bytes(px, {"prompt": "remember the milk", "Comment": "holiday 2019"})) == []


@pytest.mark.timeout(30)
def test_xmp_and_exif():
    px = A.photo()
    xmp = read_provenance(A.jpeg_bytes(px, xmp=A.xmp_packet()))
    assert kinds(xmp) == [("xmp-digital-source-type", "hint")] and "trainedAlgorithmicMedia" in xmp[0].text
    captured = read_provenance(A.jpeg_bytes(px, xmp=A.xmp_packet(
        "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture")))
    assert kinds(captured) == [("xmp-digital-source-type", "camera-claim")]
    camera = read_provenance(A.jpeg_bytes(px, exif={0x010F: "Canon", 0x0110: "Canon EOS 5D Mark IV",
                                                    0x0131: "Adobe Photoshop 24.0"}))
    assert kinds(camera) == [("exif-camera", "camera-claim")] and "Canon EOS 5D Mark IV" in camera[0].text
    made = read_provenance(A.jpeg_bytes(px, exif={0x0131: "Midjourney v6"}))
    assert kinds(made) == [("software", "hint")]
    assert read_provenance(A.jpeg_bytes(px)) == []  # a plain photo: nothing, and nothing is proved by that


@pytest.mark.timeout(60)
def test_c2pa_signed_trusted_and_tampered():
    pytest.importorskip("c2pa", reason="C2PA manifests are read with c2pa-python (the provenance extra)")
    chain, key, ca = A.certificate_chain()
    signed = A.c2pa_signed(A.jpeg_bytes(A.photo()), chain, key)
    untrusted = read_provenance(signed)
    assert kinds(untrusted) == [("c2pa", "hint")]  # c2pa says Valid: the signer is on no trust list
    assert untrusted[0].detail["validation_state"] == "Valid"
    assert "signingCredential.untrusted" in untrusted[0].detail["validation_status"]
    assert "trainedAlgorithmicMedia" in untrusted[0].text and "detector test signer" in untrusted[0].text
    assert deciding(untrusted) is None
    trusted = read_provenance(signed, trust_anchors=ca)
    assert kinds(trusted) == [("c2pa", "proof-of-generation")] and trusted[0].detail["validation_state"] == "Trusted"
    assert deciding(trusted) == trusted[0]
    broken = read_provenance(A.tampered(signed), trust_anchors=ca)
    assert kinds(broken) == [("c2pa", "none")] and broken[0].detail["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in broken[0].text and "not evidence" in broken[0].text
    assert deciding(broken) is None and not broken[0].is_evidence


@pytest.mark.timeout(60)
def test_watermark_found_as_stored_and_its_limit_after_jpeg():
    pytest.importorskip("imwatermark", reason="watermarks are embedded with invisible-watermark (the provenance extra)")
    pixels = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    for kind, name in (("sd-v1", "Stable Diffusion v1"), ("sdxl", "SDXL")):
        marked = A.watermarked(pixels, kind)
        found = read_provenance(A.png_bytes(marked), pixels=marked)
        assert kinds(found) == [("watermark", "hint")] and name in found[0].text
    assert read_provenance(A.png_bytes(pixels), pixels=pixels) == []
    # the measured limit (benchmarks/watermark_robustness.py, README): a JPEG re-save at q90 erases it, and
    # JPEGs are not searched; the decoded pixels of that JPEG, stored losslessly, carry no watermark either
    marked = A.watermarked(pixels)
    q90 = A.jpeg_bytes(marked, quality=90)
    again = np.asarray(Image.open(io.BytesIO(q90)).convert("RGB"))
    assert read_provenance(q90, pixels=again) == []
    assert read_provenance(A.png_bytes(again), pixels=again) == []


@pytest.mark.timeout(60)
def test_watermark_decoder_gives_invisible_watermarks_bits():
    """Our numpy decoding of dwtDct gives, bit for bit, what invisible-watermark's own decoder gives."""
    imwatermark = pytest.importorskip("imwatermark", reason="the reference decoder is invisible-watermark's")
    from detector.provenance import _WATERMARKS, _block_votes, _decode_bits

    astronaut = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    images = [astronaut, A.watermarked(astronaut), A.watermarked(astronaut, "sdxl"), A.photo(300, 420, 5),
              np.asarray(Image.open(io.BytesIO(A.jpeg_bytes(A.watermarked(astronaut), quality=90))))]
    for pixels in images:
        for _, pattern, order in _WATERMARKS:
            image = np.ascontiguousarray(pixels[:, :, ::-1] if order == "bgr" else pixels)
            theirs = np.asarray(imwatermark.WatermarkDecoder("bits", len(pattern)).decode(image, "dwtDct"), np.uint8)
            assert np.array_equal(_decode_bits(_block_votes(image), len(pattern)), theirs)


@pytest.mark.timeout(60)
def test_hostile_metadata_is_bounded():
    px = A.photo()
    # a 10 MB text chunk, stored and compressed: a clear finding, nothing parsed, nothing copied
    for compressed in (False, True):
        data = A.png_bytes(px, {"parameters": "x" * (10 << 20)}, compressed=compressed)
        found = bounded(data, 2.0, 4 + TEXT_MAX_BYTES / 1e6)
        assert kinds(found) == [("png-parameters", "hint")] and "not parsed" in found[0].text
    # a 20 MB XMP packet appended to a JPEG, its DigitalSourceType past the window read: no finding
    huge = A.jpeg_bytes(px) + A.xmp_packet(padding=20 << 20)
    assert bounded(huge, 2.0, 8) == []
    # an 8 MB compressed XMP chunk in a PNG: over the bound, not read
    xmp = {"XML:com.adobe.xmp": A.xmp_packet(padding=8 << 20).decode("latin-1")}
    assert bounded(A.png_bytes(px, xmp, compressed=True), 2.0, 8) == []
    # a malformed C2PA box (JUMBF in APP11 whose lengths lie): reported as unreadable, not as evidence
    broken = bounded(A.jumbf_garbage(), 2.0, 8)
    if broken:  # without c2pa-python the box is not read at all
        assert kinds(broken) == [("c2pa", "none")] and "unreadable" in broken[0].text
    # lengths past the end, a keyword without end, a truncated chunk: no exception, no finding
    data = A.png_bytes(px, {"parameters": A.A1111})
    for cut in (40, 60, len(data) // 2, len(data) - 5):
        assert all(f.strength in ("hint", "none") for f in read_provenance(data[:cut]))
    assert read_provenance(b"") == [] and read_provenance(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64) == []


def test_a_failing_part_is_a_note_not_an_exception(monkeypatch):
    import detector.provenance as P

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(P, "_xmp", boom)
    found = read_provenance(A.png_bytes(A.photo(), {"parameters": A.A1111}))
    assert kinds(found) == [("png-parameters", "hint"), ("reader-error", "none")]
    assert "XMP not read: RuntimeError: boom" in found[1].text


def test_order_json_and_strengths():
    hint = Finding("png-parameters", "PNG", "hint")
    camera = Finding("exif-camera", "EXIF camera: X", "camera-claim")
    proof = Finding("c2pa", "C2PA: generated", "proof-of-generation", {"validation_state": "Trusted"})
    assert strongest([camera, hint, proof]) == proof and strongest([camera, hint]) == hint and strongest([]) is None
    text = findings_to_json([camera, proof])
    assert [f["kind"] for f in json.loads(text)] == ["c2pa", "exif-camera"]
    assert findings_from_json(text) == [proof, camera]
    assert findings_to_json([]) == "" and findings_from_json("") == [] and findings_from_json("[{\"kind\": 1}]") == []
    with pytest.raises(ValueError, match="strength must be one of"):
        Finding("c2pa", "x", "certain")


# ---------------------------------------------------------------- in a scan


def _artefact_folder(root: Path, signed: bool) -> dict[str, str]:
    """The artefacts as files, and the kind of strongest finding each should give ("" for none)."""
    root.mkdir(parents=True, exist_ok=True)
    px = A.photo(96, 128, 1)
    files = {
        "a1111.png": (A.png_bytes(px, {"parameters": A.A1111}), "png-parameters"),
        "comfyui.png": (A.png_bytes(px, {"workflow": json.dumps(A.COMFY_WORKFLOW)}), "png-comfyui"),
        "xmp.jpg": (A.jpeg_bytes(px, xmp=A.xmp_packet()), "xmp-digital-source-type"),
        "camera.jpg": (A.jpeg_bytes(px, exif={0x010F: "Nikon", 0x0110: "D850"}), "exif-camera"),
        "plain.jpg": (A.jpeg_bytes(px), ""),
        "huge_text.png": (A.png_bytes(px, {"parameters": "x" * (10 << 20)}), "png-parameters"),
        "huge_xmp.jpg": (A.jpeg_bytes(px) + A.xmp_packet(padding=20 << 20), ""),
        "tiny_with_parameters.png": (A.png_bytes(A.photo(16, 16), {"parameters": A.A1111}), "png-parameters"),
    }
    if signed:
        chain, key, ca = A.certificate_chain()
        c2pa = A.c2pa_signed(A.jpeg_bytes(px), chain, key)
        files.update({"c2pa.jpg": (c2pa, "c2pa"), "c2pa_tampered.jpg": (A.tampered(c2pa), "c2pa"),
                      "jumbf_garbage.jpg": (A.jumbf_garbage(), "c2pa")})
        (root.parent / "anchors.pem").write_text(ca)
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: kind for name, (_, kind) in files.items()}


@pytest.fixture(scope="module")
def scanner(checkpoint):
    from detector.inference import Detector

    return Detector.from_checkpoint(checkpoint, device="cpu", precision="fp32")


def _scan(folder: Path, scanner, out: Path, **options):
    from detector.patches import PatchSettings
    from detector.results import read_rows
    from detector.scanning import ScanOptions, scan

    opts = ScanOptions(patches=PatchSettings(mode="patches", patch_size=64, num_patches=2), batch_size=8,
                       workers=options.pop("workers", 0), progress=False, **options)
    summary = scan([folder], scanner, out, opts)
    return summary, {Path(r["path"]).name: r for r in read_rows(out)}


@pytest.mark.timeout(180)
def test_scan_reports_and_decides(tmp_path, scanner):
    c2pa = importlib.util.find_spec("c2pa") is not None
    folder = tmp_path / "in"
    expected = _artefact_folder(folder, signed=c2pa)
    anchors = {"trust_anchors": str(tmp_path / "anchors.pem")} if c2pa else {}
    summary, report = _scan(folder, scanner, tmp_path / "report.csv", workers=1, **anchors)
    assert sorted(report) == sorted(expected)  # one row per file, none lost
    for name, kind in expected.items():
        row = report[name]
        detail = findings_from_json(row["provenance_detail"])
        assert (detail[0].kind if detail else "") == kind, (name, row["provenance_detail"])
        assert row["provenance"] == (detail[0].text if detail else "")
    assert report["plain.jpg"]["provenance"] == "" and report["plain.jpg"]["provenance_detail"] == ""
    assert report["tiny_with_parameters.png"]["error"].startswith("too small")  # still an error row, with its evidence
    assert report["huge_text.png"]["error"] == "" and "not parsed" in report["huge_text.png"]["provenance"]
    assert {r["decided_by"] for r in report.values() if not r["error"]} == {"pixels"}
    assert summary.evidence[("png-parameters", "hint")] == 3 and summary.evidence[("exif-camera", "camera-claim")] == 1
    assert "provenance evidence: " in summary.line()
    if c2pa:
        assert "Trusted" in report["c2pa.jpg"]["provenance_detail"] and "proof-of-generation" in report["c2pa.jpg"]["provenance_detail"]
        assert "fails validation" in report["c2pa_tampered.jpg"]["provenance"]
        assert "unreadable" in report["jumbf_garbage.jpg"]["provenance"]
        assert summary.evidence[("c2pa", "proof-of-generation")] == 1
    _, decided = _scan(folder, scanner, tmp_path / "decide.csv", provenance="decide", **anchors)
    flipped = {name for name, row in decided.items() if row["decided_by"] == "provenance"}
    assert flipped == ({"c2pa.jpg"} if c2pa else set())
    for name, row in decided.items():
        if name in flipped:
            assert row["label"] == "fake" and float(row["probability"]) == 1.0 and row["logit"] == report[name]["logit"]
        else:
            assert (row["label"], row["probability"]) == (report[name]["label"], report[name]["probability"])
        if row["label"]:  # the project's promise: probability >= 0.5 iff fake
            assert (float(row["probability"]) >= 0.5) == (row["label"] == "fake")
    if c2pa:  # without trust anchors no manifest is Trusted, so none decides
        _, untrusted = _scan(folder, scanner, tmp_path / "untrusted.csv", provenance="decide")
        assert "hint" in untrusted["c2pa.jpg"]["provenance_detail"]
        assert {r["decided_by"] for r in untrusted.values() if not r["error"]} == {"pixels"}
    _, off = _scan(folder, scanner, tmp_path / "off.csv", provenance="off")
    assert all(r["provenance"] == "" and r["provenance_detail"] == "" for r in off.values())


@pytest.mark.timeout(120)
def test_scan_outputs_resume_and_missing_packages(tmp_path, scanner, monkeypatch):
    import detector.provenance as P
    from detector.scanning import ScanOptions

    folder = tmp_path / "in"
    _artefact_folder(folder, signed=False)
    for suffix in ("jsonl", "parquet"):
        if suffix == "parquet":
            pytest.importorskip("pyarrow", reason="parquet outputs need the parquet extra")
        _, rows = _scan(folder, scanner, tmp_path / f"o.{suffix}")
        assert rows["a1111.png"]["provenance"].startswith("PNG 'parameters' chunk")
        assert findings_from_json(rows["a1111.png"]["provenance_detail"])[0].kind == "png-parameters"
    # resume keeps the columns; another provenance mode is another scan
    out = tmp_path / "o.csv"
    _scan(folder, scanner, out)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:3]), encoding="utf-8")
    summary, rows = _scan(folder, scanner, out, resume=True)
    assert summary.n_skipped == 2 and len(rows) == 8 and rows["a1111.png"]["provenance"]
    with pytest.raises(ValueError, match="other weights, model set or settings"):
        _scan(folder, scanner, out, resume=True, provenance="decide")
    with pytest.raises(ValueError, match="provenance must be one of"):
        ScanOptions(provenance="maybe")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="no PEM certificate"):
        _scan(folder, scanner, tmp_path / "bad.csv", trust_anchors=str(tmp_path / "bad.pem"))
    # without the extra: said once, in the summary and the run record; PNG chunks are still read
    monkeypatch.setattr(P, "missing_packages", lambda: ["c2pa-python", "invisible-watermark"])
    monkeypatch.setattr("detector.scanning.missing_packages", P.missing_packages)
    summary, rows = _scan(folder, scanner, tmp_path / "bare.csv")
    assert sum("not installed" in note for note in summary.notes) == 1
    assert "c2pa-python and invisible-watermark not installed" in summary.line()
    record = json.loads((tmp_path / "bare.csv.json").read_text())
    assert record["provenance"]["not_installed"] == ["c2pa-python", "invisible-watermark"]
    assert rows["a1111.png"]["provenance"] and not any("installed" in r["provenance"] for r in rows.values())


# ---------------------------------------------------------------- in an evaluation


@pytest.mark.timeout(120)
def test_evaluate_ignores_provenance_and_counts_it_per_class(tmp_path, scanner):
    import pandas as pd

    from detector.datasets import read_labelled
    from detector.evaluation import EvalOptions, bias_warnings, evaluate
    from detector.patches import PatchSettings

    folder = tmp_path / "bench"
    for k in range(3):
        (folder / "real").mkdir(parents=True, exist_ok=True)
        (folder / "sdxl").mkdir(parents=True, exist_ok=True)
        px = A.photo(64, 64, 10 + k)
        (folder / "real" / f"{k}.jpg").write_bytes(A.jpeg_bytes(px, exif={0x010F: "Nikon", 0x0110: "D850"} if k else None))
        (folder / "sdxl" / f"{k}.png").write_bytes(A.png_bytes(A.photo(64, 64, 20 + k), {"parameters": A.A1111}))
    options = EvalOptions(patches=PatchSettings(mode="patches", patch_size=64, num_patches=1), workers=0, n_boot=10,
                          progress=False)
    result = evaluate(read_labelled(folder), [scanner], tmp_path / "out", options)
    note = next(w for w in result.warnings if w.startswith("metadata evidence"))
    assert "3 of 3 fakes (3 png-parameters hint)" in note and "2 of 3 reals (2 exif-camera camera-claim)" in note
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert sorted(scores["provenance"].fillna("")) == ["", "exif-camera:camera-claim", "exif-camera:camera-claim"] + [
        "png-parameters:hint"] * 3
    plain = scores.assign(provenance="", error="")
    assert not any(w.startswith("metadata evidence") for w in bias_warnings(plain))

"""The provenance reader on artefacts made here (tests/artefacts.py): generator PNG chunks, XMP, EXIF, C2PA
manifests signed with a chain made here (valid, trusted, tampered), SD watermarks, hostile metadata."""

from __future__ import annotations

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
    pytest.importorskip("imwatermark", reason="watermarks are decoded with invisible-watermark (the provenance extra)")
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

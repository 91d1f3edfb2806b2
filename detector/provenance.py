"""Provenance evidence read from a file's bytes: what a file says about where it came from, beside
what its pixels say.

Read, in this order of trust:

* **Content Credentials (C2PA)**, through ``c2pa-python`` (the ``provenance`` extra): the active
  manifest's claim generator, signer, digital source type and validation state, as c2pa reports it
  (``Invalid``, ``Valid``: signature and content hashes hold, ``Trusted``: and the signer chains to a
  trust anchor the caller gave). Read only when the bytes hold a JUMBF box; never fetched remotely.
* **IPTC DigitalSourceType** in an XMP packet (the first ``XMP_MAX_BYTES`` of at most 4 packets).
* **EXIF** ``Software``, ``Make``/``Model`` and a ``UserComment`` holding generation parameters.
* **PNG text chunks** of the generator front ends (AUTOMATIC1111's ``parameters``, ComfyUI's
  ``prompt``/``workflow``, NovelAI, InvokeAI, Fooocus), each parsed up to ``TEXT_MAX_BYTES``.
* **Invisible watermarks** of the Stable Diffusion family (``invisible-watermark``'s DWT-DCT, decoded
  here in numpy with OpenCV and PyWavelets: the same bits as its decoder, several times faster):
  SD v1's "StableDiffusionV1" (136 bits) and SDXL's 48-bit pattern, in images stored losslessly and
  small enough to be an SD output (see ``WATERMARK_*``). ``benchmarks/watermark_robustness.py``
  measured that a JPEG re-save at quality 95 erases them (found in 1 and 5 of 143 marked photos
  after it, none or 1 after quality 90), so JPEGs are not searched.

Each :class:`Finding` has a ``kind``, a short ``text`` and a ``strength``:

``proof-of-generation``
    only a C2PA manifest that c2pa validates as ``Trusted`` (signature, content hashes, and a signer
    chaining to a trust anchor the caller gave, see ``trust_anchors``) and whose active manifest
    declares ``trainedAlgorithmicMedia``. Nothing else: a manifest that is only ``Valid`` proves
    that someone holding a key bound that claim to these bytes, and anyone can make a key.
``hint``
    metadata that anyone can write (XMP, EXIF, PNG chunks), an untrusted but valid manifest declaring
    generation, a manifest declaring ``compositeWithTrainedAlgorithmicMedia`` (partly generated: the
    rest of the pixels may be a photo), and a decoded watermark. Hints say where to look, not what is.
``camera-claim``
    a claim of capture: EXIF ``Make``/``Model``, an XMP or C2PA source type of ``digitalCapture`` and
    the like. Anyone can write EXIF, so this is a claim, not evidence of a camera.
``none``
    reported so that a person can look, evidence of nothing: a manifest that fails validation (its
    claims are never counted), C2PA data that cannot be read, a part of the reader that failed.

The reader never trusts the content: every length is checked against the bytes, every text is
bounded (``TEXT_MAX_BYTES``, ``XMP_MAX_BYTES``, ``_SHOWN``) and stripped of control characters, and
:func:`read_provenance` never raises: a part that fails adds a ``none`` finding saying so. Absence
of findings proves nothing: most platforms strip metadata, and every re-encode erases the watermarks.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["EVIDENCE", "STRENGTHS", "TEXT_MAX_BYTES", "WATERMARK_MAX_PIXELS", "XMP_MAX_BYTES", "Finding",
           "deciding", "evidence_tags", "findings_from_json", "findings_to_json", "missing_packages", "read_provenance",
           "strongest", "watermark_bit_errors"]

STRENGTHS = ("proof-of-generation", "hint", "camera-claim", "none")  # strongest first
EVIDENCE = STRENGTHS[:3]  # the strengths that count as evidence (``none`` is reported, never counted)

# Bounds on what is parsed: Pillow's own MAX_TEXT_CHUNK for a PNG text chunk (decompressed), and an XMP
# window far above real packets (a few kB; Photoshop's edit history can reach a few hundred kB).
TEXT_MAX_BYTES = 1 << 20
XMP_MAX_BYTES = 1 << 20
_XMP_PACKETS = 4
_PNG_MAX_CHUNKS = 100_000
_SHOWN = 160  # characters of any text from the file that a finding shows

# The watermarks: decoded only on images with at most this many pixels (SD and SDXL write 0.25 to
# 1 MP; 4 MP leaves room for an upscale and bounds the cost) and a shorter side of at least 256 px
# (the SDXL watermarker leaves smaller images alone).
WATERMARK_MAX_PIXELS = 1 << 22
WATERMARK_MIN_SIDE = 256
# A payload counts as found when at most this many of its bits differ from the pattern. Chosen from
# benchmarks/watermark_robustness.py (README, "Provenance evidence"): on 276 real photos the closest
# decodings were 58 of 136 and 15 of 48 bits off, while photos marked here and stored losslessly
# decoded with a median of 13 of 136 and 1 of 48 bits off (the DWT-DCT mark does not take on smooth
# areas). A random payload falls within these bounds with odds below 1e-13 (136 bits) and 1e-7 (48).
WATERMARK_MAX_BIT_ERRORS = {136: 24, 48: 6}


def _bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.uint8)


SD_V1_PAYLOAD = b"StableDiffusionV1"  # what the SD v1 reference scripts (txt2img.py) embed
SDXL_PATTERN = 0b101100111110110010010000011110111011000110011110  # Stability's generative-models and diffusers
_WATERMARKS = (
    # (name, bits, channel order the encoder was given: "bgr" as its docs ask, "rgb" as some pipelines passed it)
    ("Stable Diffusion v1 (\"StableDiffusionV1\")", np.unpackbits(np.frombuffer(SD_V1_PAYLOAD, np.uint8)), "bgr"),
    ("SDXL", _bits(SDXL_PATTERN, 48), "bgr"),
    ("SDXL", _bits(SDXL_PATTERN, 48), "rgb"),
)

# IPTC digital source types (http://cv.iptc.org/newscodes/digitalsourcetype/): what each says
_GENERATED = {"trainedAlgorithmicMedia": "generated", "compositeWithTrainedAlgorithmicMedia": "partly generated",
              "algorithmicMedia": "made by an algorithm", "compositeSynthetic": "composite of synthetic elements"}
_CAPTURED = {"digitalCapture": "camera capture", "computationalCapture": "computational camera capture",
             "negativeFilm": "scanned negative film", "positiveFilm": "scanned positive film", "print": "scanned print",
             "compositeCapture": "composite of captures"}

# Names in a Software field that only generators write (lower case, matched as words)
_GENERATOR_SOFTWARE = ("novelai", "stable diffusion", "midjourney", "dall-e", "dall\u00b7e", "adobe firefly", "imagen",
                       "comfyui", "invokeai", "automatic1111", "fooocus", "diffusionbee", "draw things", "leonardo.ai",
                       "ideogram", "nightcafe", "bing image creator")

# PNG text keywords written by generator front ends: keyword (lower case) -> (kind, front end)
_PNG_KEYS = {
    "parameters": ("png-parameters", "AUTOMATIC1111-style web UI"),
    "prompt": ("png-comfyui", "ComfyUI"),
    "workflow": ("png-comfyui", "ComfyUI"),
    "invokeai_metadata": ("png-invokeai", "InvokeAI"),
    "invokeai_graph": ("png-invokeai", "InvokeAI"),
    "sd-metadata": ("png-invokeai", "InvokeAI"),
    "dream": ("png-invokeai", "InvokeAI"),
    "fooocus_scheme": ("png-fooocus", "Fooocus"),
    "comment": ("png-novelai", "NovelAI"),
}
_A1111_FIELDS = ("Steps", "Sampler", "Model", "Size")
_KIND_ORDER = ("c2pa", "watermark", "png-parameters", "png-comfyui", "png-novelai", "png-invokeai", "png-fooocus",
               "exif-parameters", "xmp-digital-source-type", "software", "exif-camera", "reader-error")


@dataclass(frozen=True)
class Finding:
    """One piece of provenance evidence: ``kind`` (where it was read: ``c2pa``, ``xmp-digital-source-type``,
    ``png-parameters``, ``software``, ``exif-camera``, ``watermark``...), a short human ``text``, a
    ``strength`` (one of :data:`STRENGTHS`) and a small JSON-able ``detail``."""

    kind: str
    text: str
    strength: str
    detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.strength not in STRENGTHS:
            raise ValueError(f"strength must be one of {STRENGTHS}, got {self.strength!r}")

    @property
    def is_evidence(self) -> bool:
        """Whether the finding counts as evidence (its strength is not ``none``)."""
        return self.strength in EVIDENCE


def _rank(finding: Finding) -> tuple[int, int]:
    kind = finding.kind if finding.kind in _KIND_ORDER else "reader-error"
    return STRENGTHS.index(finding.strength), _KIND_ORDER.index(kind)


def strongest(findings: Iterable[Finding]) -> Finding | None:
    """The finding to show first: by strength (:data:`STRENGTHS` order), then by kind (a signed manifest
    before a watermark before PNG chunks before XMP before EXIF); None for no finding."""
    ordered = sorted(findings, key=_rank)
    return ordered[0] if ordered else None


def deciding(findings: Iterable[Finding]) -> Finding | None:
    """The finding that may set a verdict (``--provenance decide``): a ``proof-of-generation``, else None."""
    return next((f for f in sorted(findings, key=_rank) if f.strength == "proof-of-generation"), None)


def evidence_tags(findings: Iterable[Finding]) -> str:
    """The evidence among ``findings`` as ``kind:strength`` tags joined by ``;`` (sorted, each once; ``""``
    for none): a compact column for tables (``detector evaluate``'s bias guards)."""
    return ";".join(sorted({f"{f.kind}:{f.strength}" for f in findings if f.is_evidence}))


def findings_to_json(findings: Sequence[Finding]) -> str:
    """The findings as a JSON list (the ``provenance_detail`` column), strongest first; ``""`` for none."""
    if not findings:
        return ""
    return json.dumps([asdict(f) for f in sorted(findings, key=_rank)], ensure_ascii=False, sort_keys=True)


def findings_from_json(text: str) -> list[Finding]:
    """The inverse of :func:`findings_to_json`; entries that are not findings are skipped (a hand-edited file)."""
    try:
        entries = json.loads(text) if isinstance(text, str) and text else []
    except ValueError:
        return []
    out = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            out.append(Finding(str(entry["kind"]), str(entry["text"]), str(entry["strength"]),
                               dict(entry.get("detail") or {})))
        except (KeyError, TypeError, ValueError):
            continue
    return out


_PACKAGES = {"c2pa": "c2pa-python", "cv2": "opencv-python-headless", "pywt": "PyWavelets"}


def missing_packages() -> list[str]:
    """The optional packages of the ``provenance`` extra that are not installed (their parts are not read)."""
    return [dist for module, dist in _PACKAGES.items() if importlib.util.find_spec(module) is None]


def _clean(text: object, limit: int = _SHOWN) -> str:
    """Text from a file, fit to show: control characters dropped, whitespace collapsed, cut at ``limit``."""
    value = re.sub(r"\s+", " ", re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", str(text))).strip()
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


# ---------------------------------------------------------------- the container


def _mime(data: bytes) -> str | None:
    """The MIME type of the bytes by their magic number, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis"):
        return "image/heif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


# ---------------------------------------------------------------- C2PA


@functools.lru_cache(maxsize=4)
def _c2pa_context(trust_anchors: str | None):
    """A c2pa context (one per process and trust list): no remote manifests, no OCSP (no network)."""
    import c2pa

    verify = {"remote_manifest_fetch": False, "ocsp_fetch": False}
    settings = {"verify": {**verify, "verify_trust": True}, "trust": {"trust_anchors": trust_anchors}} \
        if trust_anchors else {"verify": verify}
    return c2pa.Context(c2pa.Settings.from_dict(settings))


def _source_types(manifest: dict) -> list[str]:
    """The IPTC codes of the ``digitalSourceType`` of a manifest's actions (``c2pa.created`` first)."""
    codes: list[str] = []
    for assertion in manifest.get("assertions") or []:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        actions = (assertion.get("data") or {}).get("actions") or []
        for action in sorted((a for a in actions if isinstance(a, dict)), key=lambda a: a.get("action") != "c2pa.created"):
            value = str(action.get("digitalSourceType") or "")
            code = value.rstrip("/").rsplit("/", 1)[-1]
            if code and code not in codes:
                codes.append(code)
    return codes


def _generator(manifest: dict) -> str:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict) and info[0].get("name"):
        return _clean(" ".join(str(info[0][k]) for k in ("name", "version") if info[0].get(k)), 60)
    return _clean(manifest.get("claim_generator") or "unknown software", 60)


def _signer(manifest: dict) -> str:
    sig = manifest.get("signature_info") or {}
    names = [_clean(sig[k], 60) for k in ("common_name", "issuer") if sig.get(k)]
    return " / ".join(dict.fromkeys(names)) or "an unnamed signer"


def _c2pa(data: bytes, mime: str | None, trust_anchors: str | None) -> list[Finding]:
    """The active C2PA manifest, when the bytes embed one (a JUMBF box) and c2pa-python is installed."""
    if b"jumb" not in data or importlib.util.find_spec("c2pa") is None:
        return []
    import c2pa

    try:
        with c2pa.Reader(mime or "", io.BytesIO(data), context=_c2pa_context(trust_anchors)) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state() or "unknown"
    except c2pa.C2paError.ManifestNotFound:
        return []  # a JUMBF box of another kind
    except c2pa.C2paError as err:
        return [Finding("c2pa", f"C2PA data present but unreadable ({_clean(err, 80)}): not evidence", "none",
                        {"error": _clean(err)})]
    manifests = store.get("manifests") if isinstance(store, dict) else None
    manifest = (manifests or {}).get(store.get("active_manifest")) if isinstance(manifests, dict) else None
    if not isinstance(manifest, dict):
        return [Finding("c2pa", "C2PA manifest store without an active manifest: not evidence", "none",
                        {"validation_state": state})]
    codes = _source_types(manifest)
    failures = [str(s.get("code")) for s in store.get("validation_status") or [] if isinstance(s, dict)]
    detail = {"validation_state": state, "validation_status": failures[:12], "claim_generator": _generator(manifest),
              "signer": _signer(manifest), "digital_source_types": codes[:8]}
    who = f"{_generator(manifest)}, signed by {_signer(manifest)}"
    if state not in ("Valid", "Trusted"):
        broken = ", ".join(c for c in failures if c != "signingCredential.untrusted")[:120] or state
        return [Finding("c2pa", f"C2PA manifest fails validation ({broken}): not evidence", "none", detail)]
    trust = "trusted signer" if state == "Trusted" else "valid signature, signer on no trust list given"
    generated = next((c for c in codes if c in _GENERATED), None)
    captured = next((c for c in codes if c in _CAPTURED), None)
    if generated == "trainedAlgorithmicMedia":
        strength = "proof-of-generation" if state == "Trusted" else "hint"
        return [Finding("c2pa", f"C2PA: generated (trainedAlgorithmicMedia) by {who}; {trust}", strength, detail)]
    if generated:
        return [Finding("c2pa", f"C2PA: {_GENERATED[generated]} ({generated}) by {who}; {trust}", "hint", detail)]
    if captured:
        return [Finding("c2pa", f"C2PA: {_CAPTURED[captured]} ({captured}) by {who}; {trust}", "camera-claim", detail)]
    return [Finding("c2pa", f"C2PA manifest by {who} declaring no generation or capture; {trust}", "none", detail)]


# ---------------------------------------------------------------- XMP


_XMP_START = re.compile(rb"<x:xmpmeta|<\?xpacket begin")
_DST = re.compile(rb"[:\s<]DigitalSourceType\b")
_DST_VALUE = re.compile(rb"(?:digitalsourcetype/)?([A-Za-z]{3,64})", re.IGNORECASE)


def _xmp_codes(window: bytes) -> list[str]:
    """IPTC codes of the DigitalSourceType properties in one XMP window."""
    codes: list[str] = []
    for match in list(_DST.finditer(window))[:16]:
        segment = window[match.end(): match.end() + 400]
        start = segment.lower().find(b"digitalsourcetype/")
        value = _DST_VALUE.match(segment[start:]) if start >= 0 else re.match(rb"\W{0,4}([A-Za-z]{3,64})", segment)
        code = value.group(1).decode("ascii") if value else ""
        if (code in _GENERATED or code in _CAPTURED) and code not in codes:
            codes.append(code)
    return codes


def _xmp(data: bytes, windows: Iterable[bytes] = ()) -> list[Finding]:
    """IPTC DigitalSourceType in the XMP packets of the bytes (and in ``windows``: decompressed PNG XMP)."""
    found: list[bytes] = list(windows)
    pos = 0
    for _ in range(_XMP_PACKETS):
        match = _XMP_START.search(data, pos)
        if not match:
            break
        found.append(data[match.start(): match.start() + XMP_MAX_BYTES])
        end = data.find(b"</x:xmpmeta>", match.start(), match.start() + XMP_MAX_BYTES)
        pos = end if end >= 0 else match.start() + XMP_MAX_BYTES
    codes: list[str] = []
    for window in found:
        codes += [c for c in _xmp_codes(window) if c not in codes]
    out = []
    for code in codes[:2]:
        if code in _GENERATED:
            out.append(Finding("xmp-digital-source-type", f"XMP DigitalSourceType: {_GENERATED[code]} ({code}); "
                               "unsigned metadata", "hint", {"code": code}))
        else:
            out.append(Finding("xmp-digital-source-type", f"XMP DigitalSourceType: {_CAPTURED[code]} ({code}); "
                               "unsigned metadata", "camera-claim", {"code": code}))
    return out


# ---------------------------------------------------------------- PNG text chunks


def _inflate(payload: bytes) -> bytes | None:
    """zlib data inflated up to ``TEXT_MAX_BYTES + 1`` bytes (so that a bomb is seen, not expanded); None if broken."""
    try:
        return zlib.decompressobj().decompress(payload, TEXT_MAX_BYTES + 1)
    except zlib.error:
        return None


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """``(type, body)`` of each chunk of a PNG, lengths checked against the bytes; the bodies are views
    (a 10 MB chunk is looked at, not copied)."""
    view = memoryview(data)
    pos, n = 8, 0
    while pos + 8 <= len(data) and n < _PNG_MAX_CHUNKS:
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        body, pos, n = pos + 8, pos + 12 + length, n + 1
        if body + length > len(data) or kind == b"IEND":
            break
        yield kind, view[body: body + length]


def _png_text(kind: bytes, body: memoryview) -> tuple[str, str | None] | None:
    """``(keyword, text)`` of a tEXt, zTXt or iTXt chunk (text None when over ``TEXT_MAX_BYTES`` or
    broken), None for a chunk without a keyword."""
    raw = bytes(body[:80])
    end = raw.find(b"\0")
    if end < 0:
        return None
    keyword = raw[:end].decode("latin-1")
    text: bytes | memoryview | None = body[end + 1:]
    codec = "latin-1"
    if kind == b"zTXt":
        text = _inflate(body[end + 2:])
    elif kind == b"iTXt":  # compression flag, method, language\0, translated keyword\0, text
        codec, compressed, start = "utf-8", body[end + 1: end + 2] == b"\x01", end + 3
        for _ in range(2):  # past the language and the translated keyword
            nul = bytes(body[start: start + 256]).find(b"\0")
            start = start + nul + 1 if nul >= 0 else len(body)
        text = _inflate(body[start:]) if compressed else body[start:]
    if text is None or len(text) > TEXT_MAX_BYTES:
        return keyword, None
    return keyword, bytes(text).decode(codec, errors="replace")


def _a1111_summary(text: str) -> str:
    """The settings of an AUTOMATIC1111 ``parameters`` text (the prompt left out)."""
    fields = [f"{name}: {m.group(1)}" for name in _A1111_FIELDS
              if (m := re.search(rf"\b{name}: ([^,\n]{{1,60}})", text))]
    return _clean(", ".join(fields), 120)


def _software(value: str, kind: str, where: str) -> list[Finding]:
    lowered = value.lower()
    named = next((name for name in _GENERATOR_SOFTWARE if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", lowered)), None)
    if named is None:
        return []
    return [Finding(kind, f"{where}: {_clean(value, 80)} (a generator's name; unsigned metadata)", "hint",
                    {"software": _clean(value)})]


def _png(data: bytes) -> tuple[list[Finding], list[bytes], bytes | None]:
    """Findings of a PNG's text chunks, its XMP packets (``XML:com.adobe.xmp``, maybe compressed) and
    its EXIF block (an ``eXIf`` chunk within ``TEXT_MAX_BYTES``)."""
    texts: dict[str, str | None] = {}
    sizes: dict[str, int] = {}
    xmp: list[bytes] = []
    exif = None
    for kind, body in _png_chunks(data):
        if kind == b"eXIf" and exif is None and len(body) <= TEXT_MAX_BYTES:
            exif = bytes(body)
        parsed = _png_text(kind, body) if kind in (b"tEXt", b"zTXt", b"iTXt") else None
        if parsed is None:
            continue
        keyword, text, length = *parsed, len(body)
        if keyword == "XML:com.adobe.xmp" and text is not None:
            xmp.append(text.encode("utf-8", errors="replace")[:XMP_MAX_BYTES])
        key = keyword.lower()
        if key in _PNG_KEYS or key in ("software", "source"):
            texts.setdefault(key, text)
            sizes.setdefault(key, length)
    out: list[Finding] = []
    seen: set[str] = set()
    novelai = "novelai" in (texts.get("software") or "").lower()
    for key, text in texts.items():
        if key in ("software", "source"):
            if text:
                out += _software(text, "software", f"PNG {key}")
            continue
        kind, tool = _PNG_KEYS[key]
        if text is None:
            out.append(Finding(kind, f"PNG '{key}' chunk ({tool}) of {sizes[key]:,} bytes, over the "
                               f"{TEXT_MAX_BYTES:,}-byte bound: not parsed", "hint", {"key": key, "bytes": sizes[key]}))
            continue
        stripped = text.lstrip()
        if key in ("prompt", "workflow", "invokeai_metadata", "invokeai_graph", "sd-metadata") and not stripped.startswith("{"):
            continue  # a generic keyword (prompt) holding something else than the front end's JSON
        if key == "comment" and not (novelai or re.search(r'"(steps|sampler|n_samples)"\s*:', text)):
            continue  # a plain comment
        if kind in seen:
            continue
        seen.add(kind)
        settings = _a1111_summary(text) if key == "parameters" else ""
        out.append(Finding(kind, f"PNG '{key}' chunk ({tool})" + (f": {settings}" if settings else "")
                           + "; unsigned metadata", "hint", {"key": key, "bytes": sizes[key]}))
    return out, xmp, exif


# ---------------------------------------------------------------- EXIF


def _exif(data: bytes, block: bytes | None = None) -> list[Finding]:
    """EXIF Software (a generator's name), UserComment (generation parameters) and Make/Model (a camera
    claim), from ``block`` (a PNG's eXIf chunk: PNGs are not opened, Pillow would read every text chunk)
    or from the image's header."""
    from PIL import Image, UnidentifiedImageError

    from .images import open_image

    exif = Image.Exif()
    if block is not None:
        exif.load(block)
    elif _mime(data) != "image/png":
        try:
            with open_image(io.BytesIO(data)) as img:
                exif = img.getexif()
        except (UnidentifiedImageError, OSError):  # not an image: its error row says so
            return []
    software = exif.get(0x0131)
    make, model = exif.get(0x010F), exif.get(0x0110)
    comment = exif.get_ifd(0x8769).get(0x9286) if 0x8769 in exif else None
    out: list[Finding] = []
    if isinstance(software, str):
        out += _software(software, "software", "EXIF Software")
    if isinstance(comment, bytes):  # an 8-byte charset header, then the text
        header, body = comment[:8], comment[8: 8 + TEXT_MAX_BYTES]
        comment = body.decode("utf-16-be" if header.startswith(b"UNICODE") and body[:1] == b"\0" else
                              "utf-16-le" if header.startswith(b"UNICODE") else "latin-1", errors="replace")
    if isinstance(comment, str) and re.search(r"\bSteps: \d", comment) and re.search(r"\bSampler: ", comment):
        out.append(Finding("exif-parameters", f"EXIF UserComment with generation parameters: "
                           f"{_a1111_summary(comment)}; unsigned metadata", "hint"))
    make, model = (_clean(v, 40) if isinstance(v, str) else "" for v in (make, model))
    camera = model if make and model.lower().startswith(make.lower()) else f"{make} {model}".strip()
    if camera:
        out.append(Finding("exif-camera", f"EXIF camera: {camera} (a claim anyone can write)", "camera-claim",
                           {"make": make, "model": model}))
    return out


# ---------------------------------------------------------------- watermarks


_WATERMARK_SCALE = 36  # the quantisation step of invisible-watermark's dwtDct in the U channel
_WATERMARK_BLOCK = 4


def _block_votes(bgr: np.ndarray) -> np.ndarray:
    """The bit each 4x4 block of a dwtDct watermark votes for, in the encoder's order (blocks in rows).

    invisible-watermark's ``dwtDct`` decoding, in numpy instead of a Python loop over blocks (the same
    votes; tests/test_provenance.py compares the decoded bits with its decoder): the U channel of the
    YUV image (OpenCV's conversion), cropped to a multiple of 4, its Haar approximation, and per 4x4
    block of it the coefficient of largest magnitude but the first, whose magnitude modulo the step
    says 1 when past half of it. Every pattern length reads the same votes, so they are computed once."""
    import cv2
    import pywt

    h, w = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    u = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV)[:h, :w, 1]
    approx = pywt.dwt2(u, "haar")[0]
    b = _WATERMARK_BLOCK
    rows, cols = approx.shape[0] // b, approx.shape[1] // b
    blocks = approx[: rows * b, : cols * b].reshape(rows, b, cols, b).transpose(0, 2, 1, 3).reshape(-1, b * b)
    ac = np.abs(blocks[:, 1:])
    values = ac[np.arange(len(ac)), np.argmax(ac, axis=1)]
    return (values % _WATERMARK_SCALE) > 0.5 * _WATERMARK_SCALE


def _decode_bits(votes: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` payload bits of the block votes: block k votes for bit k mod n, a bit is set when more
    than half (127/255) of its votes are."""
    index = np.arange(len(votes)) % n
    ones = np.bincount(index, weights=votes.astype(np.float64), minlength=n)
    counts = np.maximum(np.bincount(index, minlength=n), 1)
    return ((ones / counts) * 255 > 127).astype(np.uint8)


def watermark_bit_errors(pixels: np.ndarray) -> list[tuple[str, str, int, int]]:
    """``(name, channel order, bit errors, bits)`` of each Stable Diffusion watermark decoded from RGB
    uint8 ``pixels``: how far the image's DWT-DCT payload is from each pattern (about half the bits on an
    unmarked image). Needs OpenCV and PyWavelets (the ``provenance`` extra); used by
    :func:`read_provenance` and the benchmark."""
    votes = {order: _block_votes(pixels[:, :, ::-1] if order == "bgr" else pixels)
             for order in dict.fromkeys(order for _, _, order in _WATERMARKS)}
    out = []
    for name, pattern, order in _WATERMARKS:
        decoded = _decode_bits(votes[order], len(pattern))
        out.append((name, order, int(np.count_nonzero(decoded != pattern)), len(pattern)))
    return out


def _watermarks(pixels: np.ndarray | None, mime: str | None) -> list[Finding]:
    if pixels is None or mime == "image/jpeg" or any(importlib.util.find_spec(m) is None for m in ("cv2", "pywt")):
        return []
    h, w = pixels.shape[:2]
    if h * w > WATERMARK_MAX_PIXELS or min(h, w) < WATERMARK_MIN_SIDE:
        return []
    out = []
    for name, order, errors, n in watermark_bit_errors(pixels):
        if errors <= WATERMARK_MAX_BIT_ERRORS[n] and not any(f.detail.get("watermark") == name for f in out):
            out.append(Finding("watermark", f"invisible watermark of {name} ({errors} of {n} bits off); "
                               "a hint: anyone can embed it", "hint",
                               {"watermark": name, "bit_errors": errors, "bits": n, "channel_order": order}))
    return out


# ---------------------------------------------------------------- the reader


def read_provenance(data: bytes, *, pixels: np.ndarray | None = None, trust_anchors: str | None = None,
                    watermarks: bool = True) -> list[Finding]:
    """The provenance findings of a file's ``data``, strongest first (see the module docstring).

    ``pixels``, the file's decoded RGB uint8 pixels when the caller has them, are searched for
    watermarks (none are searched without them, or with ``watermarks=False``). ``trust_anchors``
    (PEM certificates) are the roots a C2PA signer must chain to for c2pa to call a manifest
    ``Trusted``, the only state that gives ``proof-of-generation``. Never raises: a part that fails
    adds a ``reader-error`` finding of strength ``none``. Parts whose package is missing (see
    :func:`missing_packages`) are skipped silently: say so once, where the findings are shown.
    """
    mime = _mime(data)
    findings: list[Finding] = []
    xmp_windows: list[bytes] = []
    exif_block: list[bytes] = []

    def png() -> list[Finding]:
        found, windows, exif = _png(data)
        xmp_windows.extend(windows)
        exif_block.extend([exif] if exif else [])
        return found

    parts: list[tuple[str, Callable[[], list[Finding]]]] = [
        ("C2PA", lambda: _c2pa(data, mime, trust_anchors)),
        ("PNG text", png if mime == "image/png" else list),
        ("XMP", lambda: _xmp(data, xmp_windows)),
        ("EXIF", lambda: _exif(data, exif_block[0] if exif_block else None) if mime else []),
        ("watermark", lambda: _watermarks(pixels, mime) if watermarks else []),
    ]
    for name, part in parts:
        try:
            findings += part()
        except Exception as err:  # noqa: BLE001 - hostile bytes must cost a finding, never the row
            findings.append(Finding("reader-error", f"{name} not read: {type(err).__name__}: {_clean(err, 80)}",
                                    "none"))
    return sorted(findings, key=_rank)

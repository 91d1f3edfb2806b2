"""Provenance artefacts made on the spot (none downloaded): generator PNG chunks, XMP, EXIF, a C2PA-signed
JPEG with a certificate chain made here, a watermarked image. Used by tests/test_provenance.py and the
scan tests; ``benchmarks/watermark_robustness.py`` embeds its watermarks with :func:`watermarked`."""

from __future__ import annotations

import datetime
import io
import json

import numpy as np
from PIL import Image, PngImagePlugin

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
A1111 = ("a lighthouse at dusk, oil painting\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
         "Seed: 1234, Size: 512x512, Model hash: abcdef1234, Model: v1-5-pruned-emaonly")
COMFY_WORKFLOW = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}, {"id": 4, "type": "CheckpointLoaderSimple"}]}


def photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth, camera-like RGB image (gradients and mild noise), uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([120 + 80 * np.sin(x / 17 + k) * np.cos(y / 23 - k) for k in range(3)], axis=2)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray, texts: dict[str, str] | None = None, *, compressed: bool = False) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value, zip=compressed)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray, *, quality: int = 90, xmp: bytes | None = None, exif: dict | None = None) -> bytes:
    image, buffer = Image.fromarray(pixels), io.BytesIO()
    options = {"quality": quality}
    if xmp is not None:
        options["xmp"] = xmp
    if exif:
        table = Image.Exif()
        for tag, value in exif.items():
            table[tag] = value
        options["exif"] = table.tobytes()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def xmp_packet(source_type: str = TRAINED, padding: int = 0) -> bytes:
    """An XMP packet declaring an IPTC DigitalSourceType (``padding`` bytes of whitespace before it)."""
    return (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
            + b" " * padding + b' Iptc4xmpExt:DigitalSourceType="' + source_type.encode() + b'"/>'
            b'</rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


def certificate_chain():
    """A test CA and an end-entity ES256 certificate it signed (digitalSignature, emailProtection: what
    C2PA accepts of a signer): ``(chain_pem, key_pem, ca_pem)``, the first two as bytes (what
    c2pa-python's signer takes), the CA as text (a trust anchor)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "detector tests")])

    def usage(signer: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=signer, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not signer,
                             crl_sign=not signer, encipher_only=False, decipher_only=False)

    def builder(subject: str, key, issuer: str) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (builder("detector test CA", ca_key, "detector test CA")
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(False), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (builder("detector test signer", key, "detector test CA")
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem, ca.public_bytes(pem).decode()


def c2pa_signed(jpeg: bytes, chain_pem: bytes, key_pem: bytes, source_type: str = TRAINED) -> bytes:
    """``jpeg`` with a C2PA manifest (a ``c2pa.created`` action of ``source_type``) signed by the chain."""
    import c2pa

    manifest = {"claim_generator_info": [{"name": "detector-tests", "version": "1.0"}], "title": "generated.jpg",
                "format": "image/jpeg",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": source_type}]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain_pem, key_pem, None))
    out = io.BytesIO()
    with c2pa.Builder(json.dumps(manifest)) as builder:
        builder.sign(signer, "image/jpeg", io.BytesIO(jpeg), out)
    return out.getvalue()


def tampered(jpeg: bytes) -> bytes:
    """``jpeg`` with one byte of its entropy-coded pixel data changed (before the end marker)."""
    data = bytearray(jpeg)
    data[len(data) - 40] ^= 0x01
    return bytes(data)


def watermarked(pixels: np.ndarray, kind: str = "sd-v1") -> np.ndarray:
    """RGB ``pixels`` with a Stable Diffusion watermark embedded as the reference code does it (BGR to the
    encoder): ``sd-v1`` ("StableDiffusionV1", what txt2img.py embeds) or ``sdxl`` (the 48-bit pattern)."""
    from imwatermark import WatermarkEncoder

    from detector.provenance import SD_V1_PAYLOAD, SDXL_PATTERN

    encoder = WatermarkEncoder()
    if kind == "sd-v1":
        encoder.set_watermark("bytes", SD_V1_PAYLOAD)
    else:
        encoder.set_watermark("bits", [int(b) for b in bin(SDXL_PATTERN)[2:]])
    bgr = np.ascontiguousarray(pixels[:, :, ::-1])
    return np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def jumbf_garbage() -> bytes:
    """A JPEG whose APP11 segment claims a C2PA JUMBF box with nonsense inside (lengths that lie)."""
    body = b"JP" + b"\x00\x01" + b"\x00\x00\x00\x01" + b"\xff\xff\xff\xf0jumb" + b"\x00\x00\x00\x11jumdc2pa" + b"\xab" * 200
    segment = b"\xff\xeb" + (len(body) + 2).to_bytes(2, "big") + body
    jpeg = jpeg_bytes(photo(64, 64, 3))
    return jpeg[:2] + segment + jpeg[2:]

"""Self-contained HTML pages for people who would rather look than read a CSV.

:func:`scan_report` turns a ``detector scan`` output (and its heatmaps) into one HTML file: a summary
(counts, weights, their sha256 and model card, settings, date), a histogram of probabilities and a
table of every image with its thumbnail and heatmap. :func:`evaluation_report` does the same for a
``detector evaluate`` folder: metrics tables, ROC and score plots, the worst-scored images of each class.

Everything the page shows is inside the file: images are JPEG/PNG data URIs, the histogram is inline
SVG, the few lines of JavaScript (sorting, filters, pages) are inline, and a Content-Security-Policy
forbids the browser to fetch anything else. The page reads fine with scripting off (mail clients):
the table then shows every row, unsorted. Every file name and text from the CSV is escaped with
:func:`html.escape`; a name like ``<script>.png`` shows as text.

This module only builds HTML: it reads the files that ``scan`` and ``evaluate`` wrote and scores nothing.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from .calibration import TOO_SMALL
from .provenance import EVIDENCE

__all__ = ["scan_report", "evaluation_report", "is_evaluation_dir", "THUMBNAIL_PX", "PAGE_SIZE"]

THUMBNAIL_PX = 128  # longest side of thumbnails and heatmaps in the page
PAGE_SIZE = 500  # rows per page once the script runs
WORST_PER_CLASS = 12  # evaluation: images shown for each class
_EVAL_FILES = ("metrics.csv", "auc.csv", "acc.csv", "scores.csv")


# ---------------------------------------------------------------- small helpers


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _float(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV, read by column name (columns may come and go between versions)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
        return list(reader.fieldnames or []), rows


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _jpeg_uri(image) -> str:
    """A PIL image as a small JPEG data URI."""
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: str) -> str | None:
    """The image file as a thumbnail data URI, or None when it cannot be read (moved, not an image).

    Decoded like the scan decodes it (safe decoders, stored pixel grid, no EXIF rotation), so the
    thumbnail and the heatmap overlay line up.
    """
    from PIL import Image

    from .images import ImageError, decode_image

    try:
        return _jpeg_uri(Image.fromarray(decode_image(path).pixels))
    except (ImageError, OSError, ValueError):
        return None


def _heatmap(folder: Path | None, path: str) -> str | None:
    if folder is None:
        return None
    from PIL import Image

    from .results import heatmap_name

    target = folder / heatmap_name(path)
    try:
        with Image.open(target, formats=("PNG",)) as image:
            return _jpeg_uri(image)
    except (OSError, ValueError):
        return None


def _img(uri: str | None, alt: str, missing: str = "not readable") -> str:
    if uri is None:
        return f'<span class="na">{_esc(missing)}</span>'
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _card_text(weights: str | None) -> str | None:
    """The model card's first paragraph for weights recorded at ``weights`` (or the bundled copy of that name)."""
    from .resources import default_weights_path, model_card_summary

    if not weights:
        return None
    text = model_card_summary(weights)
    if text is None and Path(weights).parent.suffix == ".export":  # an export's model: the card of its checkpoint
        text = model_card_summary(Path(weights).parent)
    if text is None:
        try:
            bundled = default_weights_path(Path(weights).name)
        except ValueError:
            bundled = None
        text = model_card_summary(bundled) if bundled else None
    return text.replace("**", "") if text else None


def _flatten(record: dict, prefix: str = "") -> Iterable[tuple[str, object]]:
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _dl(pairs: Iterable[tuple[str, object]], cls: str = "") -> str:
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v if not isinstance(v, (list, tuple)) else ', '.join(map(str, v)))}</dd>"
                    for k, v in pairs)
    return f'<dl class="{cls}">{items}</dl>'


def _models_html(models: Sequence[dict]) -> str:
    """Every model: its say in the verdict, weights, sha256, architecture, calibration and the first
    paragraph of its model card."""
    parts, shown = [], set()
    for m in models:
        rows = [(k, m[k]) for k in ("name", "weights", "weights_sha256", "architecture", "device", "precision",
                                     "temperature", "threshold") if m.get(k) not in (None, "")]
        if "weight" in m:
            say = float(m["weight"])
            rows.insert(1, ("say", f"weight {say:g}: " + ("decides the verdict" if say > 0 else
                                                          "reported beside the verdict, no say in it")))
        card = _card_text(m.get("weights"))
        note = ('<p class="card"><b>Model card:</b> the one shown above (one card covers these weights).</p>'
                if card in shown else f'<p class="card"><b>Model card:</b> {_esc(card)}</p>' if card
                else '<p class="card na">No model card found beside these weights: read what they were trained on '
                     'before trusting a score.</p>')
        shown.add(card)
        parts.append(f'<div class="model" data-model="{_esc(m.get("name", ""))}">{_dl(rows, "kv")}{note}</div>')
    return "".join(parts) or '<p class="na">No run record (the .json beside the CSV) found: weights unknown.</p>'


def _heat_legend(model: str | None) -> str:
    """What a heatmap's colours mean, and which model drew it."""
    drawn = f"drawn by <b>{_esc(model)}</b>" if model else "drawn by the scan's convolutional model"
    return ('<div class="legend" id="heat-legend"><span>Heatmaps: ' + drawn + ', its calibrated probability per '
            'region</span><span class="ramp"><span>0 real</span><span class="bar-ramp"></span><span>1 generated'
            '</span></span><span><span class="hatch"></span> not scored (between patches)</span></div>')


def _page(title: str, body: str, subtitle: str = "") -> str:
    """The HTML document around ``body``, with a CSP that allows nothing outside the file."""
    style_hash = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'sha256-{style_hash}'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    from . import __version__

    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>{_esc(title)}</h1><p class="sub">{_esc(subtitle)}</p>'
        f'<p class="sub">Report made {made} by detector {_esc(__version__)}. Scores are evidence to weigh, '
        "not a verdict: read the model card's limits below.</p></header>"
        f"{body}<script>{_SCRIPT}</script></body></html>\n"
    )


def _write(output: str | os.PathLike, text: str) -> Path:
    from .checkpoints import atomic_write

    output = Path(output)
    atomic_write(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return output


# ---------------------------------------------------------------- scan report


@dataclass(frozen=True)
class _Column:
    """A column of the image table: header, how to sort it, and the cell of a row."""

    title: str
    numeric: bool


def _histogram(probabilities: Sequence[tuple[float, str]], threshold: float | None, bins: int = 20) -> str:
    """Inline SVG: counts of probabilities in ``bins`` bins, fake and real stacked, the threshold dashed.

    Each bar carries its range (``data-lo``/``data-hi``): the script filters the table on a click.
    """
    w, h, left, bottom, top = 640, 190, 40, 30, 22
    fake = [0] * bins
    real = [0] * bins
    for p, label in probabilities:
        k = min(bins - 1, max(0, int(p * bins)))
        (fake if label == "fake" else real)[k] += 1
    peak = max([f + r for f, r in zip(fake, real)] + [1])
    plot_h = h - bottom - top
    bar_w = (w - left - 10) / bins
    parts = [f'<svg id="histogram" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="histogram of probabilities">']
    for k in range(bins):
        x = left + k * bar_w
        lo, hi = k / bins, (k + 1) / bins
        y0 = h - bottom
        for count, cls in ((real[k], "real"), (fake[k], "fake")):
            if count:
                bh = plot_h * count / peak
                y0 -= bh
                parts.append(f'<rect class="bar {cls}" x="{x + 1:.1f}" y="{y0:.1f}" width="{bar_w - 2:.1f}" '
                             f'height="{bh:.1f}" data-lo="{lo:.2f}" data-hi="{hi:.2f}">'
                             f"<title>{count} {cls}, probability {lo:.2f} to {hi:.2f}</title></rect>")
    axis_y = h - bottom
    parts.append(f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{w - 10}" y2="{axis_y}"/>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * (w - left - 10)
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>'
                 f'<text x="{left - 6}" y="{axis_y}" text-anchor="end">0</text>')
    if threshold is not None:
        x = left + threshold * (w - left - 10)
        parts.append(f'<line class="threshold" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y}"/>'
                     f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle">calibrated threshold {threshold:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _evidence(detail: str) -> list:
    """The provenance findings of a row's ``provenance_detail`` (strongest first)."""
    from .provenance import findings_from_json

    return findings_from_json(detail)


def _provenance_cell(findings: Sequence) -> str:
    """The strongest finding, its strength as a badge, the others under a disclosure."""
    if not findings:
        return '<td class="prov"><span class="na">none found</span></td>'
    first, rest = findings[0], findings[1:]
    badge = f'<span class="badge {_esc(first.strength)}">{_esc(first.strength)}</span> '
    more = "".join(f"<li>{_esc(f.strength)}: {_esc(f.text)}</li>" for f in rest)
    return (f'<td class="prov">{badge}{_esc(first.text)}'
            + (f"<details><summary>{len(rest)} more</summary><ul>{more}</ul></details>" if rest else "") + "</td>")


def _probability_threshold(detector: dict) -> float | None:
    """The calibrated threshold on the probability scale: 0.5, where the logit reaches the threshold
    (see :meth:`detector.checkpoints.CheckpointInfo.probability`); None when the record has none."""
    t, temp = _float(str(detector.get("threshold"))), _float(str(detector.get("temperature")))
    if t is None or not temp:
        return None
    return 0.5


def _detectors(record: dict) -> list[dict]:
    """The models a scan used, each a dict with its ``name`` (and ``weight`` in a model set): the
    members of ``detector`` (a model set), ``detector`` itself (one model), or ``detectors``/``models``."""
    for key in ("detectors", "models"):
        if isinstance(record.get(key), list):
            return [m for m in record[key] if isinstance(m, dict)]
    detector = record.get("detector")
    if not isinstance(detector, dict):
        return []
    if isinstance(detector.get("members"), dict):
        members = [{"name": name, **m} for name, m in detector["members"].items() if isinstance(m, dict)]
        return sorted(members, key=lambda m: -float(m.get("weight", 1.0)))  # the deciding ones first
    return [{"name": Path(str(detector.get("weights", "model"))).stem, **detector}]


def scan_report(
    results_csv: str | os.PathLike,
    output: str | os.PathLike,
    heatmaps: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Write one self-contained HTML page for a ``detector scan`` output; returns its path.

    ``heatmaps`` is the scan's ``--heatmaps`` folder: each image's overlay is shown beside its
    thumbnail. The run record ``<results_csv>.json`` gives the weights and settings when present.
    Raises ``ValueError`` for a CSV that is not a scan output.
    """
    results_csv = Path(results_csv)
    try:
        columns, rows = _read_csv(results_csv)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read {results_csv}: {err}") from None
    if "path" not in columns or "probability" not in columns:
        raise ValueError(f"{results_csv} is not a detector scan output (no path and probability columns)")
    record = _read_json(Path(f"{results_csv}.json"))
    drawn = record.get("heatmaps") if isinstance(record.get("heatmaps"), dict) else {}
    if heatmaps is None and drawn.get("folder") and Path(drawn["folder"]).is_dir():
        heatmaps = drawn["folder"]  # the scan's own --heatmaps folder, from its run record
    heat_dir = Path(heatmaps) if heatmaps else None
    if heat_dir is not None and not heat_dir.is_dir():
        raise ValueError(f"heatmap folder not found: {heat_dir}")
    detectors = _detectors(record)
    extra_probs = [c for c in columns if c.startswith("probability_")]

    labels = Counter("error" if r.get("error") else (r.get("label") or "unscored") for r in rows)
    has_provenance = "provenance_detail" in columns
    evidence = {i: _evidence(r.get("provenance_detail", "")) for i, r in enumerate(rows)}
    scored = [(p, r.get("label", "")) for r in rows if (p := _float(r.get("probability"))) is not None]
    threshold = _probability_threshold(record["detector"]) if isinstance(record.get("detector"), dict) else None

    counts = "".join(f'<div class="count {cls}"><span>{labels.get(key, 0) if key else len(rows)}</span>{name}</div>'
                     for key, cls, name in (("", "all", "images"), ("fake", "fake", "fake"), ("real", "real", "real"),
                                            *([(TOO_SMALL, "small", TOO_SMALL)] if labels.get(TOO_SMALL) else []),
                                            ("error", "error", "errors")))
    if has_provenance:
        with_evidence = sum(1 for found in evidence.values() if set(f.strength for f in found) & set(EVIDENCE))
        counts += f'<div class="count prov"><span>{with_evidence}</span>with provenance evidence</div>'
    settings = [(k, v) for k, v in _flatten(record)
                if not k.startswith(("detector", "models", "inputs", "started"))]
    summary = (
        f'<section id="summary"><h2>Summary</h2><div class="counts">{counts}</div>'
        f"<h3>Models</h3>{_models_html(detectors)}"
        f"<h3>Scan</h3>{_dl([('output', results_csv.name), ('inputs', record.get('inputs', '')), ('started', record.get('started', 'unknown'))], 'kv')}"
        f'<details><summary>All settings</summary>{_dl(settings, "kv")}</details></section>'
    )
    histogram = (f'<section><h2>Probabilities</h2><p class="hint">{len(scored)} scored images; fake labels in red, real '
                 f"in blue. Click a bar to show its images.</p>{_histogram(scored, threshold)}</section>")

    table_columns = [_Column("#", True), _Column("image", False)]
    if heat_dir is not None:
        table_columns.append(_Column(f"heatmap ({drawn['model']})" if drawn.get("model") else "heatmap", False))
    table_columns += [_Column("file", False), _Column("probability", True)]
    table_columns += [_Column(c.replace("probability_", "p: "), True) for c in extra_probs]
    table_columns += [_Column("label", False)] + ([_Column("provenance", False)] if has_provenance else [])
    table_columns += [_Column("size", True), _Column("format", False), _Column("folder", False), _Column("error", False)]
    head = "".join(f'<th scope="col"{" data-type=num" if c.numeric else ""}>{_esc(c.title)}</th>' for c in table_columns)

    body_rows = []
    folders: Counter[str] = Counter()
    for n, row in enumerate(rows, start=1):
        path = row.get("path", "")
        name, folder = os.path.basename(path) or path, os.path.dirname(path)
        folders[folder] += 1
        prob = _float(row.get("probability"))
        label = row.get("label", "")
        error = row.get("error", "")
        width, height = _float(row.get("width")), _float(row.get("height"))
        size = f"{int(width)}\u00d7{int(height)}" if width and height else ""
        cells = [f"<td>{n}</td>", f'<td class="thumb">{_img(_thumbnail(path), name, "file not found or unreadable")}</td>']
        if heat_dir is not None:
            cells.append(f'<td class="thumb">{_img(_heatmap(heat_dir, path), "heatmap of " + name, "no heatmap")}</td>')
        cells.append(f'<td class="file" title="{_esc(path)}">{_esc(name)}</td>')
        for column in ("probability", *extra_probs):
            value = _float(row.get(column))
            cells.append(f'<td class="num">{"" if value is None else f"{value:.3f}"}</td>')
        cells.append(f'<td class="label {_esc(label)}">{_esc(label)}'
                     + ('<br><span class="decided">by provenance</span>' if row.get("decided_by") == "provenance" else "")
                     + "</td>")
        if has_provenance:
            cells.append(_provenance_cell(evidence[n - 1]))
        strengths = " ".join(sorted({f.strength for f in evidence[n - 1]}))
        cells += [f'<td data-v="{int(width * height) if width and height else ""}">{size}</td>',
                  f"<td>{_esc(row.get('format', ''))}</td>", f'<td class="folder">{_esc(folder)}</td>',
                  f'<td class="error">{_esc(error)}</td>']
        body_rows.append(
            f'<tr data-label="{_esc(label)}" data-folder="{_esc(folder)}" data-error="{1 if error else 0}" '
            f'data-prov="{_esc(strengths)}" '
            f'data-prob="{"" if prob is None else prob}" data-name="{_esc(name.lower())}">{"".join(cells)}</tr>'
        )

    folder_options = "".join(f'<option value="{_esc(f)}">{_esc(f or "(none)")} ({c})</option>'
                             for f, c in sorted(folders.items()))
    filters = (
        '<form id="filters" class="filters">'
        '<label>label <select name="label"><option value="">any</option><option>fake</option>'
        f"<option>real</option><option>{TOO_SMALL}</option></select></label>"
        f'<label>folder <select name="folder"><option value="*">any</option>{folder_options}</select></label>'
        '<label><input type="checkbox" name="errors"> errors only</label>'
        + ('<label>provenance <select name="prov"><option value="">any</option>'
           '<option value="evidence">with provenance evidence</option>'
           '<option value="proof-of-generation">proof of generation</option><option value="hint">hints</option>'
           '<option value="camera-claim">camera claims</option><option value="nothing">no evidence</option>'
           '</select></label>' if has_provenance else "")
        + '<label>probability from <input type="number" name="pmin" min="0" max="1" step="0.05" value="0"></label>'
        '<label>to <input type="number" name="pmax" min="0" max="1" step="0.05" value="1"></label>'
        '<label>name <input type="search" name="q" placeholder="part of a file name"></label>'
        f'<label>rows per page <select name="pagesize"><option>100</option><option selected>{PAGE_SIZE}</option>'
        '<option>2000</option><option value="0">all</option></select></label></form>'
    )
    legend = _heat_legend(drawn.get("model")) if heat_dir is not None else ""
    if has_provenance:
        legend += ('<p class="hint" id="provenance-note">Provenance: what each file says of itself (C2PA Content '
                   "Credentials, XMP and EXIF, generator PNG chunks, Stable Diffusion watermarks). Only a C2PA manifest "
                   "that validates as Trusted and declares a generated image is proof of generation; metadata anyone "
                   "can write is a hint. No evidence proves nothing: most platforms strip metadata.</p>")
    table = (
        f'<section id="images"><h2>Images</h2>{filters}{legend}<p id="status" class="hint">{len(rows)} images. '
        "Click a column header to sort.</p>"
        f'<table id="results" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body_rows)}</tbody></table>'
        '<nav class="pager"><button type="button" id="prev">previous</button> <span id="page"></span> '
        '<button type="button" id="next">next</button></nav></section>'
    )
    page = _page(title or f"detector scan: {results_csv.name}", summary + histogram + table,
                 subtitle=f"{len(rows)} images from {results_csv}")
    return _write(output, page)


# ---------------------------------------------------------------- evaluation report


def is_evaluation_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``detector evaluate`` (it holds metrics.csv and scores.csv)."""
    path = Path(path)
    return path.is_dir() and (path / "metrics.csv").is_file() and (path / "scores.csv").is_file()


def _table(columns: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(columns)
    head = "".join(f'<th scope="col"{" data-type=num" if n else ""}>{_esc(c)}</th>' for c, n in zip(columns, numeric))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{_esc(v)}</td>' for v, n in zip(r, numeric))
                   + "</tr>" for r in rows)
    return f'<div class="wide"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _number(text: str, count: bool = False) -> str:
    value = _float(text)
    if value is None:
        return text
    return str(int(value)) if count and value.is_integer() else f"{value:.3f}"


def _csv_table(path: Path) -> str:
    """A small CSV (auc.csv, acc.csv) as a sortable table; numbers to 3 decimals."""
    if not path.is_file():
        return f'<p class="na">{_esc(path.name)} not found.</p>'
    columns, rows = _read_csv(path)
    numeric = [all(_float(r.get(c)) is not None or not r.get(c) for r in rows) and bool(rows) for c in columns]
    return _table(columns, ([_number(r.get(c, "")) for c in columns] for r in rows), numeric)


_METRICS = [("n_real", "reals"), ("n_fake", "fakes"), ("auc", "AUC"), ("auc_low", "AUC low"), ("auc_high", "AUC high"),
            ("ap", "AP"), ("balanced_acc", "bAcc"), ("acc_real", "acc real"), ("acc_fake", "acc fake"),
            ("eer", "EER"), ("pd@0.1far", "Pd@10%"), ("pd@0.05far", "Pd@5%"), ("pd@0.01far", "Pd@1%"),
            ("best_balanced_acc", "best bAcc (oracle)"), ("ece", "ECE"), ("log_loss", "log loss")]


def _metrics_tables(path: Path) -> str:
    """metrics.csv (tidy: group, model, metric, value) as one table per model: groups x metrics."""
    if not path.is_file():
        return '<p class="na">metrics.csv not found.</p>'
    _, rows = _read_csv(path)
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        by_model.setdefault(r.get("model", ""), {}).setdefault(r.get("group", ""), {})[r.get("metric", "")] = r.get("value", "")
    parts = []
    for model, groups in by_model.items():
        present = {m for g in groups.values() for m in g}
        shown = [(key, name) for key, name in _METRICS if key in present]
        table_rows = ([group] + [_number(values.get(key, ""), key.startswith("n_")) for key, _ in shown]
                      for group, values in groups.items())
        parts.append(f"<h3>{_esc(model)}</h3>"
                     + _table(["group"] + [name for _, name in shown], table_rows, [False] + [True] * len(shown))
                     + _label_intervals(groups.get("all", {})))
    return "".join(parts)


def _label_intervals(values: dict[str, str]) -> str:
    """One sentence under a model's table: the label's FPR and recall of the ``all`` row with their
    intervals over whole sources and families (``detector.evaluation.groups.label_intervals``), if any."""
    acc_real, acc_fake = _float(values.get("acc_real")), _float(values.get("acc_fake"))
    rates = {"label_fpr": ("false-positive rate", None if acc_real is None else 1 - acc_real, "photo sources"),
             "label_recall": ("recall", acc_fake, "generator families")}
    parts = []
    for key, (name, rate, over) in rates.items():
        low, high = _float(values.get(f"{key}_low")), _float(values.get(f"{key}_high"))
        if None not in (rate, low, high):
            parts.append(f"label {name} {rate:.3f} [{low:.3f}, {high:.3f}] (95% interval resampling whole {over})")
    return f"<p>All images: {_esc('; '.join(parts))}.</p>" if parts else ""


def _png(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="na">{_esc(path.name)} not found.</p>'
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img class="plot" src="{uri}" alt="{_esc(alt)}"></figure>'


def _worst(scores: Path, run: dict) -> str:
    """The reals scored most fake and the fakes scored most real, per class, with thumbnails."""
    if not scores.is_file():
        return '<p class="na">scores.csv not found.</p>'
    columns, rows = _read_csv(scores)
    logits = [c for c in columns if c.startswith("logit_")]
    if not logits:
        return '<p class="na">scores.csv has no logit column.</p>'
    column = "logit_fused" if "logit_fused" in logits else logits[0]
    model = column[len("logit_"):]
    spec = next((m for m in run.get("models", []) if isinstance(m, dict) and m.get("name") == model), {})
    temperature = _float(str(spec.get("temperature"))) or 1.0
    threshold = _float(str(spec.get("threshold")))
    min_side = _float(str(spec.get("min_side"))) or 0.0
    parts = [f'<p class="hint">Ranked by <code>{_esc(column)}</code>; the probability is sigmoid((logit - '
             f"{threshold or 0:.3g}) / {temperature:.3g}).</p>"]
    for label, name, reverse in (("0", "Reals scored most fake", True), ("1", "Fakes scored most real", False)):
        scored = [(v, r) for r in rows if r.get("label") == label and (v := _float(r.get(column))) is not None]
        scored.sort(key=lambda item: item[0], reverse=reverse)
        table_rows = []
        for logit, r in scored[:WORST_PER_CLASS]:
            path = r.get("path", "")
            margin = (logit - (threshold or 0.0)) / temperature
            probability = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, margin))))
            side = _float(r.get("short_side"))
            called = ("" if threshold is None else TOO_SMALL if side is not None and side < min_side
                      else "fake" if logit >= threshold else "real")
            table_rows.append(
                f'<tr><td class="thumb">{_img(_thumbnail(path), os.path.basename(path), "file not found")}</td>'
                f'<td class="file" title="{_esc(path)}">{_esc(os.path.basename(path))}</td>'
                f"<td>{_esc(r.get('generator', ''))}</td><td>{_esc(r.get('format', ''))}</td>"
                f'<td class="num">{logit:.3f}</td><td class="num">{probability:.3f}</td>'
                f"<td>{called}</td></tr>"
            )
        head = ('<th scope="col">image</th><th scope="col">file</th><th scope="col">generator</th>'
                '<th scope="col">format</th><th scope="col" data-type=num>logit</th>'
                '<th scope="col" data-type=num>probability</th><th scope="col">called</th>')
        parts.append(f"<h3>{name}</h3><table class=\"sortable\"><thead><tr>{head}</tr></thead>"
                     f"<tbody>{''.join(table_rows)}</tbody></table>")
    return "".join(parts)


def evaluation_report(output_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (or ``output``) for a ``detector evaluate`` folder; returns its path.

    Reads only what evaluate wrote: metrics.csv, auc.csv, acc.csv, roc.png, scores.png, scores.csv
    and run.json. Raises ``ValueError`` when ``output_dir`` is not such a folder.
    """
    folder = Path(output_dir)
    if not is_evaluation_dir(folder):
        raise ValueError(f"{folder} is not a detector evaluate folder (metrics.csv and scores.csv missing)")
    run = _read_json(folder / "run.json")
    models = [m for m in run.get("models", []) if isinstance(m, dict)]
    counts = "".join(f'<div class="count {cls}"><span>{_esc(run.get(key, "?"))}</span>{name}</div>'
                     for key, cls, name in (("n_images", "all", "images"), ("n_fake", "fake", "fakes"),
                                            ("n_real", "real", "reals"), ("n_errors", "error", "errors")))
    settings = [(k, v) for k, v in _flatten(run.get("settings", {})) if not isinstance(v, dict)]
    body = (
        f'<section id="summary"><h2>Summary</h2><div class="counts">{counts}</div>'
        f"<h3>Models</h3>{_models_html(models)}"
        f"<h3>Run</h3>{_dl([('inputs', run.get('inputs', '')), ('date', run.get('date', 'unknown')), ('device', run.get('device', '')), ('precision', run.get('precision', ''))], 'kv')}"
        f'<details><summary>All settings</summary>{_dl(settings, "kv")}</details></section>'
        f'<section><h2>Metrics</h2><p class="hint">Each generator\'s fakes against all reals, at the calibrated '
        f"threshold; AUC low/high is the bootstrap 95% interval.</p>{_metrics_tables(folder / 'metrics.csv')}"
        f"<h3>AUC (auc.csv)</h3>{_csv_table(folder / 'auc.csv')}"
        f"<h3>Accuracy (acc.csv)</h3>{_csv_table(folder / 'acc.csv')}</section>"
        f"<section><h2>Plots</h2>{_png(folder / 'roc.png', 'ROC curves')}{_png(folder / 'scores.png', 'score histograms')}</section>"
        f"<section><h2>Worst-scored images</h2>{_worst(folder / 'scores.csv', run)}</section>"
    )
    page = _page(f"detector evaluation: {folder.name}", body, subtitle=str(folder))
    return _write(output or folder / "report.html", page)


# ---------------------------------------------------------------- page assets

_STYLE = """
:root{--fake:#c62828;--real:#1565c0;--err:#8d6e00;--line:#ddd;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
body{margin:0 auto;max-width:1400px;padding:0 1.2em 3em;color:#222;background:#fff}
header{border-bottom:2px solid #222;margin-bottom:1em}h1{margin:.6em 0 .1em;font-size:1.5em}
h2{font-size:1.2em;margin:1.4em 0 .4em}h3{font-size:1em;margin:1em 0 .3em}
.sub,.hint{color:#555;margin:.2em 0}.na{color:#888;font-style:italic}
.counts{display:flex;gap:1em;flex-wrap:wrap}.count{border:1px solid var(--line);border-radius:6px;padding:.4em 1em;min-width:6em}
.count span{display:block;font-size:1.8em;font-weight:600}.count.fake span{color:var(--fake)}
.count.real span{color:var(--real)}.count.error span{color:var(--err)}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.4em 0}dt{color:#555}dd{margin:0;word-break:break-all}
.card{background:#fff8e1;border-left:4px solid #f9a825;padding:.5em .8em;max-width:70em}
svg text{font-size:11px;fill:#444}.bar{cursor:pointer}.bar.fake{fill:var(--fake)}.bar.real{fill:var(--real)}
.bar:hover{opacity:.7}.axis{stroke:#444}.threshold{stroke:#222;stroke-dasharray:4 3}
.filters{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin:.5em 0}
.filters input[type=number]{width:5em}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}th,td{border-bottom:1px solid var(--line);padding:.25em .6em;text-align:left;vertical-align:middle}
th{background:#f4f4f4;position:sticky;top:0;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.thumb{width:130px;height:100px}
td.thumb img{display:block;max-width:128px;max-height:128px}
td.file{max-width:22em;word-break:break-all}td.folder{max-width:18em;word-break:break-all;color:#555}
td.label.fake{color:var(--fake);font-weight:600}td.label.real{color:var(--real);font-weight:600}
td.error{color:var(--err);max-width:20em}td.prov{max-width:26em;font-size:.92em}td.prov ul{margin:.2em 0;padding-left:1.2em}
.badge{display:inline-block;border-radius:3px;padding:0 .35em;font-size:.85em;background:#eee;color:#333}
.badge.proof-of-generation{background:var(--fake);color:#fff}.badge.hint{background:#ffe0b2}.badge.camera-claim{background:#e3f2fd}
.decided{font-size:.8em;font-weight:400}.count.prov span{color:#6a1b9a}img.plot{max-width:100%;border:1px solid var(--line)}
.pager{margin:.6em 0}tr[hidden]{display:none}.wide{overflow-x:auto;max-width:100%}
.wide table{width:100%;table-layout:auto}.wide th{white-space:normal}.wide td{overflow-wrap:anywhere}
.model{margin:.4em 0 1em}.legend{display:flex;flex-wrap:wrap;gap:.4em 1.5em;align-items:center;margin:.4em 0;font-size:.9em}
.ramp{display:inline-flex;gap:.4em;align-items:center}.bar-ramp{display:inline-block;width:10em;height:.9em;
background:linear-gradient(90deg,rgb(0,0,255),rgb(128,0,128),rgb(255,0,0));border:1px solid #999}
.hatch{display:inline-block;width:1.4em;height:.9em;vertical-align:middle;border:1px solid #999;
background:repeating-linear-gradient(45deg,#464646 0 2px,#ececec 2px 6px)}
"""

_SCRIPT = """
"use strict";
(function () {
  function key(row, i, numeric) {
    const cell = row.cells[i];
    const text = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
    if (!numeric) return text.toLowerCase();
    const x = parseFloat(text);
    return isNaN(x) ? null : x;
  }
  function sortBy(table, i, th) {
    const numeric = th.dataset.type === "num";
    const up = th.getAttribute("aria-sort") !== "ascending";
    for (const h of table.tHead.rows[0].cells) h.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      const x = key(a, i, numeric), y = key(b, i, numeric);
      if (x === y) return 0;
      if (x === null || x === "") return 1;   /* empty cells last, both ways */
      if (y === null || y === "") return -1;
      return (x < y ? -1 : 1) * (up ? 1 : -1);
    });
    for (const r of rows) body.appendChild(r);
    if (table.refresh) table.refresh();
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.from(table.tHead.rows[0].cells).forEach(function (th, i) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, i, th); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(table, i, th); });
    });
  });

  const table = document.getElementById("results");
  const form = document.getElementById("filters");
  if (!table || !form) return;
  const status = document.getElementById("status"), pageText = document.getElementById("page");
  let page = 0;
  function matches(r) {
    const f = form.elements, d = r.dataset;
    if (f.label.value && d.label !== f.label.value) return false;
    if (f.folder.value !== "*" && d.folder !== f.folder.value) return false;
    if (f.errors.checked && d.error !== "1") return false;
    if (f.prov && f.prov.value) {
      const found = d.prov ? d.prov.split(" ") : [];
      const evidence = found.filter(function (s) { return s !== "none"; });
      if (f.prov.value === "evidence" ? !evidence.length :
          f.prov.value === "nothing" ? evidence.length > 0 : found.indexOf(f.prov.value) < 0) return false;
    }
    const lo = parseFloat(f.pmin.value), hi = parseFloat(f.pmax.value);
    if ((lo > 0 || hi < 1) && (d.prob === "" || +d.prob < (lo || 0) || +d.prob > (isNaN(hi) ? 1 : hi))) return false;
    const name = f.q.value.trim().toLowerCase();
    return !name || d.name.indexOf(name) >= 0;
  }
  function refresh() {
    const rows = Array.from(table.tBodies[0].rows), shown = rows.filter(matches);
    const size = parseInt(form.elements.pagesize.value, 10) || Math.max(shown.length, 1);
    const pages = Math.max(1, Math.ceil(shown.length / size));
    page = Math.min(Math.max(page, 0), pages - 1);
    const visible = new Set(shown.slice(page * size, (page + 1) * size));
    for (const r of rows) r.hidden = !visible.has(r);
    status.textContent = shown.length + " of " + rows.length + " images match" +
      (pages > 1 ? "; showing " + (page * size + 1) + " to " + Math.min(shown.length, (page + 1) * size) : "") +
      ". Click a column header to sort.";
    pageText.textContent = "page " + (page + 1) + " of " + pages;
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
  }
  table.refresh = refresh;
  form.addEventListener("input", function () { page = 0; refresh(); });
  form.addEventListener("change", function () { page = 0; refresh(); });
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  document.getElementById("prev").addEventListener("click", function () { page -= 1; refresh(); });
  document.getElementById("next").addEventListener("click", function () { page += 1; refresh(); });
  document.querySelectorAll("#histogram .bar").forEach(function (bar) {
    bar.addEventListener("click", function () {
      form.elements.pmin.value = bar.dataset.lo; form.elements.pmax.value = bar.dataset.hi; page = 0; refresh();
    });
  });
  refresh();
})();
"""

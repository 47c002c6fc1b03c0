"""Downloading dataset archives (official URL + MD5) and extracting them without trusting their paths.

``safe_extract`` refuses, before writing anything, an archive with a member whose path is absolute,
contains ``..``, or otherwise resolves outside the target folder, and any link or device member —
a crafted archive cannot write outside the folder it is extracted into. Members are extracted into a
hidden staging folder first and moved into place when all of them are written, so an extraction that
is killed (or fills the disk) never leaves a half-extracted dataset that looks complete.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import torchvision.datasets.utils as tv_utils  # the module, so tests can stand in for the network

from transferlab.data.sources import DatasetError


def _check_member_path(name: str, target: Path, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise DatasetError(f"{archive}: refusing to extract member {name!r}: its path leaves {target}")
    dest = (target / pure).resolve()
    if dest != target and target not in dest.parents:
        raise DatasetError(f"{archive}: refusing to extract member {name!r}: its path leaves {target}")
    return dest


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A hidden folder inside ``target``; on success its top-level entries replace those of ``target``."""
    for old in target.glob(".extracting-*"):  # left by a killed extraction: never complete
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=target))
    try:
        yield staging
        for entry in staging.iterdir():
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a ``.zip`` or tar archive (``.tar``, ``.tar.gz``, ``.tgz``, …) into ``target``.

    Every member is checked first; one that would land outside ``target``, or a symbolic/hard link
    or device file, makes the whole extraction fail with a DatasetError naming the archive and the
    member. Returns ``target``.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _check_member_path(m.filename, target, archive)
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise DatasetError(f"{archive}: refusing to extract symbolic link member {m.filename!r}")
            with _staging(target) as staging:
                for m in members:
                    with zf.open(m) as src:
                        _write_member(staging / _check_member_path(m.filename, target, archive).relative_to(target), m.is_dir(), src)
        return target
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{archive}: not a zip or tar archive ({e})") from None
    with tf:
        members = tf.getmembers()
        for m in members:
            _check_member_path(m.name, target, archive)
            if not (m.isfile() or m.isdir()):
                raise DatasetError(f"{archive}: refusing to extract member {m.name!r}: links and special files are not allowed")
        with _staging(target) as staging:
            for m in members:
                src = None if m.isdir() else tf.extractfile(m)
                if src is None and not m.isdir():
                    raise DatasetError(f"{archive}: cannot read member {m.name!r}")
                _write_member(staging / _check_member_path(m.name, target, archive).relative_to(target), m.isdir(), src)
    return target


def _write_member(dest: Path, is_dir: bool, src: object) -> None:
    if is_dir:
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out)  # type: ignore[arg-type]


DOWNLOAD_MB = {"cifar-10-python.tar.gz": 163, "cifar-100-python.tar.gz": 161, "tiny-imagenet-200.zip": 237, "FashionMNIST": 30, "MNIST": 12}
"""Size of what a loader would download (MB), for ``transferlab plan``."""

_downloads_refused = 0


class DownloadRefused(DatasetError):
    """A loader would download, inside ``no_downloads()`` (``transferlab plan``): the data is not here."""


@contextmanager
def no_downloads() -> Iterator[None]:
    """Within this block a loader that would download raises ``DownloadRefused`` naming what and how large, instead."""
    global _downloads_refused
    _downloads_refused += 1
    try:
        yield
    finally:
        _downloads_refused -= 1


def refuse_download(what: str) -> None:
    """Raise ``DownloadRefused`` inside ``no_downloads()``; otherwise nothing (the download goes ahead)."""
    if _downloads_refused:
        name = what.rsplit("/", 1)[-1]
        size = f" (about {DOWNLOAD_MB[name]} MB)" if name in DOWNLOAD_MB else ""
        raise DownloadRefused(f"would download {what}{size}")


def download_archive(url: str, md5: str, directory: Path, filename: str) -> Path:
    """Download ``url`` into ``directory/filename`` and check its MD5 (torchvision's downloader).

    An existing file with the right checksum is reused. Raises DatasetError naming the URL when the
    download or the checksum fails.
    """
    refuse_download(url)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    try:
        tv_utils.download_url(url, str(directory), filename=filename, md5=md5)
    except Exception as e:  # noqa: BLE001 - offline, HTTP error, ...
        raise DatasetError(f"download of {url} into {directory} failed ({type(e).__name__}: {e})") from None
    if not tv_utils.check_integrity(str(path), md5):
        raise DatasetError(f"{path}: MD5 checksum does not match {md5} (download of {url} corrupted); delete it and retry")
    return path

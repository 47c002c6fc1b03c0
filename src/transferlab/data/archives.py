"""Downloading dataset archives (official URL + MD5) and extracting them without trusting their paths.

``safe_extract`` refuses, before writing anything, an archive with a member whose path is absolute,
contains ``..``, or otherwise resolves outside the target folder, and any link or device member —
a crafted archive cannot write outside the folder it is extracted into.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from transferlab.data.sources import DatasetError


def _check_member_path(name: str, target: Path, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise DatasetError(f"{archive}: refusing to extract member {name!r}: its path leaves {target}")
    dest = (target / pure).resolve()
    if dest != target and target not in dest.parents:
        raise DatasetError(f"{archive}: refusing to extract member {name!r}: its path leaves {target}")
    return dest


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
            for m in members:
                dest = _check_member_path(m.filename, target, archive)
                if m.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
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
        for m in members:
            dest = _check_member_path(m.name, target, archive)
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:
                raise DatasetError(f"{archive}: cannot read member {m.name!r}")
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    return target


def download_archive(url: str, md5: str, directory: Path, filename: str) -> Path:
    """Download ``url`` into ``directory/filename`` and check its MD5 (torchvision's downloader).

    An existing file with the right checksum is reused. Raises DatasetError naming the URL when the
    download or the checksum fails.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    try:
        download_url(url, str(directory), filename=filename, md5=md5)
    except Exception as e:  # noqa: BLE001 - offline, HTTP error, ...
        raise DatasetError(f"download of {url} into {directory} failed ({type(e).__name__}: {e})") from None
    if not check_integrity(str(path), md5):
        raise DatasetError(f"{path}: MD5 checksum does not match {md5} (download of {url} corrupted); delete it and retry")
    return path

"""Fetch datasets from their public locations, verified by sha256, written atomically.

Each dataset in :data:`REGISTRY` lists its files with their sha256 (from
``../shared/data/MANIFEST.md``), direct mirror URLs, and archives that contain them (whose
own hash may be unknown: their *members* are verified after extraction). :func:`fetch`:

- reuses a file already in the target directory when its sha256 matches, without network;
  a mismatch is an error naming the file and both hashes (the file is left alone);
- otherwise downloads to a temporary file in the target directory, checks the length
  against ``Content-Length`` and the hash against the registry, fsyncs it, then
  ``os.replace``\\ s it into place (and fsyncs the directory), so a name in the directory
  always holds a complete, verified file, even after a kill or a power loss; a failed
  or truncated download removes its temporary file and tries the next mirror.

``data_dir`` (or ``$RNNDROP_DATA_DIR``) may be the dataset's own directory holding a local
copy (e.g. ``../shared/data/ptb``) or a root with one sub-directory per dataset
(``ptb``, ``wikitext-2``, ``mnist``); the default root is ``~/.cache/rnndrop``.

Command line: ``python -m rnndrop.data.download ptb wikitext2 --data-dir DIR``.

Why not ``pooch``: it verifies whole downloads by hash, but not members of an archive whose
own hash is unknown (the PTB tarball), it has no per-file fallback from mirrors to archives,
and it would be a dependency of every data module; this file is the ~300 lines those need.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..atomic import replace
from .registry import REGISTRY, ArchiveSpec, DatasetSpec, FileSpec

__all__ = [
    "REGISTRY",
    "ArchiveSpec",
    "ChecksumError",
    "DatasetSpec",
    "DownloadError",
    "FileSpec",
    "dataset_dir",
    "default_root",
    "fetch",
    "main",
    "sha256sum",
]

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset file could not be found, downloaded or verified."""


class ChecksumError(DownloadError):
    """A file's sha256 is not the one the registry expects."""


def default_root() -> Path:
    """``$RNNDROP_DATA_DIR``, else ``$XDG_CACHE_HOME/rnndrop`` (``~/.cache/rnndrop``)."""
    env = os.environ.get("RNNDROP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "rnndrop"


def dataset_dir(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``spec``'s files live: ``data_dir`` itself if it holds any of them (or is named
    like the dataset's sub-directory), else ``data_dir/<subdir>``."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_root()
    if root.name == spec.subdir or any((root / f.name).exists() for f in spec.files):
        return root
    return root / spec.subdir


def sha256sum(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_existing(path: Path, spec: FileSpec) -> None:
    actual = sha256sum(path)
    if actual != spec.sha256:
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {spec.sha256}, got {actual} "
            f"({path.stat().st_size} bytes). This is not the expected {spec.name}; "
            "delete it to download a fresh copy, or point data_dir at a good one"
        )


def _copy_stream(src: IO[bytes], directory: Path, name: str) -> tuple[Path, str, int]:
    """Write ``src`` to a new temporary file in ``directory``; return (path, sha256, bytes)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    h, n = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename that makes it visible
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), h.hexdigest(), n


def _download(
    url: str, directory: Path, name: str, timeout: float, verbose: bool = False
) -> tuple[Path, str, int]:
    """Download ``url`` to a temporary file; raise DownloadError if it fails or is truncated."""
    if verbose:
        print(f"rnndrop: downloading {url}", file=sys.stderr)
    request = urllib.request.Request(url, headers={"User-Agent": "rnndrop"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            tmp, digest, n = _copy_stream(response, directory, name)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot connect ({e.reason})") from None
    except http.client.IncompleteRead as e:
        raise DownloadError(
            f"truncated download: connection closed after {len(e.partial)} bytes"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"download failed ({type(e).__name__}: {e})") from None
    if declared is not None and declared.isdigit() and n != int(declared):
        tmp.unlink(missing_ok=True)
        raise DownloadError(
            f"truncated download: got {n} bytes, the server announced {declared} (Content-Length)"
        )
    return tmp, digest, n


def _install(tmp: Path, digest: str, n: int, spec: FileSpec, target: Path) -> None:
    """Move a verified temporary file into place; remove it and raise if it does not verify."""
    try:
        if spec.size is not None and n != spec.size:
            raise ChecksumError(f"wrong size: {n} bytes, expected {spec.size} (truncated?)")
        if digest != spec.sha256:
            raise ChecksumError(f"sha256 mismatch: expected {spec.sha256}, got {digest}")
        replace(tmp, target)  # atomic, and durable (the directory is fsynced)
    finally:
        tmp.unlink(missing_ok=True)


def _from_archive(
    archive: ArchiveSpec, wanted: list[FileSpec], directory: Path, timeout: float, verbose: bool
) -> dict[str, list[str]]:
    """Fetch ``wanted`` out of ``archive``; return the reasons for the files still missing."""
    errors: dict[str, list[str]] = {f.name: [] for f in wanted}
    for url in archive.urls:
        if not wanted:
            break
        try:
            tmp, digest, _ = _download(url, directory, url.rsplit("/", 1)[-1], timeout, verbose)
        except DownloadError as e:
            for f in wanted:
                errors[f.name].append(f"{url}: {e}")
            continue
        try:
            if archive.sha256 is not None and digest != archive.sha256:
                raise DownloadError(f"sha256 mismatch: expected {archive.sha256}, got {digest}")
            failed = _extract(tmp, url, archive, wanted, directory)
        except (DownloadError, tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
            failed = {f.name: f"{url}: not a readable archive ({e})" for f in wanted}
        finally:
            tmp.unlink(missing_ok=True)
        for name, msg in failed.items():
            errors[name].append(msg)
        wanted = [f for f in wanted if f.name in failed]
    return {f.name: errors[f.name] for f in wanted}


def _extract(
    tmp: Path, url: str, archive: ArchiveSpec, wanted: list[FileSpec], directory: Path
) -> dict[str, str]:
    """Extract and verify each wanted member; return {file name: error} for failures."""
    errors: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if zipfile.is_zipfile(tmp):
            zf = stack.enter_context(zipfile.ZipFile(tmp))
            members: dict[str, object] = {n.removeprefix("./"): n for n in zf.namelist()}
            open_member = zf.open
        else:
            tf = stack.enter_context(tarfile.open(tmp))  # any compression; TarError otherwise
            members = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isfile()}
            open_member = tf.extractfile  # type: ignore[assignment]
        for spec in wanted:
            member = archive.members[spec.name]
            if member not in members:
                errors[spec.name] = f"{url}: the archive has no member {member}"
                continue
            with open_member(members[member]) as src:  # type: ignore[arg-type,union-attr]
                out = _copy_stream(src, directory, spec.name)
            try:
                _install(*out, spec, directory / spec.name)
            except ChecksumError as e:
                errors[spec.name] = f"{url} (member {member}): {e}"
    return errors


def fetch(
    dataset: str | DatasetSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    timeout: float = 60.0,
    verbose: bool = True,
) -> Path:
    """Make sure a dataset's files are present and verified; return their directory.

    Args:
        dataset: a name in :data:`REGISTRY` (``"ptb"``, ``"ptb_char"``, ``"wikitext2"``,
            ``"mnist"``) or a :class:`DatasetSpec` (e.g. with other URLs).
        data_dir: the dataset's directory or a root above it (see :func:`dataset_dir`);
            default ``$RNNDROP_DATA_DIR`` or ``~/.cache/rnndrop``.
        download: fetch missing files; if False a missing file is an error.
        timeout: seconds to wait on a connection.
        verbose: print a line per download to stderr.

    Raises:
        ChecksumError: a file already present has the wrong sha256.
        DownloadError: a file is missing and every source failed (each reason listed).
    """
    if isinstance(dataset, str):
        if dataset not in REGISTRY:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(REGISTRY)}")
        dataset = REGISTRY[dataset]
    directory = dataset_dir(dataset, data_dir)
    missing = []
    for spec in dataset.files:
        path = directory / spec.name
        if path.is_file():
            _verify_existing(path, spec)
        else:
            missing.append(spec)
    if not missing:
        return directory
    names = ", ".join(f.name for f in missing)
    if not download:
        raise DownloadError(
            f"{dataset.name}: missing {names} in {directory}; download them with "
            f"`python -m rnndrop.data.download {dataset.name} --data-dir {directory}` "
            "(or pass download=True), or point data_dir at a local copy"
        )
    created = _missing_ancestors(directory)  # removed again if nothing gets downloaded
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"{dataset.name}: cannot create {directory} to download into: {e}"
        ) from None
    if not os.access(directory, os.W_OK):
        raise DownloadError(f"{dataset.name}: {directory} is not writable; missing {names}")
    errors: dict[str, list[str]] = {f.name: [] for f in missing}

    def direct(files: list[FileSpec]) -> list[FileSpec]:
        left = []
        for spec in files:
            for url in spec.urls:
                try:
                    tmp = _download(url, directory, spec.name, timeout, verbose)
                    _install(*tmp, spec, directory / spec.name)
                    break
                except DownloadError as e:
                    errors[spec.name].append(f"{url}: {e}")
            else:
                left.append(spec)
        return left

    def archives(files: list[FileSpec]) -> list[FileSpec]:
        for archive in dataset.archives:
            inside = [f for f in files if f.name in archive.members]
            if not inside:
                continue
            failed = _from_archive(archive, inside, directory, timeout, verbose)
            for name, errs in failed.items():
                errors[name].extend(errs)
            files = [f for f in files if f not in inside or f.name in failed]
        return files

    steps = (archives, direct) if dataset.archive_first else (direct, archives)
    for step in steps:
        missing = step(missing)
    if missing:
        lines = [
            f"  {f.name}: " + ("; ".join(errors[f.name]) or "no source lists this file")
            for f in missing
        ]
        for d in created:  # deepest first; a directory holding anything stays
            with contextlib.suppress(OSError):
                d.rmdir()
        raise DownloadError(
            f"{dataset.name}: could not fetch {len(missing)} file(s) into {directory}; nothing "
            "unverified was left behind. Tried:\n"
            + "\n".join(lines)
            + "\n"
            + _by_hand(dataset, missing, directory)
        )
    return directory


def _missing_ancestors(directory: Path) -> list[Path]:
    """``directory`` and its ancestors that do not exist yet, deepest first."""
    out = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        out.append(d)
    return out


def _by_hand(dataset: DatasetSpec, missing: list[FileSpec], directory: Path) -> str:
    """How to install the missing files without this machine's network."""
    sources = []
    for f in missing:
        where = list(f.urls) + [
            f"{a.urls[0]} (member {a.members[f.name]})"
            for a in dataset.archives if f.name in a.members and a.urls
        ]  # fmt: skip
        sources.append(f"  {f.name} (sha256 {f.sha256[:12]}…): " + (" or ".join(where) or "?"))
    return (
        "To install them by hand: fetch these on a machine with internet,\n"
        + "\n".join(sources)
        + f"\nput them in {directory}, and check them with `python -m rnndrop.data.download "
        f"{dataset.name} --data-dir {directory} --verify-only`."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rnndrop.data.download NAME... [--data-dir DIR] [--verify-only] [--list]``."""
    parser = argparse.ArgumentParser(
        prog="python -m rnndrop.data.download",
        description="Download rnndrop's datasets (sha256-verified) or verify a local copy.",
    )
    parser.add_argument("names", nargs="*", help=f"datasets: {', '.join(REGISTRY)} or all")
    parser.add_argument("--data-dir", default=None, help="dataset directory or root above it")
    parser.add_argument("--verify-only", action="store_true", help="check, download nothing")
    parser.add_argument("--list", action="store_true", help="list the datasets and exit")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list or not args.names:
        for d in REGISTRY.values():
            print(f"{d.name:10s} {d.description} ({len(d.files)} files, sub-directory {d.subdir}/)")
        return 0
    names = list(REGISTRY) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    status = 0
    for name in names:
        try:
            path = fetch(name, args.data_dir, download=not args.verify_only, timeout=args.timeout)
            print(f"{name}: ok, {len(REGISTRY[name].files)} files verified in {path}")
        except DownloadError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())

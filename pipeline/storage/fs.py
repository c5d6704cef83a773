"""Paths on any filesystem: local folders, `file://`, `s3://`, `gs://` (through pyarrow.fs) and, for
reading only, `http(s)://` (the standard library).

Every place that reads or writes a dataset goes through `Location` (a folder) or `open_url` (one file), so
the same code serves a laptop's disk and an object store. Two facts shape the API:
- object stores have no atomic rename, so `Location.write_bytes` is atomic only as one whole object
  (a local write goes to a temporary name, is fsynced and renamed; a store's PUT appears whole or not
  at all); multi-part commits are made safe by a commit record written last (see `shards.py`);
- S3-compatible stores other than AWS need an endpoint: the `endpoint` argument, else the standard
  `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) environment variable.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
import urllib.request
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs
from clipforge.pipeline.errors import ClipforgeError
from clipforge.pipeline.storage.atomic import atomic_write

READ_ONLY_SCHEMES = ("http", "https")


def is_remote(url: str) -> bool:
    return "://" in str(url) and urlparse(str(url)).scheme not in ("file", "")


def is_url(value: str) -> bool:
    return isinstance(value, str) and "://" in value


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"allow_bucket_creation": False, "region": region or os.environ.get("AWS_DEFAULT_REGION")
                    or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(url: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URL."""
    url = str(url)
    if not is_url(url):
        return pafs.LocalFileSystem(), os.path.abspath(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), parsed.path
    if parsed.scheme == "s3":
        return _s3(endpoint or endpoint_from_env(), None), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in READ_ONLY_SCHEMES:
        raise ClipforgeError(f"{url}: http(s) locations can be read with open_url, not used as a folder")
    raise ClipforgeError(f"{url}: unsupported scheme {parsed.scheme!r} (use a local path, file://, s3:// or gs://)")


class Location:
    """A folder on some filesystem. Relative names use `/`."""

    def __init__(self, url: str | os.PathLike, endpoint: str | None = None):
        self.url = str(url).rstrip("/") if is_url(str(url)) else os.path.abspath(str(url))
        self.endpoint = endpoint
        self.fs, self.root = filesystem(self.url, endpoint)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __reduce__(self):   # pyarrow filesystems travel to Ray workers as the URL they came from
        return (Location, (self.url, self.endpoint))

    def path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def child_url(self, name: str) -> str:
        """The URL (or local path) of `name`, for readers that take URLs."""
        return f"{self.url}/{name}" if name else self.url

    def sub(self, name: str) -> "Location":
        return Location(self.child_url(name), self.endpoint)

    def makedirs(self, name: str = "") -> None:
        if self.local:
            os.makedirs(self.path(name), exist_ok=True)
        # object stores have no folders: a key's prefix exists once an object is written under it

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def size(self, name: str) -> int:
        info = self.fs.get_file_info(self.path(name))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.child_url(name))
        return int(info.size)

    def list(self, folder: str = "", suffix: str = "") -> list[str]:
        """Names (relative to `folder`) of the files directly in `folder`, sorted."""
        sel = pafs.FileSelector(self.path(folder), allow_not_found=True, recursive=False)
        names = [info.base_name for info in self.fs.get_file_info(sel) if info.type == pafs.FileType.File]
        return sorted(n for n in names if n.endswith(suffix))

    def walk(self, folder: str = "") -> list[str]:
        """Names (relative to the Location, with `/`) of every file under `folder`, sorted."""
        sel = pafs.FileSelector(self.path(folder), allow_not_found=True, recursive=True)
        root = self.path().rstrip("/") + "/"
        return sorted(info.path[len(root):] if info.path.startswith(root) else info.path
                      for info in self.fs.get_file_info(sel) if info.type == pafs.FileType.File)

    def sizes(self, folder: str = "") -> dict[str, int]:
        """{name relative to the Location: size} of the files directly in `folder`, from one listing
        (a few requests on an object store, instead of one per file)."""
        sel = pafs.FileSelector(self.path(folder), allow_not_found=True, recursive=False)
        prefix = f"{folder}/" if folder else ""
        return {prefix + info.base_name: int(info.size) for info in self.fs.get_file_info(sel)
                if info.type == pafs.FileType.File}

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open_input(self, name: str):
        """A random-access file (seek, read_at) on any filesystem."""
        return self.fs.open_input_file(self.path(name))

    def open_output(self, name: str):
        """A plain output stream; not atomic on its own (see `write_bytes` and the shard commit)."""
        if self.local:
            os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
            return open(self.path(name), "wb")
        return self.fs.open_output_stream(self.path(name))

    def write_bytes(self, name: str, data: bytes, sync_dir: bool = True) -> None:
        """Write one file so that readers see all of it or none of it. On a local disk the data is
        fsynced before the rename and the directory after it (`sync_dir=False` leaves the directory to a
        later write in the same folder that syncs it)."""
        if self.local:
            target = self.path(name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_write(target, data, sync_dir)
        else:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass
        except OSError as err:   # pyarrow reports a missing key on some stores as a plain OSError
            if self.exists(name):
                raise err


def as_location(value, endpoint: str | None = None) -> Location:
    """`value` itself when it is already a Location, else the Location of that path or URL."""
    return value if isinstance(value, Location) else Location(value, endpoint)


def open_url(url: str, mode: str = "rb", endpoint: str | None = None):
    """Open one file for reading by path or URL (local, file://, s3://, gs://, http(s)://)."""
    if mode != "rb":
        raise ValueError("open_url reads only; write through a Location")
    if is_url(url) and urlparse(url).scheme in READ_ONLY_SCHEMES:
        return urllib.request.urlopen(url, timeout=120)
    fs, path = filesystem(url, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        return open(path, "rb")
    return fs.open_input_file(path)


def register_webdataset_schemes(endpoint: str | None = None) -> None:
    """Let webdataset (and wids) open `s3://` and `gs://` shard URLs through pyarrow, with no CLI tools.

    webdataset picks an opener by URL scheme from `webdataset.gopen.gopen_schemes`; ours stream through
    the same filesystem code as the rest of clipforge (so `AWS_ENDPOINT_URL` works the same way).
    """
    import sys

    import webdataset  # noqa: F401 — makes the gopen module importable by name

    gopen_module = sys.modules["webdataset.gopen"]

    def opener(url, mode="rb", bufsize=8192, **kw):
        return open_url(url, "rb", endpoint)

    for scheme in ("s3", "gs", "gcs"):
        gopen_module.gopen_schemes[scheme] = opener


def cache_root() -> Path:
    """Where clipforge keeps local copies of remote files and working copies of remote runs:
    $CLIPFORGE_CACHE, else ~/.cache/clipforge."""
    return Path(os.environ.get("CLIPFORGE_CACHE") or Path.home() / ".cache" / "clipforge")


def local_copy(url: str, names: tuple[str, ...] = (), endpoint: str | None = None) -> Path:
    """A local path for `url`: the path itself when it is local; else a fresh copy in the cache of the
    remote file, or (with `names`) of those files of the remote folder. Each file is written whole."""
    if not is_remote(str(url)):
        return Path(url)
    source = Location(url, endpoint) if names else Location(str(url).rsplit("/", 1)[0], endpoint)
    target = cache_root() / "files" / hashlib.sha256(str(url).encode("utf-8")).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    for name in names or (str(url).rsplit("/", 1)[1],):
        if not source.exists(name):
            raise FileNotFoundError(source.child_url(name))
        atomic_write(target / name, source.read_bytes(name))
    return target if names else target / str(url).rsplit("/", 1)[1]

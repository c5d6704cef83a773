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

import base64
import functools
import http.client as http_client
import ipaddress
import logging
import os
import re
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from functools import lru_cache
from urllib.parse import quote, unquote, unquote_plus, urljoin, urlparse, urlsplit, urlunsplit

import pyarrow.fs as pafs

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
        raise ValueError(f"{url}: http(s) locations can be read with open_url, not used as a folder")
    raise ValueError(f"{url}: unsupported scheme {parsed.scheme!r} (use a local path, file://, s3:// or gs://)")


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
            tmp = f"{target}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            if sync_dir:
                fsync_dir(os.path.dirname(target))
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


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry lives in the directory's own blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some filesystems refuse fsync on a directory; the file data itself was fsynced
    finally:
        os.close(fd)


# --- fetching one remote file ------------------------------------------------------------------------
#
# `fetch` copies a video from a store or a web server that clipforge does not control, so it assumes the
# worst of it: a server may drip bytes forever, lie about (or exceed) its size, end a body early, or
# redirect to the cloud's metadata endpoint or another internal address. Each of these ends in a
# `FetchError` whose reason goes to the ledger, and no message ever shows a URL's credentials.

# Query parameters whose values are credentials (compared case-insensitively): presigned S3 and GCS URLs,
# Azure SAS (`sig`) and the usual API-key and token names.
SECRET_QUERY_PARAMS = frozenset(name.lower() for name in (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "sig", "token",
    "access_token", "key", "apikey", "api_key", "password", "GoogleAccessId", "X-Goog-Signature",
    "X-Goog-Credential", "X-Goog-Security-Token", "client_secret", "refresh_token", "id_token"))
REDACTED = "REDACTED"
MAX_REDIRECTS = 5
ALLOW_PRIVATE_REDIRECTS_ENV = "CLIPFORGE_ALLOW_PRIVATE_REDIRECTS"
_HTTP_CHUNK = 64 << 10    # at most this much per socket read, each under the remaining deadline
_STORE_CHUNK = 1 << 20    # pyarrow issues one ranged GET per read: bigger reads, fewer requests
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_RETRYABLE_HTTP = (408, 425, 429)   # besides 5xx
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")   # carrier NAT; some clouds' metadata live here

log = logging.getLogger(__name__)


def _redact_params(text: str) -> str:
    if not text or "=" not in text:
        return text
    pieces = []
    for piece in text.split("&"):
        name, sep, _value = piece.partition("=")
        if sep and unquote_plus(name).strip().lower() in SECRET_QUERY_PARAMS:
            piece = f"{name}={REDACTED}"
        pieces.append(piece)
    return "&".join(pieces)


def redact_url(url: str) -> str:
    """`url` fit to print: userinfo (`user:password@`) removed and the values of query (and fragment)
    parameters that carry credentials (`SECRET_QUERY_PARAMS`) replaced by "REDACTED". A plain path comes
    back unchanged; a URL too malformed to parse is still cleaned, by pattern."""
    text = str(url)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, _redact_params(parts.query),
                           _redact_params(parts.fragment)))
    except ValueError:   # e.g. an unbalanced "[" in the host: fall back to patterns
        text = re.sub(r"(://)[^/?#]*@", r"\1", text)
        return re.sub(r"([?&#;])([^=&#;]+)=([^&#;]*)",
                      lambda m: f"{m[1]}{m[2]}={REDACTED}" if unquote_plus(m[2]).strip().lower()
                      in SECRET_QUERY_PARAMS else m[0], text)


def _secrets_of(url: str) -> list[str]:
    """The raw URL and the secret strings inside it, longest first (for scrubbing exception texts)."""
    found = {url}
    try:
        parts = urlsplit(url)
        if parts.password:
            found.update({parts.password, unquote(parts.password)})
        for text in (parts.query, parts.fragment):
            for piece in text.split("&"):
                name, sep, value = piece.partition("=")
                if sep and value and unquote_plus(name).strip().lower() in SECRET_QUERY_PARAMS:
                    found.update({value, unquote_plus(value)})
    except ValueError:
        pass
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """An exception's text with the URL and its secrets taken out (http.client quotes a bad selector,
    pyarrow quotes paths...)."""
    for secret in _secrets_of(url):
        text = text.replace(secret, redact_url(url) if secret == url else REDACTED)
    return text


class FetchError(Exception):
    """A remote file could not be fetched. `reason` is one of schema.REASONS: "missing" (not there),
    "fetch_error" (transient: may work on a retry) or "fetch_refused" (a redirect clipforge will not
    follow). The message never carries credentials (see `redact_url`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Transient(Exception):
    """One attempt failed in a way another attempt may not (5xx, a body cut short)."""


class _Refused(Exception):
    """A redirect that must not be followed; the text says why."""


class _Deadline:
    """The wall-clock budget of one `fetch`. Besides telling the time left, it shuts down every socket
    registered with `watch` when the budget runs out, so no read (status line, headers, chunk sizes,
    body) can outlive it however slowly the server drips."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer: threading.Timer | None = None
        self._fired = False

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self._fired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._fired:
                self._socks.append(sock)
                if self._timer is None:
                    self._timer = threading.Timer(max(0.0, self.remaining()), self._fire)
                    self._timer.daemon = True
                    self._timer.start()
                return
        _shutdown(sock)

    def release(self) -> None:
        """Forget the sockets of an attempt that is over."""
        with self._lock:
            self._socks.clear()

    def close(self) -> None:
        with self._lock:
            self._socks.clear()
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            socks, self._socks = self._socks, []
        for sock in socks:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:   # the plain socket method: SSLSocket.shutdown would drop its SSL object under the reading thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass   # already closed


def _forbidden_address(ip: str) -> str | None:
    """What kind of non-public address `ip` is (None for a public one)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    elif addr.version == 6 and addr.sixtofour is not None and _forbidden_address(str(addr.sixtofour)):
        return "6to4-wrapped private"
    for kind, hit in (("unspecified", addr.is_unspecified), ("loopback", addr.is_loopback),
                      ("link-local", addr.is_link_local), ("multicast", addr.is_multicast),
                      ("private", addr.is_private), ("reserved", addr.is_reserved),
                      ("shared (carrier NAT)", addr.version == 4 and addr in _SHARED_ADDRESS_SPACE)):
        if hit:
            return kind
    return None


def _check_redirect_target(url: str) -> None:
    """Refuse (raise _Refused) a redirect target that is not http(s) or whose host resolves to any
    non-public address. Resolution only: nothing connects to the target here."""
    parts = urlsplit(url)
    if parts.scheme not in READ_ONLY_SCHEMES:
        raise _Refused(f"a redirect to a {parts.scheme or 'scheme-less'}: URL")
    host = parts.hostname
    if not host:
        raise _Refused("a redirect with no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):   # gaierror: transient
        kind = _forbidden_address(info[4][0])
        if kind:
            raise _Refused(f"a redirect to {host}, a {kind} address ({info[4][0]})")


class _GuardedConnection:
    """Mixed into http.client's connections: each connect is bounded by the deadline, its sockets are
    registered with it, and on a redirect hop the address actually connected to is checked again (a
    name may resolve differently the second time: DNS rebinding)."""

    def __init__(self, *args, deadline: _Deadline, check_peer: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._cf_deadline, self._cf_check_peer = deadline, check_peer
        self._create_connection = self._cf_create_connection

    def _cf_create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        left = self._cf_deadline.remaining()
        if left <= 0:
            raise TimeoutError("deadline passed before connecting")
        if not isinstance(timeout, (int, float)) or timeout <= 0 or timeout > left:
            timeout = left
        sock = socket.create_connection(address, timeout, source_address)
        self._cf_deadline.watch(sock)
        if self._cf_check_peer:
            peer = sock.getpeername()[0]
            kind = _forbidden_address(peer)
            if kind:
                sock.close()
                raise _Refused(f"a redirect to {address[0]}, which connected to a {kind} address ({peer})")
        return sock

    def connect(self):
        super().connect()
        self._cf_deadline.watch(self.sock)   # for https, the TLS socket that replaced the plain one


class _GuardedHTTPConnection(_GuardedConnection, http_client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnection, http_client.HTTPSConnection):
    pass


def _check_peer(req: urllib.request.Request) -> bool:
    # through a proxy the peer is the proxy: only the name check before the hop applies
    return bool(getattr(req, "cf_check_peer", False)) and not req.has_proxy() and not req._tunnel_host


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_GuardedHTTPConnection, deadline=self._deadline,
                                              check_peer=_check_peer(req)), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):
        kwargs = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(functools.partial(_GuardedHTTPSConnection, deadline=self._deadline,
                                              check_peer=_check_peer(req)), req, **kwargs)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects come back as HTTPError 3xx, to be checked and followed by `_open_http`."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, the Basic Authorization header value or None)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode("utf-8")).decode("ascii")
    return urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment)), f"Basic {token}"


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _allow_private(value: bool | None) -> bool:
    if value is not None:
        return bool(value)
    return os.environ.get(ALLOW_PRIVATE_REDIRECTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _open_http(url: str, deadline: _Deadline, allow_private: bool, max_redirects: int):
    """GET `url`, following at most `max_redirects` redirects that pass `_check_redirect_target`. Basic
    credentials from the URL go only to the origin they were given for. Returns the open response."""
    opener = urllib.request.build_opener(_NoRedirects(), _GuardedHTTPHandler(deadline),
                                         _GuardedHTTPSHandler(deadline))
    current, auth = _split_userinfo(url)
    hops = 0
    while True:
        req = urllib.request.Request(current, headers={"Accept-Encoding": "identity"})
        if auth:
            req.add_unredirected_header("Authorization", auth)
        req.cf_check_peer = hops > 0 and not allow_private
        left = deadline.remaining()
        if left <= 0:
            raise TimeoutError("deadline passed")
        try:
            return opener.open(req, timeout=left)
        except urllib.error.HTTPError as err:
            code, location = err.code, (err.headers.get("Location") if err.headers is not None else None)
            err.close()
            if code in (404, 410):
                raise FetchError("missing", f"{redact_url(url)}: HTTP {code}") from None
            if code in _REDIRECT_CODES and location:
                hops += 1
                if hops > max_redirects:
                    raise _Refused(f"more than {max_redirects} redirects") from None
                try:
                    location = quote(location.strip(), encoding="iso-8859-1", safe=string.punctuation)
                    target, target_auth = _split_userinfo(urljoin(current, location))
                    if not allow_private:
                        _check_redirect_target(target)
                    elif urlsplit(target).scheme not in READ_ONLY_SCHEMES:
                        raise _Refused(f"a redirect to a {urlsplit(target).scheme or 'scheme-less'}: URL")
                    auth = target_auth or (auth if _origin(target) == _origin(current) else None)
                except ValueError:   # e.g. a port out of range
                    raise _Refused("a redirect to an unusable URL") from None
                current = target
                continue
            if code >= 500 or code in _RETRYABLE_HTTP:
                raise _Transient(f"HTTP {code}") from None
            raise FetchError("fetch_error", f"{redact_url(url)}: HTTP {code}") from None
        except (ValueError, http_client.InvalidURL) as err:   # a space, a bad port: the URL is unusable
            if hops == 0:
                raise FetchError("bad_manifest_row", f"{redact_url(url)}: not a usable URL "
                                                     f"({_scrub(str(err), url)})") from None
            raise _Refused("a redirect to an unusable URL") from None


def _response_socket(resp):
    try:
        return resp.fp.raw._sock
    except AttributeError:
        return None


def _copy_http(url: str, tmp: str, max_bytes: int, deadline: _Deadline, allow_private: bool,
               max_redirects: int) -> int:
    resp = _open_http(url, deadline, allow_private, max_redirects)
    try:
        expected = resp.length   # Content-Length; None when chunked or absent
        if expected is not None and expected > max_bytes:
            raise FetchError("fetch_error", f"{redact_url(url)}: {expected} bytes (Content-Length) is over "
                                            f"the {max_bytes}-byte limit")
        sock = _response_socket(resp)
        written = 0
        with open(tmp, "wb") as out:
            while True:
                left = deadline.remaining()
                if left <= 0:
                    raise TimeoutError("deadline passed")
                if sock is not None:
                    try:
                        sock.settimeout(left)
                    except OSError:
                        pass   # closed at the end of the body; the read below returns b""
                chunk = resp.read1(_HTTP_CHUNK)   # one socket read, not a loop until 64 KiB arrive
                if deadline.expired():
                    raise TimeoutError("deadline passed")
                if not chunk:
                    break
                written += len(chunk)
                if written > max_bytes:
                    raise FetchError("fetch_error", f"{redact_url(url)}: over the {max_bytes}-byte limit")
                out.write(chunk)
        if expected is not None and written < expected:
            raise _Transient(f"got {written} of {expected} bytes")
        return written
    finally:
        resp.close()


def _copy_store(url: str, tmp: str, max_bytes: int, deadline: _Deadline, endpoint: str | None) -> int:
    """s3:// and gs:// through pyarrow. Its reads cannot be interrupted from here: the deadline is checked
    between reads of 1 MiB (a stalled read ends at the store client's own request timeout)."""
    fs, path = filesystem(url, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FetchError("missing", f"no such object: {redact_url(url)}")
    if info.type == pafs.FileType.Directory:
        raise FetchError("missing", f"{redact_url(url)} is a folder, not an object")
    expected = info.size
    if expected is not None and expected > max_bytes:
        raise FetchError("fetch_error", f"{redact_url(url)}: {expected} bytes is over the {max_bytes}-byte limit")
    written = 0
    with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
        while True:
            if deadline.expired():
                raise TimeoutError("deadline passed")
            chunk = src.read(_STORE_CHUNK)
            if deadline.expired():
                raise TimeoutError("deadline passed")
            if not chunk:
                break
            written += len(chunk)
            if written > max_bytes:
                raise FetchError("fetch_error", f"{redact_url(url)}: over the {max_bytes}-byte limit")
            out.write(chunk)
    if expected is not None and written < expected:
        raise _Transient(f"got {written} of {expected} bytes")
    return written


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fetch(url: str, dest: str, max_bytes: int = 4 << 30, timeout_s: float = 120.0, retries: int = 3,
          endpoint: str | None = None, *, allow_private_redirects: bool | None = None,
          max_redirects: int = MAX_REDIRECTS) -> int:
    """Copy a remote file (s3://, gs://, http(s)://) to the local path `dest`; returns its size.

    `timeout_s` is the wall-clock budget of the whole call, retries and back-off included; for http(s) it
    is enforced at the socket, so a server that drips bytes cannot stretch it. A file over `max_bytes`
    is refused from its Content-Length (or object size) before any byte is read, and cut off while
    streaming otherwise; a body shorter than its declared size is an error, never a file. `dest` is
    written under a temporary name and renamed when complete; after a failure it does not exist.

    http(s): user:password@ in the URL is sent as Basic credentials, to that origin only. The URL itself
    is fetched as given, but at most `max_redirects` redirects are followed, only to http(s), and never
    to a host that resolves to a loopback, private, link-local (cloud metadata), unspecified, multicast
    or reserved address, unless `allow_private_redirects` (default: the environment variable
    CLIPFORGE_ALLOW_PRIVATE_REDIRECTS=1).

    Raises FetchError with reason "missing" when the object is really not there (HTTP 404/410, no such
    key), "fetch_refused" for a redirect it will not follow, "bad_manifest_row" for an http(s) URL that
    cannot be requested at all (a space, a bad port), and "fetch_error" (transient) for a file
    over `max_bytes`, an HTTP error, or what the retries did not fix: timeouts, 5xx, connection errors,
    bodies cut short. Messages and log lines show the URL through `redact_url`.
    """
    url = str(url)
    shown = redact_url(url)
    allow = _allow_private(allow_private_redirects)
    over_http = urlparse(url).scheme in READ_ONLY_SCHEMES
    deadline = _Deadline(timeout_s)
    tmp = f"{dest}.part{os.getpid()}-{threading.get_ident()}"
    attempts = max(1, int(retries))
    last = ""
    done = False
    try:
        for attempt in range(attempts):
            try:
                if over_http:
                    size = _copy_http(url, tmp, max_bytes, deadline, allow, max_redirects)
                else:
                    size = _copy_store(url, tmp, max_bytes, deadline, endpoint)
                os.replace(tmp, dest)
                done = True
                return size
            except _Refused as err:
                raise FetchError("fetch_refused", f"{shown}: refused {_scrub(str(err), url)}") from None
            except (ValueError, http_client.InvalidURL) as err:
                if not over_http:
                    raise
                raise FetchError("bad_manifest_row", f"{shown}: not a usable URL ({_scrub(str(err), url)})") from None
            except (OSError, http_client.HTTPException, _Transient) as err:
                if deadline.expired():
                    raise FetchError("fetch_error", f"{shown}: took longer than {timeout_s:g} s") from None
                last = _scrub(str(err) if isinstance(err, _Transient) else f"{type(err).__name__}: {err}", url)
                log.debug("fetch %s: attempt %d of %d failed: %s", shown, attempt + 1, attempts, last)
            finally:
                deadline.release()
            pause = min(2.0 ** attempt * 0.2, 5.0)
            if attempt + 1 == attempts or deadline.remaining() <= pause:
                break
            time.sleep(pause)
        raise FetchError("fetch_error", f"{shown}: {last} ({attempt + 1} attempt{'s' * (attempt > 0)})")
    finally:
        deadline.close()
        if not done:
            _remove(tmp)
            _remove(dest)


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

"""Fetching one remote file (s3://, gs://, http(s)://) to a local path.

(One file over 400 lines on purpose: every defence against a hostile server is here, so it can be
audited in one reading.)

`fetch` copies a video from a store or a web server that clipforge does not control, so it assumes the
worst of it: a server may drip bytes forever, lie about (or exceed) its size, end a body early, or
redirect to the cloud's metadata endpoint or another internal address. Each of these ends in a
`FetchError` whose reason goes to the ledger, and no message ever shows a URL's credentials
(`clipforge.pipeline.storage.redact`).
"""
from __future__ import annotations

import base64
import functools
import http.client as http_client
import ipaddress
import logging
import os
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import quote, unquote, urljoin, urlparse, urlsplit, urlunsplit

import pyarrow.fs as pafs

from clipforge.pipeline.errors import InputFailure
from clipforge.pipeline.storage.fs import READ_ONLY_SCHEMES, filesystem
from clipforge.pipeline.storage.redact import redact_url, scrub

MAX_REDIRECTS = 5
ALLOW_PRIVATE_REDIRECTS_ENV = "CLIPFORGE_ALLOW_PRIVATE_REDIRECTS"
_HTTP_CHUNK = 64 << 10    # at most this much per socket read, each under the remaining deadline
_STORE_CHUNK = 1 << 20    # pyarrow issues one ranged GET per read: bigger reads, fewer requests
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_RETRYABLE_HTTP = (408, 425, 429)   # besides 5xx
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")   # carrier NAT; some clouds' metadata live here

log = logging.getLogger(__name__)


class FetchError(InputFailure):
    """A remote file could not be fetched. `reason` is one of schema.REASONS: "missing" (not there),
    "fetch_error" (transient: may work on a retry) or "fetch_refused" (a redirect clipforge will not
    follow). The message never carries credentials (see `redact_url`)."""


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
                                                     f"({scrub(str(err), url)})") from None
            raise _Refused("a redirect to an unusable URL") from None


def _response_socket(resp):
    try:
        return resp.fp.raw._sock
    except AttributeError:
        return None


def _append(out, chunk: bytes, written: int, max_bytes: int, url: str) -> int:
    """Write one chunk of a download, refusing to go past `max_bytes`; returns the bytes written so far."""
    written += len(chunk)
    if written > max_bytes:
        raise FetchError("fetch_error", f"{redact_url(url)}: over the {max_bytes}-byte limit")
    out.write(chunk)
    return written


def _check_complete(written: int, expected: int | None) -> None:
    """A body shorter than its declared size is a transient failure, never a file."""
    if expected is not None and written < expected:
        raise _Transient(f"got {written} of {expected} bytes")


def _copy_chunks(read, tmp: str, max_bytes: int, deadline: _Deadline, url: str, expected: int | None) -> int:
    """Copy what `read()` returns to `tmp` until it returns b"", checking the deadline before and after
    every read, the size limit and, at the end, the declared size."""
    written = 0
    with open(tmp, "wb") as out:
        while True:
            if deadline.expired():
                raise TimeoutError("deadline passed")
            chunk = read()
            if deadline.expired():
                raise TimeoutError("deadline passed")
            if not chunk:
                break
            written = _append(out, chunk, written, max_bytes, url)
    _check_complete(written, expected)
    return written


def _copy_http(url: str, tmp: str, max_bytes: int, deadline: _Deadline, allow_private: bool,
               max_redirects: int) -> int:
    resp = _open_http(url, deadline, allow_private, max_redirects)
    try:
        expected = resp.length   # Content-Length; None when chunked or absent
        if expected is not None and expected > max_bytes:
            raise FetchError("fetch_error", f"{redact_url(url)}: {expected} bytes (Content-Length) is over "
                                            f"the {max_bytes}-byte limit")
        sock = _response_socket(resp)

        def read() -> bytes:
            if sock is not None:
                try:
                    sock.settimeout(max(deadline.remaining(), 1e-3))
                except OSError:
                    pass   # closed at the end of the body; the read below returns b""
            return resp.read1(_HTTP_CHUNK)   # one socket read, not a loop until 64 KiB arrive

        return _copy_chunks(read, tmp, max_bytes, deadline, url, expected)
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
    with fs.open_input_stream(path) as src:
        return _copy_chunks(lambda: src.read(_STORE_CHUNK), tmp, max_bytes, deadline, url, expected)


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
                raise FetchError("fetch_refused", f"{shown}: refused {scrub(str(err), url)}") from None
            except (ValueError, http_client.InvalidURL) as err:
                if not over_http:
                    raise
                raise FetchError("bad_manifest_row", f"{shown}: not a usable URL ({scrub(str(err), url)})") from None
            except (OSError, http_client.HTTPException, _Transient) as err:
                if deadline.expired():
                    raise FetchError("fetch_error", f"{shown}: took longer than {timeout_s:g} s") from None
                last = scrub(str(err) if isinstance(err, _Transient) else f"{type(err).__name__}: {err}", url)
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


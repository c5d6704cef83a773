"""`fetch` against servers that misbehave: drips, short bodies, lies about size, redirects into the
private network or to other schemes, and URLs that carry credentials. Real HTTP servers on 127.0.0.1,
each stopped after its test; every handler ends by itself within seconds."""
import base64
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipforge.pipeline.schema import REASONS, TRANSIENT
from clipforge.pipeline.storage.fetch import FetchError, fetch
from clipforge.pipeline.storage.redact import redact_url

BODY = bytes(range(256)) * 40   # 10 KiB


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802 — http.server's naming
        path = self.path.split("?", 1)[0]
        self.server.hits.append((path, dict(self.headers)))
        route = self.server.routes.get(path)
        if route is None:
            for prefix, fn in self.server.routes.items():
                if prefix.endswith("*") and path.startswith(prefix[:-1]):
                    route = fn
                    break
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self, path)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client gave up: that is the point of most of these tests

    def log_message(self, *args):
        pass


def _drip(handler, data: bytes, every: float = 0.2, at_most: int = 40):
    """Send `data` one byte at a time, ending after `at_most` bytes (so the server always finishes)."""
    for b in data[:at_most]:
        handler.wfile.write(bytes([b]))
        handler.wfile.flush()
        time.sleep(every)


def _send(handler, body: bytes, status: int = 200, length: int | None = None):
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def _redirect(to: str, status: int = 302):
    def route(handler, path):
        handler.send_response(status)
        handler.send_header("Location", to(handler) if callable(to) else to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


@pytest.fixture
def serve():
    """serve(routes) -> (server, base URL): a ThreadingHTTPServer on 127.0.0.1, shut down after the test."""
    servers = []

    def start(routes: dict):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.routes, server.hits = routes, []
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _fetch_error(*args, **kwargs) -> tuple[FetchError, float]:
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(*args, **kwargs)
    return info.value, time.monotonic() - start


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_the_reasons_are_in_the_closed_vocabulary():
    assert {"missing", "fetch_error", "fetch_refused"} <= set(REASONS)
    assert "fetch_error" in TRANSIENT and "fetch_refused" not in TRANSIENT


def test_a_drip_feed_body_ends_at_the_deadline(serve, tmp_path):
    def drip(handler, path):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        _drip(handler, BODY)
    _, base = serve({"/drip.mp4": drip})
    err, took = _fetch_error(f"{base}/drip.mp4", str(tmp_path / "v.mp4"), timeout_s=2.0)
    assert err.reason == "fetch_error" and "took longer than 2 s" in str(err), str(err)
    assert took < 3.5, took
    assert _leftovers(tmp_path) == []


def test_a_drip_feed_status_line_and_headers_end_at_the_deadline(serve, tmp_path):
    """The socket timeout alone is per read: only the watchdog bounds headers sent a byte at a time."""
    def drip_headers(handler, path):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        _drip(handler, b"a" * 40)
    _, base = serve({"/slow-headers.mp4": drip_headers})
    err, took = _fetch_error(f"{base}/slow-headers.mp4", str(tmp_path / "v.mp4"), timeout_s=2.0)
    assert err.reason == "fetch_error" and "took longer than 2 s" in str(err), str(err)
    assert took < 3.5, took


def test_a_body_shorter_than_its_content_length_is_never_a_file(serve, tmp_path):
    server, base = serve({"/short.mp4": lambda h, p: _send(h, BODY[:10], length=1000)})
    dest = tmp_path / "v.mp4"
    dest.write_bytes(b"stale")   # whatever was there must not survive as if it were this URL's file
    err, took = _fetch_error(f"{base}/short.mp4", str(dest), timeout_s=10.0, retries=2)
    assert err.reason == "fetch_error" and "got 10 of 1000 bytes" in str(err), str(err)
    assert len(server.hits) == 2   # transient: retried
    assert _leftovers(tmp_path) == []


def test_a_content_length_over_the_limit_is_refused_before_reading(serve, tmp_path):
    def big(handler, path):
        handler.send_response(200)
        handler.send_header("Content-Length", "10000")
        handler.end_headers()
        handler.wfile.write(BODY[:100])
        _drip(handler, BODY, every=0.2, at_most=15)
    _, base = serve({"/big.mp4": big})
    err, took = _fetch_error(f"{base}/big.mp4", str(tmp_path / "v.mp4"), max_bytes=1000, timeout_s=5.0)
    assert err.reason == "fetch_error" and "10000 bytes (Content-Length)" in str(err), str(err)
    assert took < 1.0, took
    assert _leftovers(tmp_path) == []


def test_a_body_without_length_is_cut_at_the_limit(serve, tmp_path):
    def unsized(handler, path):
        handler.send_response(200)
        handler.end_headers()   # HTTP/1.0, no Content-Length: the body runs to the close
        handler.wfile.write(BODY)
    _, base = serve({"/unsized.mp4": unsized})
    err, _ = _fetch_error(f"{base}/unsized.mp4", str(tmp_path / "v.mp4"), max_bytes=1000, timeout_s=5.0)
    assert err.reason == "fetch_error" and "over the 1000-byte limit" in str(err)
    assert _leftovers(tmp_path) == []


def test_a_good_body_arrives_whole(serve, tmp_path):
    _, base = serve({"/ok.mp4": lambda h, p: _send(h, BODY)})
    dest = tmp_path / "v.mp4"
    assert fetch(f"{base}/ok.mp4", str(dest), timeout_s=5.0) == len(BODY)
    assert dest.read_bytes() == BODY and _leftovers(tmp_path) == ["v.mp4"]


def test_a_redirect_to_the_metadata_endpoint_is_refused_without_connecting(serve, tmp_path):
    server, base = serve({"/meta.mp4": _redirect("http://169.254.169.254/latest/meta-data/")})
    err, took = _fetch_error(f"{base}/meta.mp4", str(tmp_path / "v.mp4"), timeout_s=5.0)
    assert err.reason == "fetch_refused", str(err)
    assert "169.254.169.254" in str(err) and "link-local" in str(err)
    assert "connected" not in str(err)   # refused by the name check, before any connection
    assert took < 1.0, took   # no connection was tried (it would hang or fail as a fetch_error)
    assert len(server.hits) == 1 and _leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/video.mp4", "data:,hello"])
def test_a_redirect_to_another_scheme_is_refused(serve, tmp_path, target):
    _, base = serve({"/other.mp4": _redirect(target)})
    for allow in (False, True):   # not even when private redirects are allowed
        err, took = _fetch_error(f"{base}/other.mp4", str(tmp_path / "v.mp4"), timeout_s=5.0,
                                 allow_private_redirects=allow)
        assert err.reason == "fetch_refused" and "redirect to a" in str(err), str(err)
        assert took < 1.0
    assert _leftovers(tmp_path) == []


def test_a_redirect_to_loopback_is_refused_unless_allowed(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPFORGE_ALLOW_PRIVATE_REDIRECTS", raising=False)
    second, base2 = serve({"/video.mp4": lambda h, p: _send(h, BODY)})
    _, base = serve({"/to-second.mp4": _redirect(f"{base2}/video.mp4")})
    dest = tmp_path / "v.mp4"
    err, took = _fetch_error(f"{base}/to-second.mp4", str(dest), timeout_s=5.0)
    assert err.reason == "fetch_refused" and "loopback" in str(err) and "connected" not in str(err), str(err)
    assert second.hits == [] and _leftovers(tmp_path) == []

    assert fetch(f"{base}/to-second.mp4", str(dest), timeout_s=5.0, allow_private_redirects=True) == len(BODY)
    assert dest.read_bytes() == BODY and len(second.hits) == 1

    dest.unlink()
    monkeypatch.setenv("CLIPFORGE_ALLOW_PRIVATE_REDIRECTS", "1")
    assert fetch(f"{base}/to-second.mp4", str(dest), timeout_s=5.0) == len(BODY)
    err, _ = _fetch_error(f"{base}/to-second.mp4", str(dest), timeout_s=5.0, allow_private_redirects=False)
    assert err.reason == "fetch_refused"


def test_the_given_url_itself_may_be_private(serve, tmp_path):
    """Only redirect targets are checked: a manifest may point at an internal server."""
    _, base = serve({"/ok.mp4": lambda h, p: _send(h, BODY)})
    assert fetch(f"{base}/ok.mp4", str(tmp_path / "v.mp4"), timeout_s=5.0) == len(BODY)


def test_at_most_five_redirects_are_followed(serve, tmp_path):
    def hop(handler, path):
        n = int(path.rsplit("/", 1)[1])
        if n == 0:
            _send(handler, BODY)
        else:
            _redirect(f"/hop/{n - 1}", status=307)(handler, path)
    server, base = serve({"/hop/*": hop})
    dest = tmp_path / "v.mp4"
    assert fetch(f"{base}/hop/5", str(dest), timeout_s=5.0, allow_private_redirects=True) == len(BODY)
    assert len(server.hits) == 6
    server.hits.clear()
    err, _ = _fetch_error(f"{base}/hop/6", str(dest), timeout_s=5.0, allow_private_redirects=True)
    assert err.reason == "fetch_refused" and "more than 5 redirects" in str(err), str(err)
    assert len(server.hits) == 6 and _leftovers(tmp_path) == []


def test_redact_url():
    url = ("https://alice:s3cr3t@bucket.s3.amazonaws.com/v/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           "&x-amz-credential=AKIAEXAMPLE%2F20240101&X-Amz-Signature=abcdef0123&X-Amz-Security-Token=TOK"
           "&width=640")
    shown = redact_url(url)
    for secret in ("alice", "s3cr3t", "AKIAEXAMPLE", "abcdef0123", "TOK"):
        assert secret not in shown, shown
    assert shown == ("https://bucket.s3.amazonaws.com/v/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                     "&x-amz-credential=REDACTED&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED"
                     "&width=640")
    assert redact_url("https://h/x?GoogleAccessId=me&Signature=zz&sig=1&Token=2&ACCESS_TOKEN=3&key=4"
                      "&apikey=5&api_key=6&password=7&X-Goog-Signature=8&X-Goog-Credential=9&keep=10") == (
        "https://h/x?GoogleAccessId=REDACTED&Signature=REDACTED&sig=REDACTED&Token=REDACTED"
        "&ACCESS_TOKEN=REDACTED&key=REDACTED&apikey=REDACTED&api_key=REDACTED&password=REDACTED"
        "&X-Goog-Signature=REDACTED&X-Goog-Credential=REDACTED&keep=10")
    assert redact_url("http://u:p@[::1/x?token=abc") == "http://[::1/x?token=REDACTED"   # unparsable host
    assert redact_url("s3://bucket/key.mp4") == "s3://bucket/key.mp4"
    assert redact_url("/data/videos/a?b.mp4") == "/data/videos/a?b.mp4"


def test_credentials_are_used_but_never_shown(serve, tmp_path, caplog):
    caplog.set_level("DEBUG", logger="clipforge.pipeline.storage.fetch")
    server, base = serve({"/ok.mp4": lambda h, p: _send(h, BODY),
                          "/flaky.mp4": lambda h, p: h.send_error(503)})
    authed = base.replace("http://", "http://user:pw@")
    err, _ = _fetch_error(f"{authed}/missing.mp4?X-Amz-Security-Token=SECRET", str(tmp_path / "v.mp4"),
                          timeout_s=5.0)
    assert err.reason == "missing"
    assert "pw" not in str(err) and "SECRET" not in str(err) and "user" not in str(err), str(err)
    basic = "Basic " + base64.b64encode(b"user:pw").decode()
    assert server.hits[-1][1].get("Authorization") == basic   # used for the request

    err, _ = _fetch_error(f"{authed}/flaky.mp4?sig=SECRET", str(tmp_path / "v.mp4"), timeout_s=5.0, retries=2)
    assert err.reason == "fetch_error" and "HTTP 503" in str(err)
    assert "pw" not in str(err) and "SECRET" not in str(err), str(err)
    assert caplog.records and not any("SECRET" in r.getMessage() or "user:pw" in r.getMessage()
                                      for r in caplog.records)

    assert fetch(f"{authed}/ok.mp4", str(tmp_path / "v.mp4"), timeout_s=5.0) == len(BODY)


def test_an_unusable_url_shows_no_secret_either(serve, tmp_path):
    """http.client quotes the request line of a URL it cannot send: the secret must be scrubbed from it."""
    _, base = serve({})
    authed = base.replace("http://", "http://user:pw@")
    err, _ = _fetch_error(f"{authed}/a b.mp4?token=SECRETX", str(tmp_path / "v.mp4"), timeout_s=5.0)
    assert err.reason == "bad_manifest_row" and "not a usable URL" in str(err), str(err)
    assert "SECRETX" not in str(err) and "pw" not in str(err), str(err)


def test_credentials_stay_with_their_origin_on_a_redirect(serve, tmp_path):
    second, base2 = serve({"/video.mp4": lambda h, p: _send(h, BODY)})
    first, base = serve({"/elsewhere.mp4": _redirect(f"{base2}/video.mp4"),
                         "/here.mp4": _redirect("/video.mp4"),
                         "/video.mp4": lambda h, p: _send(h, BODY)})
    authed = base.replace("http://", "http://user:pw@")
    dest = str(tmp_path / "v.mp4")
    assert fetch(f"{authed}/elsewhere.mp4", dest, timeout_s=5.0, allow_private_redirects=True) == len(BODY)
    assert "Authorization" in first.hits[-1][1] and "Authorization" not in second.hits[-1][1]
    assert fetch(f"{authed}/here.mp4", dest, timeout_s=5.0, allow_private_redirects=True) == len(BODY)
    assert first.hits[-1][0] == "/video.mp4" and "Authorization" in first.hits[-1][1]


@pytest.mark.parametrize("status,reason,tries", [(404, "missing", 1), (410, "missing", 1),
                                                 (503, "fetch_error", 3), (403, "fetch_error", 1)])
def test_http_status_reasons(serve, tmp_path, status, reason, tries):
    server, base = serve({"/x.mp4": lambda h, p: h.send_error(status)})
    err, _ = _fetch_error(f"{base}/x.mp4", str(tmp_path / "v.mp4"), timeout_s=10.0, retries=3)
    assert err.reason == reason and f"HTTP {status}" in str(err)
    assert len(server.hits) == tries


def test_a_refused_connection_is_a_transient_fetch_error(tmp_path):
    import socket
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err, took = _fetch_error(f"http://127.0.0.1:{port}/v.mp4", str(tmp_path / "v.mp4"), timeout_s=5.0, retries=2)
    assert err.reason == "fetch_error" and "2 attempts" in str(err) and took < 3.0


def test_a_redirect_hop_checks_the_address_it_really_connected_to(serve):
    """A name can resolve to a public address for the check and to a private one for the connection
    (DNS rebinding): the connection of a redirect hop checks its peer before sending anything."""
    from clipforge.pipeline.storage.fetch import _Deadline, _GuardedHTTPConnection, _Refused
    server, base = serve({"/ok.mp4": lambda h, p: _send(h, BODY)})
    port = server.server_address[1]
    deadline = _Deadline(5.0)
    try:
        hop = _GuardedHTTPConnection("127.0.0.1", port, timeout=5.0, deadline=deadline, check_peer=True)
        with pytest.raises(_Refused, match="connected to a loopback address"):
            hop.request("GET", "/ok.mp4")
        hop.close()
        given = _GuardedHTTPConnection("127.0.0.1", port, timeout=5.0, deadline=deadline, check_peer=False)
        given.request("GET", "/ok.mp4")
        assert given.getresponse().read() == BODY
        given.close()
    finally:
        deadline.close()
    assert [path for path, _ in server.hits] == ["/ok.mp4"]   # the refused hop sent no request

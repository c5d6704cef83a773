"""URLs fit to print and to store: credentials never leave the process in a message, a sample's source,
the index or the ledger. `redact_url` cleans a URL; `scrub` takes a URL's secrets out of any text (an
exception's message quoting it).
"""
from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

# Query parameters whose values are credentials (compared case-insensitively): presigned S3 and GCS URLs,
# Azure SAS (`sig`) and the usual API-key and token names.
SECRET_QUERY_PARAMS = frozenset(name.lower() for name in (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "sig", "token",
    "access_token", "key", "apikey", "api_key", "password", "GoogleAccessId", "X-Goog-Signature",
    "X-Goog-Credential", "X-Goog-Security-Token", "client_secret", "refresh_token", "id_token"))
REDACTED = "REDACTED"


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


def secrets_of(url: str) -> list[str]:
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


def scrub(text: str, url: str) -> str:
    """An exception's text with the URL and its secrets taken out (http.client quotes a bad selector,
    pyarrow quotes paths...)."""
    for secret in secrets_of(url):
        text = text.replace(secret, redact_url(url) if secret == url else REDACTED)
    return text

"""Where a tokenizer comes from, as every command names it: one string for each kind.

    image:  DIR                  a clipforge image tokenizer folder (config.json, weights.pt)
            icetk:PATH[#16]      icetk's ice_image.pt (or the folder holding it), compression 8 or 16
    text:   FILE                 a clipforge sentencepiece model
            icetk:PATH           icetk's ice_text.model (or the folder holding it)

Paths may be local or URLs (a remote tokenizer is copied to the cache first). The same string is what
dataset.json and a run's latest.json record, so a dataset or a run reopens its own tokenizers.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from clipforge.pipeline.errors import ClipforgeError

ICETK = "icetk:"
IMAGE_FILES = ("config.json", "weights.pt")         # a clipforge image tokenizer folder


def is_icetk(spec) -> bool:
    return str(spec).startswith(ICETK)


def split_spec(spec) -> tuple[str, int]:
    """(location, compression) of an icetk spec ("icetk:PATH#16" -> ("PATH", 16); no "#": 8)."""
    body = str(spec)[len(ICETK):]
    location, _, compression = body.partition("#")
    if compression and compression not in ("4", "8", "16"):
        raise ClipforgeError(f"{spec}: icetk compression must be 4, 8 or 16, not {compression!r}")
    return location, int(compression or 8)


def open_image_tokenizer(spec, device=None, dtype: str = "float32", **options):
    """An image tokenizer (`encode`/`decode`, `tokenizer_id`, `sha256`, `tokens_hw`, ...) from its spec."""
    if is_icetk(spec):
        from clipforge.tokenizer.icetk import IceImageTokenizer
        location, compression = split_spec(spec)
        return IceImageTokenizer.load(fetch(location, "icetk-image"), device=device, dtype=dtype,
                                      compression=compression, **options)
    from clipforge.tokenizer.image import ImageTokenizer
    return ImageTokenizer.load(fetch(spec, "image"), device=device, dtype=dtype, **options)


def open_text_tokenizer(spec):
    if is_icetk(spec):
        from clipforge.tokenizer.icetk import IceTextTokenizer
        return IceTextTokenizer(fetch(split_spec(spec)[0], "icetk-text"))
    from clipforge.tokenizer.text import TextTokenizer
    return TextTokenizer(fetch(spec, "text"))


def fetch(location: str, kind: str) -> Path:
    """A local path for a tokenizer location (a remote one is copied to the cache once per URL)."""
    from clipforge.pipeline.storage.fs import is_remote, local_copy

    if not is_remote(str(location)):
        return Path(location).expanduser()
    if kind == "image":
        return local_copy(location, IMAGE_FILES)
    icetk_name = {"icetk-image": "ice_image.pt", "icetk-text": "ice_text.model"}.get(kind)
    if icetk_name and not str(location).endswith((".pt", ".model")):     # icetk's folder on object storage
        return local_copy(location, (icetk_name,)) / icetk_name
    return local_copy(location)


def localised(spec, kind: str) -> str:
    """`spec` naming a local copy (a remote tokenizer is fetched to the cache first)."""
    if is_icetk(spec):
        return with_location(spec, str(fetch(split_spec(spec)[0], f"icetk-{kind}")))
    return str(fetch(spec, kind))


def with_location(spec, location: str) -> str:
    """`spec` pointing somewhere else (same flavour and compression)."""
    if not is_icetk(spec):
        return str(location)
    _, compression = split_spec(spec)
    return f"{ICETK}{location}" + (f"#{compression}" if compression != 8 else "")


def absolute_spec(spec) -> str:
    """The spec with an absolute local path (URLs unchanged), for dataset.json and run records."""
    location = split_spec(spec)[0] if is_icetk(spec) else str(spec)
    if "://" not in location:
        location = os.path.abspath(os.path.expanduser(location))
    return with_location(spec, location)


def identity_file(spec, kind: str) -> Path:
    """The local file whose sha256 identifies the tokenizer (what dataset.json pins)."""
    if is_icetk(spec):
        from clipforge.tokenizer.icetk import IMAGE_FILE, TEXT_FILE, icetk_file
        return icetk_file(fetch(split_spec(spec)[0], f"icetk-{kind}"), IMAGE_FILE if kind == "image" else TEXT_FILE)
    path = fetch(spec, kind)
    return path / IMAGE_FILES[1] if kind == "image" else path


def copy_into(spec, kind: str, folder: Path) -> str:
    """Copy a tokenizer into `folder` (a run's tokenizers/) and return its spec relative to the folder's
    parent. icetk's 400+ MB image file is hard-linked when it can be."""
    if is_icetk(spec):
        source = identity_file(spec, kind)
        target = folder / source.name
        folder.mkdir(parents=True, exist_ok=True)
        if source.resolve() != target.resolve():
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        return with_location(spec, f"{folder.name}/{target.name}")
    if kind == "image":
        source, target = fetch(spec, kind), folder / "image"
        target.mkdir(parents=True, exist_ok=True)
        for name in IMAGE_FILES:
            if (source / name).resolve() != (target / name).resolve():
                shutil.copy2(source / name, target / name)
        return f"{folder.name}/image"
    source, target = fetch(spec, kind), folder / "text.model"
    folder.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        shutil.copy2(source, target)
    return f"{folder.name}/text.model"


def relative_to(spec, base: str) -> str:
    """A spec recorded relative to a dataset or run folder, made usable from here."""
    location = split_spec(spec)[0] if is_icetk(spec) else str(spec)
    from clipforge.pipeline.storage.fs import is_remote
    if is_remote(location) or Path(location).is_absolute():
        return str(spec)
    return with_location(spec, f"{str(base).rstrip('/')}/{location}")

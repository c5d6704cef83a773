"""The synthetic corpus: real, decodable H.264 files whose pixels match the manifest's ground truth."""
import hashlib
import os
import re

import av
import numpy as np
import pandas as pd
import pytest

from clipforge.pipeline.video.synth import (BROKEN_KINDS, COLORS, DIRECTIONS, SHAPES, SynthConfig, make_caption, make_dirty,
                            parse_combinations, parse_sizes, plan_synthetic_video, render_frame, write_synthetic_corpus)

COLUMNS = ["id", "video", "caption", "color", "shape", "direction", "fps", "seconds", "width", "height", "broken"]
CONFIG = SynthConfig(videos=6, seed=3, max_seconds=2.0, dirty_captions=0.5, broken=len(BROKEN_KINDS))
# Measured over 80 frames: the median shape colour after yuv420p + x264 (crf 23) is within 16 of the palette
# per channel, and the second-nearest palette colour is >= 79 away; 40 leaves margin on both sides.
COLOR_TOL = 40
# Measured centroid error <= 0.08 * radius (chroma blur and x264 ringing at the edges).
CENTROID_TOL = 0.25
CLEAN = re.compile(r"[A-Za-z]+(?:,? [A-Za-z]+)*")   # what make_caption produces, and nothing else


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    calls = []
    path = write_synthetic_corpus(tmp_path_factory.mktemp("synth"), CONFIG, progress=lambda i, n: calls.append((i, n)))
    return path, pd.read_parquet(path), calls


def _decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.width, stream.height, stream.average_rate, stream.format.name)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return info, frames


def _shape_pixels(frame):
    """Mask of the shape: pixels far from the background, which is the frame's median colour."""
    f = frame.astype(np.float64)
    background = np.median(f.reshape(-1, 3), axis=0)
    return np.abs(f - background).sum(-1) > 90


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_manifest(corpus):
    path, df, calls = corpus
    n = CONFIG.videos + CONFIG.broken
    assert path.name == "manifest.parquet"
    assert list(df.columns) == COLUMNS
    assert len(df) == n
    assert df["id"].tolist() == [f"synth-{i:06d}" for i in range(n)]
    assert df["broken"].tolist() == [False] * CONFIG.videos + [True] * CONFIG.broken
    assert set(df["color"]) <= set(COLORS) and set(df["shape"]) <= set(SHAPES)
    assert set(df["direction"]) <= set(DIRECTIONS)
    assert set(df["fps"]) <= set(CONFIG.fps_choices)
    assert df["seconds"].between(CONFIG.min_seconds - 0.05, CONFIG.max_seconds + 0.05).all()
    assert all(p.startswith("/") and p.endswith(f"{i:06d}.mp4") for i, p in enumerate(df["video"]))
    assert calls == [(i + 1, n) for i in range(n)]
    # exactly round(0.5 * 6) good videos get a dirty caption; clean ones name their colour
    good = df[~df["broken"]]
    clean = [bool(CLEAN.fullmatch(c)) and not c.startswith("The video") for c in good["caption"]]
    assert sum(not c for c in clean) == 3
    for ok, caption, color in zip(clean, good["caption"], good["color"]):
        if ok:
            assert color in caption.lower()


def test_videos_match_ground_truth(corpus):
    _, df, _ = corpus
    palette = np.array(list(COLORS.values()), np.float64)
    for i, row in df[~df["broken"]].iterrows():
        plan = plan_synthetic_video(CONFIG, i)
        (codec, width, height, rate, pix_fmt), frames = _decode(row["video"])
        assert (codec, pix_fmt) == ("h264", "yuv420p")
        assert (width, height) == (row["width"], row["height"]) and width % 2 == 0 and height % 2 == 0
        assert rate == row["fps"]
        assert abs(len(frames) - row["fps"] * row["seconds"]) <= 1
        centroids = []
        for k in (0, len(frames) - 1):
            mask = _shape_pixels(frames[k])
            color = np.median(frames[k][mask].astype(np.float64), axis=0)
            assert np.abs(color - COLORS[row["color"]]).max() <= COLOR_TOL, (row["color"], color)
            nearest = list(COLORS)[int(np.abs(palette - color).max(1).argmin())]
            assert nearest == row["color"]
            ys, xs = np.nonzero(mask)
            cx, cy = plan.center(k)
            if row["shape"] == "triangle":
                cy += plan.radius / 3   # a triangle's centroid sits a third of the way up from its base
            assert np.hypot(xs.mean() - cx, ys.mean() - cy) <= CENTROID_TOL * plan.radius + 1
            centroids.append((xs.mean(), ys.mean()))
        (x0, y0), (x1, y1) = centroids
        dx, dy = x1 - x0, y1 - y0
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[row["direction"]]
        along = width if row["direction"] in ("left", "right") else height
        assert moved > 0.3 * along and abs(dy if row["direction"] in ("left", "right") else dx) < 2


def test_broken_rows_are_broken(corpus):
    _, df, _ = corpus
    for j, (_, row) in enumerate(df[df["broken"]].iterrows()):
        kind = BROKEN_KINDS[j % len(BROKEN_KINDS)]
        path = row["video"]
        if kind == "missing":
            assert not os.path.exists(path)
            continue
        if kind == "empty":
            assert open(path, "rb").read() == b""
        with pytest.raises(av.error.FFmpegError):
            _decode(path)


def test_decord_reads_good_videos(corpus):
    decord = pytest.importorskip("decord")
    _, df, _ = corpus
    for _, row in df[~df["broken"]].iterrows():
        vr = decord.VideoReader(row["video"])
        n = len(vr)
        assert abs(n - row["fps"] * row["seconds"]) <= 1
        batch = vr.get_batch([0, n // 2, n - 1]).asnumpy()
        assert batch.shape == (3, row["height"], row["width"], 3) and batch.dtype == np.uint8
        assert not np.array_equal(batch[0], batch[-1])   # the shape moved


def test_deterministic(tmp_path):
    config = SynthConfig(videos=3, seed=11, max_seconds=1.5, dirty_captions=1.0, broken=2)

    def run(out):
        manifest = write_synthetic_corpus(out, config)
        videos = sorted((out / "videos").glob("*.mp4"))
        return manifest.read_bytes(), {p.name: _sha(p) for p in videos}

    first = run(tmp_path / "a")
    assert run(tmp_path / "a") == first   # same directory: the manifest is byte-identical
    elsewhere = run(tmp_path / "b")       # another directory: same files, paths differ only
    assert elsewhere[1] == first[1]
    a, b = pd.read_parquet(tmp_path / "a" / "manifest.parquet"), pd.read_parquet(tmp_path / "b" / "manifest.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="video"), b.drop(columns="video"))
    other = write_synthetic_corpus(tmp_path / "c", SynthConfig(videos=3, seed=12, max_seconds=1.5))
    assert pd.read_parquet(other)["caption"].tolist() != a["caption"].tolist()


def test_left_out_combinations_never_appear_and_the_rest_is_unchanged(tmp_path):
    """A training corpus can leave out chosen (colour, shape, direction) combinations, so held-out captions
    can ask for pairings the model never saw; every other video plans exactly as without the option."""
    left_out = parse_combinations("red-circle-left, blue-square-up,white-triangle-down")
    assert left_out[1] == ("blue", "square", "up")
    plain, leaving = SynthConfig(videos=400, seed=5), SynthConfig(videos=400, seed=5, leave_out=left_out)
    plans = [(plan_synthetic_video(plain, i), plan_synthetic_video(leaving, i)) for i in range(400)]
    hit = [i for i, (p, _) in enumerate(plans) if (p.color, p.shape, p.direction) in left_out]
    assert hit                                                   # the plain corpus does draw them
    assert not [q for _, q in plans if (q.color, q.shape, q.direction) in left_out]
    assert all(p == q for i, (p, q) in enumerate(plans) if i not in hit)
    manifest = pd.read_parquet(write_synthetic_corpus(tmp_path / "c", SynthConfig(videos=2, seed=5, max_seconds=1.0,
                                                                                     leave_out=left_out)))
    assert len(manifest) == 2
    only = [plan_synthetic_video(SynthConfig(videos=40, seed=6, only=left_out), i) for i in range(40)]
    assert {(p.color, p.shape, p.direction) for p in only} == set(left_out)
    with pytest.raises(ValueError, match="unknown combination"):
        SynthConfig(leave_out=(("red", "hexagon", "left"),))
    with pytest.raises(ValueError, match="COLOR-SHAPE-DIRECTION"):
        parse_combinations("red-circle")


def test_synth_command_draws_the_given_sizes(tmp_path):
    """`clipforge synth --sizes` (the demo's square corpus): every video decodes at one of the given sizes."""
    import subprocess
    import sys
    out = tmp_path / "square"
    subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", "synth", str(out), "--videos", "6", "--seed", "2",
                    "--max-seconds", "1", "--sizes", "64x64, 96X96"], check=True, capture_output=True)
    manifest = pd.read_parquet(out / "manifest.parquet")
    decoded = set()
    for video in manifest["video"]:
        with av.open(str(out / video) if not os.path.isabs(video) else video) as container:
            frame = next(container.decode(video=0))
            decoded.add((frame.width, frame.height))
    assert decoded == {(64, 64), (96, 96)}
    assert parse_sizes("160x120") == ((160, 120),)
    for bad in ("96", "96x", "63x64", "8x8"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT|even"):
            parse_sizes(bad)


def test_cross_band_keeps_every_path_in_the_middle_of_the_frame(tmp_path):
    """`clipforge synth --cross-band 0.25` (the demo's corpus): in every decoded frame the shape's centre lies
    within the middle quarter of the frame across its motion, ending on the side the direction names; without
    the flag the same seed's paths spread over the frame, the rest of each video unchanged."""
    import subprocess
    import sys
    band = 0.25
    runs = {}
    for name, extra in (("band", ["--cross-band", str(band)]), ("anywhere", [])):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "clipforge.jobs.cli", "synth", str(out), "--videos", "16", "--seed", "5",
                        "--max-seconds", "1", "--sizes", "96x96"] + extra, check=True, capture_output=True)
        runs[name] = pd.read_parquet(out / "manifest.parquet"), out
    offsets = {}
    for name, (manifest, out) in runs.items():
        offsets[name] = []
        for row in manifest.itertuples():
            _, frames = _decode(str(out / row.video))
            centres = []
            for frame in frames[:: max(1, len(frames) // 6)] + frames[-1:]:
                ys, xs = np.nonzero(_shape_pixels(frame))
                centres.append((xs.mean() / frame.shape[1], ys.mean() / frame.shape[0]))
            centres = np.array(centres)
            along, across = (0, 1) if row.direction in ("left", "right") else (1, 0)
            offsets[name].append(np.abs(centres[:, across] - 0.5).max())
            moved = centres[-1, along] - centres[0, along]
            assert moved * (1 if row.direction in ("right", "down") else -1) > 0.3, (name, row.direction, moved)
    # half the band, plus the measured centroid error of a decoded shape (CENTROID_TOL radii of at most 16 px)
    assert max(offsets["band"]) <= band / 2 + CENTROID_TOL * 16 / 96
    assert max(offsets["anywhere"]) > band / 2 + 0.1
    for column in ("caption", "color", "shape", "direction", "fps", "seconds"):
        assert runs["band"][0][column].tolist() == runs["anywhere"][0][column].tolist()
    with pytest.raises(ValueError, match="cross_band"):
        SynthConfig(cross_band=1.5)


def test_render_frame():
    bg = (20, 22, 24)
    for shape in SHAPES:
        frame = render_frame(shape, COLORS["red"], (40, 30), 10, 80, 60, bg)
        assert frame.shape == (60, 80, 3) and frame.dtype == np.uint8
        assert tuple(frame[30, 40]) == COLORS["red"]      # centre is inside every shape
        assert tuple(frame[0, 0]) == bg and tuple(frame[59, 79]) == bg
    circle = render_frame("circle", COLORS["red"], (40, 30), 10, 80, 60, bg)
    square = render_frame("square", COLORS["red"], (40, 30), 10, 80, 60, bg)
    assert tuple(circle[21, 31]) == bg and tuple(square[21, 31]) == COLORS["red"]   # the corner tells them apart


def test_captions_and_dirt():
    ftfy = pytest.importorskip("ftfy")
    rng = np.random.default_rng(0)
    captions = {make_caption("orange", "triangle", "up", rng) for _ in range(50)}
    assert len(captions) > 20                          # varied wording
    assert all("orange" in c.lower() and "a orange" not in c.lower() for c in captions)
    dirty = [make_dirty("red ball sliding left", np.random.default_rng(s)) for s in range(40)]
    assert all(d != "red ball sliding left" for d in dirty)
    assert any("\u00e2\u0080" in d for d in dirty)      # latin-1 mojibake of UTF-8 punctuation
    # ftfy undoes the mojibake (it also straightens curly quotes, hence the loose check)
    assert all("â" not in ftfy.fix_text(d) for d in dirty if "\u00e2\u0080" in d and "caf" not in d)

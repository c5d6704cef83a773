"""`clipforge eval-synth`'s pixel detector and scoring, on frames rendered like the synthetic corpus."""
import numpy as np
import pytest

from clipforge.pipeline.video.synth_detector import detect, score
from clipforge.pipeline.video.synth import COLORS, SHAPES, render_frame

DIRECTIONS = ("left", "right", "up", "down")


def moving(shape, color, direction, size=64, frames=5, radius=9.0, background=(25, 22, 30), travel=0.8, seed=0):
    """uint8 [frames, size, size, 3]: `shape` crossing `travel` of the frame's free span in `direction`."""
    rng = np.random.default_rng(seed)
    lo, hi = radius + 2, size - radius - 2
    a0, a1 = lo + (1 - travel) / 2 * (hi - lo), hi - (1 - travel) / 2 * (hi - lo)
    if direction in ("left", "up"):
        a0, a1 = a1, a0
    across = rng.uniform(radius + 1, size - radius - 2)
    out = []
    for t in np.linspace(0, 1, frames):
        a = a0 + t * (a1 - a0)
        xy = (a, across) if direction in ("left", "right") else (across, a)
        out.append(render_frame(shape, COLORS[color], xy, radius, size, size, background))
    return np.stack(out)


def test_detector_reads_every_combination():
    for i, (color, shape, direction) in enumerate((c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS):
        got = detect(moving(shape, color, direction, radius=8 + (i % 3), seed=i))
        assert (got["color"], got["shape"], got["direction"]) == (color, shape, direction), (color, shape, direction, got)


def test_detector_reports_no_motion_and_no_shape():
    still = detect(moving("square", "red", "right", travel=0.0))
    assert still["direction"] == "none" and still["shape"] == "square" and still["color"] == "red"
    empty = detect(np.full((5, 64, 64, 3), 20, np.uint8))
    assert not empty["found"] and empty["color"] is None and empty["direction"] is None
    # a few stray pixels do not outvote the shape: the largest blob is scored
    noisy = moving("triangle", "cyan", "up")
    noisy[:, 2, 2] = COLORS["red"]
    assert detect(noisy)["color"] == "cyan" and detect(noisy)["shape"] == "triangle"


@pytest.mark.parametrize("blur", [1])
def test_detector_survives_soft_edges(blur):
    """VQ reconstructions have soft edges and slight colour shifts; the decisions must not depend on
    crisp pixels."""
    from scipy import ndimage

    for color, shape, direction in (("orange", "circle", "left"), ("yellow", "square", "down"), ("blue", "triangle", "right")):
        frames = moving(shape, color, direction).astype(np.float32)
        soft = ndimage.uniform_filter(frames, size=(1, 1 + 2 * blur, 1 + 2 * blur, 1))
        got = detect(np.clip(soft + 8, 0, 255).astype(np.uint8))
        assert (got["color"], got["shape"], got["direction"]) == (color, shape, direction), got


@pytest.mark.parametrize("brightness", [1.0, 0.75])
def test_colour_survives_a_darker_decoder_and_a_blended_rim(brightness):
    """Measured through the demo's tokenizer: colours come back 10-25 % darker, and the rim blends into
    the background; a darkened orange's blob median was nearer to red than to orange in RGB."""
    from scipy import ndimage

    for i, color in enumerate(COLORS):
        frames = moving("circle", color, "right", radius=7, seed=i).astype(np.float32)
        background = np.array((25, 22, 30), np.float32)
        fg = np.abs(frames - background).max(axis=-1, keepdims=True) > 0
        darker = np.where(fg, frames * brightness, frames)
        soft = ndimage.uniform_filter(darker, size=(1, 3, 3, 1))
        got = detect(np.clip(soft, 0, 255).astype(np.uint8))
        assert got["color"] == color, (color, brightness, got)


def test_score_counts_each_attribute_and_all_three():
    truth = {"color": "red", "shape": "circle", "direction": "left"}
    rows = [{"truth": truth, "detected": dict(truth)},
            {"truth": truth, "detected": {**truth, "shape": "square"}},
            {"truth": truth, "detected": {**truth, "direction": "none"}},
            {"truth": truth, "detected": {"color": None, "shape": None, "direction": None}}]
    assert score(rows) == {"n": 4, "color": 0.75, "shape": 0.5, "direction": 0.5, "all": 0.25}
    assert score([]) == {"n": 0}

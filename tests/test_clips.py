"""Clip planning: CogVideo's rate policy over real timestamps, and the crop geometry."""
import numpy as np
import pytest

from clipforge.pipeline.video.clips import (ClipConfig, crop_box, display_size, frames_at, orient_and_crop,
                                            orient_for_display, plan_clips, resize_for_short_side, sane_timestamps)


def grid(fps, seconds, start=0.0):
    n = int(round(fps * seconds))
    return np.arange(n) / fps + start, start + n / fps


def test_sequential_picks_lowest_rate_that_fits():
    pts, end = grid(30, 10.0)            # 10 s: 0.25 fps needs 16 s, 0.5 fps needs 8 s -> 0.5
    (plan,) = plan_clips(pts, end, ClipConfig())
    assert plan.mode == "sequential" and plan.rate == 0.5 and plan.span == 8.0
    assert plan.timestamps == pytest.approx([1.0, 3.0, 5.0, 7.0, 9.0], abs=1 / 30)   # evenly around the middle
    assert plan.frame_indices == sorted(plan.frame_indices)


def test_max_span_caps_long_videos():
    pts, end = grid(25, 120.0)
    (plan,) = plan_clips(pts, end, ClipConfig())
    assert plan.rate == 0.25 and plan.span == 16.0          # 16 s is the longest span, even in 120 s
    assert plan.timestamps[0] == pytest.approx(52.0, abs=0.04)


def test_too_short_gives_no_plan():
    pts, end = grid(30, 0.3)
    assert plan_clips(pts, end, ClipConfig()) == []


def test_trim_and_manifest_window():
    pts, end = grid(30, 20.0)
    (plan,) = plan_clips(pts, end, ClipConfig(trim=1.0), start=2.0, end=12.0)   # window [3, 11]: 8 s
    assert plan.rate == 0.5 and plan.timestamps[0] >= 3.0 and plan.timestamps[-1] <= 11.0


def test_variable_frame_rate_samples_by_time():
    # 10 fps for 2 s, then 1 fps for 6 s: times, not indices, decide
    pts = np.concatenate([np.arange(20) / 10, 2 + np.arange(6)])
    (plan,) = plan_clips(pts, 8.0, ClipConfig(rates=(1.0,)))
    assert plan.timestamps == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0])
    assert plan.frame_indices == [20, 21, 22, 23, 24]


def test_start_offset():
    pts, end = grid(25, 4.0, start=10.0)
    (plan,) = plan_clips(pts, end, ClipConfig())
    assert plan.rate == 1.0 and plan.timestamps[0] == pytest.approx(10.0, abs=0.04)


def test_interpolation_clips_do_not_overlap_and_are_deterministic():
    pts, end = grid(30, 12.0)
    cfg = ClipConfig(mode="interpolation")
    plans = plan_clips(pts, end, cfg, key="video-a")
    assert 1 <= len(plans) <= 4 and all(p.rate in (2.0, 4.0, 8.0) for p in plans)
    for a, b in zip(plans, plans[1:]):
        assert a.timestamps[-1] < b.timestamps[0]
    assert [p.as_dict() for p in plan_clips(pts, end, cfg, key="video-a")] == [p.as_dict() for p in plans]


def test_interpolation_skips_rates_above_the_source_rate():
    pts, end = grid(6, 10.0)
    plans = plan_clips(pts, end, ClipConfig(mode="interpolation"), source_fps=6.0)
    assert plans and all(p.rate <= 6.0 for p in plans)
    assert all(len(set(p.frame_indices)) == 5 for p in plans)


def test_both_modes():
    pts, end = grid(30, 12.0)
    plans = plan_clips(pts, end, ClipConfig(mode="both"), key="k")
    assert plans[0].mode == "sequential" and all(p.mode == "interpolation" for p in plans[1:])


def test_garbage_timestamps_are_rejected():
    assert not sane_timestamps(np.array([-3e17, -3e17, 0.1]), 5.0)
    assert not sane_timestamps(np.array([0.0, 0.2, 0.1]), 5.0)
    assert not sane_timestamps(np.array([0.0, 0.1, 50.0]), 5.0)
    assert sane_timestamps(np.array([0.0, 0.1, 0.2]), 5.0)


def test_frames_at_is_the_frame_on_screen():
    pts = np.array([0.0, 0.1, 0.5, 0.6])
    assert frames_at(pts, np.array([0.0, 0.3, 0.55, 9.0])).tolist() == [0, 1, 2, 3]


def test_geometry_short_side_rotation_and_sar():
    assert display_size(568, 320, 1.0, -90) == (320, 568)
    assert display_size(720, 480, 32 / 27, 0) == (853, 480)          # anamorphic NTSC widescreen
    assert resize_for_short_side(1280, 720, 1.0, 0, 160) == (284, 160)
    assert resize_for_short_side(568, 320, 1.0, -90, 160) == (284, 160)   # stored orientation
    assert crop_box(1280, 720, 160) == [280.0, 0.0, 720.0, 720.0]



@pytest.mark.parametrize("rotation", [0, -90, 90, 180, -180, 270, -270])
def test_orientation_maps_every_stored_pixel_to_its_display_position(rotation):
    """Display matrix angles are counter-clockwise degrees (ffmpeg/PyAV): -90 turns the stored picture
    90 degrees clockwise for display. Expected positions are written out pixel by pixel, not with numpy's
    rotation, so a wrong direction or a transpose cannot pass."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)       # stored [T, H=3, W=5, 3]
    _, h, w, _ = frames.shape
    out = orient_for_display(frames, rotation)
    turn = (-rotation // 90) % 4                                      # clockwise quarter turns
    assert out.shape == ((2, w, h, 3) if turn % 2 else (2, h, w, 3))
    for r in range(h):
        for c in range(w):
            # one clockwise quarter turn sends stored (r, c) to display (c, h - 1 - r)
            y, x, hh, ww = r, c, h, w
            for _ in range(turn):
                y, x, hh, ww = x, hh - 1 - y, ww, hh
            assert (out[:, y, x] == frames[:, r, c]).all(), (rotation, r, c)


def test_a_clockwise_display_turn_moves_the_left_edge_to_the_top_and_crops_the_middle():
    frames = np.zeros((1, 160, 284, 3), np.uint8)                      # stored landscape
    frames[:, :, :10] = 255                                            # a bright left edge
    frames[:, 70:90, 132:152] = 100                                    # a grey mark at the centre
    shown = orient_for_display(frames, -90)                            # -90: turn clockwise for display
    assert shown.shape == (1, 284, 160, 3)
    assert shown[0, :10].min() == 255 and shown[0, 10:].max() < 255     # left edge is now the top rows
    out = orient_and_crop(frames, -90, 160)
    assert out.shape == (1, 160, 160, 3)
    assert out.max() == 100 and (out == 100).any()                     # the top edge is cropped away, the
    ys, xs = np.nonzero(out[0, :, :, 0] == 100)                        # centre mark stays at the centre
    assert abs(ys.mean() - 79.5) <= 1 and abs(xs.mean() - 79.5) <= 1

"""`clipforge clips VIDEO`: the clip plan of one video, as the build job would take it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipforge.pipeline.video.clips import ClipConfig
from clipforge.pipeline.video.decode import isolated_decoder
from clipforge.pipeline.schema import video_id_for


def plan_video(video: str, out: str | None = None, size: int = 160, frames: int = 5, mode: str = "sequential",
               trim: float = 0.0, timeout_s: float = 120.0, memory_limit_mb: int | None = 8192,
               cpu_limit_s: float | None = None) -> dict:
    """The clip plan as JSON: {"video", "decoder", "source", "clips": [...], "failure"}; with `out`, each clip's
    frames as `.npy` (uint8 [T,S,S,3]) and a contact-sheet PNG (one row per clip).

    The video is decoded as the build decodes it: in an isolated child with the same time, CPU-time and
    memory limits and scrubbed environment (`isolated_decoder`), after the same content sniffing and
    container allowlist (`decode_video`)."""
    config = ClipConfig(size=size, frames=frames, mode=mode, trim=trim)
    call = isolated_decoder(timeout_s, memory_limit_mb, cpu_limit_s)
    try:
        outcome = call(video, config, video_id_for(video))
    finally:
        call.close()
    if outcome[0] != "ok":
        return {"video": video, "decoder": None, "source": None, "clips": [],
                "failure": {"reason": outcome[1], "message": outcome[2]}}
    result = outcome[1]
    src = result["source"]
    clips = []
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for n, clip in enumerate(result["clips"]):
        entry = {k: clip[k] for k in ("mode", "rate", "span", "frame_indices", "timestamps", "crop")}
        entry["frames_file"] = None
        if out_dir:
            name = f"clip{n:02d}_{clip['mode']}_{clip['rate']:g}fps.npy"
            np.save(out_dir / name, clip["frames"], allow_pickle=False)
            entry["frames_file"] = name
        clips.append(entry)
    if out_dir and result["clips"]:
        from clipforge.pipeline.video.pictures import contact_sheet, write_png
        write_png(out_dir / "contact_sheet.png", contact_sheet([c["frames"] for c in result["clips"]]))
    source = {"width": src["width"], "height": src["height"], "fps": src["fps"], "frames": src["frames"],
              "duration": src["duration"], "rotation": src["rotation"], "sar": src["sar"], "codec": src["codec"],
              "video_streams": src["video_streams"], "stream_index": src["stream_index"]}
    return {"video": video, "decoder": result["decoder"], "source": source, "clips": clips, "failure": None}

"""icetk's tokenizers and CogVideo's rows, end to end on real files.

Counter videos (each frame's number written as two grey levels, top and bottom half) are built with
`clipforge build --image-tokenizer icetk:MODELS --text-tokenizer icetk:MODELS --mode cogvideo`, where MODELS
holds an `ice_image.pt` of random weights in icetk's own checkpoint format and an `ice_text.model` trained
here. The frames each clip holds (read off the pixels) must be the ones cogdata's formula picks with
decord's own frame count and rate; the export must be the rows the documented layout gives.

Where the `icetk` and `cogdata` packages can be imported (`make test-icetk`: they cannot be installed
beside Ray, see the README), the codes are also compared with icetk's own `encode` on the same frames,
the text ids with icetk's, and the `.bin` is read with cogdata's `BinaryDataset`; elsewhere those skip.
"""
from __future__ import annotations

import io
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")   # icetk's generated protobuf code

from clipforge.jobs.cli import main  # noqa: E402

SIZE = 64                 # frames 64x64 -> 8x8 codes at icetk's compression 8 (CogVideo: 160 -> 20x20)
W, H = 96, SIZE           # landscape: the centre crop keeps both halves whole
CAPTIONS = ["a red ball rolls to the left", "一只红色的球向左滚动", "the cat 🐱 jumps over a box 📦",
            "a dog runs<n>on the beach", "a slow timelapse of clouds"]
VIDEOS = [("ten-fps-12s.mp4", Fraction(10), 120), ("ntsc-7s.mp4", Fraction(30000, 1001), 215),
          ("ten-fps-3s.mp4", Fraction(10), 35), ("pal-6s.mp4", Fraction(25), 151),
          ("two-fps-80s.mp4", Fraction(2), 160)]     # 16 s clips: four of them


def level(digit: int) -> int:
    return 20 + 14 * digit


def counter_video(path: Path, frames: int, fps: Fraction) -> None:
    """H.264 at a constant rate; frame n shows n % 16 in its top half and n // 16 in its bottom half."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "4"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for n in range(frames):
            img = np.empty((H, W, 3), np.uint8)
            img[:H // 2], img[H // 2:] = level(n % 16), level(n // 16)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def read_counter(frame: np.ndarray) -> int:
    low, high = frame[4:SIZE // 2 - 4].mean(), frame[SIZE // 2 + 4:-4].mean()
    return int(round((low - 20) / 14)) + 16 * int(round((high - 20) / 14))


def cogdata_indices(path: Path) -> tuple[float, list[list[int]]]:
    """cogdata's video task, written out as it reads (decord's frame count and average rate, 5 frames,
    at most 4 clips, at most 16 s): (clip seconds, frame indices of each clip)."""
    import decord

    vr = decord.VideoReader(str(path))
    fps, count = vr.get_avg_fps(), len(vr)
    length = min(int(count / fps) - 1, 16)
    interval = int(fps * (length / (5 - 1)))
    strided = int((count + interval - 1) / interval)
    clips = min(strided // 5, 4)
    first = (strided - clips * 5) // 2
    picked = list(range(first, interval * clips * 5 + first, interval))
    return float(length), [picked[5 * c:5 * c + 5] for c in range(clips)]


def icetk_package():
    try:
        import icetk.ice_tokenizer  # noqa: F401 — needs torchvision, which the main environment lacks
    except ImportError as err:
        pytest.skip(f"the icetk package is not importable here ({err}); `make test-icetk` runs this")
    from icetk.ice_tokenizer import IceTokenizer
    return IceTokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """icetk's two files: random weights in its checkpoint format, a small sentencepiece model with its
    <pad> and <n> pieces."""
    import sentencepiece as spm

    from clipforge.tokenizer.icetk_net import random_checkpoint

    folder = tmp_path_factory.mktemp("icetk")
    random_checkpoint(folder / "ice_image.pt", seed=3, spread=1e-4)   # icetk-like: many near-ties
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS * 20 + [f"{s}.0秒" for s in range(17)]), encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(corpus), model_writer=model, vocab_size=400, model_type="unigram",
                                   character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   user_defined_symbols=["<n>"], byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    (folder / "ice_text.model").write_bytes(model.getvalue())
    corpus.unlink()
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("counter-videos")
    for (name, fps, frames), caption in zip(VIDEOS, CAPTIONS):
        counter_video(folder / name, frames, fps)
    pd.DataFrame({"video": [str(folder / v[0]) for v in VIDEOS], "caption": CAPTIONS,
                  "id": [v[0].split(".")[0] for v in VIDEOS]}).to_parquet(folder / "manifest.parquet")
    return folder


@pytest.fixture(scope="module")
def built(models, videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("icetk-build") / "ds"
    main(["build", str(videos / "manifest.parquet"), "--out", str(out), "--image-tokenizer", f"icetk:{models}",
          "--text-tokenizer", f"icetk:{models / 'ice_text.model'}", "--mode", "cogvideo", "--size", str(SIZE),
          "--runner", "local", "--text-slot", "64"])
    return out


def samples(dataset: Path) -> list[dict]:
    from clipforge import open_dataset
    return list(open_dataset(str(dataset)))


def clip_frames(video: Path, out: Path) -> list[np.ndarray]:
    """The frames of each cogvideo clip as `clipforge clips` writes them (the build's own decode)."""
    from clipforge.jobs.clips import plan_video

    plan = plan_video(str(video), out=str(out), size=SIZE, mode="cogvideo")
    return [np.load(out / c["frames_file"]) for c in plan["clips"]]


def test_cogvideo_mode_reads_the_frames_cogdatas_formula_picks(videos, tmp_path):
    for name, _, _ in VIDEOS:
        seconds, expected = cogdata_indices(videos / name)
        frames = clip_frames(videos / name, tmp_path / name)
        assert [[read_counter(f) for f in clip] for clip in frames] == expected, name
        assert len(expected) >= 1
    assert len(cogdata_indices(videos / VIDEOS[-1][0])[1]) == 4


def test_build_with_icetk_keeps_cogdatas_clips_and_icetks_text_ids(built, models, videos):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(models / "ice_text.model"))
    got = samples(built)
    by_video = {}
    for s in got:
        by_video.setdefault(s["meta"]["row_id"], []).append(s)
    assert sorted(by_video) == sorted(v[0].split(".")[0] for v in VIDEOS)
    for (name, _, _), caption in zip(VIDEOS, CAPTIONS):
        seconds, expected = cogdata_indices(videos / name)
        clips = sorted(by_video[name.split(".")[0]], key=lambda s: s["meta"]["clip_index"])
        assert [c["meta"]["frame_indices"] for c in clips] == expected
        for c in clips:
            assert c["meta"]["mode"] == "cogvideo" and c["meta"]["span"] == seconds
            assert c["vtok"].shape == (5, SIZE // 8, SIZE // 8) and int(c["vtok"].max()) < 20000
            assert c["ttok"].tolist() == [i + 20000 for i in sp.encode(caption)]
    info = json.loads((built / "dataset.json").read_text())
    assert info["tokenizers"]["image"]["id"].startswith("icetk-image-c8-")
    assert info["tokenizers"]["image"]["path"] == f"icetk:{models}"
    assert info["layout"]["image_vocab"] == 20000


def test_codes_are_the_ones_our_icetk_network_gives_for_the_clip_frames(built, models, videos, tmp_path):
    from clipforge.tokenizer.sources import open_image_tokenizer

    tok = open_image_tokenizer(f"icetk:{models}", device="cpu")
    got = {(s["meta"]["row_id"], s["meta"]["clip_index"]): s["vtok"] for s in samples(built)}
    name = VIDEOS[1][0]
    for i, frames in enumerate(clip_frames(videos / name, tmp_path)):
        assert np.array_equal(tok.encode(frames), got[(name.split(".")[0], i)])


def test_codes_equal_the_icetk_package_encode(built, models, videos, tmp_path):
    import torch

    IceTokenizer = icetk_package()
    reference = IceTokenizer(path=str(models), device="cpu", fp16=False)
    got = {(s["meta"]["row_id"], s["meta"]["clip_index"]): s["vtok"] for s in samples(built)}
    compared = 0
    for name, _, _ in VIDEOS:
        for i, frames in enumerate(clip_frames(videos / name, tmp_path / name)):
            pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
            codes = reference.encode(image_torch=pixels, compress_rate=8).view(len(frames), SIZE // 8, SIZE // 8)
            assert np.array_equal(codes.numpy(), got[(name.split(".")[0], i)]), (name, i)
            compared += 1
    assert compared == len(got)


def test_text_ids_equal_the_icetk_package(models):
    from clipforge.tokenizer.icetk import IceTextTokenizer

    IceTokenizer = icetk_package()
    reference, ours = IceTokenizer(path=str(models), device="cpu"), IceTextTokenizer(models)
    for text in CAPTIONS + ["4.0秒", "unseen 字 🚀 text"]:
        assert ours.encode(text) == reference.encode(text), text
    assert (ours.pad_id, ours.sep_id, ours.vocab_size) == (reference["<pad>"], reference["<n>"], reference.num_tokens)


def documented_row(sample: dict, sp, text_len: int = 64) -> np.ndarray:
    """docs/cogvideo.md's row: duration ids, <n>, caption cut to text_len - len(duration) - 3 with <n> ->
    <pad>, <pad> to text_len; then every frame's codes."""
    pad, sep = sp.piece_to_id("<pad>") + 20000, sp.piece_to_id("<n>") + 20000
    duration = [i + 20000 for i in sp.encode(f"{float(sample['meta']['span'])}秒")]
    caption = [pad if t == sep else t for t in sample["ttok"].tolist()][:text_len - len(duration) - 3]
    text = duration + [sep] + caption
    return np.array(text + [pad] * (text_len - len(text)) + sample["vtok"].reshape(-1).tolist(), dtype=np.int32)


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "cogvideo.bin"
    main(["export", "cogvideo", str(built), str(out)])
    return out


def test_export_rows_follow_the_documented_layout(built, exported, models):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(models / "ice_text.model"))
    meta = json.loads(Path(f"{exported}.json").read_text())
    got = samples(built)
    assert meta["rows"] == len(got) and meta["row_length"] == 64 + 5 * 8 * 8 and meta["dtype"] == "int32"
    rows = np.fromfile(exported, dtype=np.int32).reshape(meta["rows"], meta["row_length"])
    for row, sample in zip(rows, got):
        assert np.array_equal(row, documented_row(sample, sp)), sample["key"]
    # the caption with a literal <n> keeps its place, with <pad> instead
    assert any((sample["ttok"] == sp.piece_to_id("<n>") + 20000).any() for sample in got)


def test_cogdatas_binary_dataset_reads_the_export(built, exported, models):
    import sentencepiece as spm
    try:
        from cogdata.datasets import BinaryDataset
    except ImportError as err:
        pytest.skip(f"cogdata is not importable here ({err}); `make test-icetk` runs this")
    sp = spm.SentencePieceProcessor(model_file=str(models / "ice_text.model"))
    meta = json.loads(Path(f"{exported}.json").read_text())
    data = BinaryDataset(str(exported), length_per_sample=meta["row_length"], dtype="int32")
    got = samples(built)
    assert len(data) == len(got)
    for i, sample in enumerate(got):
        assert np.array_equal(data[i].numpy(), documented_row(sample, sp))


def test_verify_checks_an_export_row_by_row(built, exported, tmp_path, capsys):
    main(["verify", str(built), "--export", str(exported)])
    assert json.loads(capsys.readouterr().out)["problems"] == []
    broken = tmp_path / "broken.bin"
    blob = bytearray(exported.read_bytes())
    blob[4 * (64 + 10)] ^= 1                   # one image code of the first row
    broken.write_bytes(bytes(blob))
    Path(f"{broken}.json").write_text(Path(f"{exported}.json").read_text())
    with pytest.raises(SystemExit) as stop:
        main(["verify", str(built), "--export", str(broken)])
    assert stop.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert any("row 0 " in p for p in report["problems"]) and any("sha256" in p for p in report["problems"])


def test_export_refuses_to_overwrite_and_refuses_datasets_without_icetk_tokens(built, exported, reference_dataset,
                                                                               tmp_path, capsys):
    before = exported.read_bytes()
    with pytest.raises(SystemExit):
        main(["export", "cogvideo", str(built), str(exported)])
    assert "exists" in capsys.readouterr().err and exported.read_bytes() == before
    with pytest.raises(SystemExit):
        main(["export", "cogvideo", str(reference_dataset), str(tmp_path / "x.bin")])
    err = capsys.readouterr().err.strip()
    assert "not icetk's" in err and len(err.splitlines()) == 1 and not (tmp_path / "x.bin").exists()


def test_a_missing_icetk_file_is_named_and_nothing_is_downloaded(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tokenizer", "eval-image", f"icetk:{tmp_path}", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "ice_image.pt") in err and "never downloads" in err


def test_the_bundled_model_trains_and_samples_on_icetk_tokens(built, models, tmp_path):
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(models / "ice_text.model")).get_piece_size()
    run = tmp_path / "run"
    main(["train", str(built), "--out", str(run), "--steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
          "--batch-size", "2"])
    latest = json.loads((run / "latest.json").read_text())
    assert latest["model_config"]["text_vocab"] == 20000 + pieces and latest["model_config"]["image_vocab"] == 20000
    assert latest["tokenizers"]["image"]["path"] == "icetk:tokenizers/ice_image.pt"
    video = tmp_path / "clip.gif"
    main(["sample", str(run), "--prompt", CAPTIONS[1], "--out", str(video), "--candidates", "1"])
    assert video.stat().st_size > 0


def test_a_dataset_on_object_storage_exports_the_same_rows(s3_server, models, videos, exported, tmp_path):
    """Built to s3:// with icetk's text model read from s3:// too (its folder, as icetk keeps it); the
    export streams from the bucket and gives the local build's bytes."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("//")[1], scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    with fs.open_output_stream("datasets/icetk-models/ice_text.model") as f:
        f.write((models / "ice_text.model").read_bytes())
    main(["build", str(videos / "manifest.parquet"), "--out", "s3://datasets/icetk-ds", "--image-tokenizer",
          f"icetk:{models}", "--text-tokenizer", "icetk:s3://datasets/icetk-models", "--mode", "cogvideo",
          "--size", str(SIZE), "--runner", "local", "--text-slot", "64"])
    out = tmp_path / "remote.bin"
    main(["export", "cogvideo", "s3://datasets/icetk-ds", str(out)])
    assert out.read_bytes() == exported.read_bytes()
    assert json.loads(Path(f"{out}.json").read_text())["sha256"] == json.loads(Path(f"{exported}.json").read_text())["sha256"]

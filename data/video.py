"""Video input: frames sampled at a given rate from a video file (PyAV) or a directory of images.

``iter_frames(path, fps)`` yields ``(t_seconds, PIL.Image)`` in time order: from a file (mp4, webm,
mkv, ... anything FFmpeg reads) the first frame at or after each ``k / fps`` seconds; from a
directory, its images sorted by name, frame k at ``k / fps``. PyAV is an optional dependency
(``pip install 'vlt[video]'``); without it a video file is a clear error and frame directories work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def iter_frames(path, fps: float = 1.0) -> Iterator[tuple[float, "object"]]:
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    p = Path(path).expanduser()
    if p.is_dir():
        yield from _dir_frames(p, fps)
        return
    if not p.is_file():
        raise FileNotFoundError(f"video {str(p)!r} does not exist (give a video file or a directory of frames)")
    yield from _file_frames(p, fps)


def _dir_frames(p: Path, fps: float):
    from PIL import Image
    files = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"directory {str(p)!r} holds no frames ({', '.join(IMAGE_SUFFIXES)})")
    for k, f in enumerate(files):
        with Image.open(f) as im:
            yield k / fps, im.convert("RGB")


def _file_frames(p: Path, fps: float):
    try:
        import av
    except ImportError as e:
        raise ValueError(f"reading the video file {str(p)!r} needs PyAV: pip install 'vlt[video]' "
                         "(or pass a directory of frame images instead)") from e
    try:
        container = av.open(str(p))
    except Exception as e:  # noqa: BLE001 - FFmpeg's errors vary by format; name the file and the cause
        raise ValueError(f"cannot read video {str(p)!r}: {e}") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{str(p)!r} has no video stream")
        stream = container.streams.video[0]
        k = 0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time + 1e-6 >= k / fps:
                    yield k / fps, frame.to_image()
                    k += 1
        except av.error.FFmpegError as e:
            raise ValueError(f"video {str(p)!r} is corrupt after {k} frames: {e}") from e
        if k == 0:
            raise ValueError(f"video {str(p)!r} holds no decodable frames")

"""Reading and writing what the ``dnls`` command line denoises: images (PNG, JPEG, TIFF; 8 or
16 bit), folders of frames, and video files (through imageio; its ffmpeg plugin is the
``video`` extra). Frames are float32 ``(T, H, W, C)`` in ``[0, 1]``."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


class MediaError(ValueError):
    """A file or folder that cannot be read or written; the message says why."""


@dataclass
class Media:
    frames: np.ndarray  # (T, H, W, C) float32 in [0, 1]
    kind: str  # "image", "folder" or "video"
    bits: int = 8  # 8 or 16
    names: list[str] = field(default_factory=list)  # file names of a folder's frames
    fps: float = 25.0
    gray: bool = False  # the input had no channel axis


def _imageio():
    if importlib.util.find_spec("imageio") is None:
        raise MediaError("reading images needs imageio: pip install 'dnls[cli]'")
    import imageio.v3 as iio

    return iio


def _to_float(img: np.ndarray, path: Path) -> tuple[np.ndarray, int, bool]:
    if img.dtype == np.uint8:
        bits, scale = 8, 255.0
    elif img.dtype == np.uint16:
        bits, scale = 16, 65535.0
    else:
        raise MediaError(f"{path}: pixels of type {img.dtype}; expected 8- or 16-bit integers")
    gray = img.ndim == 2
    if gray:
        img = img[..., None]
    if img.ndim != 3:
        raise MediaError(f"{path}: an image of shape {img.shape}; expected (H, W) or (H, W, C)")
    return img.astype(np.float32) / scale, bits, gray


def _read_image(path: Path) -> tuple[np.ndarray, int, bool]:
    iio = _imageio()
    try:
        img = np.asarray(iio.imread(path))
    except Exception as err:  # imageio raises many types for unreadable files
        raise MediaError(f"{path}: not a readable image ({type(err).__name__})") from None
    return _to_float(img, path)


def read(path: str | os.PathLike) -> Media:
    """Read an image, a folder of frames (sorted by name) or a video file."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file or folder")
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not names:
            raise MediaError(f"{path}: a folder with no {'/'.join(IMAGE_EXTS)} frames")
        frames, bits, gray = [], 8, False
        for name in names:
            img, bits_i, gray = _read_image(path / name)
            if frames and img.shape != frames[0].shape:
                raise MediaError(
                    f"{path / name}: frame of size {img.shape[:2]} (channels {img.shape[2]}), "
                    f"but {names[0]} has {frames[0].shape[:2]} (channels {frames[0].shape[2]})"
                )
            bits = max(bits, bits_i)
            frames.append(img)
        return Media(np.stack(frames), "folder", bits, names, gray=gray)
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        img, bits, gray = _read_image(path)
        return Media(img[None], "image", bits, gray=gray)
    if ext in VIDEO_EXTS:
        return _read_video(path)
    raise MediaError(
        f"{path}: unknown type {ext or '(none)'}; expected an image ({', '.join(IMAGE_EXTS)}), "
        f"a video ({', '.join(VIDEO_EXTS)}) or a folder of frames"
    )


def _read_video(path: Path) -> Media:
    iio = _imageio()
    if path.suffix.lower() != ".gif" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise MediaError(f"{path}: reading video needs imageio-ffmpeg: pip install 'dnls[video]'")
    try:
        frames = np.asarray(iio.imread(path, index=None))
        fps = float(iio.immeta(path).get("fps", 25.0) or 25.0)
    except Exception as err:
        raise MediaError(f"{path}: not a readable video ({type(err).__name__})") from None
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.dtype != np.uint8:
        raise MediaError(f"{path}: frames of shape {frames.shape}, type {frames.dtype}")
    return Media(frames[..., :3].astype(np.float32) / 255.0, "video", 8, fps=fps)


def check_writable(path: str | os.PathLike, media: Media, overwrite: bool) -> Path:
    """Check, before any work, that ``path`` can take the result of ``media``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MediaError(f"{path}: exists; pass --overwrite to replace it")
    if media.kind == "folder":
        if path.exists() and not path.is_dir():
            raise MediaError(f"{path}: the result of a folder is a folder, and this is a file")
    else:
        want = IMAGE_EXTS if media.kind == "image" else VIDEO_EXTS
        if path.suffix.lower() not in want:
            raise MediaError(f"{path}: the result of a {media.kind} needs one of {', '.join(want)}")
        if path.suffix.lower() in (".jpg", ".jpeg") and media.bits == 16:
            raise MediaError(f"{path}: JPEG holds 8 bits; write a 16-bit image as PNG or TIFF")
        color = media.frames.shape[-1] > 1
        if path.suffix.lower() == ".png" and media.bits == 16 and color:
            raise MediaError(f"{path}: 16-bit colour is written as TIFF (.tif); PNG takes gray")
        if not path.parent.exists():
            raise MediaError(f"{path.parent}: no such folder")
    return path


def _to_int(img: np.ndarray, bits: int, gray: bool) -> np.ndarray:
    scale, dtype = (255.0, np.uint8) if bits == 8 else (65535.0, np.uint16)
    out = np.clip(np.rint(img * scale), 0, scale).astype(dtype)
    return out[..., 0] if gray else out


def write(path: str | os.PathLike, media: Media, frames: np.ndarray) -> None:
    """Write ``frames`` ``(T, H, W, C)`` in ``[0, 1]`` like ``media`` was read (kind, bits).
    Each file is written beside its target and renamed onto it, so a failure leaves no
    half-written result."""
    iio = _imageio()
    path = Path(path)
    if media.kind == "folder":
        path.mkdir(parents=True, exist_ok=True)
        for name, img in zip(media.names, frames, strict=True):
            _atomic(iio, path / name, _to_int(img, media.bits, media.gray))
    elif media.kind == "image":
        _atomic(iio, path, _to_int(frames[0], media.bits, media.gray))
    else:
        data = _to_int(frames, 8, media.gray)
        _atomic(iio, path, data, fps=media.fps)


def _atomic(iio, path: Path, data: np.ndarray, **kw) -> None:
    tmp = path.with_name(f".{path.stem}.dnls-tmp{path.suffix}")
    try:
        iio.imwrite(tmp, data, **kw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

"""The dnls command line on tiny inputs: round trips, folders, video, JSON, and every bad input
(one line on stderr, exit code 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("skimage")

from dnls.cli import main  # noqa: E402


def _image(path, dtype=np.uint8, shape=(24, 20, 3), seed=0):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    img = (rng.random(shape) * top).astype(dtype)
    iio.imwrite(path, img)
    return img


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _fails(capsys, *argv, match: str):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dnls: error:"), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


ROUND_TRIPS = [
    (np.uint8, ".png", (24, 20, 3)),
    (np.uint8, ".jpg", (24, 20, 3)),
    (np.uint16, ".png", (24, 20)),
    (np.uint16, ".tif", (24, 20, 3)),
]


@pytest.mark.parametrize("dtype,ext,shape", ROUND_TRIPS)
def test_image_round_trip_keeps_bits_and_shape(tmp_path, capsys, dtype, ext, shape):
    src = tmp_path / f"in{ext}"
    img = _image(src, dtype, shape)
    dst = tmp_path / f"out{ext}"
    code, out, _ = _run(capsys, "denoise", src, "-o", dst, "--sigma", 10, "--ws", 5, "--quiet")
    assert code == 0 and out == ""
    res = iio.imread(dst)
    assert res.dtype == dtype and res.shape == img.shape


def test_gray_image_and_estimated_sigma(tmp_path, capsys):
    src = tmp_path / "g.png"
    _image(src, np.uint8, (20, 20))
    code, out, _ = _run(capsys, "denoise", src, "-o", tmp_path / "o.png", "--ws", 5, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["sigma_estimated"] and report["sigma"] > 0 and report["channels"] == 1
    assert iio.imread(tmp_path / "o.png").shape == (20, 20)


def test_json_report(tmp_path, capsys):
    src = tmp_path / "in.png"
    _image(src)
    code, out, _ = _run(
        capsys, "denoise", src, "-o", tmp_path / "o.png", "--sigma", 15, "--ws", 5, "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["kind"] == "image" and report["bits"] == 8 and report["sigma"] == 15
    assert (report["height"], report["width"], report["ws"]) == (24, 20, 5)


def test_folder_of_frames(tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        _image(folder / f"f{i:02d}.png", seed=i)
    code, out, _ = _run(capsys, "denoise", folder, "-o", tmp_path / "out", "--sigma", 10,
                        "--ws", 5, "--wt", 1, "--json")  # fmt: skip
    assert code == 0
    assert json.loads(out)["frames"] == 3 and json.loads(out)["wt"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f00.png", "f01.png", "f02.png"]


def test_video_file(tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    frames = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    src = tmp_path / "in.mp4"
    iio.imwrite(src, frames, fps=10)
    dst = tmp_path / "out.mp4"
    code, out, _ = _run(capsys, "denoise", src, "-o", dst, "--sigma", 10, "--ws", 5, "--json")
    assert code == 0 and json.loads(out)["kind"] == "video"
    assert np.asarray(iio.imread(dst, index=None)).shape[0] == 4


def test_overwrite(tmp_path, capsys):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    _image(src)
    dst.write_bytes(b"keep")
    _fails(capsys, "denoise", src, "-o", dst, "--sigma", 10, match="--overwrite")
    assert dst.read_bytes() == b"keep"
    code, _, _ = _run(capsys, "denoise", src, "-o", dst, "--sigma", 10, "--ws", 5,
                      "--overwrite", "--quiet")  # fmt: skip
    assert code == 0 and iio.imread(dst).shape == (24, 20, 3)


def test_bad_inputs(tmp_path, capsys):
    src = tmp_path / "in.png"
    _image(src)
    out = tmp_path / "o.png"
    _fails(capsys, "denoise", tmp_path / "missing.png", "-o", out, match="no such file")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    _fails(capsys, "denoise", bad, "-o", out, match="not a readable image")
    folder = tmp_path / "mixed"
    folder.mkdir()
    _image(folder / "a.png", shape=(24, 20, 3))
    _image(folder / "b.png", shape=(20, 24, 3))
    _fails(capsys, "denoise", folder, "-o", tmp_path / "o", match="b.png")
    _fails(capsys, "denoise", src, "-o", out, "--sigma", 0, match="--sigma")
    _fails(capsys, "denoise", src, "-o", out, "--sigma", -3, match="--sigma")
    _fails(capsys, "denoise", src, "-o", out, "--max-memory", "1KB", match="--max-memory")
    _fails(capsys, "denoise", src, "-o", out, "--max-memory", "lots", match="--max-memory")
    _fails(capsys, "denoise", src, "-o", out, "--device", "nonsense", match="--device")
    _fails(capsys, "denoise", src, "-o", out, "--device", "cuda:99", match="--device")
    _fails(capsys, "denoise", src, "-o", tmp_path / "o.txt", match="needs one of")
    rgb16 = tmp_path / "rgb16.tif"
    _image(rgb16, np.uint16)
    _fails(capsys, "denoise", rgb16, "-o", tmp_path / "o16.png", match="TIFF")
    _fails(capsys, "denoise", src, match="-o/--output")
    _fails(capsys, "frobnicate", match="invalid choice")
    assert not out.exists() and not (tmp_path / "o").exists()


def test_demo(tmp_path, capsys, monkeypatch):
    """The demo end to end, shrunk: a crop of the photograph, a tiny clip."""
    from skimage import data

    import dnls.cli as cli

    monkeypatch.setattr(data, "astronaut", lambda: data.chelsea()[:64, :64])
    clip = cli._demo_clip
    monkeypatch.setattr(cli, "_demo_clip", lambda clean: clip(clean, frames=5, size=32))
    code, out, _ = _run(capsys, "demo", "--out", tmp_path / "d.png")
    assert code == 0, out
    assert "PSNR" in out and "SSIM" in out and "space-time gain" in out
    assert iio.imread(tmp_path / "d.png").shape == (64, 192, 3)


def test_demo_flows_point_to_the_moving_content():
    """Frame t's pixel is found in frame t' at the position the demo's flows give."""
    import dnls.cli as cli

    rng = np.random.default_rng(0)
    clean = rng.random((64, 64, 3)).astype(np.float32)
    step = (1.0, 2.0)  # whole pixels, so the spline shift is exact away from the borders
    clip = cli._demo_clip(clean, frames=5, size=24, step=step)
    flows = cli._demo_flows(5, 24, wt=2, step=step)
    assert flows.shape == (1, 5, 5, 2, 24, 24) and flows.dtype.is_floating_point is False
    y, x = 12, 11
    for t in range(5):  # T = 2 * wt + 1: every window holds the whole clip
        for slot in range(5):
            dh, dw = flows[0, t, slot, :, y, x].tolist()
            np.testing.assert_allclose(clip[slot, y + dh, x + dw], clip[t, y, x],
                                       atol=1e-5)  # fmt: skip

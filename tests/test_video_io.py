import av
import numpy as np
import pytest
from PIL import Image

from mag.cli import main
from mag.errors import InputError
from mag.io import read_mp4, write_mp4, write_png_strip
from mag.io.video import MIN_SIDE_PX, auto_scale
from mag.world import WorldConfig, make_episode

MIN_ROUND_TRIP_PSNR_DB = 35.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


@pytest.mark.parametrize("integer_motion", [True, False], ids=["integer", "subpixel"])
def test_mp4_round_trip_keeps_psnr_above_35_db(tmp_path, integer_motion):
    frames = make_episode("test", 2, config=WorldConfig(integer_motion=integer_motion)).frames
    path = write_mp4(tmp_path / "nested" / "ep.mp4", frames, fps=16)
    decoded = read_mp4(path, downscale=4)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert _psnr(decoded, frames) >= MIN_ROUND_TRIP_PSNR_DB
    assert read_mp4(path).shape == (len(frames), 128, 128, 3)


def test_yuv444_without_upscale_also_round_trips(tmp_path):
    frames = make_episode("test", 0).frames[:24]
    decoded = read_mp4(write_mp4(tmp_path / "a.mp4", frames, 8, scale=1, pix_fmt="yuv444p"))
    assert _psnr(decoded, frames) >= MIN_ROUND_TRIP_PSNR_DB


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    frames = make_episode("test", 0).frames
    target = tmp_path / "v.mp4"
    write_mp4(target, frames[:6], 16)
    write_mp4(target, frames[:9], 16)
    assert len(read_mp4(target)) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_unwritable_output_path_raises_input_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(InputError, match="cannot write"):
        write_mp4(blocker / "out.mp4", frames, 16)
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(InputError, match="it is a folder"):
        write_mp4(tmp_path / "folder.mp4", frames, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder.mp4"]


def test_bad_frames_and_options_raise_input_error(tmp_path):
    with pytest.raises(InputError, match=r"uint8 \[T, H, W, 3\]"):
        write_mp4(tmp_path / "x.mp4", np.zeros((3, 32, 32, 3), np.float32), 16)
    with pytest.raises(InputError, match="even frame sizes"):
        write_mp4(tmp_path / "x.mp4", np.zeros((3, 33, 32, 3), np.uint8), 16, scale=1)
    with pytest.raises(InputError, match="fps"):
        write_mp4(tmp_path / "x.mp4", np.zeros((3, 32, 32, 3), np.uint8), 0)


def test_reading_a_missing_file_or_a_non_video_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_mp4(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    with pytest.raises(InputError, match="cannot read"):
        read_mp4(junk)


def test_png_strip_lays_out_rows_with_labels(tmp_path):
    ep = make_episode("test", 0)
    path = write_png_strip(tmp_path / "s.png", [ep.panorama, ep.frames[:4]], ["panorama", "frames"],
                           scale=2)
    image = np.asarray(Image.open(path))
    gap, label = 2, 12
    assert image.shape == (2 * (64 + label) + gap, 512, 3)
    np.testing.assert_array_equal(image[label:label + 64:2, :512:2], ep.panorama)
    first_frame = image[label + 64 + gap + label:, :64]
    np.testing.assert_array_equal(first_frame[::2, ::2], ep.frames[0])
    with pytest.raises(InputError, match="one label per row"):
        write_png_strip(tmp_path / "t.png", [ep.panorama], ["a", "b"])


def test_cli_world_preview_writes_the_episode(tmp_path, capsys):
    out = tmp_path / "out" / "preview.mp4"
    argv = ["world", "preview", "--split", "test", "--index", "1", "--frames", "12", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    episode = make_episode("test", 1)
    assert f"switch frame {episode.switch_frame}" in printed and episode.prompt in printed
    assert episode.theme in printed and str(out) in printed
    decoded = read_mp4(out, downscale=4)
    assert _psnr(decoded, episode.frames[:12]) >= MIN_ROUND_TRIP_PSNR_DB


def test_cli_world_show_writes_a_png_and_errors_are_one_line(tmp_path, capsys):
    png = tmp_path / "strip.png"
    assert main(["world", "show", "--index", "0", "--theme", "snowy-forest", "-o",
                 str(png)]) == 0
    assert Image.open(png).format == "PNG"
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["world", "preview", "--frames", "3", "-o", str(blocker / "x.mp4")]) == 2
    assert capsys.readouterr().err.startswith("mag: error: cannot write")


def test_real_size_video_is_written_at_native_size_with_every_frame_at_16_fps(tmp_path):
    t, y, x = np.meshgrid(np.arange(5), np.arange(480), np.arange(832), indexing="ij")
    # every frame differs
    smooth = np.stack([x / 832, y / 480, (x + y + 40 * t) % 400 / 400], axis=-1)
    frames = (smooth * 255).astype(np.uint8)
    path = write_mp4(tmp_path / "wan.mp4", frames, 16)
    decoded = read_mp4(path)
    assert decoded.shape == (5, 480, 832, 3)
    assert _psnr(decoded, frames) >= MIN_ROUND_TRIP_PSNR_DB
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 16


def test_small_frames_are_upscaled_to_the_minimum_side_and_large_ones_are_not():
    assert auto_scale(16, 16) * 16 == MIN_SIDE_PX and auto_scale(32, 32) * 32 == MIN_SIDE_PX
    assert auto_scale(480, 832) == 1 and auto_scale(100, 200) == 2

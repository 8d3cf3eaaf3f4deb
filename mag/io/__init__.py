"""File input/output: mp4 video (PyAV) and PNG strips of frames."""

from mag.io.video import DEFAULT_CRF, DEFAULT_SCALE, read_mp4, write_mp4, write_png_strip

__all__ = ["DEFAULT_CRF", "DEFAULT_SCALE", "read_mp4", "write_mp4", "write_png_strip"]

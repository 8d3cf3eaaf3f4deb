"""``mag serve``: a live browser viewer of a never-ending stream (steer with the arrow keys, switch
prompts).

``live`` (the generator thread), ``viewer`` (HTTP server and page), ``cli``. Design:
docs/generate.md.
"""

from mag.serve.cli import register
from mag.serve.live import LiveFrame, LiveStream, default_max_frames
from mag.serve.viewer import HOST, Viewer, apply_control, page_html

__all__ = ["HOST", "LiveFrame", "LiveStream", "Viewer", "apply_control", "default_max_frames",
           "page_html", "register"]

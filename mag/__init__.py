"""mag: real-time autoregressive video generation with compressed long-term memory (MAG)."""

__version__ = "0.1.0"

"""Training data beyond the procedural world: prompt files for the data-free DMD stages."""

from mag.data.prompts import PromptBatch, PromptFileSource, read_prompt_file

__all__ = ["PromptBatch", "PromptFileSource", "read_prompt_file"]

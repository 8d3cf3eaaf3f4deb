"""Training data beyond the procedural world: latent shards of real videos and prompt files."""

from mag.data.prompts import PromptBatch, PromptFileSource, read_prompt_file

__all__ = ["PromptBatch", "PromptFileSource", "read_prompt_file"]

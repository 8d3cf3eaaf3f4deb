"""Pipelines: model + scheduler + cache combined into generation loops (streaming, training
rollouts)."""

from mag.pipelines.loading import compile_stream, load_generator
from mag.pipelines.pretrained import MagPipeline, load_any_dit
from mag.pipelines.streaming import SAMPLERS, SamplerConfig, SamplerKind, StreamingGenerator
from mag.pipelines.writers import (
    AVAILABLE_POLICIES,
    GENERATOR_ONLY_POLICIES,
    MEMORY_MODEL_POLICIES,
    CacheWriter,
    GeneratorWriter,
    check_policy_name,
    default_writer,
    policy_from_name,
    writer_for,
)

__all__ = ["AVAILABLE_POLICIES", "GENERATOR_ONLY_POLICIES", "MEMORY_MODEL_POLICIES", "SAMPLERS",
           "CacheWriter", "GeneratorWriter", "MagPipeline", "SamplerConfig", "SamplerKind",
           "StreamingGenerator", "check_policy_name", "compile_stream", "default_writer",
           "load_any_dit", "load_generator", "policy_from_name", "writer_for"]

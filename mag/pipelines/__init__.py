"""Pipelines: model + scheduler + cache combined into generation loops (streaming, benchmark feeding)."""

from mag.pipelines.streaming import (
    AVAILABLE_POLICIES,
    CacheWriter,
    GeneratorWriter,
    SamplerConfig,
    StreamingGenerator,
    check_policy_name,
    compile_stream,
    default_writer,
    load_generator,
    policy_from_name,
    writer_for,
)

__all__ = ["AVAILABLE_POLICIES", "CacheWriter", "GeneratorWriter", "SamplerConfig", "StreamingGenerator",
           "check_policy_name", "compile_stream", "default_writer", "load_generator", "policy_from_name",
           "writer_for"]

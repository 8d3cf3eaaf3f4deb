"""Where streaming time goes: frames/s per policy and a torch-profiler table of one stream.

Streams ``--blocks`` blocks of the shipped tiny generator (camera panning one patch per frame) under
each policy, times a second, warm stream, then profiles one more stream of the last policy.

Usage: python scripts/profile_stream.py [--model tiny-causal-long] [--memory-model tiny-memory]
           [--policies window,mag] [--blocks 32] [--threads 1] [--rows 14]
"""

from __future__ import annotations

import argparse
import time

import torch

from mag.app import load_memory_for, text_cache
from mag.pipelines import StreamingGenerator, load_generator, policy_from_name, writer_for

PROMPT = "a camera panning slowly across a quiet desert at dusk with dunes, rocks and cacti"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-causal-long")
    parser.add_argument("--memory-model", default="tiny-memory")
    parser.add_argument("--policies", default="window,mag")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, preset, meta = load_generator(args.model)
    memory, _, empty = load_memory_for(args.memory_model, preset, "cpu")
    context = text_cache(preset, meta).get([PROMPT])
    block = preset.cache.frames_per_block
    for name in args.policies.split(","):
        policy = policy_from_name(name, preset)
        writer = writer_for(policy, memory_model=memory, empty_context=empty)
        gen = StreamingGenerator.for_preset(model, preset, policy, writer=writer)

        def stream(gen: StreamingGenerator = gen) -> None:
            gen.reset(1, args.blocks * block)
            gen.set_prompt(context)
            noise = torch.Generator().manual_seed(0)
            for b in range(args.blocks):
                camera = torch.arange(b * block, (b + 1) * block, dtype=torch.float32)[None]
                gen.generate_block(noise, camera if preset.dit.camera_rope else None)

        stream()  # warm-up
        start = time.perf_counter()
        stream()
        seconds = time.perf_counter() - start
        print(f"{name}: {args.blocks * block / seconds:.1f} frames/s ({args.blocks} blocks of "
              f"{block},"
              f" {args.threads} thread(s))")
    with torch.profiler.profile() as prof:
        stream()
    print(f"profile of one {name} stream:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

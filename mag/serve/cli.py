"""``mag serve`` on the command line.
"""

from __future__ import annotations

import argparse

from mag.app import (
    add_compile_argument,
    add_model_arguments,
    config_from_args,
    load_models,
    sampler_config,
    set_threads,
)
from mag.generate import DEFAULT_PROMPT
from mag.io.cli import dtype_from_args
from mag.io.text import check_text
from mag.pipelines import MEMORY_MODEL_POLICIES, check_policy_name
from mag.real_weights import (
    add_real_weights_arguments,
    loaded_from_pipeline,
    pipeline_from_args,
    uses_real_weights,
)
from mag.serve.live import (
    DEFAULT_POLICY,
    DEFAULT_PORT,
    GROWING_MAX_FRAMES,
    MAX_PROMPT_CHARS,
    LiveStream,
    default_max_frames,
)
from mag.serve.viewer import Viewer

# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:

    p = subparsers.add_parser(
        "serve", help="live browser viewer on 127.0.0.1: frames stream, arrow keys steer, prompts "
                      "switch",
        description="Stream generated frames live to a local web page (127.0.0.1 only): the arrow "
                    "keys"
                    " steer the camera, a text box switches the prompt (KV re-cache), FPS and KV "
                    "memory"
                    " are shown live. Ctrl-C stops. See docs/generate.md.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--policy", default=None,
                   help="cache policy: full, window, downsample, mag, bounded, official, archive "
                        f"(default: the preset's: {DEFAULT_POLICY} for tiny, official for "
                        "wan-1.3b)")
    p.add_argument("--prompt", default=None, help="first prompt (default: a test-split world "
                                                  "prompt)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="frames per stream before the cache is emptied (default: "
                        f"{GROWING_MAX_FRAMES} under"
                        " full, downsample and mag, whose cache grows; the RoPE table's length "
                        "under window"
                        " and bounded)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    add_compile_argument(p)
    add_model_arguments(p)
    add_real_weights_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    config = config_from_args(args)
    real = uses_real_weights(args)
    if not real:
        args.policy = args.policy or DEFAULT_POLICY
        # before any model loads
        check_policy_name(args.policy, has_memory_model=bool(config.memory_model))
    if args.prompt is not None:
        check_text(args.prompt, "--prompt", MAX_PROMPT_CHARS)
    sampler = sampler_config(config)
    viewer = Viewer(args.port)  # a taken port fails before any model is loaded
    try:
        codec = None
        if real:
            # few-step sampler: the released generators are DMD models
            pipe = pipeline_from_args(args)
            loaded, codec = loaded_from_pipeline(pipe)
            sampler, args.policy = pipe.sampler, pipe.policy_name
        else:
            needs_memory = args.policy in MEMORY_MODEL_POLICIES and bool(config.memory_model)
            loaded = load_models(config, device=args.device, with_memory=needs_memory,
                                 dtype=dtype_from_args(args))
        max_frames = args.max_frames
        if max_frames is None:
            max_frames = default_max_frames(args.policy, loaded.model.cfg.rope_max_positions)
        live = LiveStream(loaded, args.policy, sampler, args.prompt or DEFAULT_PROMPT,
                          max_frames=max_frames, seed=args.seed, compile_model=args.compile,
                          codec=codec)
    except BaseException:
        viewer.close()
        raise
    viewer.attach(live)
    live.start()
    print(f"mag serve: {viewer.url} (policy {args.policy}, {live.horizon} frames per stream; "
          "frames are"
          " generated while a page is open) -- Ctrl-C to stop", flush=True)
    try:
        viewer.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        viewer.server.closing = True
        live.stop()
        viewer.close()
    print(f"mag serve: stopped after {live.stats().get('frame', -1) + 1} frames", flush=True)

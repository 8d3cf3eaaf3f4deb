"""Our streaming loop against the official MAG inference loop, and our UMT5 against Wan's T5 encoder.

tests/data/official/ (scripts/official_reference.py, its README): MAG's ``memory_generation_pipeline``
streamed 27 blocks at the official geometry (2 uncompressed sinks, a ring of 21 compressed frames that
wraps at block 21, the memory model writing every block with the empty prompt and reading the sinks),
with its noise and re-noise recorded; and Wan2.1's T5 encoder in its ``.pth`` layout. Both sides run in
float32; the differences left come from operation order (~1e-6 here), a mis-wired cache moves outputs by
O(0.01..1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mag.pipelines import SamplerConfig, StreamingGenerator, load_any_dit, policy_from_name, writer_for
from mag.text.umt5_wan import load_wan_t5

DATA = Path(__file__).parent / "data" / "official"
BLOCK_TOLERANCE = 1e-4
# Latents of the reference stream are [16, 2, 4]: a 16 x 32 video at the VAE's 8x.
SIZE = {"video.height": 16, "video.width": 32}


def _stream(policy_name: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    ref = load_file(str(DATA / "mag_stream.safetensors"))
    generator = load_any_dit(DATA / "mag_generator", **SIZE)
    memory = load_any_dit(DATA / "mag_memory", stages=("memory",), **SIZE)
    preset = generator.preset
    policy = policy_from_name(policy_name, preset)
    writer = writer_for(policy, memory_model=memory.model, empty_context=ref["empty_context"])
    gen = StreamingGenerator.for_preset(generator.model, preset, policy, sampler=SamplerConfig(),
                                        writer=writer)
    block = preset.cache.frames_per_block
    blocks = ref["noise"].shape[1] // block
    gen.reset(1, blocks * block)
    gen.set_prompt(ref["context"])
    out = []
    with torch.no_grad():
        for b in range(blocks):
            frames = slice(b * block, (b + 1) * block)
            out.append(gen.generate_block(noise=ref["noise"][:, frames],
                                          renoise=[n[None] for n in ref["renoise"][b]]))
    return out, ref


def test_official_geometry_streams_27_blocks_through_a_ring_wrap_like_the_official_loop():
    blocks, ref = _stream("official")
    assert len(blocks) == 27  # the ring of 21 wraps at block 21
    block = blocks[0].shape[1]
    errors = [float((ours - ref["output"][:, b * block:(b + 1) * block]).abs().max())
              for b, ours in enumerate(blocks)]
    assert max(errors) <= BLOCK_TOLERANCE, errors
    assert float(ref["output"].abs().max()) > 0.1


def test_hiding_the_sinks_from_the_memory_model_departs_from_the_official_loop():
    blocks, ref = _stream("bounded")  # same geometry, the memory model blind to the sinks
    block = blocks[0].shape[1]
    late = torch.cat(blocks[2:], 1) - ref["output"][:, 2 * block:]
    assert float(late.abs().max()) > 100 * BLOCK_TOLERANCE


def test_umt5_read_from_the_original_pth_equals_wans_t5_encoder():
    ref = load_file(str(DATA / "umt5_encode.safetensors"))
    model = load_wan_t5(DATA / "umt5_enc_bf16.pth", torch.float32)
    ids, mask = ref["ids"].long(), ref["mask"].long()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    scale = float(ref["hidden"].abs().max())
    assert float((hidden - ref["hidden"]).abs().max()) <= BLOCK_TOLERANCE * scale


@pytest.mark.parametrize("name", ["mag_generator", "mag_memory"])
def test_official_folders_are_detected_as_official_mag(name):
    assert load_any_dit(DATA / name, stages=("memory",), **SIZE).meta["source_format"] == "official-mag"

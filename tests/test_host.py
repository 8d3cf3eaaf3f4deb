"""The streaming loop never makes the host wait for the device, and the kernel counter counts
launches.

Streams run on the ``meta`` device, which stands in for a GPU: a host sync there is a host sync on
CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mag.bench.host import HostSyncAudit, HostSyncError, KernelCounter
from mag.config import get_preset
from mag.models import WanDiT
from mag.pipelines import (
    AVAILABLE_POLICIES,
    SamplerConfig,
    StreamingGenerator,
    policy_from_name,
    writer_for,
)

META = torch.device("meta")
BATCH = 2
# Camera-anchored (per-sample RoPE angles), small rings so that window and bounded wrap within the
# stream.
SMALL = {"dit.dim": 32, "dit.ffn_dim": 64, "dit.num_heads": 2, "dit.num_layers": 2,
         "dit.text_dim": 16,
         "dit.freq_dim": 16, "dit.rope_max_positions": 64, "dit.camera_rope": True,
         "video.height": 8, "video.width": 8, "cache.window_frames": 3, "cache.memory_slots": 2}
BLOCKS = 6


def _meta_stream(policy_name: str, sampler: SamplerConfig) -> StreamingGenerator:
    preset = get_preset("tiny", **SMALL)
    with META:
        generator, memory_model = WanDiT(preset.dit).eval(), WanDiT(preset.dit).eval()
    empty = torch.zeros(1, 3, preset.dit.text_dim, device=META)
    policy = policy_from_name(policy_name, preset)
    writer = writer_for(policy, memory_model=memory_model, empty_context=empty)
    gen = StreamingGenerator.for_preset(generator, preset, policy, sampler=sampler, writer=writer)
    gen.reset(BATCH, BLOCKS * 3 * 2)
    return gen


@pytest.mark.parametrize("policy", ["full", "window", "downsample", "mag", "bounded"])
@pytest.mark.parametrize("sampler", [SamplerConfig(), SamplerConfig("euler", steps=2,
                                                                    guidance_scale=3.0)],
                         ids=["few_step", "euler-guided"])
def test_streaming_blocks_never_sync_the_host(policy, sampler):
    gen = _meta_stream(policy, sampler)
    text = torch.zeros(BATCH, 3, gen.model.cfg.text_dim, device=META)
    offsets = torch.zeros(BATCH, 3, device=META)
    with HostSyncAudit(strict=True) as audit:
        gen.set_prompt(text, text if sampler.uses_guidance else None)
        gen.feed(torch.zeros(BATCH, 3, *gen.latent_shape, device=META), offsets)
        for _ in range(BLOCKS):
            gen.generate_block(width_offsets=offsets)
        gen.predict_block_teacher_forced(torch.zeros(BATCH, 3, *gen.latent_shape, device=META),
                                         width_offsets=offsets)
        gen.recache(text, text if sampler.uses_guidance else None)
        gen.generate_block(width_offsets=offsets)
    assert audit.syncs == []
    # the ring wrapped: a read is no longer of the slots in time order
    if policy in ("window", "bounded"):
        assert gen.cache.frames_seen > gen.cache.capacity_frames


def test_audit_catches_each_kind_of_sync():
    on_device = torch.zeros(3, device=META)
    with HostSyncAudit() as audit:
        # host data built on the device: blocking copy
        torch.tensor([1, 2], device=META)
        torch.arange(3).to(META)                          # host tensor moved without non_blocking
        torch.arange(3).to(META, non_blocking=True)       # fine
        torch.arange(3).to(META, torch.float32, True)     # fine: non_blocking given by position
        on_device.new_zeros(2).copy_(torch.ones(2))       # blocking copy into a device tensor
        torch.arange(3).to(torch.float64)                 # dtype only: fine
    assert [s.operation.split()[0] for s in audit.syncs] == [
        "_VariableFunctionsClass.tensor(host", "TensorBase.to", "Tensor.copy_"]
    assert all(s.where == "?" for s in audit.syncs)  # called from no mag source line
    assert audit.report().count("1 x ") == 3

    for read_back in (lambda: on_device.sum().item(), lambda: on_device.tolist(),
                      lambda: bool(on_device[0]), lambda: on_device.nonzero()):
        with HostSyncAudit(strict=True), pytest.raises(HostSyncError, match="reads a device value"):
            read_back()


def test_audit_names_the_mag_line_that_synced():
    preset = get_preset("tiny", **SMALL)
    with META:
        model = WanDiT(preset.dit)
    # frame positions given as a host list (an API convenience) are copied
    with HostSyncAudit() as audit:
        model._frame_positions([0, 1, 2], 3, META)
    assert len(audit.syncs) == 1
    where = audit.syncs[0].where
    assert where.startswith("mag/models/dit.py:") and where.endswith("(_frame_positions)")


def test_cpu_runs_record_nothing():
    with HostSyncAudit() as audit:
        torch.tensor([1.0]).item()
        torch.arange(2).to("cpu")
    assert audit.syncs == []


def test_kernel_counter_counts_fused_attention_once_and_views_apart():
    q = torch.zeros(1, 2, 5, 8, device=META)
    with KernelCounter() as counter:
        out = F.scaled_dot_product_attention(q, q, q)
        out.transpose(1, 2).reshape(1, 5, 16)
        (out * 2 + 1).sum()
    assert counter.ops["scaled_dot_product_attention"] == 1
    assert not any("bmm" in op or "softmax" in op for op in counter.ops)  # its math is not counted
    # attention, the copy that reshape of a transpose makes, mul, add, sum
    assert counter.kernels == 5
    assert counter.ops["aten.clone.default"] == 1
    assert counter.views >= 2
    assert counter.top(1)[0][1] == 1


def test_count_kernels_script_counts_a_tiny_stream_without_syncs():
    """scripts/count_kernels.py: one self- and one cross-attention kernel per layer and forward, no
    host sync, and the same number of forwards per block for every policy (denoising steps + one
    write pass)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "count_kernels", Path(__file__).resolve().parents[1] / "scripts" / "count_kernels.py")
    count_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count_kernels)
    report = count_kernels.count("tiny", ["window", "mag"], torch.float32, warmup_blocks=2)
    preset = get_preset("tiny")
    steps = len(preset.scheduler.denoising_steps)
    for row in report["policies"].values():
        assert row["forwards"] == steps + 1
        assert row["attention_kernels"] == 2 * preset.dit.num_layers * row["forwards"]
        assert row["host_syncs"] == []
        assert row["kernels"] > row["attention_kernels"] and row["dtype_casts"] >= 0
    assert report["dtype"] == "float32" and report["machine"]["device"] == "meta"


def test_sync_check_script_passes_the_stream_and_catches_a_planted_sync(monkeypatch):
    """scripts/sync_check.py (what a lent GPU runs with CUDA's own check): clean on every policy as
    shipped, and a cache commit that makes a blocking host-to-device copy is reported for every
    policy."""
    import importlib.util
    from pathlib import Path

    from mag.cache import KVCache

    spec = importlib.util.spec_from_file_location(
        "sync_check", Path(__file__).resolve().parents[1] / "scripts" / "sync_check.py")
    sync_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync_check)
    clean = sync_check.check("tiny", 1, META, torch.float32, blocks=2)
    assert set(clean["policies"]) == set(AVAILABLE_POLICIES)  # the official geometry included
    assert set(clean["policies"].values()) == {"no host sync"}

    commit = KVCache.commit

    def commit_with_blocking_copy(self, pending, frame_positions):
        commit(self, pending, frame_positions)
        torch.tensor(list(pending.plan.slots), device=self.slot_positions.device)

    monkeypatch.setattr(KVCache, "commit", commit_with_blocking_copy)
    planted = sync_check.check("tiny", 1, META, torch.float32, blocks=2)
    assert all(r.startswith("SYNC: HostSyncError") and "blocking host-to-device copy" in r
               for r in planted["policies"].values())

"""``mag bench speed``: the JSON contract, KV accounting against the real cache, and clear errors.

The tiny preset streams 3 blocks per policy on the CPU; the Wan-1.3B path is checked for geometry
and argument handling only (on the meta device), since CI has no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import needs_inductor, random_dit
from torch import nn

from mag.bench import speed
from mag.bench.speed.report import peak_bytes, peak_key
from mag.cache import FullPolicy, MagPolicy, kv_bytes_per_frame
from mag.cli import main
from mag.config import CacheConfig, get_preset
from mag.info import KV_DTYPE, preset_info
from mag.models import count_parameters
from mag.models.compile import CompiledModules, compile_model

REPO = Path(__file__).resolve().parents[1]
ALL_POLICIES = "full,window,downsample,mag,bounded,archive"
# 9 video frames = 9 latent frames of the pixel codec = 3 blocks.
TINY_FRAMES = 9
POLICY_KEYS = {"fps", "latency_ms_p50", "latency_ms_p95", "peak_rss_bytes", "peak_method",
               "kv_bytes", "kv_bytes_streamed", "video_frames", "blocks"}
META_KEYS = {"machine", "preset", "device", "dtype", "commit", "command", "text", "compile",
             "models"}


def run_cli(*args: str) -> int:
    return main(["bench", "speed", "--threads", "1", "--no-progress", *args])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    assert run_cli("--preset", "tiny", "--policies", ALL_POLICIES, "--frames", str(TINY_FRAMES),
                   "--warmup-blocks", "0", "--out", str(out)) == 0
    data = json.loads(out.read_text())
    data["_path"] = str(out)
    return data


def test_json_contract_and_plot(report):
    assert META_KEYS <= report.keys()
    assert report["preset"] == "tiny" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu"]
    assert report["text"]["encoder"] is None
    assert list(report["policies"]) == ALL_POLICIES.split(",")
    for row in report["policies"].values():
        assert POLICY_KEYS <= row.keys()
        assert row["fps"] > 0 and 0 < row["latency_ms_p50"] <= row["latency_ms_p95"]
        assert row["video_frames"] == TINY_FRAMES and row["blocks"] == TINY_FRAMES // 3
        horizons = [h for h, _ in row["kv_bytes"]]
        assert set(speed.KV_HORIZONS) <= set(horizons) and horizons == sorted(horizons)
    png = Path(report["_path"]).with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_replayed_kv_bytes_equal_the_streamed_cache(report):
    for name, row in report["policies"].items():
        at_stream = dict(row["kv_bytes"])[row["video_frames"]]
        assert at_stream == row["kv_bytes_streamed"], name
    # 3 blocks never fill the archive policy's ring: its host tier is still empty.
    archive = report["policies"]["archive"]
    host_tier = ("archive_frames", "archive_bytes", "archive_disk_bytes")
    assert [archive[key] for key in host_tier] == [0, 0, 0]


def test_mag_keeps_a_third_of_full_plus_sinks_and_bounded_stays_in_budget(report):
    cache = get_preset("tiny").cache
    rows = report["policies"]
    per_frame = rows["full"]["kv_bytes_per_frame"]
    full, mag = dict(rows["full"]["kv_bytes"]), dict(rows["mag"]["kv_bytes"])
    for horizon in speed.KV_HORIZONS:
        assert (
            full[horizon] / 3
            <= mag[horizon]
            <= full[horizon] / 3 + cache.memory_sink_frames * per_frame
        )
    assert dict(rows["downsample"]["kv_bytes"]) == mag
    budget = (cache.memory_sink_frames + cache.memory_slots) * per_frame
    bounded = [b for _, b in rows["bounded"]["kv_bytes"]]
    assert max(bounded) <= budget and bounded[-1] == budget
    window = {b for h, b in rows["window"]["kv_bytes"] if h in speed.KV_HORIZONS}
    assert window == {(cache.sink_frames + cache.window_frames) * per_frame}


def test_rounds_interleave_policies_and_report_medians(tmp_path, capsys):
    out = tmp_path / "rounds.json"
    assert run_cli("--preset", "tiny", "--policies", "window,full", "--frames", "6",
                   "--warmup-blocks", "0",
                   "--rounds", "3", "--profile-blocks", "1", "--attention", "math", "--out",
                   str(out)) == 0
    data = json.loads(out.read_text())
    assert data["attention"] == "math"
    rows = data["policies"]
    for row in rows.values():
        assert len(row["fps_rounds"]) == 3 and row["fps"] == sorted(row["fps_rounds"])[1]
        assert len(row["latency_ms_blocks"]) == row["blocks"] == 2
        profile = row["profile"]
        assert profile["blocks"] == 1 and profile["time"] == "self CPU time"
        assert "aten::addmm" in {op["op"] for op in profile["ops"]}
        assert 0 < sum(op["share"] for op in profile["ops"]) <= 1 + 1e-9
    assert rows["window"]["fps_over_window"] == 1.0
    assert "x1.000 window fps" in capsys.readouterr().out


def test_merge_rounds_takes_per_round_ratios_and_per_block_medians():
    def row(fps: float, blocks: list[float]) -> dict:
        return {"fps": fps, "seconds": 1 / fps, "latency_ms_blocks": blocks,
                "peak_rss_bytes": int(fps)}

    merged = speed.merge_rounds({
        "window": [row(10.0, [1.0, 2.0]), row(20.0, [3.0, 4.0]), row(40.0, [5.0, 9.0])],
        "mag": [row(9.0, [2.0, 2.0]), row(19.0, [1.0, 1.0]), row(20.0, [7.0, 3.0])],
    })
    # Per-round ratios 0.9, 0.95, 0.5: the median pairs each round with its own window run.
    assert merged["mag"]["fps_over_window"] == pytest.approx(0.9)
    assert merged["mag"]["fps"] == 19.0 and merged["mag"]["latency_ms_blocks"] == [2.0, 2.0]
    assert (
        merged["window"]["latency_ms_first"] == 3.0 and merged["window"]["latency_ms_last"] == 4.0
    )
    assert merged["mag"]["peak_rss_bytes"] == 20 and "peak_device_bytes" not in merged["mag"]


def test_peak_bytes_reads_the_key_of_results_written_before_the_rename():
    """results/ keeps files whose rows say ``peak_memory_bytes`` (CPU and CUDA alike): still
    read."""
    old = json.loads((REPO / "results" / "speed" / "cpu-tiny.json").read_text())["policies"][
        "window"
    ]
    assert "peak_rss_bytes" not in old and peak_bytes(old) == old["peak_memory_bytes"] > 0
    gpu = json.loads((REPO / "results" / "speed" / "gpu-h200" / "wan-1.3b-eager.json").read_text())
    assert {peak_key(row) for row in gpu["policies"].values()} == {"peak_memory_bytes"}
    merged = speed.merge_rounds({"mag": [old, {**old,
                                               "peak_memory_bytes": old["peak_memory_bytes"] + 1}]})
    assert merged["mag"]["peak_memory_bytes"] == old["peak_memory_bytes"] + 1
    assert peak_bytes({"peak_device_bytes": 7, "fps": 1.0}) == 7
    with pytest.raises(KeyError, match="no peak figure"):
        peak_bytes({"fps": 1.0})


@pytest.mark.parametrize(("args", "message"), [
    (["--policies", "full,nope"], "unknown cache policy 'nope'"),
    (["--policies", ","], "--policies is empty"),
    (["--frames", "0"], "--frames must be a positive"),
    (["--warmup-blocks", "-1"], "--warmup-blocks must be >= 0"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--profile-blocks", "-1"], "--profile-blocks must be >= 0"),
    (["--attention", "cudnn"], "--attention cudnn runs on CUDA only"),
    (["--preset", "wan-1.3b"], "benchmarked on a GPU only"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_give_one_clear_error(tmp_path, capsys, args, message):
    assert run_cli(*args, "--out", str(tmp_path / "s.json")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s.json").exists()


def test_unknown_compile_mode_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--compile", "fastest", "--out", str(tmp_path / "s.json"))
    assert exit_info.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


def test_unwritable_json_path_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for path in (blocker / "out.json", tmp_path, tmp_path / "out.txt"):
        assert run_cli("--frames", "3", "--out", str(path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert run_cli("--preset", "wan-1.3b", "--device", "cuda", "--out",
                   str(tmp_path / "s.json")) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_wan_geometry_and_kv_accounting_without_allocating():
    preset = speed.speed_preset("wan-1.3b", steps=4, height=480, width=832)
    assert preset.scheduler.denoising_steps == get_preset("wan-1.3b").scheduler.denoising_steps
    assert speed.latent_frames_for(preset, 237) == 60 and speed.video_frames_for(preset, 60) == 237
    assert speed.latent_frames_for(preset, 240) == 63  # rounded up to whole blocks of 3
    per_frame = kv_bytes_per_frame(preset.dit, preset.tokens_per_frame, KV_DTYPE)
    assert per_frame == preset_info(preset)["kv_bytes_per_frame_bf16"]
    curve = speed.kv_bytes_curve(FullPolicy(), preset, KV_DTYPE, [237, 10000])
    assert curve == [[237, 60 * per_frame], [10000, speed.latent_frames_for(preset,
                                                                            10000) * per_frame]]
    cache = preset.cache
    bounded = speed.kv_bytes_curve(MagPolicy(cache.memory_sink_frames, cache.memory_slots), preset,
                                   KV_DTYPE, list(speed.KV_HORIZONS))
    assert bounded[-1][1] == (cache.memory_sink_frames + cache.memory_slots) * per_frame
    model = speed.random_model(preset, "meta", torch.bfloat16, seed=0)
    assert (
        model.patch_embedding.weight.is_meta
        and model.patch_embedding.weight.dtype == torch.bfloat16
    )
    assert count_parameters(model) == preset_info(preset)["params"]


def test_steps_override_spaces_the_few_step_list():
    assert speed.speed_preset("tiny", steps=2).scheduler.denoising_steps == (1000, 500)


class _Broken(nn.Module):
    def forward(self, *args: object) -> None:
        raise RuntimeError("backend compiler failed (simulated)")


def test_a_failing_compile_falls_back_to_eager_and_says_so(tmp_path, monkeypatch, capsys):
    def broken_compile(model, **options):
        original = model.head
        model.head = _Broken()
        return CompiledModules([(model, "head", original)])

    monkeypatch.setattr(speed.measure, "compile_model", broken_compile)
    out = tmp_path / "c.json"
    assert run_cli("--policies", "full", "--frames", "3", "--compile", "--out", str(out)) == 0
    data = json.loads(out.read_text())
    assert data["compile"]["requested"] and not data["compile"]["used"]
    assert "simulated" in data["compile"]["error"]
    assert data["policies"]["full"]["fps"] > 0
    assert "torch.compile failed" in capsys.readouterr().err


def test_rope_table_can_grow_for_long_random_streams_only(tmp_path):
    """Long streams of a random-weight model need a longer position table; a trained model keeps its
    own."""
    from mag.bench.speed import speed_preset

    assert speed_preset("tiny", rope_max_positions=12_000).dit.rope_max_positions == 12_000
    code = main(["bench", "speed", "--preset", "tiny", "--model", "tiny-causal-long", "--policies",
                 "window",
                 "--frames", "6", "--rope-max-positions", "12000", "--out",
                 str(tmp_path / "s.json")])
    assert code == 2 and not (tmp_path / "s.json").exists()


def test_overrides_of_a_loaded_model_keep_its_own_preset_fields():
    """--height / --steps on a shipped model change only what they name (not its camera RoPE or
    video)."""
    loaded = speed.build_models(None, model="tiny-causal-long", memory_model=None,
                                policies=("window",),
                                device="cpu", dtype=torch.float32, seed=0, steps=2, height=32)
    assert loaded.preset.dit == loaded.generator.cfg and loaded.preset.dit.camera_rope
    assert (loaded.preset.video.height, loaded.preset.video.width) == (32, 16)
    assert loaded.preset.scheduler.denoising_steps == (1000, 500)


@pytest.mark.parametrize("preset_name", ["tiny", "wan-1.3b"])
def test_sink_free_memory_keeps_at_most_0_34_of_full_at_every_horizon(preset_name):
    """Issue 8's KV bound: with cache.memory_sink_frames = 0 every block keeps one of its frames;
    with the default 3 uncompressed sinks the bound only holds from a few hundred frames on."""
    horizons = list(speed.KV_HORIZONS)
    for sinks, holds_everywhere in ((0, True), (3, False)):
        preset = speed.speed_preset(preset_name, cache={"memory_sink_frames": sinks})
        full = speed.kv_bytes_curve(FullPolicy(), preset, KV_DTYPE, horizons)
        mag = speed.kv_bytes_curve(MagPolicy(sinks), preset, KV_DTYPE, horizons)
        ratios = [m / f for (_, m), (_, f) in zip(mag, full, strict=True)]
        assert all(r <= 0.34 for r in ratios) == holds_everywhere, (sinks, ratios)
        assert ratios[-1] <= 0.34


def _stream(model, memory, preset, name: str, blocks: int) -> torch.Tensor:
    from mag.pipelines import StreamingGenerator, policy_from_name, writer_for

    text_shape = (1, preset.text_max_tokens, preset.dit.text_dim)
    context, empty = (torch.randn(text_shape,
                                  generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    policy = policy_from_name(name, preset)
    gen = StreamingGenerator.for_preset(model, preset, policy,
                                        writer=writer_for(policy, memory_model=memory,
                                                          empty_context=empty))
    gen.reset(batch_size=1, horizon_frames=blocks * preset.cache.frames_per_block)
    gen.set_prompt(context)
    noise = torch.Generator().manual_seed(0)
    return torch.cat([gen.generate_block(noise) for _ in range(blocks)], dim=1)


def _compiled_graphs(preset) -> int:
    """Graphs dynamo builds for a 2-block window stream of a compiled random model of ``preset``
    (asserting that no region breaks its graph: a break would leave eager gaps, and CUDA graphs,
    inside a region)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_dit(preset.dit)
    compile_model(model, backend="aot_eager")
    _stream(model, None, preset, "window", blocks=2)
    graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    return graphs


def test_compiled_block_regions_stream_exactly_like_eager():
    """--compile's regions (each block minus its cached attention) traced by dynamo + AOT autograd:
    streams under window and mag match eager bit for bit, and restore() puts the eager model
    back."""
    preset = get_preset("tiny")
    model, memory = random_dit(preset.dit, seed=0), random_dit(preset.dit, seed=1)
    eager = {name: _stream(model, memory, preset, name, blocks=4) for name in ("window", "mag")}
    torch._dynamo.reset()
    compiled = [compile_model(m, backend="aot_eager") for m in (model, memory)]
    assert "before_cache" in vars(model.blocks[0])
    for name, reference in eager.items():
        # random heads: a comparison of zeros would prove nothing
        assert reference.abs().amax() > 0.1
        assert torch.equal(_stream(model, memory, preset, name, blocks=4), reference), name
    for c in compiled:
        c.restore()
    assert "before_cache" not in vars(model.blocks[0]) and type(model.head).__name__ == "Head"
    torch._dynamo.reset()


def test_unknown_compile_mode_is_a_config_error():
    from mag.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown compile mode 'turbo'; valid modes: default, "
                                          "reduce"):
        compile_model(random_dit(get_preset("tiny").dit), mode="turbo")


def test_compiled_layers_share_their_graphs():
    """One graph per compiled region serves every layer and every block (no graph breaks, no
    recompiles: the first layer's input has the others' strides), so a deeper model compiles no more
    graphs."""
    from mag.models.compile import COMPILED_BLOCK_METHODS, COMPILED_MODEL_PARTS

    shallow, deep = (get_preset("tiny", **{"dit.num_layers": n}) for n in (2, 6))
    regions = len(COMPILED_BLOCK_METHODS) + len(COMPILED_MODEL_PARTS)
    assert _compiled_graphs(shallow) == _compiled_graphs(deep) == regions


@needs_inductor
def test_inductor_compiled_stream_matches_eager_within_fp32_tolerance():
    """The real --compile (TorchInductor kernels) reorders float sums: within 1e-5 of eager,
    relatively."""
    preset = get_preset("tiny")
    model, memory = random_dit(preset.dit, seed=0), random_dit(preset.dit, seed=1)
    eager = _stream(model, memory, preset, "mag", blocks=3)
    torch._dynamo.reset()
    compiled = [compile_model(m) for m in (model, memory)]
    try:
        fast = _stream(model, memory, preset, "mag", blocks=3)
    finally:
        for c in compiled:
            c.restore()
        torch._dynamo.reset()
    assert (fast - eager).abs().amax() <= 1e-5 * eager.abs().amax()


@pytest.mark.slow
@needs_inductor
def test_gpu_bench_script_runs_end_to_end_in_smoke_mode(tmp_path):
    """scripts/gpu_bench.sh is what a rare, 15-minute GPU lease runs: SMOKE=1 runs the same four
    runs on the CPU with the tiny preset, so the script cannot rot unnoticed between leases."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SMOKE": "1", "ROUNDS": "1", "FRAMES": "3", "PROFILE_BLOCKS": "1",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_bench.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {name: json.loads((tmp_path / f"wan-1.3b-{name}.json").read_text())
            for name in ("eager", "compile", "cudagraphs", "attention")}
    assert list(runs["eager"]["policies"]) == ["full", "window", "downsample", "mag", "bounded"]
    assert all("profile" in row for row in runs["eager"]["policies"].values())
    assert runs["compile"]["compile"]["mode"] == "default" and runs["compile"]["compile"]["used"]
    assert runs["cudagraphs"]["compile"]["mode"] == "reduce-overhead"
    assert list(runs["cudagraphs"]["policies"]) == list(runs["attention"]["policies"]) == ["window",
                                                                                           "mag"]
    assert runs["attention"]["attention"] == "flash"
    assert (tmp_path / "machine.txt").is_file() and (tmp_path / "wan-1.3b-eager.png").is_file()
    sync = json.loads((tmp_path / "sync-check.json").read_text())
    assert sync["device"] == "meta" and set(sync["policies"].values()) == {"no host sync"}


def test_latency_model_recovers_a_known_line_from_replayed_cache_sizes():
    """scripts/latency_model.py: per-block latencies made exactly 300 + 20 x (frames of keys), where
    the keys follow each policy's own write plans, give back 300 and 20."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "latency_model", Path(__file__).resolve().parents[1] / "scripts" / "latency_model.py")
    latency_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latency_model)
    report = {"preset": "tiny", "cache": {"frames_per_block": 3, "sink_frames": 3,
                                          "memory_sink_frames": 3,
                                          "window_frames": 9, "memory_slots": 2}, "policies": {}}
    preset = get_preset("tiny", cache=CacheConfig(**report["cache"]))
    expected_keys = {"window": [3, 6, 9, 12, 15, 15], "mag": [3, 6, 7, 8, 9, 10],
                     "bounded": [3, 6, 7, 8, 8, 8], "full": [3, 6, 9, 12, 15, 18]}
    for name, keys in expected_keys.items():
        frames = latency_model.cached_frames(latency_model.plan_policy(name, preset), preset,
                                             len(keys))
        assert [f + 3 for f in frames] == keys, name
        report["policies"][name] = {"latency_ms_blocks": [300.0 + 20.0 * k for k in keys]}
    result = latency_model.fit(report)
    assert result["fixed_ms"] == pytest.approx(300.0) and result[
        "ms_per_key_frame"
    ] == pytest.approx(20.0)
    assert all(row["rms_residual_ms"] < 1e-6 for row in result["policies"].values())


def test_wan_ring_is_the_released_mags_23_frames_and_is_full_by_video_frame_252():
    """The Wan preset's ring is the released MAG's inference geometry (2 uncompressed sinks + 21
    compressed frames): block 0 keeps 3 frames, every later block one, so the ring is full after 21
    blocks (63 latent, 249 video frames) and the KV stays at 23 frames (23 x 274 MiB in bf16)
    however long the stream."""
    preset = speed.speed_preset("wan-1.3b")
    cache = preset.cache
    assert (cache.memory_sink_frames, cache.memory_slots, cache.default_policy) == (2, 21,
                                                                                    "official")
    official = MagPolicy(cache.memory_sink_frames, cache.memory_slots, memory_sees_sinks=True)
    curve = dict(speed.kv_bytes_curve(official, preset, torch.bfloat16, [228, 252, 1000, 10000]))
    per_frame = kv_bytes_per_frame(preset.dit, preset.tokens_per_frame, torch.bfloat16)
    assert per_frame == 2 * 30 * 1560 * 1536 * 2  # K and V, 30 layers, 1560 tokens, 1536 wide, bf16
    assert curve[228] == 22 * per_frame  # 60 latent frames: 20 blocks, one ring slot still free
    assert curve[252] == curve[1000] == curve[10000] == 23 * per_frame


def test_tiny_bounded_ring_is_full_by_frame_100():
    """The tiny preset's ring (the shipped models' too) is full by frame 100, so the bounded
    stream's KV, and with it its per-block cost, is the same at 100 and at 10,000 frames (issue 8's
    flat-latency target)."""
    preset = speed.speed_preset("tiny")
    cache = preset.cache
    bounded = MagPolicy(cache.memory_sink_frames, cache.memory_slots)
    curve = dict(speed.kv_bytes_curve(bounded, preset, KV_DTYPE, [99, 100, 1000, 10000]))
    per_frame = kv_bytes_per_frame(preset.dit, preset.tokens_per_frame, KV_DTYPE)
    full_ring = (cache.memory_sink_frames + cache.memory_slots) * per_frame
    assert curve[99] == curve[100] == curve[1000] == curve[10000] == full_ring

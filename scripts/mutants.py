"""The planted bugs of scripts/mutate.py: one per entry, each with the test file that must catch it.

A snippet must occur exactly once across ``mag/**.py`` (whitespace included); keep it short and
distinctive so it survives code moves, and pick a ``-k`` expression that selects the fast tests that
catch it.
"""
# Snippets are verbatim source lines, easier to grep for unwrapped:
# ruff: noqa: E501

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``snippet`` by ``replacement``; ``test`` (``-k k``) must then
    fail."""

    id: str
    snippet: str
    replacement: str
    test: str
    k: str | None
    plants: str


CACHE = "tests/test_cache.py"
ARCHIVE = "tests/test_archive.py"
MEMORY = "tests/test_memory.py"
RECON = "tests/test_memory_recon.py"
DIT = "tests/test_dit.py"
DMD = "tests/test_dmd.py"
DMD_CAUSAL = "tests/test_dmd_causal_score.py"
METRICS = "tests/test_metrics.py"
WEIGHTS = "tests/test_weights.py"
TRAIN = "tests/test_train.py"
PARITY = "diffusers"

MUTANTS: tuple[Mutant, ...] = (
    # -- cache and policies ------------------------------------------------------------------------
    Mutant("cache-ring-overwrites-sinks", "    return sink_frames + (index - sink_frames) % "
                                          "ring_frames",
           "    return (index - sink_frames) % ring_frames", CACHE, "window or bounded",
           "the ring of a window / bounded cache starts at slot 0 and overwrites the sinks"),
    Mutant("cache-sinks-join-the-ring", "if index < sink_frames or ring_frames is None:",
           "if ring_frames is None:", CACHE, "window or bounded", "sink frames are evicted like "
                                                                  "ring frames"),
    Mutant("cache-window-one-frame-short",
           "_ring_slot(start + i, self.sink_frames, self.window_frames)",
           "_ring_slot(start + i, self.sink_frames, self.window_frames - 1)", CACHE, "window",
           "the window ring holds one frame fewer than asked"),
    Mutant("cache-downsample-keeps-first-frame", "or i == last\n", "or i == 0\n", CACHE, "downsample",
           "the compressed policies keep a block's first frame instead of its last"),
    Mutant("cache-retained-counts-seen",
           "self.frames_seen += pending.num_block_frames\n        self.frames_retained += "
           "len(plan.frames)",
           "self.frames_seen += pending.num_block_frames\n        self.frames_retained += "
           "pending.num_block_frames", CACHE, "downsample or bounded",
           "the retained count grows by the whole block, so compressed frames skip slots"),
    Mutant("cache-kv-bytes-drop-batch", "return _frame_bytes(self.num_layers, self.batch_size, "
                                        "self.num_heads,",
           "return _frame_bytes(self.num_layers, 1, self.num_heads,", CACHE, "bytes",
           "issue 21 bug 2: KVCache.bytes_per_frame ignores the batch size"),
    Mutant("cache-kv-bytes-formula-drops-batch",
           "return KV_TENSORS * layers * batch * heads * tokens * head_dim * itemsize",
           "return KV_TENSORS * layers * heads * tokens * head_dim * itemsize", CACHE, "bytes",
           "the KV size formula (cache, speed benchmark, mag info) ignores the batch size"),
    Mutant("cache-nbytes-counts-capacity", "return len(self.valid_slots) * self.bytes_per_frame",
           "return self.capacity_frames * self.bytes_per_frame", CACHE, "bytes",
           "nbytes reports the allocation instead of the valid entries"),
    Mutant("cache-hidden-prefix-read", "start = self._hidden_prefix * self.tokens_per_frame",
           "start = 0", CACHE, "hiding", "a hidden prefix of cached frames is still read"),
    Mutant("cache-positions-not-stored", "[pending.kept_frames])",
           "[pending.kept_frames] * 0)", CACHE, "downsample", "cached frames lose their RoPE "
                                                              "positions"),
    Mutant("mag-memory-view-hides-nothing",
           "hidden = {\n            s for s in range(self.sink_frames) if s % frames_per_block"
           " != frames_per_block - 1\n        }",
           "hidden: set[int] = set()", MEMORY, "streaming_with_memory_model",
           "the memory model's write pass reads uncompressed sink frames"),
    # -- memory model and masks
    # ----------------------------------------------------------------------
    Mutant("memory-mask-noisy-misses-own-retained", "mask[num_frames:, :num_frames] = (k <= q) & "
                                                    "retained",
           "mask[num_frames:, :num_frames] = (k < q) & retained", MEMORY, "mask",
           "a noisy block does not see its own block's retained frame"),
    Mutant("memory-mask-clean-sees-all-earlier", "mask[:num_frames, :num_frames] = (k == q) | ((k "
                                                 "< q) & retained)",
           "mask[:num_frames, :num_frames] = k <= q", MEMORY, "mask",
           "a clean query sees every earlier clean frame, not only the retained ones"),
    Mutant("memory-mask-noisy-causal",
           "mask[num_frames:, :num_frames] = (k <= q) & retained\n    mask[num_frames:, "
           "num_frames:] = k == q",
           "mask[num_frames:, :num_frames] = (k <= q) & retained\n    mask[num_frames:, "
           "num_frames:] = k <= q", MEMORY, "mask", "noisy "
                                                                                                                                "blocks see earlier noisy blocks"),
    Mutant("recon-noisy-sees-own-clean-block",
           "    mask = memory_training_mask(frames, frames_per_block, device=device)\n",
           "    mask = memory_training_mask(frames, frames_per_block, device=device)\n"
           "    mask[frames:, :frames] |= torch.eye(frames // frames_per_block, dtype=torch.bool,"
           " device=device).repeat_interleave(frames_per_block, "
           "0).repeat_interleave(frames_per_block, 1)\n",
           RECON, "reference or ignores",
           "issue 21 bug 3: the benchmark's noisy block sees its own whole clean block"),
    Mutant("memory-writer-not-at-t0", "zero = torch.zeros(batch, device=clean_block.device)",
           "zero = torch.full((batch,), 500.0, device=clean_block.device)", MEMORY,
           "streaming_with_memory_model", "the memory model writes its K/V from a noisy-time pass"),
    Mutant("memory-loss-clean-noisy-positions",
           "positions = torch.arange(start_position, end_position, device=x0.device).repeat(2)",
           "positions = torch.arange(start_position, start_position + 2 * num_frames, "
           "device=x0.device)",
           MEMORY, "reconstruction_loss_equals", "the noisy half gets other RoPE positions than "
                                                 "the clean half"),
    Mutant("mask-last-frame-is-first", "is_last = frames % frames_per_block == frames_per_block - "
                                       "1",
           "is_last = frames % frames_per_block == 0", CACHE, "downsample",
           "the compressed-memory mask keeps each block's first frame"),
    Mutant("mask-window-one-short", "(key >= query_start - window_frames)",
           "(key > query_start - window_frames)", CACHE, "window", "the sliding-window mask is "
                                                                   "one frame short"),
    Mutant("mask-block-causal-sees-future", "return block[None, :] <= block[:, None]",
           "return block[None, :] <= block[:, None] + 1", CACHE, "full_cache",
           "the block-causal mask lets a block see the next one"),
    # -- attention and RoPE
    # --------------------------------------------------------------------------
    Mutant("rope-not-on-keys",
           "k = apply_rotary(_heads(self.norm_k(self.k(x)), self.num_heads), cos, sin)",
           "k = _heads(self.norm_k(self.k(x)), self.num_heads)", DIT, PARITY, "keys are cached "
                                                                              "without RoPE"),
    Mutant("rope-sign-flipped", "torch.stack([-sin, sin], dim=-1)", "torch.stack([sin, -sin], "
                                                                    "dim=-1)",
           DIT, PARITY, "RoPE rotates the other way"),
    Mutant("rope-axis-split", "spatial = 2 * (head_dim // 6)", "spatial = 2 * (head_dim // 8)", DIT,
           PARITY, "the head width is split between time / height / width unlike Wan"),
    Mutant("rope-frequencies", "exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, "
                               "device=device) / axis_dim",
           "exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / "
           "(axis_dim + 2)",
           DIT, PARITY, "RoPE frequencies off"),
    Mutant("rope-time-ignores-position", "t_part[frame_positions].view(frames, 1, 1, -1)",
           "t_part[frame_positions * 0].view(frames, 1, 1, -1)", DIT, PARITY,
           "every frame gets temporal position 0"),
    Mutant("attention-cached-keys-after-new", "keys = torch.cat([cached_k.to(k.dtype), k], dim=2)",
           "keys = torch.cat([k, cached_k.to(k.dtype)], dim=2)", CACHE, "full_cache",
           "cached keys and values are concatenated in different orders"),
    Mutant("attention-grouped-order-dropped", "if query_frames != sorted(query_frames):", "if "
                                                                                          "False:",
                                                                                          DIT,
           "grouped", "grouped masked attention returns its outputs out of query order"),
    Mutant("attention-mask-tiled",
           "rows = frame_mask.repeat_interleave(tokens_per_frame, dim=0)\n"
           "    return rows.repeat_interleave(tokens_per_frame, dim=1)",
           "return frame_mask.repeat(tokens_per_frame, tokens_per_frame)", CACHE, "dense",
           "the frame mask is tiled, not expanded, to tokens"),
    Mutant("attention-cross-key-norm", "return _heads(self.norm_k(self.k(context)), "
                                       "self.num_heads)",
           "return _heads(self.norm_q(self.k(context)), self.num_heads)", DIT, PARITY,
           "cross-attention keys are normalised with the query norm"),
    Mutant("layers-rms-weight-dropped", "return normed.type_as(x) * self.weight", "return "
                                                                                  "normed.type_as(x)",
           DIT, PARITY, "RMSNorm ignores its weight (invisible while every norm weight is 1)"),
    Mutant("layers-modulate-scale", "return normed * (1 + scale.float()) + shift",
           "return normed * scale.float() + shift", DIT, PARITY, "adaLN scale without the 1 +"),
    Mutant("layers-gate-dropped", "return x + y * gate.float()", "return x + y", DIT, PARITY,
           "gated residuals ignore the gate"),
    Mutant("layers-time-embedding-order", "torch.cat([torch.cos(angles), torch.sin(angles)], "
                                          "dim=-1)",
           "torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)", DIT, PARITY,
           "the sinusoidal timestep embedding is sin-first"),
    # -- weight key maps
    # -----------------------------------------------------------------------------
    Mutant("keymap-self-norm-qk-swapped",
           '("self_attn.norm_q.", "attn1.norm_q."),\n    ("self_attn.norm_k.", "attn1.norm_k."),',
           '("self_attn.norm_q.", "attn1.norm_k."),\n    ("self_attn.norm_k.", "attn1.norm_q."),',
           DIT, PARITY,
           "issue 21 bug 1: self-attention norm_q / norm_k swapped in the diffusers key map"),
    Mutant("keymap-cross-norm-qk-swapped",
           '("cross_attn.norm_q.", "attn2.norm_q."),\n    ("cross_attn.norm_k.", "attn2.norm_k."),',
           '("cross_attn.norm_q.", "attn2.norm_k."),\n    ("cross_attn.norm_k.", "attn2.norm_q."),',
           WEIGHTS, "converter",
           "cross-attention norm_q / norm_k swapped in the diffusers key map"),
    Mutant("keymap-text-linears-swapped",
           '("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),',
           '("text_embedding.0.", "condition_embedder.text_embedder.linear_2."),', WEIGHTS,
           "converter", "the text embedder's first linear maps to the second"),
    Mutant("load-prefers-raw-over-ema",
           "entry = SELF_FORCING_EMA if use_ema and SELF_FORCING_EMA in data else SELF_FORCING_RAW",
           "entry = SELF_FORCING_RAW", WEIGHTS, "ema", "Self-Forcing checkpoints load the raw "
                                                       "generator, not EMA"),
    # -- DMD and the history loss
    # --------------------------------------------------------------------
    Mutant("dmd-gradient-sign", "return (x0_fake - x0_real) / normaliser",
           "return (x0_real - x0_fake) / normaliser", DMD, "gradient", "the DMD direction points "
                                                                       "the wrong way"),
    Mutant("dmd-normaliser-uses-fake", "normaliser = (x - x0_real).abs()", "normaliser = (x - "
                                                                           "x0_fake).abs()",
           DMD, "gradient", "DMD normalises by the distance to the critic's prediction"),
    Mutant("dmd-loss-scale", "loss = 0.5 * ((x - (x - g).detach()) ** 2).mean()",
           "loss = ((x - (x - g).detach()) ** 2).mean()", DMD, "gradient", "the DMD loss gradient "
                                                                           "is doubled"),
    Mutant("dmd-guidance-base", "return uncond + guidance_scale * (cond - uncond)",
           "return cond + guidance_scale * (cond - uncond)", DMD, "history_loss_scores or gradient",
           "classifier-free guidance extrapolates from the conditional score"),
    Mutant("history-first-chunk-too-long", "return context if block < first_chunk_blocks else "
                                           "empty_context",
           "return context if block <= first_chunk_blocks else empty_context", DMD, "history",
           "the history rollout keeps the real text one block too long"),
    Mutant("history-scores-the-first-chunk", "later = windows[1:]", "later = windows[:-1]", DMD,
           "history", "the history loss scores the text-conditioned first chunk"),
    Mutant("history-scored-with-empty-text",
           "_dmd_loss_on_windows(later, real_score_fn, fake_score_fn, scheduler, t, noise,\n"
           "                                   context, uncond_context",
           "_dmd_loss_on_windows(later, real_score_fn, fake_score_fn, scheduler, t, noise,\n"
           "                                   empty_context, uncond_context",
           DMD, "history", "the history chunks are scored with the empty text"),
    Mutant("history-lambda-weights-swapped", "return (1 - lam) * l_dmd + lam * l_hist",
           "return lam * l_dmd + (1 - lam) * l_hist", DMD, "lambda", "λ weights the wrong loss"),
    Mutant("history-draw-inverted", "return bool(torch.rand((), generator=generator) < "
                                    "history_lambda)",
           "return bool(torch.rand((), generator=generator) > history_lambda)", DMD, "lambda",
           "the history loss is drawn with probability 1 - λ"),
    # -- metrics
    # -------------------------------------------------------------------------------------
    Mutant("metrics-psnr-20log", "db = 10.0 * torch.log10(", "db = 20.0 * torch.log10(", METRICS,
           "psnr", "PSNR doubled (20 log10 of a squared ratio)"),
    Mutant("metrics-psnr-mean-over-inf", "mean_db = float(flat[finite].mean())", "mean_db = "
                                                                                 "float(flat.mean())",
           METRICS, "psnr", "identical pairs (+inf) poison the PSNR mean"),
    Mutant("metrics-ssim-c2", "c2 = (SSIM_K2 * data_range) ** 2", "c2 = SSIM_K2 * data_range ** 2",
           METRICS, "ssim", "SSIM's second constant not squared"),
    Mutant("metrics-ssim-covariance", "cov = xy - mu_x * mu_y", "cov = xy", METRICS, "ssim",
           "SSIM's covariance is not centred"),
    Mutant("metrics-frechet-trace-term", "return (mu_a - mu_b).pow(2).sum() + trace_a + trace_b - "
                                         "2 * trace_sqrt",
           "return (mu_a - mu_b).pow(2).sum() + trace_a + trace_b - trace_sqrt", METRICS, "frechet",
           "the Fréchet distance subtracts the cross term once"),
    Mutant("metrics-frechet-biased", "trace_a = centered_a.pow(2).sum() / (a.shape[0] - 1)",
           "trace_a = centered_a.pow(2).sum() / a.shape[0]", METRICS, "frechet",
           "a biased variance in one trace term"),
    Mutant("metrics-lpips-shift", "LPIPS_SHIFT = (-0.030, -0.088, -0.188)", "LPIPS_SHIFT = "
                                                                            "(-0.030, -0.088, "
                                                                            "0.188)",
           METRICS, "official", "an LPIPS scaling-layer constant with the wrong sign"),
    # -- archive memory (issue 18)
    # -----------------------------------------------------------------------
    Mutant("archive-shift-sign", "shifts = self.assigned_positions() - self.slot_stored",
           "shifts = -self.assigned_positions() + 2 * self.slot_stored", ARCHIVE, "return",
           "stored keys are rotated away from their re-assigned positions"),
    Mutant("archive-retrieval-ignores-view", "order = np.lexsort((-newest, -scores, -gain))",
           "order = np.lexsort((-newest, -scores, gain))", ARCHIVE, "return",
           "retrieval prefers the frames that show least of the block's view"),
    Mutant("archive-sinks-keep-true-distance",
           "assigned[:, sink_columns] = oldest[:, None] - (first - frames[:, sink_columns])",
           "pass", ARCHIVE, "return", "sinks stay at their true (out-of-training) distance"),
    Mutant("archive-coverage-ignores-covered", "gain = (shows & ~covered).sum(axis=1)",
           "gain = shows.sum(axis=1)", ARCHIVE, "covers",
           "retrieval counts columns earlier picks already show (top-k by overlap again)"),
    Mutant("dmd-causal-score-sees-future",
           "mask = teacher_forcing_mask(clean.shape[1], frames_per_block, device=clean.device)",
           "mask = torch.ones(2 * clean.shape[1], 2 * clean.shape[1], dtype=torch.bool)",
           DMD_CAUSAL, "causal", "a causal teacher's score reads the window's later clean blocks"),
    # -- checkpoint and resume
    # -----------------------------------------------------------------------
    Mutant("resume-rng-not-restored", 'torch.set_rng_state(states["torch_cpu"])', "pass", TRAIN,
           "rng", "a resumed run does not restore the global RNG"),
    Mutant("resume-ema-not-saved", "tensors.update({_EMA + k: v.detach().contiguous().cpu() for "
                                   "k, v in state.ema.items()})",
           "pass", TRAIN, "kill_and_resume", "checkpoints do not carry the EMA weights"),
    Mutant("resume-optimizer-not-restored", "self.optimizer.load_state_dict(state.optimizer)",
           "pass", TRAIN, "kill_and_resume", "a resumed run restarts AdamW's moments"),
    Mutant("checkpoint-keep-one-more", "list_checkpoints(directory)[:-keep_last]",
           "list_checkpoints(directory)[:-keep_last - 1]", TRAIN, "keep_last", "pruning keeps one "
                                                                               "checkpoint too "
                                                                               "many"),
)

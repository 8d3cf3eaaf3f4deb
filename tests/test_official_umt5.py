"""Our UMT5 text encoder against Wan2.1's T5 encoder and its prompt cleaning.

tests/data/official/ (scripts/official_reference.py, its README): Wan's
``umt5_xxl(encoder_only=True)`` at a small config in the ``models_t5_umt5-xxl-enc-bf16.pth`` layout,
its float32 hidden states on recorded token ids with the padding rows zeroed, and four prompts
before and after Wan's ``clean="whitespace"``. The google/umt5-xxl tokenizer cannot be had offline,
so a stand-in tokenizer hands our encoder the recorded ids; everything after the tokenizer is ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mag.text import UMT5Encoder
from mag.text.base import clean_prompt
from mag.text.umt5_wan import load_wan_t5

DATA = Path(__file__).parent / "data" / "official"
# Both sides run float32 on the same bf16 weights: what is left is operation order (1.8e-6 of the
# output scale measured); a wrong relative-position bucket, norm or gate moves outputs by O(scale).
TOLERANCE = 1e-4


def _reference() -> tuple[dict[str, torch.Tensor], dict]:
    path = str(DATA / "umt5_encode.safetensors")
    with safe_open(path, "pt") as f:
        about = json.loads(f.metadata()["about"])
    return load_file(path), about


class RecordedIds:
    """A tokenizer stand-in: prompt ``"row i"`` -> row ``i`` of the recorded ids, padded to the
    longest."""

    padding_side = "right"

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
        self.ids, self.mask, self.vocab = ids, mask, vocab
        self.seen: list[str] = []

    def __len__(self) -> int:
        return self.vocab

    def __call__(self, prompts: list[str], **kwargs: object) -> dict[str, torch.Tensor]:
        self.seen.extend(prompts)
        rows = [int(p.removeprefix("row ")) if p.startswith("row ") else 0 for p in prompts]
        longest = int(self.mask[rows].sum(1).max())
        return {"input_ids": self.ids[rows, :longest], "attention_mask": self.mask[rows, :longest]}


def _encoder(ref: dict[str, torch.Tensor], about: dict) -> tuple[UMT5Encoder, RecordedIds]:
    tokenizer = RecordedIds(ref["ids"].long(), ref["mask"].long(), about["config"]["vocab_size"])
    model = load_wan_t5(DATA / "umt5_enc_bf16.pth", torch.float32)
    return UMT5Encoder(model, tokenizer, max_tokens=ref["ids"].shape[1]), tokenizer


def test_umt5_from_the_original_pth_equals_wans_encoder_with_padding_rows_zeroed():
    ref, about = _reference()
    encoder, _ = _encoder(ref, about)
    rows = ref["ids"].shape[0]
    hidden, lengths = encoder.encode_with_lengths([f"row {i}" for i in range(rows)])
    assert hidden.shape == ref["hidden"].shape
    assert lengths.tolist() == ref["mask"].sum(1).long().tolist()
    padding = ref["mask"] == 0
    assert padding.any() and bool((hidden[padding] == 0).all())
    scale = float(ref["hidden"].abs().max())
    assert scale > 0.1
    assert float((hidden - ref["hidden"]).abs().max()) <= TOLERANCE * scale


def test_prompt_cleaning_equals_wans_for_all_four_prompts():
    _, about = _reference()
    assert len(about["prompts"]) == 4
    assert [clean_prompt(p) for p in about["prompts"]] == about["cleaned"]
    # the mojibake, entities and whitespace do get fixed
    assert about["prompts"] != about["cleaned"]


def test_the_encoder_tokenizes_the_cleaned_prompts():
    ref, about = _reference()
    encoder, tokenizer = _encoder(ref, about)
    encoder.encode_with_lengths(about["prompts"])
    assert tokenizer.seen == about["cleaned"]

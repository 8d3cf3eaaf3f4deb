"""Text encoders (real offline MiniLM, tiny random umT5) and the prompt-embedding cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import socket  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mag.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from mag.text import (  # noqa: E402
    MiniLMEncoder,
    PromptEmbeddingCache,
    TextEncoder,
    UMT5Encoder,
    get_text_encoder,
    minilm_path,
)
from mag.text.base import clean_prompt  # noqa: E402
from mag.text.umt5_wan import WAN_T5_FILE, WAN_T5_TOKENIZER, hf_to_wan_t5, wan_t5_to_hf  # noqa: E402

SUNSET = "a red sunset over a calm ocean"
DUSK = "orange evening sky above the sea"
TAXES = "a spreadsheet of quarterly tax figures"


def _no_network(*args, **kwargs):
    raise AssertionError("a text encoder tried to open a network connection")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        yield


@pytest.fixture(scope="module")
def minilm_tokens(offline) -> MiniLMEncoder:
    return get_text_encoder("minilm", mode="tokens", max_tokens=32)


@pytest.fixture(scope="module")
def minilm_pooled(offline) -> MiniLMEncoder:
    return get_text_encoder("minilm", mode="pooled")


@pytest.fixture(scope="module")
def tiny_umt5(offline) -> UMT5Encoder:
    return get_text_encoder("umt5", tiny=True, seed=0, max_tokens=16)


def _row_is_nonzero(emb: torch.Tensor) -> torch.Tensor:
    return emb.abs().sum(-1) > 0


# -- registry and input checks ---------------------------------------------------------------------

def test_unknown_encoder_lists_choices():
    with pytest.raises(ConfigError, match="minilm.*umt5"):
        get_text_encoder("clip")


def test_umt5_without_weights_says_how_to_get_them():
    with pytest.raises(ConfigError, match="path="):
        get_text_encoder("umt5")


def test_minilm_rejects_unknown_mode_and_bad_prompts(minilm_tokens):
    with pytest.raises(ConfigError, match="tokens.*pooled"):
        MiniLMEncoder(mode="cls")
    with pytest.raises(InputError, match=r"\[prompt\]"):
        minilm_tokens.encode("just a string")
    with pytest.raises(InputError, match="non-empty list"):
        minilm_tokens.encode([])


# -- minilm -------------------------------------------------------------------------------------

def test_minilm_tokens_are_real_384d_states_zero_padded(minilm_tokens):
    emb, lengths = minilm_tokens.encode_with_lengths([SUNSET, ""])
    assert emb.shape == (2, 32, 384) and minilm_tokens.text_dim == 384
    assert lengths.tolist()[1] == 2  # "" is [CLS] [SEP]
    for i, n in enumerate(lengths.tolist()):
        assert _row_is_nonzero(emb[i]).tolist() == [True] * n + [False] * (32 - n)


def test_minilm_truncates_to_max_tokens(minilm_tokens):
    emb, lengths = minilm_tokens.encode_with_lengths([" ".join(["panorama"] * 100)])
    assert lengths.tolist() == [32] and bool(_row_is_nonzero(emb[0]).all())


def test_minilm_tokens_do_not_depend_on_batch_mates(minilm_tokens):
    together = minilm_tokens.encode([SUNSET, TAXES + " " + DUSK])
    alone = minilm_tokens.encode([SUNSET])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_minilm_pooled_is_unit_and_semantic(minilm_pooled):
    emb = minilm_pooled.encode([SUNSET, DUSK, TAXES, ""])
    assert emb.shape == (4, 1, 384) and minilm_pooled.max_tokens == 1
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4, 1))
    v = emb[:, 0]
    related, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert related > unrelated + 0.3, (related, unrelated)


def test_minilm_pooled_is_normalised_mean_of_tokens(minilm_tokens, minilm_pooled):
    tokens, lengths = minilm_tokens.encode_with_lengths([DUSK])
    expected = F.normalize(tokens[0, : lengths[0]].mean(0), dim=-1)
    torch.testing.assert_close(minilm_pooled.encode([DUSK])[0, 0], expected, atol=1e-6, rtol=1e-5)


def test_minilm_pooled_matches_sentence_transformers(minilm_pooled):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    # the last one is truncated at 256
    prompts = [SUNSET, DUSK, TAXES, "", " ".join(["word"] * 300)]
    reference = model.encode(prompts, convert_to_tensor=True)
    torch.testing.assert_close(minilm_pooled.encode(prompts)[:, 0], reference, atol=1e-5, rtol=0)


def test_minilm_missing_folder_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        MiniLMEncoder(path=tmp_path)


# -- umt5 ---------------------------------------------------------------------------------------

def test_umt5_tiny_shapes_padding_and_prompt_cleaning(tiny_umt5):
    emb, lengths = tiny_umt5.encode_with_lengths(["", "a  cat\n on a mat ", " ".join(["x"] * 40)])
    assert emb.shape == (3, 16, tiny_umt5.text_dim) and tiny_umt5.text_dim == 32
    # "" -> [CLS] [SEP]; truncated at 16
    assert lengths.tolist()[0] == 2 and lengths.tolist()[2] == 16
    for i, n in enumerate(lengths.tolist()):
        assert _row_is_nonzero(emb[i]).tolist() == [True] * n + [False] * (16 - n)
    torch.testing.assert_close(tiny_umt5.encode(["a cat on a mat"]), emb[1:2], atol=1e-5, rtol=1e-5)


def test_umt5_from_pretrained_round_trip_both_layouts(tiny_umt5, tmp_path):
    flat = tmp_path / "flat"
    tiny_umt5.save_pretrained(flat)
    reference = tiny_umt5.encode([SUNSET])
    torch.testing.assert_close(UMT5Encoder.from_pretrained(flat, max_tokens=16).encode([SUNSET]),
                               reference)
    root = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"  # diffusers layout: text_encoder/ + tokenizer/
    tiny_umt5._hf.model.save_pretrained(root / "text_encoder")
    shutil.copytree(minilm_path(), root / "tokenizer")
    loaded = get_text_encoder("umt5", path=root, max_tokens=16)
    torch.testing.assert_close(loaded.encode([SUNSET]), reference)


def _wan_t5_folder(encoder: UMT5Encoder, folder):
    """Write ``encoder`` as an original Wan2.1 folder: the .pth in Wan's key layout +
    google/umt5-xxl/."""
    folder.mkdir(parents=True)
    torch.save(hf_to_wan_t5(encoder._hf.model.state_dict()), folder / WAN_T5_FILE)
    shutil.copytree(minilm_path(), folder / WAN_T5_TOKENIZER)
    return folder


def test_umt5_from_the_original_wan_file_equals_the_encoder_it_was_written_from(offline, tmp_path):
    source = UMT5Encoder.tiny_random(minilm_path(), seed=3, max_tokens=16,
                                     relative_attention_max_distance=128)
    with torch.no_grad():  # every weight random, norms included, so no swapped key can hide
        for param in source._hf.model.parameters():
            param.copy_(torch.randn_like(param) * 0.5 + 0.5)
    folder = _wan_t5_folder(source, tmp_path / "Wan2.1-T2V-1.3B")
    prompts = [SUNSET, "a  cat\n on a mat ", ""]
    expected = source.encode(prompts)
    for path in (folder, folder / WAN_T5_FILE):
        loaded = get_text_encoder("umt5", path=path, max_tokens=16)
        assert loaded.fingerprint != source.fingerprint
        torch.testing.assert_close(loaded.encode(prompts), expected, atol=1e-5, rtol=1e-5)


def test_wan_t5_file_with_foreign_keys_names_them(tmp_path):
    path = tmp_path / WAN_T5_FILE
    torch.save({"token_embedding.weight": torch.zeros(4, 8), "decoder.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="decoder.x|pos_embedding"):
        UMT5Encoder.from_pretrained(path)
    with pytest.raises(CheckpointError, match="decoder.x"):
        wan_t5_to_hf({"token_embedding.weight": torch.zeros(4, 8), "decoder.x": torch.zeros(1)})


def test_umt5_accepts_its_one_mode_and_refuses_others():
    assert get_text_encoder("umt5", tiny=True, mode="tokens", max_tokens=8).max_tokens == 8
    with pytest.raises(ConfigError, match="only mode 'tokens'"):
        get_text_encoder("umt5", tiny=True, mode="pooled")


def test_prompt_cleaning_is_wans_ftfy_html_and_whitespace():
    assert clean_prompt("  The Mona Lisa doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t"
                        " &amp;amp; smile\n\t ") == "The Mona Lisa doesn't & smile"


def test_umt5_bad_folders_are_checkpoint_errors(tiny_umt5, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        UMT5Encoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json"):
        UMT5Encoder.from_pretrained(tmp_path)
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(minilm_path() / "config.json", bert / "config.json")
    with pytest.raises(CheckpointError, match="'bert' model"):
        UMT5Encoder.from_pretrained(bert)
    small = tmp_path / "small_vocab"
    tiny_umt5._hf.model.save_pretrained(small)
    with pytest.raises(CheckpointError, match="tokenizer"):
        UMT5Encoder.from_pretrained(small)  # no tokenizer files in the folder
    with pytest.raises(CheckpointError, match="embedding table"):
        UMT5Encoder.tiny_random(minilm_path(), vocab_size=100)


# -- cache --------------------------------------------------------------------------------------

class CountingEncoder(TextEncoder):
    """Delegates to a real encoder and records every prompt it is asked to encode."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.name, self.text_dim, self.max_tokens = inner.name, inner.text_dim, inner.max_tokens
        self.fingerprint = inner.fingerprint
        self.calls: list[list[str]] = []

    def encode_with_lengths(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode_with_lengths(prompts)

    def to(self, device=None, dtype=None):
        return self


def test_cache_encodes_each_prompt_once_and_matches_encoder(tiny_umt5):
    enc = CountingEncoder(tiny_umt5)
    cache = PromptEmbeddingCache(enc)
    first = cache.get([SUNSET, DUSK, SUNSET])
    assert enc.calls == [[SUNSET, DUSK]]
    second = cache.get([DUSK, SUNSET, ""])
    assert enc.calls == [[SUNSET, DUSK], [""]]
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], second[1])
    torch.testing.assert_close(second, tiny_umt5.encode([DUSK, SUNSET, ""]), atol=1e-5, rtol=1e-5)
    assert (cache.hits, cache.misses) == (3, 3)


def test_cache_evicts_least_recently_used(tiny_umt5):
    enc = CountingEncoder(tiny_umt5)
    cache = PromptEmbeddingCache(enc, max_entries=2)
    for prompt in (SUNSET, DUSK, SUNSET, TAXES):  # SUNSET refreshed, so DUSK is the one dropped
        cache.get([prompt])
    assert len(cache) == 2
    cache.get([SUNSET])
    cache.get([DUSK])
    assert enc.calls == [[SUNSET], [DUSK], [TAXES], [DUSK]]


def test_cache_disk_round_trip_is_exact_and_atomic(tiny_umt5, tmp_path):
    first = PromptEmbeddingCache(CountingEncoder(tiny_umt5), cache_dir=tmp_path)
    written = first.get([SUNSET, ""])
    enc = CountingEncoder(tiny_umt5)
    again = PromptEmbeddingCache(enc, cache_dir=tmp_path).get(["", SUNSET])
    assert enc.calls == []
    assert torch.equal(again, written.flip(0))
    files = sorted(p.suffix for p in tmp_path.rglob("*") if p.is_file())
    assert files == [".safetensors", ".safetensors"]  # no temporary files left behind


def test_cache_never_mixes_encoders(tiny_umt5, tmp_path):
    PromptEmbeddingCache(tiny_umt5, cache_dir=tmp_path).get([SUNSET])
    other = CountingEncoder(UMT5Encoder.tiny_random(minilm_path(), seed=1, max_tokens=16))
    got = PromptEmbeddingCache(other, cache_dir=tmp_path).get([SUNSET])
    assert other.calls == [[SUNSET]]
    assert not torch.allclose(got, tiny_umt5.encode([SUNSET]))


def test_corrupt_cache_file_warns_reencodes_and_repairs(tiny_umt5, tmp_path):
    reference = PromptEmbeddingCache(tiny_umt5, cache_dir=tmp_path).get([SUNSET])
    (path,) = tmp_path.rglob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # truncated write from some other tool
    enc = CountingEncoder(tiny_umt5)
    with pytest.warns(RuntimeWarning, match="unusable"):
        got = PromptEmbeddingCache(enc, cache_dir=tmp_path).get([SUNSET])
    assert enc.calls == [[SUNSET]]
    assert torch.equal(got, reference)
    enc = CountingEncoder(tiny_umt5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptEmbeddingCache(enc, cache_dir=tmp_path).get([SUNSET])
    assert enc.calls == []  # the file was rewritten


def test_cache_rejects_bad_size(tiny_umt5):
    with pytest.raises(ConfigError, match="max_entries"):
        PromptEmbeddingCache(tiny_umt5, max_entries=0)


def test_prompt_table_stands_in_for_its_encoder(minilm_pooled, tmp_path, monkeypatch):
    """MAG_PROMPT_TABLE serves the encoder's own outputs for the table's prompts and refuses
    others."""
    from mag.errors import CheckpointError, ConfigError, InputError
    from mag.text import PROMPT_TABLE_ENV, PromptTableEncoder, write_prompt_table

    prompts = ["", "a red square", "a camera panning slowly across a quiet desert"]
    path = write_prompt_table(minilm_pooled, prompts + ["a red square"], tmp_path / "t.safetensors")
    monkeypatch.setenv(PROMPT_TABLE_ENV, str(path))
    table = get_text_encoder("minilm", mode="pooled")
    assert isinstance(table, PromptTableEncoder) and table.fingerprint == minilm_pooled.fingerprint
    want, want_n = minilm_pooled.encode_with_lengths(prompts[::-1])
    got, got_n = table.encode_with_lengths(prompts[::-1])
    assert torch.equal(got, want) and torch.equal(got_n, want_n)
    with pytest.raises(InputError, match="not in the prompt table"):
        table.encode(["a prompt nobody wrote down"])
    with pytest.raises(ConfigError, match="built with text encoder"):
        get_text_encoder("minilm", mode="tokens")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable prompt table"):
        get_text_encoder("minilm", mode="pooled")


def test_theme_prompts_cover_every_prompt_the_world_writes():
    import numpy as np

    from mag.world import THEMES, make_prompt, theme_prompts

    for theme in THEMES.values():
        possible = set(theme_prompts(theme))
        rng = np.random.default_rng(0)
        assert {make_prompt(rng, theme) for _ in range(200)} <= possible

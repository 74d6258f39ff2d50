"""The bytes of each token (logprobs' `bytes`): joined over an answer they are its UTF-8, for byte-level BPE and for
SentencePiece (`▁` spaces, `<0xNN>` byte-fallback pieces for characters outside its vocabulary)."""

from __future__ import annotations

import pytest
from tiny_models import CORPUS, make_sentencepiece, make_tokenizer

from minillava.serve.batching import TokenTexts

TEXT = "A cat on a mat, café 日本 ünd ✓\nnew line"


@pytest.fixture(scope="module", params=["sentencepiece-legacy", "sentencepiece", "byte-level-bpe"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte-level-bpe":
        return make_tokenizer(tmp_path_factory.mktemp("bpe"))
    from transformers import LlamaTokenizer

    directory = make_sentencepiece(tmp_path_factory.mktemp("sp"), CORPUS * 5, vocab_size=400)
    return LlamaTokenizer.from_pretrained(directory, legacy=request.param.endswith("legacy"))


def test_token_bytes_join_into_the_texts_utf8(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    texts = TokenTexts(tokenizer)
    pieces = [texts(i)[1] for i in ids]
    assert all(p is not None for p in pieces)
    joined = bytes(b for p in pieces for b in p)
    # SentencePiece writes the dummy prefix as a leading space; the rest must be the text's bytes exactly
    assert joined in (TEXT.encode(), b" " + TEXT.encode())
    if "Llama" in type(tokenizer).__name__:  # characters it never saw come as single bytes
        assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)


def test_special_tokens_have_no_bytes(tokenizer):
    texts = TokenTexts(tokenizer)
    special = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.all_special_ids[0]
    assert texts(special)[1] is None

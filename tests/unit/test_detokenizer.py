"""Streaming text: multi-byte characters and possible stop strings are held back until final."""

import pytest

from common.model_source import resolve_model
from common.tokenizer import Tokenizer
from gateway.detokenizer import StreamDetokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_source(resolve_model(None))


def stream(tok, text: str, stop=(), final=None) -> list[str]:
    d = StreamDetokenizer(tok, tuple(stop))
    parts = [d.push([t]) for t in tok.encode(text)]
    parts.append(d.finish(final))
    return parts


def test_pieces_join_to_the_text(tok):
    text = "Hello, wörld! 東京 is big 🙂."
    parts = stream(tok, text)
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_is_never_emitted(tok):
    parts = stream(tok, "The capital of France is Paris.", stop=["France"])
    assert "".join(parts) == "The capital of "
    assert not any("Fr" in p for p in parts)


def test_worker_text_is_authoritative_at_finish(tok):
    parts = stream(tok, "one two three", stop=["three"], final="one two ")
    assert "".join(parts) == "one two "

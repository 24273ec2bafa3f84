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


def test_each_push_decodes_a_bounded_window(tok):
    """No quadratic work: a push decodes the new token and a few before it, never the whole stream."""
    text = ("Long streams stay cheap: naïve café façade, 東京 and 🙂 too. " * 40).strip()
    ids = tok.encode(text)
    lengths: list[int] = []

    class Counting:
        def decode(self, ids_, skip_special_tokens=True):  # noqa: ANN001, ANN202
            lengths.append(len(ids_))
            return tok.decode(ids_, skip_special_tokens)

    d = StreamDetokenizer(Counting(), ("never appears",))
    out = "".join(d.push([t]) for t in ids) + d.finish(None)
    assert out == text and len(ids) > 400
    assert max(lengths[:-1]) <= 8  # finish(None) decodes everything once, by design


def test_a_stop_string_split_across_many_tokens_late_in_a_long_stream(tok):
    body = "word " * 300
    parts = stream(tok, body + "the END marker and more", stop=["END marker"])
    assert "".join(parts) == body + "the "

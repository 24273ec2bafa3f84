"""Every bad input raises an error that names the field or path and what would be valid."""

import pytest

from common.engine.sampling import SamplingParams
from common.errors import InvalidRequestError, ModelLoadError
from common.model_source import resolve_model
from tests.helpers import assert_no_leaks, greedy, tiny_engine


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens", "positive"),
        ({"max_tokens": -3}, "max_tokens", "positive"),
        ({"max_tokens": 2.5}, "max_tokens", "integer"),
        ({"temperature": -0.1}, "temperature", ">= 0"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_k": -1}, "top_k", ">= 0"),
        ({"stop": 7}, "stop", "string or a list"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stop": {"a": 1}}, "stop", "string or a list"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
        ({"seed": "x"}, "seed", "integer"),
    ],
)
def test_sampling_params_reject(kwargs, param, needle):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.create(**kwargs)
    assert err.value.param == param
    assert needle in str(err.value)


def test_prompt_beyond_context_window():
    engine = tiny_engine(max_model_len=32)
    with pytest.raises(InvalidRequestError, match="context window is 32") as err:
        engine.add_request("x", list(range(32)), greedy(4))
    assert err.value.param == "prompt"
    assert_no_leaks(engine)


def test_prompt_plus_max_tokens_beyond_cache():
    engine = tiny_engine(num_kv_blocks=4)  # 16 tokens
    with pytest.raises(InvalidRequestError, match="max_tokens <= 6") as err:
        engine.add_request("x", list(range(10)), greedy(20))
    assert err.value.param == "max_tokens"


def test_empty_prompt_and_bad_token_ids_and_duplicate_ids():
    engine = tiny_engine()
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("x", [], greedy())
    with pytest.raises(InvalidRequestError, match=r"\[0, 256\)"):
        engine.add_request("x", [1, 999], greedy())
    engine.add_request("x", [1, 2], greedy())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("x", [1, 2], greedy())
    engine.abort("x")
    assert_no_leaks(engine)


def test_missing_weights_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "nope.gguf")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ModelLoadError, match="not GGUF"):
        resolve_model(f)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"\*\.safetensors"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("first_token", [-1, 256, 2**40])
def test_an_imported_first_token_outside_the_vocabulary_fails_alone(first_token):
    """A decode request naming a first token the model does not have is refused before it joins
    the batch, so the requests already running keep going."""
    engine = tiny_engine()
    engine.add_request("ok", [1, 2, 3], greedy(4))
    with pytest.raises(InvalidRequestError, match=r"\[0, 256\)") as err:
        engine.handoff.begin_import("bad", [4, 5, 6], first_token, greedy(4))
    assert err.value.param == "first_token"
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs if o.finished] == ["length"]
    assert_no_leaks(engine)

"""Penalties and logit_bias mean what vLLM means by them, under greedy sampling too; a tiny top_p
survives the float32 wire; and with every one of them at its default nothing changes."""

import math

import pytest
import torch

from common.engine.sampler import Sampler
from common.engine.sampling import SamplingParams
from common.engine.sequence import Sequence
from common.errors import InvalidRequestError
from common.rpc import types_pb2
from common.rpc.convert import params_from_proto, params_to_proto
from tests.helpers import (
    TINY,
    assert_no_leaks,
    generate_alone,
    greedy,
    run_to_completion,
    tiny_engine,
    tiny_model,
    tokens_of,
)

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 10, 20]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def seq(prompt: list[int], output: list[int], **params: object) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams.create(**params))
    s.output_token_ids = list(output)
    return s


def logits(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


# -- the sampler on hand-made logits: each penalty moves the argmax exactly where its definition says


def test_presence_penalty_counts_the_output_once():
    row = logits(5.0, 4.5, 0.0)
    assert Sampler().sample(row, [seq([2], [0], presence_penalty=0.4)]) == [0]  # 4.6 > 4.5
    assert Sampler().sample(row, [seq([2], [0, 0, 0], presence_penalty=0.6)]) == [1]  # 4.4 < 4.5, once
    assert Sampler().sample(row, [seq([0], [2], presence_penalty=2.0)]) == [0], "the prompt is not output"


def test_frequency_penalty_counts_every_occurrence():
    row = logits(5.0, 4.5, 0.0)
    assert Sampler().sample(row, [seq([2], [0, 0], frequency_penalty=0.2)]) == [0]  # 5 - 0.4 = 4.6
    assert Sampler().sample(row, [seq([2], [0, 0, 0], frequency_penalty=0.2)]) == [1]  # 5 - 0.6 = 4.4


def test_a_migrated_stream_counts_its_earlier_output_as_output():
    """After a migration the tokens already sent arrive as the prompt's tail: the output penalties
    must see them exactly as the uninterrupted stream would."""
    import dataclasses

    row = logits(5.0, 4.5, 0.0)
    whole = seq([2], [0, 0, 0], frequency_penalty=0.2)
    moved = seq([2, 0, 0], [0], frequency_penalty=0.2)
    moved.params = dataclasses.replace(moved.params, prior_output_tokens=2)
    assert Sampler().sample(row.clone(), [whole]) == Sampler().sample(row.clone(), [moved]) == [1]  # 5 - 0.6
    unaware = seq([2, 0, 0], [0], frequency_penalty=0.2)
    assert Sampler().sample(row.clone(), [unaware]) == [0]  # counting only its own output: 5 - 0.2


def test_negative_penalties_favour_repeats():
    row = logits(4.5, 5.0, 0.0)
    assert Sampler().sample(row, [seq([2], [0], presence_penalty=-1.0)]) == [0]


def test_repetition_penalty_covers_prompt_and_output_and_both_signs():
    row = logits(5.0, 4.0, -1.0, -1.2)
    assert Sampler().sample(row, [seq([0], [], repetition_penalty=1.5)]) == [1]  # 5 / 1.5 < 4
    assert Sampler().sample(row, [seq([3], [0], repetition_penalty=1.5)]) == [1]  # output counts too
    # a negative logit is multiplied: -1 * 1.5 = -1.5 falls below the unseen -1.2
    neg = logits(-1.0, -1.2)
    assert Sampler().sample(neg, [seq([0], [], repetition_penalty=1.5)]) == [1]
    # < 1 rewards what was seen
    assert Sampler().sample(logits(4.0, 5.0), [seq([0], [], repetition_penalty=0.5)]) == [0]


def test_logit_bias_is_added_last_and_leaves_the_input_alone():
    row = logits(5.0, 4.0, 3.0)
    before = row.clone()
    assert Sampler().sample(row, [seq([1], [], logit_bias={"2": 2.5})]) == [2]
    assert Sampler().sample(row, [seq([1], [], logit_bias={0: -100})]) == [1]
    # the repetition penalty scales the model's logit, then the bias is added unscaled: 4 / 2 + 2.5 < 5
    assert Sampler().sample(row, [seq([1], [], repetition_penalty=2.0, logit_bias={1: 2.5})]) == [0]
    assert torch.equal(row, before), "the caller's logits were modified"


def test_each_row_gets_only_its_own_adjustments():
    rows = torch.tensor([[5.0, 4.5], [5.0, 4.5]])
    a = seq([1], [0], presence_penalty=1.0)
    b = Sequence("b", [1], SamplingParams.create())
    b.output_token_ids = [0]
    assert Sampler().sample(rows, [a, b]) == [1, 0]


def test_history_follows_new_tokens_between_steps():
    sampler, row = Sampler(), logits(5.0, 4.5, 0.0)
    s = seq([2], [], frequency_penalty=0.3)
    picks = []
    for _ in range(4):
        picks.append(sampler.sample(row, [s])[0])
        s.output_token_ids.append(picks[-1])
    # token 0 falls below 4.5 after two occurrences (5 - 0.6), token 1 after one (4.5 - 0.3 < 4.4)
    assert picks == [0, 0, 1, 0]
    sampler.forget("r")
    assert sampler.sample(row, [seq([2], [], frequency_penalty=0.3)]) == [0], "forget drops the history"


def test_tiny_top_p_is_nearly_greedy():
    row = torch.tensor([[1.0, 0.9, 0.8, 0.7]])
    s = seq([3], [], temperature=1.0, top_p=1e-7, seed=3)
    assert {Sampler().sample(row, [s])[0] for _ in range(50)} == {0}


# -- on the tiny model, through the engine


def test_logit_bias_forces_a_token_under_greedy(model):
    plain = generate_alone(model, PROMPT, greedy(8))
    forced = next(t for t in range(TINY.vocab_size) if t not in plain)
    assert generate_alone(model, PROMPT, greedy(8, logit_bias={str(forced): 100})) == [forced] * 8
    banned = generate_alone(model, PROMPT, greedy(8, logit_bias={plain[0]: -100}))
    assert banned[0] != plain[0]


def test_penalties_break_repetition_on_the_tiny_model(model):
    plain = generate_alone(model, PROMPT, greedy(24))
    assert len(set(plain)) < len(plain), "the check below needs a greedy output that repeats itself"
    penalized = generate_alone(model, PROMPT, greedy(24, presence_penalty=2.0, frequency_penalty=2.0))
    assert len(set(penalized)) > len(set(plain))
    repeated = generate_alone(model, PROMPT, greedy(24, repetition_penalty=3.0))
    assert len(set(repeated)) > len(set(plain))


def test_defaults_change_nothing_and_skip_the_adjustment(model):
    ps = [PROMPT, [3, 1, 4, 1, 5, 9, 2, 6], [7] * 9]
    alone = [generate_alone(model, p, greedy(12)) for p in ps]
    explicit = dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={})
    engine = tiny_engine(model)

    def must_not_run(*args: object) -> None:
        raise AssertionError("default parameters must take the plain argmax path")

    engine.runner.sampler._penalizer.apply = must_not_run
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, greedy(12, **explicit))
    outs = run_to_completion(engine)
    assert [tokens_of(outs[f"r{i}"]) for i in range(len(ps))] == alone
    assert_no_leaks(engine)


def test_a_penalized_request_leaves_its_batch_alone(model):
    others = [[3, 1, 4, 1, 5, 9, 2, 6], [7] * 9]
    alone = [generate_alone(model, p, greedy(12)) for p in others]
    params = greedy(12, presence_penalty=1.5, repetition_penalty=1.3, logit_bias={5: 3.0})
    penalized_alone = generate_alone(model, PROMPT, params)
    engine = tiny_engine(model)
    engine.add_request("x", PROMPT, params)
    for i, p in enumerate(others):
        engine.add_request(f"o{i}", p, greedy(12))
    outs = run_to_completion(engine)
    assert [tokens_of(outs[f"o{i}"]) for i in range(len(others))] == alone
    assert tokens_of(outs["x"]) == penalized_alone
    penalizer = engine.runner.sampler._penalizer
    assert not penalizer._seen and not penalizer._bias, "finished requests' state is forgotten"
    assert_no_leaks(engine)


def test_penalties_survive_the_prefill_decode_handoff(model):
    """The decode side's history is prompt + imported first token: the same as one engine's."""
    params = greedy(16, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.2)
    expected = generate_alone(model, PROMPT, params)
    prefill, decode = tiny_engine(model), tiny_engine(model, num_kv_blocks=64)
    prefill.add_request("r", PROMPT, params, prefill_only=True)
    first = run_to_completion(prefill)["r"][0].new_token_ids[0]
    wire = params_from_proto(params_to_proto(params))
    dst = decode.handoff.begin_import("r", PROMPT, first, wire)
    decode.cache.write_blocks(dst, prefill.cache.read_blocks(prefill.handoff.export("r").block_ids))
    assert prefill.handoff.release("r") and prefill.handoff.settle() == ["r"]
    assert decode.finish_import("r") is None
    assert [first, *tokens_of(run_to_completion(decode)["r"])] == expected
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_engine_refuses_logit_bias_outside_the_vocabulary(model):
    engine = tiny_engine(model)
    with pytest.raises(InvalidRequestError, match=r"token id 256 is outside .*\[0, 256\)") as err:
        engine.add_request("x", PROMPT, greedy(4, logit_bias={256: 1.0}))
    assert err.value.param == "logit_bias"
    assert_no_leaks(engine)


# -- validation and the wire


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        ({"frequency_penalty": math.nan}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "(0, 10]"),
        ({"repetition_penalty": math.inf}, "repetition_penalty", "(0, 10]"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"5": math.nan}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"five": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias", "token ids"),
        ({"logit_bias": [1, 2]}, "logit_bias", "pairs"),
        ({"logit_bias": "x"}, "logit_bias", "map token ids"),
        ({"temperature": math.nan}, "temperature", "finite"),
        ({"temperature": math.inf}, "temperature", "finite"),
        ({"top_p": math.nan}, "top_p", "(0, 1]"),
        ({"top_k": 2**40}, "top_k", "4294967295"),
        ({"seed": 2**64}, "seed", "2**63"),
        ({"seed": -(2**63) - 1}, "seed", "2**63"),
        ({"max_tokens": 2**32}, "max_tokens", "4294967295"),
        ({"stop_token_ids": [2**32]}, "stop_token_ids", "token ids"),
    ],
)
def test_out_of_range_values_name_their_field(kwargs, param, needle):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.create(**kwargs)
    assert err.value.param == param
    assert needle in str(err.value)


def test_every_parameter_survives_the_wire():
    p = SamplingParams.create(
        max_tokens=7,
        temperature=0.7,
        top_p=1e-7,
        top_k=2**32 - 1,
        seed=-(2**63),
        stop=["\n"],
        presence_penalty=0.3,
        frequency_penalty=-1.1,
        repetition_penalty=1.05,
        logit_bias={"5": -100, 7: 0.125},
    )
    assert params_from_proto(params_to_proto(p)) == p


def test_top_p_unset_means_one_and_zero_is_refused():
    assert params_from_proto(types_pb2.SamplingParams(max_tokens=1)).top_p == 1.0
    assert params_from_proto(types_pb2.SamplingParams(max_tokens=1)).repetition_penalty == 1.0
    with pytest.raises(InvalidRequestError) as err:
        params_from_proto(types_pb2.SamplingParams(max_tokens=1, top_p=0.0))
    assert err.value.param == "top_p"

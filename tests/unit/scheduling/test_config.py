import pytest

from gateway.scheduling.config import DEFAULT, POLICIES, SchedulerConfigError, load_config, parse_config


def test_defaults_and_policies_parse():
    assert parse_config(DEFAULT).profiles.prefill.scorers[0].type == "prefix-cache"
    for name, policy in POLICIES.items():
        assert parse_config(policy), name
    assert load_config(None).decider.min_uncached_tokens == 32


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        (
            "profiles:\n  prefill: {scorers: [{type: magic}]}\n  decode: {scorers: []}\n",
            "profiles.prefill.scorers.0.type: Value error, unknown scorer 'magic'",
        ),
        (
            "profiles:\n  prefill: {scorers: [{type: kv-usage, weight: -1}]}\n  decode: {scorers: []}\n",
            "profiles.prefill.scorers.0.weight",
        ),
        ("profiles:\n  prefill: {scorers: []}\n", "profiles.decode: Field required"),
        ("profiles:\n  prefill: {scorers: [], filters: [vibes]}\n  decode: {scorers: []}\n", "unknown filter 'vibes'"),
        (
            "profiles:\n  prefill: {scorers: []}\n  decode: {scorers: []}\nimbalance: {relative: 0.5}\n",
            "imbalance.relative",
        ),
        ("profiles:\n  prefill: {scorers: []}\n  decode: {scorers: []}\nextra_knob: 1\n", "extra_knob"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, needle):
    path = tmp_path / "sched.yaml"
    path.write_text(yaml_text)
    with pytest.raises(SchedulerConfigError) as err:
        load_config(path)
    assert needle in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SchedulerConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")

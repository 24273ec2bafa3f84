import pytest

from bench.policies import POLICIES
from gateway.scheduling.config import DEFAULT, SchedulerConfigError, load_config, parse_config


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


def test_plugins_come_from_one_registry_each():
    """Every scorer, filter and picker class is registered under its type name, and the config
    accepts exactly the registered names."""
    import inspect

    from gateway.scheduling import filters, picker, scorers

    for module, registry in ((scorers, scorers.SCORERS), (filters, filters.FILTERS), (picker, picker.PICKERS)):
        classes = {c.type_name: c for _, c in inspect.getmembers(module, inspect.isclass) if hasattr(c, "type_name")}
        assert classes == registry
    assert set(scorers.SCORERS) - {"prefix-cache"} == scorers.LOAD_SCORERS
    profile = {"scorers": [], "picker": {"type": "coin-flip"}}
    with pytest.raises(SchedulerConfigError, match="unknown picker 'coin-flip'; known: max-score, round-robin"):
        parse_config({"profiles": {"prefill": profile, "decode": profile}})

"""evaluation/configs.py: the configuration names every tool speaks, and what they mean."""

import pytest

import todre
from evaluation import configs


@pytest.mark.parametrize(
    "name, expected",
    [
        ("full", todre.NO_PRUNING),
        ("stage2", todre.Settings(retain=1.0)),
        ("stage1-0.25", todre.Settings(retain=0.25, tau=0.0)),
        ("todre-0.10", todre.Settings(retain=0.10)),
        ("todre-0.10-v2", todre.Settings(retain=0.10, select="maxsum", tau=0.10, probe_fractions=todre.V2_PROBES)),
        ("cls-0.10", todre.Settings(retain=0.10, select="cls", tau=0.0)),
        ("cls-global-0.25", todre.Settings(retain=0.25, select="cls-global", tau=0.0)),
        ("keep-64", todre.Settings(retain=1.0, keep_tokens=64)),
        ("stage1-keep-192", todre.Settings(retain=1.0, keep_tokens=192, tau=0.0)),
        (
            "cls-keep-128-v2",
            todre.Settings(retain=1.0, keep_tokens=128, select="cls", tau=0.0, probe_fractions=todre.V2_PROBES),
        ),
    ],
)
def test_configuration_names_parse_to_settings(name, expected):
    assert configs.parse_config(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("bogus", "unknown configuration 'bogus'"),
        ("todre-64", "write todre-keep-64"),
        ("todre-1.5", "retain is a fraction"),
        ("keep-x", "configuration 'keep-x'"),
        ("stage1-nan", "retain is a fraction"),
        ("full-v2", "unknown configuration"),
    ],
)
def test_unknown_configuration_names_are_a_clear_error_listing_the_grammar(name, message):
    with pytest.raises(ValueError, match=message) as error:
        configs.parse_config(name)
    assert "keep-N" in str(error.value)  # the message lists the names there are

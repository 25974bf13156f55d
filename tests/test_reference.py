"""The parameter reference: `pyramidkd plugins --params [NAME]` (text and --json) for
every component, third-party ones included, and docs/reference.md kept current."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from pyramidkd.engine import between, positive
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.reporting.reference import REGENERATE, format_reference_markdown, reference_entries
from pyramidkd.engine.validation import describe_validator
from test_host import write_fake_distribution

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"

THIRD_PARTY = '''
import attrs
from pyramidkd.engine import Loss, between, hookimpl

def _even(instance, attribute, value):
    if value % 2:
        raise ValueError("odd")
_even.describe = "an even number"

@attrs.define
class WarpParams:
    strength: float = attrs.field(default=0.5, validator=between(0.0, 2.0), metadata={"help": "how hard to warp"})
    steps: int = attrs.field(default=4, validator=_even)
    mode: str = "fast"

class WarpLoss(Loss):
    """A third-party loss."""
    name = "warp"
    Params = WarpParams
    def forward(self, student, teachers, targets):
        return student.logits.mean()

@hookimpl
def pyramidkd_register_losses():
    return [WarpLoss]
'''


def test_docs_reference_is_current():
    expected = format_reference_markdown(reference_entries(make_plugin_host(load_entry_points=False), builtin_only=True))
    assert REFERENCE.read_text() == expected, f"docs/reference.md is out of date; regenerate it: {REGENERATE}"


def test_reference_lists_builtin_keys_with_type_default_range_and_help(cli):
    result = cli("plugins", "--params", "hint")
    assert result.code == 0, result.err
    assert "regressor" in result.out and "one of 'auto', 'always', 'never'" in result.out and 'default "auto"' in result.out
    assert "1×1-conv regressor" in result.out  # the field's help
    fitnet = cli("plugins", "--params", "fitnet").out
    assert "stage1_epochs" in fitnet and "an integer, default (not set), > 0" in fitnet
    assert "teacher" in fitnet and "default (required)" in fitnet
    train = cli("plugins", "--params", "train.optimizer").out
    assert "momentum" in train and "in [0.0, 1.0]" in train


def test_reference_covers_a_third_party_component_in_text_and_json(tmp_path, monkeypatch, cli):
    write_fake_distribution(tmp_path, THIRD_PARTY, module="warp_plugin", dist="warp-plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    text = cli("plugins", "--params", "warp")
    assert text.code == 0, text.err
    assert "loss 'warp'" in text.out and "in [0.0, 2.0]" in text.out and "an even number" in text.out
    listed = json.loads(cli("plugins", "--params", "--json").out)
    warp = next(entry for entry in listed if entry["name"] == "warp")
    assert warp["kind"] == "loss" and warp["source"] == "entry-point"
    assert {row["key"]: (row["type"], row["default"], row["range"], row["help"]) for row in warp["params"]} == {
        "strength": ("a number", "0.5", "in [0.0, 2.0]", "how hard to warp"),
        "steps": ("an integer", "4", "an even number", ""),
        "mode": ("a string", '"fast"', "", ""),
    }
    assert {"train", "experiment", "train.scheduler"} <= {entry["name"] for entry in listed}
    # The docs list the built-in components only.
    assert "warp" not in format_reference_markdown(reference_entries(make_plugin_host(), builtin_only=True))


def test_unknown_name_suggests_one(cli):
    result = cli("plugins", "--params", "fitnett")
    assert result.code == 1 and "did you mean 'fitnet'?" in result.err


def test_validators_describe_their_range():
    @attrs.define
    class Both:
        value: float = attrs.field(default=1.0, validator=[positive, between(0, 3)])

    assert describe_validator(attrs.fields(Both).value.validator) == "> 0, in [0, 3]"
    assert describe_validator(attrs.validators.in_(["a", "b"])) == "one of 'a', 'b'"
    assert describe_validator(None) is None

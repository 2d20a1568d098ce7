"""Config annotations written for mypy (``dict[str, Any]``, issue 30) read as before to users."""

from __future__ import annotations

from typing import Any

import pytest

from fskd.config import FitConfig, _describe, describe_options
from fskd.errors import ConfigError


def test_a_parametrised_dict_field_is_a_json_object():
    assert _describe(dict[str, Any]) == _describe(dict) == "a JSON object"
    assert _describe(dict[str, Any] | None) == "a JSON object or null"
    with pytest.raises(ConfigError, match=r"FitConfig: options must be a JSON object, got \(1,\)"):
        FitConfig.from_dict({"store": "s.zarr", "options": [1]})
    options = next(o for o in describe_options(FitConfig) if o["name"] == "options")
    assert options["type"] == "a JSON object" and options["default"] == "{}"

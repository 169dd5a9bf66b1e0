"""Profiles: TOML loading and validation, filtering, drop_fields and enrich."""

from __future__ import annotations

from pathlib import Path

import pytest

from broadcaster.envelope import Envelope
from broadcaster.errors import ValidationError
from broadcaster.profiles import EnrichContext, ProfileError, ProfileRegistry, parse_type_filter

CTX = EnrichContext("p", "c", "g")


def mark(event: dict, ctx: EnrichContext) -> dict:
    event["by"] = ctx.profile
    event["data"]["touched"] = True  # enrich gets its own copy: the original stays intact
    return event


def drop_all(event: dict, ctx: EnrichContext) -> None:
    return None


def event(etype: str, data: object) -> dict:
    return Envelope("c", 1, "i", etype, 0, data, "e").event_object()


def test_builtins_default_hides_debug_debug_sees_all() -> None:
    reg = ProfileRegistry()
    default, debug = reg.get("default"), reg.get("debug")
    assert default is not None and debug is not None
    assert default.allows("chat.msg") and not default.allows("debug.trace")
    assert debug.allows("debug.trace") and debug.allows("anything")
    assert reg.get("nope") is None


def test_file_loads_include_exclude_drop_enrich(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('''
[profiles.chat]
include = ["llm.*", "chat.*"]
exclude = ["*.thinking.*"]
drop_fields = ["raw", "usage.tokens"]
enrich = ["tests.test_profiles:mark"]

[profiles.default]
include = ["*"]
''')
    reg = ProfileRegistry.from_file(f)
    chat = reg.get("chat")
    assert chat is not None
    assert chat.allows("llm.delta") and not chat.allows("llm.thinking.delta") and not chat.allows("tool.x")
    original = event("chat.msg", {"raw": 1, "usage": {"tokens": 3, "cost": 2}, "keep": {"a": 1}})
    shaped = chat.shape(original, CTX)
    assert shaped is not None
    assert shaped["data"] == {"usage": {"cost": 2}, "keep": {"a": 1}, "touched": True}
    assert shaped["by"] == "p"
    assert original["data"] == {"raw": 1, "usage": {"tokens": 3, "cost": 2}, "keep": {"a": 1}}
    default = reg.get("default")
    assert default is not None and default.allows("debug.x")  # redefined by the file


def test_drop_fields_ignores_missing_paths_and_non_objects() -> None:
    reg = ProfileRegistry.from_mapping({"profiles": {"p": {"drop_fields": ["a.b", "x"]}}})
    p = reg.get("p")
    assert p is not None
    for data in (None, 3, "s", [1, 2], {"a": 5}, {"a": {"c": 1}}):
        shaped = p.shape(event("t", data), CTX)
        assert shaped is not None and shaped["data"] == data


def test_enrich_returning_none_drops_the_event() -> None:
    reg = ProfileRegistry.from_mapping({"profiles": {"p": {"enrich": ["tests.test_profiles:drop_all"]}}})
    p = reg.get("p")
    assert p is not None and p.shape(event("t", {}), CTX) is None


@pytest.mark.parametrize("body, needle", [
    ('[profiles.x]\nincldue = ["*"]', "profiles.x: unknown key(s) ['incldue']"),
    ('[profiles.x]\ninclude = ["bad pattern"]', "profiles.x.include"),
    ('[profiles.x]\ninclude = "chat.*"', "profiles.x.include: must be a list of strings"),
    ('[profiles.x]\ndrop_fields = ["a..b"]', "profiles.x.drop_fields"),
    ('[profiles.x]\nenrich = ["no_such_module_xyz:f"]', "profiles.x.enrich: cannot import"),
    ('[profiles.x]\nenrich = ["tests.test_profiles:missing"]', "profiles.x.enrich"),
    ('[profiles."bad name"]\n', "bad name"),
    ('[other]\n', "unknown top-level key(s) ['other']"),
    ('[profiles.x\n', "invalid TOML"),
])
def test_bad_files_name_the_file_and_key(tmp_path: Path, body: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ProfileError) as info:
        ProfileRegistry.from_file(f)
    assert str(f) in str(info.value) and needle in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        ProfileRegistry.from_file(tmp_path / "absent.toml")


def test_type_filter_parsing() -> None:
    globs = parse_type_filter("chat.*, llm.delta")
    assert globs is not None and globs.matches("chat.x") and globs.matches("llm.delta") and not globs.matches("llm.x")
    with pytest.raises(ValidationError):
        parse_type_filter(",".join(["a"] * 17))
    with pytest.raises(ValidationError):
        parse_type_filter("has space")

"""Typed configs (defaults < YAML < flags), the CLI's --help for every subcommand, and the
terminal chat end to end as a subprocess on a tiny model."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from loopchat.chat import ChatConfig
from loopchat.cli import build_parser, main
from loopchat.config import ConfigError, add_config_args, resolve_config


def parse(argv):
    ap = argparse.ArgumentParser()
    add_config_args(ap, ChatConfig)
    return ap.parse_args(argv)


def test_defaults_yaml_and_flags_merge_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("temperature: 0.2\nmax-new-tokens: 50\nsystem: be brief\n")
    cfg = resolve_config(ChatConfig, parse(["--config", str(y), "--max-new-tokens", "7"]))
    assert cfg.temperature == 0.2  # from YAML
    assert cfg.max_new_tokens == 7  # flag beats YAML
    assert cfg.system == "be brief"
    assert cfg.top_p == 0.9  # default
    assert resolve_config(ChatConfig, parse([])).max_new_tokens == 256


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        resolve_config(ChatConfig, parse(["--max-new-tokens", "lots"]))
    y = tmp_path / "c.yaml"
    y.write_text("temprature: 0.2\n")
    with pytest.raises(ConfigError, match="temprature"):
        resolve_config(ChatConfig, parse(["--config", str(y)]))
    y.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(ChatConfig, parse(["--config", str(y)]))
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(ChatConfig, parse(["--config", str(tmp_path / "nope.yaml")]))


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subcommands(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    cmds = list(_subcommands(build_parser()))
    assert {c[0] for c, _ in cmds} >= {"chat", "model", "data"}
    for cmd, _ in cmds:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: loopchat " + " ".join(cmd) in out
        # a bare '%' in a description makes argparse splice its own internals into the text
        assert "option_strings" not in out, f"{cmd}: a help string has an unescaped '%'"
        assert "PydanticUndefined" not in out, f"{cmd}: a required setting shows pydantic's sentinel as its default"


def test_cli_reports_bad_input_without_traceback(capsys, tmp_path):
    assert main(["model", "convert", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert "GGUF file not found" in err and "Traceback" not in err


def test_terminal_chat_as_a_subprocess(tiny_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'chat.db'}"
    env = {**os.environ, "LOOPCHAT_HOME": str(tmp_path / "home")}
    script = "Hello there\nTell me more about it\n/regen\n/reset\nNew topic\n/quit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "loopchat.cli", "chat", "--model", tiny_dir, "--db", db, "--max-new-tokens", "8",
         "--temperature", "0.9", "--seed", "1", "--system", "You are terse."],
        input=script, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(new conversation)" in proc.stdout and "saved as conversation" in proc.stdout

    from loopchat.data.store import Store

    store = Store(db)
    convs = store.conversations()
    assert len(convs) == 2
    first = min(convs, key=lambda c: c.id)
    msgs = store.conversation_messages(first.id)
    roles = [m.role for m in msgs]
    assert roles.count("user") == 2 and roles.count("assistant") == 3  # two replies + one regeneration
    assert msgs[0].role == "system" and msgs[0].content == "You are terse."
    second_user = [m for m in msgs if m.role == "user"][1]
    assert second_user.content == "Tell me more about it"
    # the follow-up was answered with the first exchange in its history (multi-turn memory)
    assert [m.content for m in store.thread(second_user.id)][:2] == ["You are terse.", "Hello there"]
    # /regen made a sibling of the last reply: two assistant children of the same user message
    assert len([c for c in store.children(second_user.id) if c.role == "assistant"]) == 2
    store.close()


def test_data_import_and_export_through_the_cli(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'd.db'}"
    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert main(["data", "import", str(bad), "--db", db]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2" in err and "role" in err
    assert main(["data", "import", str(good), "--db", db, "--user", "trainer1"]) == 0
    assert "imported 1 conversations, 2 messages" in capsys.readouterr().out
    out = tmp_path / "out.jsonl"
    assert main(["data", "export", str(out), "--format", "messages", "--db", db]) == 0
    import json

    assert json.loads(out.read_text())["messages"][1] == {"role": "assistant", "content": "Hello!"}


def test_optional_bool_settings_are_flag_pairs():
    """`bool | None` (e.g. bf16: None = by the hardware) gets --x / --no-x, and unset stays None."""
    from loopchat.train.sft import SFTConfig

    p = argparse.ArgumentParser()
    add_config_args(p, SFTConfig)
    assert resolve_config(SFTConfig, p.parse_args([])).bf16 is None
    assert resolve_config(SFTConfig, p.parse_args(["--bf16"])).bf16 is True
    assert resolve_config(SFTConfig, p.parse_args(["--no-bf16"])).bf16 is False

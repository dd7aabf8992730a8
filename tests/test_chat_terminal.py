"""The chat command as a terminal program: control characters from the model are shown escaped, never obeyed;
Ctrl-C stops a reply (back to the prompt) or, at the prompt, ends the chat without a traceback; /reset and a
loaded adapter are confirmed."""

from __future__ import annotations

import builtins

import pytest

from minillm import generate as mg


def test_visible_escapes_every_control_but_newline_and_tab():
    title = "\x1b]2;pwned\x07"
    assert mg.visible(f"a{title}b\n\tc") == "a\\x1b]2;pwned\\x07b\n\tc"
    assert mg.visible("\x00\x7f\x9b") == "\\x00\\x7f\\x9b"  # NUL, DEL and the C1 CSI
    assert mg.visible("你好, ok") == "你好, ok"


def test_printer_never_writes_raw_escape(capsys):
    mg._printer("x\x1b[2Jy")
    out = capsys.readouterr().out
    assert "\x1b" not in out and out == "x\\x1b[2Jy"


class FakeTok:
    pass


def _chat(monkeypatch, capsys, lines, replies):
    """Run the interactive chat on typed `lines` (an exception instance is raised at that point) with `replies`
    standing for the model (an exception instance is raised instead of replying)."""
    monkeypatch.setattr(mg, "load_chat", lambda model, adapter: (object(), FakeTok(), None))
    typed, answers, seen = iter(lines), iter(replies), []

    def fake_input(prompt=""):
        item = next(typed)
        if isinstance(item, BaseException):
            raise item
        return item

    def fake_reply(model, tok, messages, max_new_tokens, on_text=None, **sampling):
        seen.append(list(messages))
        item = next(answers)
        if isinstance(item, BaseException):
            raise item
        on_text(item)
        return item

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(mg, "reply", fake_reply)
    code = mg.main(["--model", "unused"])
    return code, capsys.readouterr(), seen


def test_ctrl_c_during_a_reply_returns_to_the_prompt(monkeypatch, capsys):
    code, out, seen = _chat(monkeypatch, capsys, ["hi", "again", ""], [KeyboardInterrupt(), "fine"])
    assert code == 0 and "(reply stopped)" in out.out and "Traceback" not in out.err
    assert [m["content"] for m in seen[1]][1:] == ["again"]  # the stopped turn is not in the history


def test_ctrl_c_at_the_prompt_ends_the_chat_cleanly(monkeypatch, capsys):
    code, out, _ = _chat(monkeypatch, capsys, ["hi", KeyboardInterrupt()], ["hello"])
    assert code == 0 and "Traceback" not in out.err


def test_reset_is_confirmed_and_forgets(monkeypatch, capsys):
    code, out, seen = _chat(monkeypatch, capsys, ["hi", "/reset", "again", ""], ["hello", "fine"])
    assert code == 0 and "conversation forgotten" in out.out
    assert [m["content"] for m in seen[1]][1:] == ["again"]


def test_escape_sequences_in_a_reply_are_shown_escaped(monkeypatch, capsys):
    code, out, _ = _chat(monkeypatch, capsys, ["hi", ""], ["\x1b]2;title\x07done"])
    assert code == 0 and "\x1b" not in out.out and "\\x1b]2;title\\x07done" in out.out

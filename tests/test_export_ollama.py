"""The exported Modelfile's TEMPLATE rendered by Go's text/template, the engine Ollama runs it with.

Ollama itself cannot be installed here (it is in no package registry this machine reaches), so this checks the part
of `ollama create NAME -f NAME.Modelfile` that decides whether the chat works: the prompt Ollama builds from the
Modelfile's TEMPLATE and SYSTEM must be the ChatML prompt minillm trained on (minillm.sft.chatml_prompt). Ollama's
chat and generate handlers put the Modelfile's SYSTEM first when the request has no system message, then collect
every system message into .System; whether the system messages also stay in .Messages changed across Ollama's
versions (older ones removed them, newer ones keep them), so both data shapes are rendered here.

`make export-check` installs Go (Debian's golang-go) for this file; without `go` on PATH it is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from minillm import export as ex
from minillm.sft import chatml_prompt

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain (make export-check installs it)")

# Reads the template file named by its argument and a JSON list of {"System", "Messages"} values on stdin, prints
# the JSON list of renderings: text/template with the same field names Ollama's template.Values carries.
RENDER_GO = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	System   string
	Messages []Message
}

func main() {
	src, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(string(src)))
	var cases []Values
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, v := range cases {
		var b strings.Builder
		if err := t.Execute(&b, v); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is gradient descent?"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "你是谁?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"}, {"role": "user", "content": "{{ .System }}"}],
]


def directive(modelfile: str, name: str) -> str:
    """A triple-quoted directive's text, as Ollama's Modelfile parser reads it."""
    m = re.search(rf'^{name} """(.*?)"""$', modelfile, re.S | re.M)
    assert m, f"no {name} in the Modelfile:\n{modelfile}"
    return m.group(1)


def ollama_values(modelfile_system: str, messages: list[dict], keep_system_messages: bool) -> dict:
    """What Ollama hands the template: its SYSTEM first unless the request starts with a system message, the
    system messages joined into .System, and the messages with or without them (the two versions' behaviour)."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile_system}] + messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    kept = messages if keep_system_messages else [m for m in messages if m["role"] != "system"]
    return {"System": system, "Messages": kept}


def render(template: str, values: list[dict], tmp: Path) -> list[str]:
    (tmp / "render.go").write_text(RENDER_GO)
    (tmp / "template.txt").write_text(template)
    out = subprocess.run(["go", "run", str(tmp / "render.go"), str(tmp / "template.txt")], input=json.dumps(values),
                         capture_output=True, text=True, timeout=300, cwd=tmp)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ollama_renders_the_modelfile_template_as_minillm_chatml(tmp_path):
    modelfile = ex.modelfile("chat.gguf")
    template, system = directive(modelfile, "TEMPLATE"), directive(modelfile, "SYSTEM")
    cases, want = [], []
    for messages in CONVERSATIONS:
        full = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}] + messages
        for keep in (True, False):
            cases.append(ollama_values(system, messages, keep))
            want.append(chatml_prompt(full))
    got = render(template, cases, tmp_path)
    for values, g, w in zip(cases, got, want):
        assert g == w, f"Ollama would prompt\n{g!r}\nwhere minillm trained on\n{w!r}\n(values {values})"


def test_the_template_of_before_would_have_lost_the_system_turn_in_older_ollama(tmp_path):
    """The check can fail: a template that loops over .Messages alone (this file's first version) renders no
    system turn when Ollama takes the system messages out of .Messages."""
    old = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    messages = CONVERSATIONS[0]
    got = render(old, [ollama_values("You are a helpful assistant.", messages, keep_system_messages=False)], tmp_path)
    assert "system" not in got[0] and got[0] != chatml_prompt([{"role": "system", "content": "x"}] + messages)

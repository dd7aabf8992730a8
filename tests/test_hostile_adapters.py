"""Hostile adapter directories (issue 19, class 3): adapters get the same rules as models. Every file is a regular
file inside the directory, tensors are floating point, finite and of the model's shapes (checked before anything
is allocated), the resulting update finite. Each case, for every method it applies to, is loaded through
`minillm.peft.load_adapter` and through the chat (`python -m minillm.generate --model BASE --adapter DIR`): a
sentence naming the file, a non-zero exit, the user's files unchanged, no hang.

Table-driven: each row is (case, methods, setup, substrings of the message). `setup(d, outside)` breaks the valid
adapter directory `d` (`outside` is a directory beside it, for links out).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm import generate as mg
from minillm.config import ModelConfig
from minillm.infra import corpus
from minillm.model import CausalLM
from minillm.peft import (HoulsbyConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, apply, load_adapter,
                          save_adapter)
from minillm.peft.ia3 import IA3Config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4),
    "ia3": lambda: IA3Config(),
    "adapter": lambda: HoulsbyConfig(bottleneck=4, init="houlsby"),
}
ALL = tuple(CONFIGS)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_hang():
    """A loader that blocks (opening a FIFO) fails the test instead of hanging the suite."""
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the loader hung for 30 s"))
    signal.alarm(30)
    yield
    signal.alarm(0), signal.signal(signal.SIGALRM, old)


def _base() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.preset("tiny"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The base model with the bundled tokenizer, as the chat loads it."""
    d = tmp_path_factory.mktemp("base") / "model"
    _base().save_pretrained(d)
    for f in Path(corpus.TOKENIZER_DIR).iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_dir) -> dict[str, Path]:
    """One valid adapter directory per method (weights made non-zero, so a wrong file cannot pass as identity)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, make in CONFIGS.items():
        model = apply(_base(), make())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        save_adapter(model, root / name, base_model_name_or_path=str(base_dir))
        out[name] = root / name
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / WEIGHTS))


def _rewrite(d: Path, change) -> None:
    t = _tensors(d)
    key = sorted(t)[0]
    t[key] = change(t[key])
    save_file(t, str(d / WEIGHTS), metadata={"format": "pt"})


def _config(d: Path, **changes) -> None:
    c = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**c, **changes}, indent=2))


def _link_out(name: str):
    def setup(d: Path, outside: Path) -> None:
        shutil.move(str(d / name), outside / name)
        os.symlink(outside / name, d / name)
    return setup


def _fifo(name: str):
    def setup(d: Path, outside: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)
    return setup


def _nan(d, _):
    _rewrite(d, lambda v: v.clone().fill_(float("nan")))


def _inf(d, _):
    _rewrite(d, lambda v: v.clone().fill_(float("inf")))


def _int(d, _):
    _rewrite(d, lambda v: v.to(torch.int32))


def _wrong_shape(d, _):
    _rewrite(d, lambda v: torch.zeros(*v.shape[:-1], v.shape[-1] + 1))


def _huge_alpha(d, _):
    _config(d, lora_alpha=1e308)


def _huge_r(d, _):
    _config(d, r=2**31)


def _nothing_targeted(d, _):
    _config(d, target_modules=["no_such_module"])


def _huge_tokens(d, _):
    _config(d, num_virtual_tokens=2**31)


def _huge_bottleneck(d, _):
    _config(d, bottleneck=2**31)


def _alpha_nan(d, _):
    (d / CONFIG).write_text((d / CONFIG).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))


# (case, methods, setup, substrings of the message; "{d}" is the adapter directory)
CASES = [
    ("NaN weights", ALL, _nan, ["{d}/adapter_model.safetensors", "NaN or infinite"]),
    ("inf weights", ALL, _inf, ["{d}/adapter_model.safetensors", "NaN or infinite"]),
    ("integer weights", ALL, _int, ["{d}/adapter_model.safetensors", "int32", "floating point"]),
    ("a tensor of the wrong shape", ALL, _wrong_shape, ["{d}/adapter_model.safetensors", "shape"]),
    ("weights linked outside", ALL, _link_out(WEIGHTS), ["{d}/adapter_model.safetensors", "outside"]),
    ("config linked outside", ALL, _link_out(CONFIG), ["{d}/adapter_config.json", "outside"]),
    ("weights a FIFO", ALL, _fifo(WEIGHTS), ["{d}/adapter_model.safetensors", "FIFO"]),
    ("config a FIFO", ALL, _fifo(CONFIG), ["{d}/adapter_config.json", "FIFO"]),
    ("lora_alpha 1e308", ("lora",), _huge_alpha, ["{d}/adapter_model.safetensors", "is not finite"]),
    ("lora_alpha NaN", ("lora",), _alpha_nan, ["{d}/adapter_config.json", "NaN is not a number JSON allows"]),
    ("r = 2**31", ("lora",), _huge_r, ["{d}/adapter_model.safetensors", "does not fit r=2147483648"]),
    ("targets that match nothing", ("lora", "ia3"), _nothing_targeted, ["{d}/adapter_", "no_such_module"]),
    ("num_virtual_tokens 2**31", ("prompt", "prefix"), _huge_tokens, ["{d}/adapter_model.safetensors", "shape"]),
    ("bottleneck 2**31", ("adapter",), _huge_bottleneck, ["{d}/adapter_model.safetensors", "shape"]),
]
# The chat checks first that --adapter is an adapter directory, with is_file(): a FIFO config is "no
# adapter_config.json there" (a sentence naming the directory; minillm/generate.py could let load_adapter name the FIFO)
CHAT_PARTS = {"config a FIFO": ["{d}", "adapter_config.json"]}
ROWS = [(case, method, setup, parts) for case, methods, setup, parts in CASES for method in methods]


def _digest(d: Path) -> dict[str, str]:
    return {p.name: "link" if p.is_symlink() else "fifo" if p.is_fifo() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir())}


def _broken(adapters, method, setup, tmp_path) -> Path:
    d, outside = tmp_path / "adapter", tmp_path / "outside"
    shutil.copytree(adapters[method], d)
    outside.mkdir()
    setup(d, outside)
    return d


@pytest.mark.parametrize("case,method,setup,parts", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_hostile_adapter_is_refused_by_load_adapter(case, method, setup, parts, adapters, tmp_path):
    d = _broken(adapters, method, setup, tmp_path)
    before = _digest(d)
    with pytest.raises((ValueError, OSError)) as e:
        load_adapter(_base(), d)
    msg = str(e.value)
    for part in parts:
        assert part.format(d=d) in msg, f"{case} ({method}): {msg}"
    assert "\n" not in msg, "one sentence"
    assert _digest(d) == before, "the adapter directory changed"


@pytest.mark.parametrize("case,method,setup,parts", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_hostile_adapter_is_refused_by_the_chat(case, method, setup, parts, adapters, base_dir, tmp_path, capsys):
    """The chat's main in-process (its exit is SystemExit(message): exit code 1 with that line on stderr)."""
    d = _broken(adapters, method, setup, tmp_path)
    before = _digest(d)
    with pytest.raises(SystemExit) as e:
        mg.main(["--model", str(base_dir), "--adapter", str(d), "--prompt", "hi", "--max_new_tokens", "2"])
    msg = str(e.value.code)
    assert ": error: " in msg, msg
    for part in CHAT_PARTS.get(case, parts):
        assert part.format(d=d) in msg, f"{case} ({method}): {msg}"
    assert "\n" not in msg
    assert "loaded" not in capsys.readouterr().err  # nothing answered
    assert _digest(d) == before


@pytest.mark.parametrize("method", ALL)
def test_valid_adapters_load_and_chat(method, adapters, base_dir, capsys):
    """The fixture's adapters are valid: the rows above fail for their planted fault only."""
    load_adapter(_base(), adapters[method])
    assert mg.main(["--model", str(base_dir), "--adapter", str(adapters[method]), "--prompt", "hi",
                    "--max_new_tokens", "2"]) == 0
    assert "loaded" in capsys.readouterr().err


@pytest.mark.parametrize("case,setup,message", [
    ("NaN weights", _nan, "NaN or infinite"), ("weights a FIFO", _fifo(WEIGHTS), "FIFO")])
def test_the_chat_command_exits_non_zero_with_one_sentence(case, setup, message, adapters, base_dir, tmp_path):
    """The real command, bounded by a timeout: exit 1, one line on stderr, nothing on stdout (no empty reply)."""
    d = _broken(adapters, "adapter", setup, tmp_path)
    p = subprocess.run([sys.executable, "-m", "minillm.generate", "--model", str(base_dir), "--adapter", str(d),
                        "--prompt", "hi", "--max_new_tokens", "2"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(d) in lines[0], p.stderr
    assert p.stdout == ""

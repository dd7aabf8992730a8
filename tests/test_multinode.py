"""Two nodes on one machine (issue 23): each node is its own launcher process with one CPU rank, meeting over
loopback exactly as two machines meet over a network, and the loss curve is the one 2 ranks on one node give.

The matrix is the smallest that covers both launchers, both ZeRO stages, both implementations and both scripts
(each launch costs ~25-40 s of start-up on 2 busy cores for well under a second of training):
    pretrain.py --impl minillm, ZeRO-3: `deepspeed --hostfile H --no_ssh --node_rank K ...` vs torchrun 2 ranks
    finetune.py --impl hf, ZeRO-2:      `torchrun --nnodes 2 --node_rank K ...`             vs torchrun 2 ranks
The ZeRO-3 run's checkpoint is then consolidated (train/consolidate.py) and compared with the live weights.

The deepspeed launcher needs a hostfile naming two hosts for --node_rank 1 to exist (without one it builds a
one-host pool: "--node_rank is not set correctly"; with --num_nodes 2: "Num nodes is >1 but no extra nodes
available via hostfile"); with --no_ssh it never contacts the hosts, so any two names do. Both nodes share the
output directory (a cluster's shared filesystem: every rank writes its ZeRO partition into the same checkpoint-N)
and the token-store cache, which the reference run built first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import ROOT, _env, _losses, _port, _run

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
PRETRAIN = ["--impl", "minillm", "--config_name", "tiny", "--block_size", "32", "--per_device_train_batch_size", "2",
            "--max_steps", "6", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "7",
            "--save_strategy", "steps", "--save_steps", "6", "--disable_tqdm", "true", "--report_to", "none",
            "--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]
FINETUNE = ["--impl", "hf", "--max_len", "64", "--per_device_train_batch_size", "2", "--max_steps", "4",
            "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "7", "--save_strategy", "no",
            "--disable_tqdm", "true", "--report_to", "none", "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
LAUNCH_TIMEOUT_S = 400


def node_cmd(launcher: str, k: int, port: str, hostfile: Path, script: str, args: list[str]) -> list[str]:
    """Node k's command line, as the README gives it (the launchers run from the checkout's root)."""
    if launcher == "deepspeed":
        return [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k), "--master_addr",
                "127.0.0.1", "--master_port", port, f"train/{script}", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(k), "--master_addr",
            "127.0.0.1", "--master_port", port, "--nproc_per_node", "1", f"train/{script}", *args]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, by pid (ranks may run in their own sessions)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        victims = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


def two_nodes(launcher: str, script: str, args: list[str], tmp: Path, name: str) -> list[str]:
    """Start node 0 and node 1 as separate launcher processes; both must exit 0. Returns their logs."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port, procs, logs = _port(), [], [tmp / f"{name}-node{k}.log" for k in (0, 1)]
    env = _env(tmp / "cache")
    try:
        for k in (0, 1):
            with open(logs[k], "w") as f:
                procs.append(subprocess.Popen(node_cmd(launcher, k, port, hostfile, script, args), stdout=f,
                                              stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        deadline = time.time() + LAUNCH_TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        hung = [k for k, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    texts = [log.read_text() for log in logs]
    assert not hung, f"node(s) {hung} still running after {LAUNCH_TIMEOUT_S} s:\n" + texts[hung[0]][-3000:]
    for k, p in enumerate(procs):
        assert p.returncode == 0, f"node {k} failed (exit {p.returncode}):\n" + texts[k][-3000:]
    return texts


def max_delta(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys() and a, f"different steps logged: {sorted(a)} vs {sorted(b)}"
    return max(abs(a[s] - b[s]) for s in a)


def one_node_then_two(tmp: Path, script: str, args: list[str], launcher: str) -> tuple[Path, list[str]]:
    """The same run as 2 ranks on one node (torchrun --nproc_per_node 2), then as 2 nodes of one rank each."""
    _run(script, ["--output_dir", str(tmp / "one-node"), *args], tmp / "cache", tmp / "one-node.log")
    return tmp, two_nodes(launcher, script, ["--output_dir", str(tmp / "two-nodes"), *args], tmp, "two-nodes")


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """pretrain.py --impl minillm under ZeRO-3; the two nodes launched by deepspeed --no_ssh."""
    return one_node_then_two(tmp_path_factory.mktemp("multinode-pre"), "pretrain.py", PRETRAIN, "deepspeed")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """finetune.py --impl hf (full SFT) under ZeRO-2; the two nodes launched by torchrun --nnodes 2."""
    return one_node_then_two(tmp_path_factory.mktemp("multinode-sft"), "finetune.py", FINETUNE, "torchrun")


def test_deepspeed_no_ssh_two_nodes_zero3_minillm_is_bit_identical_to_one_node(pre):
    tmp, logs = pre
    assert "global_rank_mapping=defaultdict(<class 'list'>, {'node0': [0], 'node1': [1]})" in logs[0]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in logs[0]  # 2 nodes x 1 x 2
    one, two = _losses(tmp / "one-node"), _losses(tmp / "two-nodes")
    assert len(one) == 6
    assert max_delta(one, two) == 0.0, f"{one} vs {two}"  # measured: bit-identical
    wa, wb = load_file(tmp / "one-node" / "model.safetensors"), load_file(tmp / "two-nodes" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # each node's rank wrote its own ZeRO-3 partition into the shared checkpoint
    shards = sorted(p.name for p in (tmp / "two-nodes" / "checkpoint-6" / "global_step6").glob("*model_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]


def test_torchrun_two_nodes_zero2_hf_finetune_is_bit_identical_to_one_node(sft):
    tmp, logs = sft
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in logs[0]
    one, two = _losses(tmp / "one-node"), _losses(tmp / "two-nodes")
    assert len(one) == 4
    assert max_delta(one, two) == 0.0, f"{one} vs {two}"  # measured: bit-identical


def test_consolidate_a_zero3_checkpoint_equals_the_live_weights(pre):
    """train/consolidate.py joins the ranks' fp32 partitions (zero_to_fp32) into HF-format safetensors equal to the
    weights the Trainer gathered from the live model; the result loads in transformers and minillm alike."""
    from transformers import AutoModelForCausalLM

    from minillm.model import CausalLM
    from train.consolidate import consolidate

    tmp, _ = pre
    for run in ("one-node", "two-nodes"):
        out = consolidate(tmp / run / "checkpoint-6", tmp / f"{run}-consolidated")
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
        got, live = load_file(out / "model.safetensors"), load_file(tmp / run / "model.safetensors")
        assert got.keys() == live.keys()
        worst = max((got[k] - live[k]).abs().max().item() for k in got)
        assert worst == 0.0, f"{run}: consolidated weights differ from the live ones by {worst}"  # fp32 run: equal
    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = CausalLM.from_pretrained(out).eval()(x).logits
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=x).logits
        live = CausalLM.from_pretrained(tmp / "two-nodes").eval()(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5 and torch.equal(ours, live)


def test_consolidate_refuses_what_it_cannot_read(pre, tmp_path):
    from train.consolidate import main

    with pytest.raises(SystemExit, match="holds no DeepSpeed ZeRO checkpoint"):
        main([str(tmp_path), "--output_dir", str(tmp_path / "o")])
    tmp, _ = pre
    with pytest.raises(SystemExit, match="must not be the checkpoint itself"):
        main([str(tmp / "one-node" / "checkpoint-6"), "--output_dir", str(tmp / "one-node" / "checkpoint-6")])

"""A rank that dies or hangs mid-run does not keep the others waiting for ever, and the next start resumes; a node
that never arrives is given up on (issue 23).

A 2-rank CPU run (tiny preset, ZeRO-2, the deepspeed launcher) checkpoints every 5 steps; once checkpoint-5 is
complete the test finds rank 1's pid in the launcher's process tree (its RANK variable) and
    SIGKILLs it: gloo's sockets to it are reset at once, rank 0 stops with minillm's sentence naming rank 1
        (train/run.py reporting_lost_ranks) or the launcher names rank 1's exit (-9) first; then the same command
        resumes from the newest complete checkpoint and finishes;
    SIGSTOPs it (a hung rank: alive, silent): rank 0 waits --ddp_timeout (10 s here: train/args.py
        start_process_group gives it to the default group, train/run.py ProcessGroupTimeout to DeepSpeed's own
        groups), then stops with the sentence; the deepspeed launcher then SIGKILLs the stopped rank (torchrun first
        sends SIGTERM, which a stopped process does not act on, and waits --shutdown-timeout, 30 s by default).
No test hook in the scripts: the rank is killed or stopped from outside, as a crash, the OOM killer or a stuck node
would. A node that never arrives: node 0 of `--nnodes 2` started alone gives up after torchrun's --rdzv_conf
timeout=N (its own default is 600 s), or under `deepspeed --no_ssh` after --ddp_timeout.
Measured on 2 busy cores (3 runs each, ZeRO-2, deepspeed launcher): rank 1 killed: named after 0.1-0.2 s, the launcher
exited after 1.9-3.1 s; rank 1 stopped with --ddp_timeout 20: named after 20.1 s, the launcher exited after 54.4-55.3
s (its 30 s SIGTERM grace). The file takes ~4 min (slow lane).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.test_train import ROOT, TRAIN, _env, _losses, _port

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
ARGS = ["--config_name", "tiny", "--block_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "40",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "7", "--save_strategy", "steps", "--save_steps",
        "5", "--disable_tqdm", "true", "--report_to", "none", "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
START_TIMEOUT_S = 300  # start-up to checkpoint-5, including a first compile of DeepSpeed's CPU op
KILL_REPORTED_S = 30  # measured 0.1-0.2 s to the sentence: the bound leaves room for busy cores
HANG_TIMEOUT_S = 10  # --ddp_timeout of the hang test; rank 1 is named right after it (+0.1 s measured)


def launch(out: Path, extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", _port(), str(TRAIN / "pretrain.py"), *ARGS, *extra,
           "--output_dir", str(out)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(out.parent / "cache"), cwd=ROOT)
    return proc, log


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher, read from their RANK variable."""
    pids = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "pretrain.py" in " ".join(child.cmdline()) and "RANK" in (env := child.environ()):
                pids[int(env["RANK"])] = child.pid
    return pids


def until_checkpoint(proc: subprocess.Popen, out: Path, log: Path, step: int = 5) -> dict[int, int]:
    """Wait until checkpoint-`step` is complete (trainer_state.json, written last); the ranks' pids then."""
    deadline = time.time() + START_TIMEOUT_S
    while not (out / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert proc.poll() is None, f"the run ended before checkpoint-{step}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint-{step} after {START_TIMEOUT_S} s"
        time.sleep(0.05)
    pids = rank_pids(proc)
    assert sorted(pids) == [0, 1], pids
    return pids


def seconds_until(pattern: str, log: Path, since: float, timeout_s: float) -> float | None:
    """Seconds from `since` until `pattern` shows in the log (polled every 0.1 s); None if not within timeout_s."""
    while time.time() < since + timeout_s:
        if re.search(pattern, log.read_text()):
            return time.time() - since
        time.sleep(0.1)
    return None


def stop_all(proc: subprocess.Popen, pids: dict[int, int]) -> None:
    """SIGKILL whatever of this run is left (a stopped rank first), by pid."""
    victims = list(pids.values())
    with contextlib.suppress(psutil.Error):
        victims += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def newest_complete(out: Path) -> Path:
    done = [c for c in out.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
    return max(done, key=lambda c: int(c.name.split("-")[1]))


# minillm's sentence from rank 0 (it usually sees the reset first), or the launcher's line for rank 1's exit
KILL_NAMED = (r"rank 0 of 2: rank 1 stopped \(its connection was reset: killed or crashed\)"
              r"|'--local_rank=1'.*exits with return code = -9")
HANG_NAMED = rf"rank 0 of 2: rank 1 did not answer within --ddp_timeout {HANG_TIMEOUT_S} s \(hung or stopped\)"
SHUTDOWN_GRACE_S = 30  # both launchers SIGTERM the remaining ranks and SIGKILL them 30 s later


def lose_rank_1(out: Path, sig: signal.Signals, named: str, report_bound_s: float,
                extra: list[str] = ()) -> tuple[float, float, str]:
    """Start the run, send `sig` to rank 1 once checkpoint-5 is complete. Returns (seconds until the output names
    rank 1, seconds until the launcher exited, the output); both bounded, or the test fails."""
    proc, log = launch(out, extra)
    pids = {}
    try:
        pids = until_checkpoint(proc, out, log)
        os.kill(pids[1], sig)
        lost = time.time()
        reported = seconds_until(named, log, lost, report_bound_s)
        assert reported is not None, f"nothing named rank 1 within {report_bound_s} s:\n{log.read_text()[-3000:]}"
        rc = proc.wait(timeout=report_bound_s + SHUTDOWN_GRACE_S + 30)
        exited = time.time() - lost
    finally:
        stop_all(proc, pids)
    assert rc != 0
    return reported, exited, log.read_text()


def test_a_killed_rank_stops_the_other_and_the_next_start_resumes(tmp_path):
    out = tmp_path / "run"
    reported, exited, _ = lose_rank_1(out, signal.SIGKILL, KILL_NAMED, KILL_REPORTED_S)
    print(f"rank 1 killed: named after {reported:.1f} s, the launcher exited after {exited:.1f} s")

    last = newest_complete(out)  # checkpoint-5, or a later one the run completed before rank 1 died
    proc, log = launch(out)
    try:
        assert proc.wait(timeout=START_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        stop_all(proc, {})
    assert f"RESUMING from {last}" in log.read_text()
    assert sorted(_losses(out)) == list(range(1, 41)) and (out / "model.safetensors").is_file()


def test_a_hung_rank_is_given_up_after_ddp_timeout(tmp_path):
    out = tmp_path / "run"
    reported, exited, text = lose_rank_1(out, signal.SIGSTOP, HANG_NAMED, HANG_TIMEOUT_S + 30,
                                         ["--ddp_timeout", str(HANG_TIMEOUT_S)])
    print(f"rank 1 stopped: named after {reported:.1f} s (--ddp_timeout {HANG_TIMEOUT_S}), the launcher exited after "
          f"{exited:.1f} s")
    assert reported >= HANG_TIMEOUT_S
    assert f"The same command resumes from {out}/checkpoint-" in text


def alone(cmd: list[str], tmp: Path, cap_s: float) -> tuple[int, float, str]:
    """Run node 0 of two with node 1 never started: (exit code, seconds it took, its output)."""
    log = tmp / "node0.log"
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(tmp / "cache"), cwd=ROOT)
    try:
        rc = proc.wait(timeout=cap_s)
    finally:
        stop_all(proc, {})
    return rc, time.time() - start, log.read_text()


def test_a_node_that_never_arrives_is_given_up_by_torchrun_rdzv_timeout(tmp_path):
    """torchrun's static rendezvous (--nnodes 2 --node_rank 0 --master_addr ...) waits for the other node's agent
    600 s by default, silently; --rdzv_conf timeout=N bounds it. No training process starts."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "0", "--master_addr",
           "127.0.0.1", "--master_port", _port(), "--nproc_per_node", "1", "--rdzv_conf", "timeout=15",
           "train/pretrain.py", *ARGS, "--output_dir", str(tmp_path / "run")]
    rc, took, text = alone(cmd, tmp_path, 120)
    print(f"node 0 alone, torchrun --rdzv_conf timeout=15: gave up after {took:.1f} s")
    assert rc != 0 and 15 <= took < 120 and "1/2 clients joined" in text, text[-2000:]


def test_a_node_that_never_arrives_is_given_up_after_ddp_timeout_with_deepspeed_no_ssh(tmp_path):
    """With `deepspeed --no_ssh` each node's launcher starts its ranks at once: rank 0 waits in the process group's
    rendezvous, which --ddp_timeout bounds (train/args.py start_process_group; before it, gloo's 30 minutes)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
           "--master_port", _port(), "train/pretrain.py", *ARGS, "--ddp_timeout", "15",
           "--output_dir", str(tmp_path / "run")]
    rc, took, text = alone(cmd, tmp_path, START_TIMEOUT_S)
    print(f"node 0 alone, deepspeed --no_ssh --ddp_timeout 15: gave up after {took:.1f} s (start-up included)")
    assert rc != 0 and took >= 15 and "1/2 clients joined" in text, text[-2000:]

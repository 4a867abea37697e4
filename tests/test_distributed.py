"""Several processes (torchrun's environment, gloo on CPU, 2 processes on a free port): the same
results as one process, growth in lockstep, exact resume, grad accumulation, bad input."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import train

pytestmark = pytest.mark.slow  # every test here runs train.py end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--pretrain-iters", "60", "--iters", "40", "--warmup", "10", "--interval", "5", "--eval-interval", "10",
        "--eval-iters", "4", "--ref-rank", "4", "--rank-step", "2", "--lr-warmup", "5", "--sample-len", "0",
        "--dist-timeout", "60"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # one thread each: 2 cores


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, n=2, timeout=240):
    """n processes of train.py with the environment torchrun gives them; returns their outputs."""
    port, procs = free_port(), []
    for rank in range(n):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    return outs


def metrics(out, schedule):
    return json.loads((out / schedule / "metrics.json").read_text())


def assert_close_runs(a, b, tol=1e-5):
    assert a["growth_events"] == b["growth_events"] and a["rank_pattern"] == b["rank_pattern"]
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["total_rank"] == hb["total_rank"] and abs(ha["train_loss"] - hb["train_loss"]) <= tol, (ha, hb)
        assert ("val_loss" in ha) == ("val_loss" in hb)
    assert abs(a["val_loss"] - b["val_loss"]) <= tol and a["trainable_params"] == b["trainable_params"]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The one-process run (pretraining included) that the 2-process runs must reproduce."""
    out = tmp_path_factory.mktemp("one")
    assert train.main(TINY + ["--out-dir", str(out), "--schedule", "linear"]) == 0
    return out


def test_two_processes_reproduce_one_and_stay_in_lockstep(tmp_path, one):
    # pretraining and fine-tuning under DDP; every checkpoint and the end check that the two
    # processes hold bitwise the same parameters (they exit 1 if not), after 3 growth rounds
    outs = launch(TINY + ["--out-dir", str(tmp_path), "--schedule", "linear"])
    assert [o[0] for o in outs] == [0, 0], outs
    assert "val loss" in outs[0][1] and outs[1][1] == ""  # only rank 0 prints
    a, b = metrics(one, "linear"), metrics(tmp_path, "linear")
    assert b["world_size"] == 2 and len({e[0] for e in b["growth_events"]}) == 3
    assert_close_runs(a, b)
    base_a = torch.load(next((one / "base").glob("*.pt")), weights_only=False)
    base_b = torch.load(next((tmp_path / "base").glob("*.pt")), weights_only=False)
    assert abs(base_a["val_loss"] - base_b["val_loss"]) <= 1e-5


def test_resume_under_two_processes_is_exact(tmp_path, one):
    base = str(next((one / "base").glob("*.pt")))
    argv = TINY + ["--out-dir", str(tmp_path), "--schedule", "linear", "--init-from", base]
    outs = launch(argv + ["--stop-after", "17"])
    assert [o[0] for o in outs] == [0, 0], outs
    assert outs[0][1].count("stopped after step 17") == 1
    outs = launch(argv + ["--resume"])
    assert [o[0] for o in outs] == [0, 0], outs
    assert_close_runs(metrics(one, "linear"), metrics(tmp_path, "linear"))


def test_grad_accumulation_reproduces_one_step(tmp_path, one):
    base = str(next((one / "base").glob("*.pt")))
    assert train.main(TINY + ["--out-dir", str(tmp_path), "--schedule", "linear", "--init-from", base,
                              "--grad-accum", "2"]) == 0
    assert_close_runs(metrics(one, "linear"), metrics(tmp_path, "linear"))


def test_the_encoder_pretrains_and_classifies_under_two_processes(tmp_path):
    # masked bytes: each process's share of the batch is its share of the masked targets, not of rows
    argv = ["--arch", "encoder", "--task", "package", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "16", "--pretrain-iters", "20", "--iters", "20", "--warmup", "5",
            "--interval", "5", "--eval-interval", "20", "--probe-iters", "5", "--ref-rank", "2", "--dist-timeout", "60"]
    assert train.main(argv + ["--out-dir", str(tmp_path / "one")]) == 0
    outs = launch(argv + ["--out-dir", str(tmp_path / "two")])
    assert [o[0] for o in outs] == [0, 0], outs
    a, b = metrics(tmp_path / "one", "package-linear"), metrics(tmp_path / "two", "package-linear")
    assert_close_runs(a, b)
    assert abs(a["val_acc"] - b["val_acc"]) <= 1e-6


def test_a_batch_that_does_not_divide_is_refused_on_every_process(tmp_path):
    outs = launch(TINY + ["--out-dir", str(tmp_path / "out"), "--grad-accum", "3", "--batch-size", "10"])
    assert [o[0] for o in outs] == [2, 2]
    assert outs[0][2] == "error: --batch-size 10 is not divisible by 2 processes x --grad-accum 3\n"
    assert outs[1][2] == "" and not (tmp_path / "out").exists()


def test_more_processes_than_gpus_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.main(TINY + ["--out-dir", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: 2 processes on this machine, but only 1 GPU(s): one GPU per process\n"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_under_torchrun_saves_once_and_exits_cleanly(tmp_path, one):
    base = str(next((one / "base").glob("*.pt")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + TINY + ["--out-dir", str(tmp_path), "--schedule", "linear",
                                                      "--init-from", base, "--iters", "100000", "--warmup", "10"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 20:" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process gets it
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert output.count("stopped after step") == 1 and "resume with: python train.py" in output, output
    assert 'train.py", line' not in output, output  # no traceback of ours (torchrun prints its own)
    ckpt = torch.load(tmp_path / "linear" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] >= 20 and ckpt["settings"]["world"] == 2


def test_adalora_and_increlora_under_two_processes(tmp_path, one):
    # AdaLoRA scores the all-reduced gradients; IncreLoRA's sensitivity averages each process's dL/ddW
    # over the processes before it takes |dW * dL/ddW|: both make one process's decisions
    base = str(next((one / "base").glob("*.pt")))
    for schedule in ("adalora", "increlora"):
        argv = TINY + ["--schedule", schedule, "--init-from", base]
        outs = launch(argv + ["--out-dir", str(tmp_path / "two")])
        assert [o[0] for o in outs] == [0, 0], outs
        two = metrics(tmp_path / "two", schedule)
        assert two["world_size"] == 2 and two["total_rank"] == 48
        assert train.main(argv + ["--out-dir", str(tmp_path / "one")]) == 0
        assert_close_runs(metrics(tmp_path / "one", schedule), two)

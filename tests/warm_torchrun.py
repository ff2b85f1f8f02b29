"""`torchrun --standalone --nproc_per_node=N -m vlmtrain ARGS` for the tests, with every process forked from one
that has already imported the training stack.

Why: a rank started from a fresh interpreter spends ~6 s of CPU importing torch, Lightning (which pulls in
torchmetrics, scipy.signal and the TensorBoard logger) and transformers before it reads its config; a two-rank run
of a tiny model then costs ~15 CPU-seconds, ~10 of them imports, and the distributed tests launch dozens of them on
2 cores. Here one server per pytest process imports that stack once. Each launch forks a launcher from it, which
runs torch's own elastic agent — what `torchrun` runs: `torch.distributed.launcher.api.elastic_launch`, c10d
rendezvous on a free local port, the same RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* / TORCHELASTIC_* variables,
every rank stopped when one fails, exit status 1 then — with a function entrypoint and the `fork` start method.
Each rank runs `vlmtrain.cli.main.main(ARGS)`, as `python -m vlmtrain ARGS` does.

What stays on the real `torchrun` (tests/test_distributed.py): the launches whose claim is about the launcher or the
process boundary — a preemption signal reaching one rank, two nodes, the recipe command under torchrun.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

# What `vlmtrain fit` imports before its first step (measured with PYTHONPROFILEIMPORTTIME); deepspeed for ZeRO.
PRELOAD = ("lightning.pytorch", "transformers", "transformers.modeling_utils", "peft", "deepspeed",
           "vlmtrain.cli.main", "vlmtrain.train.runner", "vlmtrain.train.preempt", "vlmtrain.train.recipe")


def _rank_main(args: list[str]) -> None:
    from vlmtrain.cli.main import main

    sys.argv = ["vlmtrain", *args]
    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        raise SystemExit(code)


def _launch(nproc: int, args: list[str]) -> int:
    """torchrun's agent over `_rank_main`: 0, or 1 with the failed ranks' summary on stderr (as torchrun).
    `nproc` 0: no agent, `python -m vlmtrain ARGS` itself (a plain process, no process group)."""
    if nproc == 0:
        from vlmtrain.cli.main import main

        sys.argv = ["vlmtrain", *args]
        return main(args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="fork",
                          monitor_interval=0.1)
    try:
        elastic_launch(config, _rank_main)(args)
    except ChildFailedError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _serve() -> None:
    """Read one JSON request per line on stdin, fork a launcher for it (own session, its stdout/stderr into the
    request's files, the request's environment and directory), answer its exit status on stdout."""
    import importlib

    answers = os.fdopen(os.dup(1), "w")  # the protocol's own channel: what the libraries print goes to stderr
    os.dup2(2, 1)
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": os.getpid()}), file=answers, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                answers.close()
                os.setsid()
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                os.environ.clear()
                os.environ.update(req["env"])
                os.chdir(req["cwd"])
                code = _launch(req["nproc"], req["args"])
            except SystemExit as e:  # argparse's --help / usage errors, as `python -m vlmtrain` exits with them
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - whatever happened goes to the request's stderr, status 1
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline, status = time.monotonic() + req["timeout"], None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.05)
        print(json.dumps({"returncode": status}), file=answers, flush=True)


class WarmTorchrun:
    """The client: one server per pytest process, started on first use, stopped at exit."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
            assert "ready" in json.loads(self.proc.stdout.readline())
            atexit.register(self.stop)
        return self.proc

    def run(self, nproc: int, args, timeout: float = 300, env=None, cwd=None) -> subprocess.CompletedProcess:
        """`torchrun --nproc_per_node=NPROC -m vlmtrain ARGS`; NPROC 0: `python -m vlmtrain ARGS`."""
        args = [str(a) for a in args]
        with self.lock, tempfile.TemporaryDirectory(prefix="warm-torchrun-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            proc = self._start()
            proc.stdin.write(json.dumps({"nproc": nproc, "args": args, "timeout": timeout,
                                         "env": dict(os.environ if env is None else env),
                                         "cwd": str(cwd or os.getcwd()), "stdout": str(out),
                                         "stderr": str(err)}) + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:  # the server itself died (killed, out of memory): say so; the next launch starts another
                raise RuntimeError(f"the warm torchrun server exited with {proc.wait()} during {args[:1]}: "
                                   f"{err.read_text(errors='replace')[-2000:] if err.is_file() else ''}")
            code = json.loads(answer)["returncode"]
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        cmd = ["torchrun", f"--nproc_per_node={nproc}", "-m", "vlmtrain", *args] if nproc else ["vlmtrain", *args]
        if code == "timeout":
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, code, stdout, stderr)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


WARM = WarmTorchrun()

if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()

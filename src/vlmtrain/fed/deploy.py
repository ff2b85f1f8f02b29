"""Flower's Deployment Engine on one machine: a SuperLink and one SuperNode per site as local processes on
127.0.0.1, started and stopped by PID, and `flwr run` of vlmtrain's Flower app against them.

Every process gets the environment Flower needs here (`flower_env`): no runtime dependency installation (the
SuperLink would otherwise `uv sync` the app's dependencies, pulling a CUDA torch), no telemetry, no update check,
its own `FLWR_HOME` (connection settings in `FLWR_HOME/config.toml`). `flwr run` may exit 0 when the ServerApp
crashed, so the run's status is read back with `flwr ls` and the coordinator's own summary is required.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmtrain.errors import VlmtrainError
from vlmtrain.fed.certs import make_site_key, make_tls

log = logging.getLogger("vlmtrain.fed")

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "vlmtrain-fed"
version = "1.0.0"
description = "vlmtrain federated DP stage (the code is the installed vlmtrain package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "vlmtrain"

[tool.flwr.app.components]
serverapp = "vlmtrain.fed.server_app:app"
clientapp = "vlmtrain.fed.client_app:app"

[tool.flwr.app.config]
plan = ""
"""


def flower_env(flwr_home: Path) -> dict:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # the SuperLink/SuperNode start `flower-superexec` / `flwr-serverapp` / `flwr-clientapp` by name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app(app_dir: Path) -> Path:
    """The Flower app folder `flwr run` packages: a pyproject naming vlmtrain's ServerApp and ClientApp."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT)
    return app_dir


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise VlmtrainError(f"{name}: not found beside {sys.executable}; install the federated extra "
                            "(`pip install -c requirements/constraints-fed.txt -e .[fed]`)")
    return str(path)


def supernode_command(superlink: str, name: str, site_dir: Path, base_model: Path, root_cert: Path | None,
                      key: Path | None, max_retries: int | None = None) -> list[str]:
    """`flower-supernode` for one site: its node config names the site's own things (`fed.client_app`), TLS to the
    SuperLink with the consortium's CA and the site's registered private key (both None: an insecure loopback)."""
    node_config = f'site-dir="{Path(site_dir).resolve()}" base-model="{Path(base_model).resolve()}" site-name="{name}"'
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--host", "127.0.0.1", "--port", str(free_port()),
           "--node-config", node_config]
    if root_cert is None:
        cmd += ["--insecure"]
    else:
        cmd += ["--root-certificates", str(root_cert), "--auth-supernode-private-key", str(key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


TLS_FILES = {"ca": "ca.crt", "cert": "server.pem", "key": "server.key"}  # what `vlmtrain fed certs` writes


def tls_from_dir(tls_dir: Path) -> dict[str, Path]:
    """The SuperLink's CA, certificate and key in `tls_dir` (`vlmtrain fed certs`, or the consortium's PKI)."""
    paths = {k: Path(tls_dir) / v for k, v in TLS_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise VlmtrainError(f"--tls-dir {tls_dir}: missing {', '.join(missing)} (make them with `vlmtrain fed certs "
                            "--out DIR --host HOST`, or put the consortium's CA, server certificate and key there)")
    return paths


def processes_of(flwr_home: Path) -> list[int]:
    """PIDs of live processes whose environment has FLWR_HOME=`flwr_home` (each inherited it from a process this
    federation started). Read from /proc by hand: psutil is a test dependency only."""
    mark, me, pids = f"FLWR_HOME={flwr_home}".encode(), os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]  # after "(comm)", which may hold spaces
            if state != "Z" and mark in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except (OSError, IndexError):  # gone, or not ours to read
            continue
    return pids


def end_processes_of(flwr_home: Path, grace_s: float = 15) -> None:
    """SIGTERM, then after `grace_s` SIGKILL, each process of this federation still alive, by PID: Flower starts
    its SuperExec (and, under the Simulation Engine, the simulation process, which starts Ray's daemons and
    workers) under new process groups of their own (setsid), which a signal to our group does not reach."""
    for pid in processes_of(flwr_home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    t_end = time.time() + grace_s
    while (left := processes_of(flwr_home)) and time.time() < t_end:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Loopback:
    """A SuperLink (on 127.0.0.1 by default) and, for `fed run`, the sites' SuperNodes; `stop()` ends exactly the
    processes it started (by PID). `fed coordinator` runs only the SuperLink, bound to `host`, with the TLS files of
    `tls_dir`; the sites connect from their own hosts (`fed site`)."""

    root: Path
    port: int = 0
    secure: bool = True  # TLS (a CA and server certificate made here) + SuperNode authentication (registered keys)
    host: str = "127.0.0.1"
    tls_dir: Path | None = None  # the SuperLink's TLS files; None: made here for 127.0.0.1
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.env = flower_env(self.home)
        (self.root / "logs").mkdir(exist_ok=True)

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.root / "logs" / f"{name}.log", "ab")
        # new process session (setsid): Flower's own children (ServerApp/ClientApp processes) stop with their parent
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs[name] = p
        (self.root / "logs" / f"{name}.pid").write_text(str(p.pid))
        return p

    def start_superlink(self) -> None:
        (self.root / "superlink.db").unlink(missing_ok=True)  # a fresh SuperLink; the coordinator keeps the state
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--database", str(self.root / "superlink.db")]
        # the control connection (`flwr run/ls/log`) stays on this host
        conn = f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
        if self.secure:
            self.tls = tls_from_dir(self.tls_dir) if self.tls_dir else make_tls(self.root / "certs")
            cmd += ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                    "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth"]
            conn += f'root-certificates = "{self.tls["ca"]}"\n'
        else:
            cmd += ["--insecure"]
            conn += "insecure = true\n"
        self._start("superlink", cmd)
        (self.home / "config.toml").write_text(conn)
        self._wait_port(self.port, "superlink")

    def register(self, name: str, public_key: Path) -> None:
        """Register a site's public key at the SuperLink (`flwr supernode register`): only registered keys join."""
        r = self.flwr("supernode", "register", str(public_key), "loopback", "--name", name, "--format", "json")
        if r.returncode != 0 or '"success": true' not in r.stdout:
            raise VlmtrainError(f"flwr supernode register {name} ({public_key}) failed: {r.stdout[-1000:]} "
                                f"{r.stderr[-1000:]}")

    def site_key(self, name: str, register: bool = True) -> Path:
        """A key pair for the site; its public key registered at the SuperLink (`flwr supernode register`)."""
        keys = make_site_key(self.root / "site-keys", name)
        if register:
            self.register(name, keys["public"])
        return keys["private"]

    def start_site(self, name: str, site_dir: Path, base_model: Path, register: bool = True,
                   max_retries: int | None = None) -> None:
        ca, key = (self.tls["ca"], self.site_key(name, register)) if self.secure else (None, None)
        self._start(f"site-{name}", supernode_command(f"127.0.0.1:{self.port}", name, site_dir, base_model, ca, key,
                                                      max_retries))

    def nodes(self) -> list[dict]:
        """The SuperLink's registered SuperNodes (`flwr supernode ls`)."""
        r = self.flwr("supernode", "ls", "loopback", "--format", "json")
        try:
            return json.loads(r.stdout)["nodes"]
        except (ValueError, KeyError):
            raise VlmtrainError(f"flwr supernode ls failed: {r.stdout[-1000:]} {r.stderr[-1000:]}") from None

    def wait_online(self, count: int, timeout: float = 180) -> None:
        """Until `count` SuperNodes are online at the SuperLink: a run submitted earlier would start round 1 with
        the quorum only (the coordinator samples the nodes connected when the round starts)."""
        t_end, online = time.time() + timeout, 0
        while time.time() < t_end:
            online = sum(n["status"] == "online" for n in self.nodes())
            if online >= count:
                return
            time.sleep(1)
        raise VlmtrainError(f"{online} of {count} SuperNodes online after {timeout:.0f}s; see {self.root / 'logs'}")

    def _wait_port(self, port: int, name: str, timeout: float = 60) -> None:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.procs[name].poll() is not None:
                raise VlmtrainError(f"{name} exited with {self.procs[name].returncode}; see "
                                    f"{self.root / 'logs' / (name + '.log')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise VlmtrainError(f"{name}: port {port} not open after {timeout:.0f}s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root)

    def submit(self, app_dir: Path, plan_path: Path, *extra: str) -> int:
        r = self.flwr("run", str(app_dir), "loopback", "--run-config", f'plan="{plan_path}"', *extra,
                      "--format", "json")
        try:
            return int(json.loads(r.stdout)["run-id"])
        except (ValueError, KeyError) as e:
            raise VlmtrainError(f"flwr run failed (exit {r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}") from e

    def run_status(self, run_id: int) -> str:
        r = self.flwr("ls", "loopback", "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(r.stdout)["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError):
            return f"unknown ({r.stdout[-300:]} {r.stderr[-300:]})"

    def wait(self, run_id: int, timeout: float) -> str:
        t_end = time.time() + timeout
        while time.time() < t_end:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2)
        raise VlmtrainError(f"federation run {run_id} not finished after {timeout:.0f}s (status {status})")

    def save_run_log(self, run_id: int) -> Path:
        """The ServerApp's log as the SuperLink kept it (`flwr log --show`), to logs/serverapp-RUN.log."""
        path = self.root / "logs" / f"serverapp-{run_id}.log"
        try:
            r = self.flwr("log", str(run_id), "loopback", "--show", timeout=60)
            path.write_text(r.stdout + r.stderr)
        except subprocess.TimeoutExpired:
            path.write_text("flwr log timed out")
        return path

    def stop(self, name: str | None = None) -> None:
        """SIGTERM the named process (default: every one started here) and its process group. With no name, also
        every process that still carries this federation's FLWR_HOME (`end_processes_of`)."""
        self._stop_started(name)
        if name is None:
            end_processes_of(self.home)

    def _stop_started(self, name: str | None) -> None:
        for n in ([name] if name else list(self.procs)):
            p = self.procs.pop(n, None)
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its process group: it and the app processes it started
            except ProcessLookupError:
                continue
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


@dataclass
class SimulationLink(Loopback):
    """Flower's Simulation Engine behind the same interface: one SuperLink in simulation mode on 127.0.0.1
    (`flower-superlink --simulation`, plaintext: no SuperNode, no network peer), which runs the submitted app in a
    `flwr-simulation` process; its ClientApps run in Ray actors, one virtual node per site. Flower's `ray.init`
    starts a local Ray instance (no dashboard; usage statistics off: `flower_env`). Run it inside a private
    network namespace (`fed.simulate`): Ray 2.55.1 binds all interfaces otherwise."""

    secure: bool = False

    def start_superlink(self) -> None:
        (self.root / "superlink.db").unlink(missing_ok=True)
        self._start("superlink", [_bin("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--database", str(self.root / "superlink.db")])
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                               f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._wait_port(self.port, "superlink")

    def submit_simulation(self, app_dir: Path, plan_path: Path, sites: int) -> int:
        """`flwr run` with one virtual node per site; every node gets a Ray actor of its own (one logical CPU
        each), so the sites train in parallel and each actor keeps its imports warm between messages."""
        return self.submit(app_dir, plan_path, "--federation-config",
                           f"num-supernodes={sites} init-args-num-cpus={sites} client-resources-num-cpus=1")

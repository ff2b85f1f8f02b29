"""`fed run --simulation`: Flower's Simulation Engine in a private network namespace that holds only loopback.

Why a namespace: Ray 2.55.1 (flwr 1.42.0's `simulation` extra) binds its GCS server, raylet and worker ports on
every interface (`*:PORT`, measured with `ss -ltnp` on 2026-11-30, also with `ray.init(_node_ip_address=
"127.0.0.1")`), and Flower's simulation config cannot pass Ray that argument anyway. In a network namespace of
its own (`unshare --net --map-root-user`, util-linux; no privilege needed where user namespaces are allowed) the
only interface is `lo`: Ray binds 127.0.0.1 there (measured) and nothing in the simulation can reach or be reached
from the network, usage statistics included (also off: RAY_USAGE_STATS_ENABLED=0).

    python -m vlmtrain.fed.simulate ROOT PLAN SITES TIMEOUT_S     (run by `simulate_isolated`, inside the namespace)

starts `SimulationLink` (SuperLink in simulation mode) on 127.0.0.1 in the namespace, submits the app with one
virtual node per site, waits for the run, stops everything it started, and writes ROOT/simulation.json
({"run_id", "status", "interfaces": the namespace's network interfaces}).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from vlmtrain.errors import VlmtrainError
from vlmtrain.fed.deploy import SimulationLink, end_processes_of, flower_env, write_app

RESULT = "simulation.json"
UNSHARE = ("unshare", "--net", "--map-root-user", "--")


def loopback_up() -> None:
    """Bring `lo` up (a new network namespace starts with it down): SIOCGIFFLAGS/SIOCSIFFLAGS with IFF_UP, which
    is all `ip link set lo up` does; by hand so that iproute2 need not be installed."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))


def check_isolation() -> None:
    """Refuse (rather than run Ray on every interface) where no private network namespace can be made."""
    if shutil.which(UNSHARE[0]) is None:
        raise VlmtrainError("--simulation runs Ray in a private network namespace (Ray 2.55.1 binds all "
                            "interfaces otherwise) and needs util-linux's `unshare`, not found on PATH")
    r = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
    if r.returncode != 0:
        raise VlmtrainError("--simulation runs Ray in a private network namespace (Ray 2.55.1 binds all "
                            f"interfaces otherwise); `{' '.join(UNSHARE)} true` failed here: {r.stderr.strip()} "
                            "(user namespaces disabled? e.g. sysctl kernel.unprivileged_userns_clone=1)")


def simulate_isolated(root: Path, plan_path: Path, sites: int, timeout_s: float) -> tuple[int, str]:
    """Run the simulation in its own network namespace (this module's `main`) → (Flower run id, run status).
    Whatever it leaves (it stops its own processes) is ended here by PID (`end_processes_of`)."""
    check_isolation()
    root = Path(root)
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    (root / RESULT).unlink(missing_ok=True)
    cmd = [*UNSHARE, sys.executable, "-m", "vlmtrain.fed.simulate", str(root), str(plan_path), str(sites),
           str(timeout_s)]
    # SIGTERM (a `timeout`, a scheduler) ends this process through `finally`, which stops the driver too
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with open(root / "logs" / "simulation-driver.log", "ab") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flower_env(home))
        try:
            p.wait(timeout=timeout_s + 600)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if p.poll() is None:  # SIGTERM: the driver in the namespace stops what it started
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            end_processes_of(home)
    if not (root / RESULT).is_file():
        raise VlmtrainError(f"the simulation driver exited with {p.returncode} before the run finished; see "
                            f"{root / 'logs' / 'simulation-driver.log'}")
    result = json.loads((root / RESULT).read_text())
    return int(result["run_id"]), str(result["status"])


def main(argv: list[str]) -> int:
    root, plan_path, sites, timeout_s = Path(argv[0]), Path(argv[1]), int(argv[2]), float(argv[3])
    loopback_up()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through `finally`: stop what was started
    net = SimulationLink(root)
    try:
        net.start_superlink()
        run = net.submit_simulation(write_app(root / "app"), plan_path, sites)
        print(f"flwr run {run} submitted to the simulation SuperLink on 127.0.0.1:{net.port}", flush=True)
        status = net.wait(run, timeout=timeout_s)
        net.save_run_log(run)
    finally:
        net.stop()
    # the namespace's network interfaces, read from the kernel: what Ray could bind to
    interfaces = sorted(name for _, name in socket.if_nameindex())
    (root / RESULT).write_text(json.dumps({"run_id": run, "status": status, "interfaces": interfaces}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

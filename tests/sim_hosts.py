"""Simulated hosts on this machine, for testing `ray up` over SSH as a user runs it.

Each host is a network namespace with one interface on a private bridge, and a process tree in its own PID,
mount and UTS namespaces: its own hostname, /tmp, /run, /dev/shm, HOME (/root), /etc/hosts listing every host,
the project's virtualenv mounted read-only, and /mnt shared by all hosts (a stand-in for an NFS mount). Hosts
made with ``sshd=True`` run an sshd on their address that accepts the laptop's key for root.

Isolation, and why it matters here: the bridge lives in a namespace of its own and no address exists outside
the namespaces made here (no default route anywhere, nothing in the machine's own namespace), so traffic stays
between the simulated hosts. Each host's PID namespace is what makes `ray stop` (run by `ray up` and
`ray down` on a host) safe: it ends every Ray process it can see, and it sees only that host's. Everything a
host started dies with it: the fixture kills each host's first process by PID (the kernel then ends every
process of that PID namespace) and deletes the namespaces, also when the test fails.

What is shared: the machine's filesystem outside the mounts above (so the venv and the repository are the
same files everywhere), the kernel and its CPUs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SUBNET = "10.77.0"  # inside namespaces made here only; never routed

# The first process of a host (PID 1 of its PID namespace), run by the venv's python: makes the host's mounts
# (the binds while /tmp is still the machine's, then /tmp itself), starts sshd, says it is ready and reaps
# orphans (Ray daemonizes) until killed. Kept to the standard library.
INIT = r"""
import json, os, subprocess, sys, time
spec = json.loads(sys.argv[1])
def run(*cmd):
    subprocess.run(cmd, check=True)
run("hostname", spec["name"])
run("mount", "--make-rprivate", "/")
for source, target, readonly, recursive in spec["binds"]:
    run("mount", "--rbind" if recursive else "--bind", source, target)
    if readonly:
        run("mount", "-o", "remount,bind,ro", target)
run("mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", "/dev/shm")
run("mount", "-t", "tmpfs", "tmpfs", "/run")
os.makedirs("/run/sshd", mode=0o755)
run("mount", "--rbind", spec["tmp"], "/tmp")
os.chmod("/tmp", 0o1777)
if spec["sshd"]:
    log = open(spec["sshd_log"], "ab")
    subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", spec["sshd_config"]], stdout=log, stderr=log,
                     stdin=subprocess.DEVNULL)
open(spec["ready"], "w").close()
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""

SSHD_CONFIG = """\
ListenAddress {ip}
Port 22
HostKey {host_key}
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 100
Subsystem sftp internal-sftp
"""


def unavailable() -> Optional[str]:
    """Why simulated hosts cannot run here (one line), or None."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network, PID and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount", "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return f"simulated hosts need `{tool}` (apt-get install iproute2 util-linux openssh-client rsync)"
    if not os.path.exists("/usr/sbin/sshd"):
        return "simulated hosts need sshd (apt-get install openssh-server)"
    probe = f"simprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    dir: Path  # on the machine: home/, tmp/, logs (the host sees home/ as /root and tmp/ as /tmp)
    proc: Optional[subprocess.Popen] = None  # unshare, the parent of the host's first process
    init_pid: Optional[int] = None  # the host's first process, as the machine sees it
    env: dict = field(default_factory=dict)
    started: list = field(default_factory=list)  # popen()'s nsenter processes, reaped at the end

    @property
    def home(self) -> Path:
        return self.dir / "home"

    @property
    def tmp(self) -> Path:
        return self.dir / "tmp"

    def command(self, args: list, cwd: Optional[str] = None) -> list:
        """``args`` as a command line that runs inside this host (its network, mounts, hostname and PIDs)."""
        enter = ["nsenter", "-t", str(self.init_pid), "-n", "-m", "-u", "-p", "--"]
        env = ["env", "-i", *(f"{k}={v}" for k, v in self.env.items())]
        if cwd:
            return enter + env + ["bash", "-c", 'cd "$0" && exec "$@"', cwd, *args]
        return enter + env + list(args)

    def run(self, args: list, cwd: Optional[str] = None, timeout: float = 120, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        out = subprocess.run(self.command(args, cwd), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and out.returncode != 0:
            raise AssertionError(f"on {self.name}: {' '.join(args)} exited {out.returncode}\n"
                                 f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def popen(self, args: list, log: Path, cwd: Optional[str] = None) -> subprocess.Popen:
        """Start ``args`` in this host, stdout and stderr into ``log``; it dies with the host at the latest."""
        with open(log, "ab") as f:
            proc = subprocess.Popen(self.command(args, cwd), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.started.append(proc)
        return proc

    def processes(self) -> list:
        """[(pid, state, command line)] of every process of this host (its own PID namespace), zombies left out."""
        out = self.run(["ps", "-eo", "pid=,stat=,args="]).stdout
        rows = [line.strip().split(None, 2) for line in out.splitlines() if line.strip()]
        return [(int(r[0]), r[1], r[2] if len(r) > 2 else "") for r in rows if not r[1].startswith("Z")]


class SimHosts:
    """``names`` hosts on one private bridge; those in ``sshd`` run sshd and accept the key of every host's
    root (each host gets ~/.ssh/id_ed25519). Use as a context manager: everything is gone after it."""

    def __init__(self, base: Path, names: list, sshd: tuple = (), venv: Optional[str] = None):
        self.base = Path(base)
        self.venv = os.path.realpath(venv or sys.prefix)
        self.tag = f"sim{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.hosts = {n: Host(n, f"{SUBNET}.{i + 10}", f"{self.tag}-{n}", self.base / n)
                      for i, n in enumerate(names)}
        self.sshd = set(sshd)
        self.made_netns: list = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> "SimHosts":
        try:
            self._network()
            self._files()
            for host in self.hosts.values():
                self._start(host)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ making
    def _ip(self, *args) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def _network(self) -> None:
        self._ip("netns", "add", self.hub)
        self.made_netns.append(self.hub)
        self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values()):
            self._ip("netns", "add", host.netns)
            self.made_netns.append(host.netns)
            port = f"p{i}"
            self._ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            self._ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
            self._ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            self._ip("-n", host.netns, "link", "set", "eth0", "up")
            self._ip("-n", host.netns, "link", "set", "lo", "up")

    def _files(self) -> None:
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.ip} {h.name}\n" for h in self.hosts.values())
        (self.base / "shared").mkdir(parents=True, exist_ok=True)
        keys = []
        for host in self.hosts.values():
            (host.home / ".ssh").mkdir(parents=True, mode=0o700)
            host.tmp.mkdir(parents=True)
            (host.dir / "hosts").write_text(hosts_file)
            (host.home / ".bashrc").write_text("")
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f",
                            str(host.home / ".ssh" / "id_ed25519")], check=True)
            keys.append((host.home / ".ssh" / "id_ed25519.pub").read_text())
            if host.name in self.sshd:
                (host.tmp / "sshd").mkdir()  # the host's /tmp/sshd
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(host.tmp / "sshd" / "host_key")], check=True)
                (host.tmp / "sshd" / "sshd_config").write_text(SSHD_CONFIG.format(ip=host.ip,
                                                                                  host_key="/tmp/sshd/host_key"))
            host.env = {"PATH": f"{self.venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
        for host in self.hosts.values():
            (host.home / ".ssh" / "authorized_keys").write_text("".join(keys))

    def _start(self, host: Host) -> None:
        binds = []
        # The venv and its interpreter (pyenv keeps it in /root/.pyenv), read-only at their own paths; one under
        # /root or /tmp (which the host overmounts) goes into the host's home or /tmp at the same place.
        keep = {os.path.realpath(self.venv), os.path.realpath(sys.base_prefix)}
        for path in sorted(keep):
            for shadowed, inside in (("/root", host.home), ("/tmp", host.tmp)):
                if Path(path).is_relative_to(shadowed):
                    target = inside / Path(path).relative_to(shadowed)
                    target.mkdir(parents=True, exist_ok=True)
                    binds.append([path, str(target), True, True])
                    break
            else:
                binds.append([path, path, True, True])
        spec = {"name": host.name, "tmp": str(host.tmp), "sshd": host.name in self.sshd,  # paths as the host sees them
                "sshd_config": "/tmp/sshd/sshd_config", "sshd_log": "/tmp/sshd/sshd.log", "ready": "/tmp/ready",
                "binds": binds + [[str(host.home), "/root", False, True],
                                  [str(host.dir / "hosts"), "/etc/hosts", False, False],
                                  [str(self.base / "shared"), "/mnt", False, False]]}
        log = open(host.dir / "init.log", "ab")
        host.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--mount-proc", "--uts",
             "--propagation", "private", sys.executable, "-c", INIT, json.dumps(spec)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            while not (host.tmp / "ready").exists():
                if host.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"simulated host {host.name} did not start: "
                                       f"{(host.dir / 'init.log').read_text()[-2000:]}")
                time.sleep(0.1)
            host.init_pid = _child_of(host.proc.pid)
        for host in self.hosts.values():  # sshd listening
            if host.name in self.sshd:
                while host.run(["bash", "-c", f"exec 3<>/dev/tcp/{host.ip}/22"], check=False).returncode:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sshd on {host.name} not listening: "
                                           f"{(host.tmp / 'sshd' / 'sshd.log').read_text()[-2000:]}")
                    time.sleep(0.2)

    # ------------------------------------------------------------------ ending
    def close(self) -> None:
        """Kill each host's first process (the kernel then ends its whole PID namespace), then delete the
        namespaces (the bridge and the veth pairs go with them)."""
        for host in self.hosts.values():
            pid = host.init_pid or (host.proc and host.proc.poll() is None and _child_of(host.proc.pid, 2))
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if host.proc is not None:
                try:
                    host.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
                    host.proc.wait(timeout=30)
        for host in self.hosts.values():  # their processes died with the host: nsenter returns at once
            for proc in host.started:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
        for name in reversed(self.made_netns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made_netns.clear()


def _child_of(pid: int, timeout: float = 10) -> Optional[int]:
    """The one child of process ``pid`` (unshare's: the host's first process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        if children:
            return int(children[0])
        time.sleep(0.05)
    return None

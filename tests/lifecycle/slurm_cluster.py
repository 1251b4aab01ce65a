"""A real, throw-away one-node slurm cluster for tests: Debian's slurm and munge packages
(installed when missing), a slurm.conf written for this host, and munged, slurmctld and slurmd
started in the foreground under a temp folder with their own key, socket, ports, state, spool
and logs. Nothing is mocked; nothing outside the folder is used (system services stay off).

Stopping cancels the cluster's jobs, ends the daemons by pid, then kills what is left of the
jobs: processes whose environment carries this cluster's marker (every job process: sbatch
passes its environment on) or whose working folder is the cluster's folder (slurmstepd, which
slurmd starts there and which outlives slurmd). Nothing else on the machine is touched.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TOOLS = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun"]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
MARKER = "XMOE_TEST_SLURM_CLUSTER"
PARTITION = "xmoe"


def which(tool: str) -> Optional[str]:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if which(tool) is None]


def install_slurm() -> Optional[str]:
    """Install the Debian packages when a tool is missing. Returns why it cannot, or None.
    apt never prompts (no stdin, noninteractive, keep existing config files) and the packages'
    services are not started: a policy-rc.d that forbids it is put in place while installing
    when the machine has none."""
    missing = missing_tools()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"slurm is not installed ({', '.join(missing)} missing) and installing it needs root"
    if which("apt-get") is None:
        return f"slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
    apt = [which("apt-get"), "-q", "-o", "DPkg::Lock::Timeout=300"]
    own_policy = not POLICY_RC_D.exists()
    if own_policy:
        POLICY_RC_D.write_text("#!/bin/sh\n# written by xmoe's slurm test while installing: start no services\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        for command, timeout in (
            (apt + ["update"], 300),
            (apt + ["install", "-y", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold", *PACKAGES], 600),
        ):
            # its own process group: a hung maintainer script (dpkg's child) is stopped with apt
            apt_run = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                output, _ = apt_run.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(apt_run.pid, signal.SIGKILL)
                apt_run.communicate()
                return f"`{' '.join(command[1:])}` did not finish in {timeout} s"
            if apt_run.returncode != 0:
                tail = "\n".join(output.strip().splitlines()[-5:])
                return f"`{' '.join(command[1:])}` failed with exit code {apt_run.returncode}:\n{tail}"
    finally:
        if own_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    still_missing = missing_tools()
    return f"installed {' '.join(PACKAGES)} but {', '.join(still_missing)} still missing" if still_missing else None


def free_ports(count: int) -> list[int]:
    """`count` different ports nothing listens on now (all held open while choosing)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SlurmCluster:
    """One node (this host, its real CPUs), one partition. `command([...])` prefixes a slurm
    client command line with this cluster's SLURM_CONF and marker."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.log_dir = folder / "log"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.node, self.cpus = "", 0

    # --- configuration -------------------------------------------------------------------
    def write_config(self) -> None:
        # slurmd -C prints this host as a slurm.conf node line: name, CPUs and their topology.
        probe = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, SLURM_CONF=str(self.conf)))
        node_line = next((line for line in probe.stdout.splitlines() if line.startswith("NodeName=")), None)
        if node_line is None:
            raise RuntimeError(f"`slurmd -C` printed no node line: {probe.stdout}{probe.stderr}")
        # Memory is left out: the test jobs ask for none, and a machine reporting a little less
        # memory later would drain the node.
        fields = [f for f in node_line.split() if not f.startswith("RealMemory=")]
        self.node = fields[0].split("=", 1)[1]
        self.cpus = int(next(f for f in fields if f.startswith("CPUs=")).split("=", 1)[1])
        munge, state, spool = self.folder / "munge", self.folder / "state", self.folder / "spool"
        for folder in (munge, state, spool, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o755)
        self.munge_key = munge / "munge.key"
        self.munge_key.write_bytes(os.urandom(1024))
        self.munge_key.chmod(0o600)
        self.munge_socket = munge / "munge.socket"
        controller_port, node_port = free_ports(2)
        settings = {
            "ClusterName": "xmoetest",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": controller_port,
            "SlurmdPort": node_port,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": state,
            "SlurmdSpoolDir": spool,
            "SlurmctldPidFile": self.folder / "slurmctld.pid",
            "SlurmdPidFile": self.folder / "slurmd.pid",
            "SlurmctldLogFile": self.log_dir / "slurmctld.log",
            "SlurmdLogFile": self.log_dir / "slurmd.log",
            # No cgroups in a container: processes are tracked by their parent ids, tasks are
            # not bound to cores, nothing is accounted.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/builtin",
            "MpiDefault": "none",
            "MailProg": "/bin/true",
            "ReturnToService": 2,
            "KillWait": 5,
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines += [" ".join(fields + ["State=UNKNOWN"]),
                  f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")

    # --- running ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)

    def command(self, args: list) -> list:
        """A slurm client command line for this cluster (its config; its marker, which the jobs
        inherit so that stopping finds them)."""
        return ["env", f"SLURM_CONF={self.conf}", f"{MARKER}={self.folder}", *args]

    def _client(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([which(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                              env=self.env(), stdin=subprocess.DEVNULL)

    def _start(self, name: str, args: list) -> None:
        log = open(self.log_dir / f"{name}.out", "w")
        self.daemons[name] = subprocess.Popen(
            [which(name), *map(str, args)], cwd=self.folder, env=self.env(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_stop_with_parent)
        log.close()

    def start(self, timeout: float = 60) -> Optional[str]:
        """Start the daemons and wait until the node takes jobs. Returns why not, or None."""
        try:
            self.write_config()
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            return f"cannot describe this host to slurm: {error}"
        self._start("munged", ["--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={self.munge_key}", f"--pid-file={self.folder / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.folder / 'munge' / 'munged.seed'}",
                               f"--log-file={self.log_dir / 'munged.log'}"])
        deadline = time.monotonic() + timeout
        while not self.munge_socket.exists() and time.monotonic() < deadline and self.daemons["munged"].poll() is None:
            time.sleep(0.2)
        self._start("slurmctld", ["-D", "-i"])
        self._start("slurmd", ["-D", "-N", self.node])
        state = ""
        while time.monotonic() < deadline:
            exited = [name for name, proc in self.daemons.items() if proc.poll() is not None]
            if exited:
                return f"{', '.join(exited)} exited at start:\n{self.logs()}"
            sinfo = self._client("sinfo", "--noheader", "--format=%T", f"--partition={PARTITION}")
            state = sinfo.stdout.strip()
            if sinfo.returncode == 0 and state == "idle":
                return None
            time.sleep(0.5)
        return f"the node is not idle after {timeout} s (state '{state}'):\n{self.logs()}"

    def logs(self, lines: int = 15) -> str:
        text = []
        for path in sorted(self.log_dir.iterdir()):
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
            text.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(text)

    def stop(self) -> None:
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            try:
                self._client("scancel", f"--partition={PARTITION}")
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self._client("squeue", "--noheader").stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def leftover_processes(self) -> list[int]:
        """Processes of this cluster still running: job processes (they carry the marker) and
        slurmstepd (its working folder is the cluster's folder)."""
        marker = f"{MARKER}={self.folder}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0") or \
                        Path(os.readlink(proc / "cwd")).is_relative_to(self.folder):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
        return found

"""A real one-node SLURM cluster (munged + slurmctld + slurmd) for the launcher tests.

Everything lives in a temporary folder: its own munge key and socket, its own
slurm.conf (no cgroups: proctrack/linuxproc, task/none), its own ports and
state. It needs root and Debian's `slurm-wlm` and `munge`; without them the
tests that use it are skipped with the reason. Only the daemons started here
are stopped, by the pids they wrote.

Import it from a test module:  `from slurm_fixture import slurm_cluster  # noqa: F401`.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def slurm_unavailable_reason():
    """None when a private SLURM can be started here, else why not (and how to fix it)."""
    if sys.platform != "linux":
        return "SLURM tests need Linux"
    if os.geteuid() != 0:
        return "SLURM tests need root (they start munged, slurmctld and slurmd)"
    missing = [b for b in BINARIES if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"SLURM tests need {', '.join(missing)}: apt-get install -y slurm-wlm munge"
    return None


def _which(name):
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


class SlurmCluster:
    """A private cluster; `env` is what a client (sbatch, scontrol, the launcher) needs."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = max(2, cpus)
        self.started_pids = {}
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout=30.0):
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        (self.root / "state").mkdir(exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        (self.root / "plugstack.conf").write_text("")
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        self.munge_socket = self.root / "munge.sock"
        self._spawn("munged", [_which("munged"), "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}",
                               f"--pid-file={self.root / 'munged.pid'}",
                               f"--log-file={self.root / 'munged.log'}",
                               f"--seed-file={self.root / 'munged.seed'}"],
                    self.root / "munged.pid")
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", [_which("slurmctld"), "-i", "-f", str(self.conf)],
                    self.root / "slurmctld.pid")
        self._spawn("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", self.host],
                    self.root / "slurmd.pid")
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state.startswith("idle"):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node not idle after {timeout:.0f}s (state {state!r}); "
                           f"see {self.root}/slurmctld.log and slurmd.log")

    def _slurm_conf(self):
        r = self.root
        return "\n".join([
            "ClusterName=m2dastest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=3",
            "MinJobAge=3600",
            "InactiveLimit=0",
            "MpiDefault=none",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name, cmd, pidfile, timeout=10.0):
        log = open(self.root / f"{name}.stdout", "ab")
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, check=True,
                       timeout=timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid = _read_pid(pidfile)
            if pid and _alive(pid):
                self.started_pids[name] = pid
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start; see {self.root}/{name}.log")

    def stop(self):
        """Cancel what is left, then stop our daemons (slurmd, slurmctld, munged), by pid."""
        if "slurmctld" in self.started_pids:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.time() + 20
            while time.time() < deadline:
                left = self.run("squeue", "-h", "-t", "R,CG", check=False).stdout.strip()
                if not left:
                    break
                time.sleep(0.5)
        names = sorted(n for n in self.started_pids if n.startswith("slurmd")) + ["slurmctld", "munged"]
        for name in names:
            pid = self.started_pids.pop(name, None)
            if pid is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                if not _alive(pid):
                    break
                os.kill(pid, sig)
                deadline = time.time() + wait
                while time.time() < deadline and _alive(pid):
                    time.sleep(0.1)

    # -- helpers for tests -------------------------------------------------
    def run(self, *cmd, check=True, timeout=30):
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def job(self, job_id) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, BeginTime, ...); {} once purged."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def release(self, job_id, timeout=60.0):
        """A requeued job waits on a BeginTime; start it now, once its last start is fully gone.

        Releasing while slurmd still tears the previous start down makes slurmd
        refuse the new launch ("already killed") and the job fail; on a real
        cluster the BeginTime delay is what prevents that.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = self.run("scontrol", "listpids", str(job_id), check=False).stdout.splitlines()[1:]
            node = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if not pids and node == "idle":
                break
            time.sleep(0.3)
        time.sleep(1.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)

    def logs(self):
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(p.read_text().splitlines()[-40:]))
        return "\n".join(parts)


def skip_if(reason):
    """Skip with the reason printed (it shows in CI logs even without -rs)."""
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    skip_if(slurm_unavailable_reason())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=os.cpu_count() or 2)
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()


def write_tiny_data(root: Path, files: int = 48, frames: int = 256, seed: int = 0) -> Path:
    """A data folder the trainer accepts: audioset_lms/*.npy [1,80,T] float32 and the weighted list."""
    root = Path(root)
    lms = root / "audioset_lms"
    lms.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = ["/m/09x0r", "/m/04rlf", "/m/0jbk", "/m/068hy"]
    rows = ["file_name,label,weight"]
    for i in range(files):
        x = rng.standard_normal((1, 80, frames + (i % 7) * 8)).astype(np.float32) * 2.0 - 5.0
        np.save(lms / f"clip{i:03d}.npy", x)
        a, b = labels[i % 4], labels[(i + 1) % 4]
        rows.append(f'audioset_lms/clip{i:03d}.npy,"{a},{b}",1.0')
    (root / "files_as_weighted.csv").write_text("\n".join(rows) + "\n")
    return root


def read_jsonl(path):
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# -- shared by the launcher tests -------------------------------------------------
# The run the launcher tests interrupt, and its uninterrupted reference: the
# cpu-test preset on two CPU ranks, 64 files x 6 epochs = 48 optimizer steps.
TINY_FILES = 64
TINY_EPOCHS = 6


# The two-node run is disturbed four times at ~20 steps/s: it gets more epochs (and its own reference,
# an undisturbed two-node run).
LONG_EPOCHS = 16


def train_argv_for(run_dir, data_dir, epochs=TINY_EPOCHS):
    """Exactly the trainer argv `launch/submit.py --preset cpu-test` builds (imported, not copied)."""
    from m2das.cluster import plan
    args = plan.build_parser().parse_args(["--preset", "cpu-test", "--cluster", "local", "--run-dir", str(run_dir)])
    return plan.Plan(args, user_trainer_flags(data_dir, epochs)).train_argv


def user_trainer_flags(data_dir, epochs=TINY_EPOCHS):
    return ["--data_path", str(data_dir), "--epochs", str(epochs)]


def make_env():
    """One intra-op thread per rank everywhere, so every path computes bit-identical sums."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "tiny_data"
    if not (root / "files_as_weighted.csv").exists():
        write_tiny_data(root, files=TINY_FILES)
    return root


def undisturbed_run(run, data, epochs):
    """Model tensors of an uninterrupted two-rank run (plain processes, no launcher)."""
    final = run / f"checkpoint-{epochs}.pth"
    if not final.exists():
        argv = train_argv_for(run, data, epochs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        run.mkdir(parents=True, exist_ok=True)
        procs = []
        for rank in range(2):
            env = dict(make_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            with open(run / f"rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "m2das", "train", *argv], env=env,
                                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        codes = [p.wait(timeout=600) for p in procs]
        assert codes == [0, 0], f"reference run failed {codes}: " + (run / "rank0.log").read_text()[-3000:]
    return load_model_tensors(final)


@pytest.fixture(scope="session")
def reference_weights(tmp_path_factory, tiny_data):
    return undisturbed_run(tmp_path_factory.getbasetemp() / "reference_run", tiny_data, TINY_EPOCHS)


def load_model_tensors(path):
    import torch

    return torch.load(path, map_location="cpu")["model"]


def assert_same_weights(got, want):
    import torch

    assert sorted(got) == sorted(want), "different state_dict keys"
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


def last_step(run_dir):
    rows = read_jsonl(Path(run_dir) / "log.jsonl")
    return rows[-1].get("step", 0) if rows else 0


def starts(run_dir):
    return [r for r in read_jsonl(Path(run_dir) / "restarts.jsonl") if r.get("event", "start") == "start"]


def wait_for(predicate, timeout, what, on_timeout=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def wait_for_progress(run_dir, n_starts, steps, timeout, on_timeout=lambda: ""):
    """Start number n_starts is running and has made `steps` optimizer steps past its resume point."""
    def ok():
        s = starts(run_dir)
        if len(s) < n_starts:
            return False
        return last_step(run_dir) >= (s[n_starts - 1].get("resumed_step") or 0) + steps and \
            (read_jsonl(Path(run_dir) / "log.jsonl")[-1].get("time", 0) >= s[n_starts - 1].get("time", 0))
    return wait_for(ok, timeout, f"start {n_starts} to make {steps} steps in {run_dir}", on_timeout)


# -- a two-node cluster: each slurmd in its own network namespace --------------------
def two_node_unavailable_reason():
    """None when two slurmd can run as separate hosts here, else why not."""
    reason = slurm_unavailable_reason()
    if reason:
        return reason
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"the two-node SLURM test needs `{tool}` (apt-get install -y iproute2 util-linux)"
    probe = f"m2dasprobe{os.getpid() % 10000}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"the two-node SLURM test needs network namespaces (`ip netns add` failed: {out.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class TwoNodeCluster(SlurmCluster):
    """slurmctld on a bridge made here; two slurmd, each in its own network and UTS namespace.

    Every address, interface and namespace is made by the fixture in a private
    10.x.y.0/24 subnet and removed by `stop`; all SLURM and gloo traffic stays on
    those addresses. Each slurmd sees a hosts file of the fixture's folder
    bind-mounted over /etc/hosts in its private mount namespace (inherited by the
    job steps it starts), so the node names resolve on the nodes.
    """

    NODES = ("m2dasn1", "m2dasn2")

    def __init__(self, root: Path):
        super().__init__(root, cpus=1)
        tag = os.getpid() % 1000
        self.bridge = f"m2dbr{tag}"
        self.subnet = self._free_subnet()
        self.ctl_host = "m2dasctl"
        self.ctl_addr = f"{self.subnet}.1"
        self.addrs = {n: f"{self.subnet}.{i + 2}" for i, n in enumerate(self.NODES)}
        self.netns = {n: f"m2das-{tag}-{n}" for n in self.NODES}
        self.made_links, self.made_netns = [], []
        self.host = self.ctl_host

    @staticmethod
    def _free_subnet():
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        for b in range(200, 250):
            net = f"10.{b}.{os.getpid() % 250}"
            if f" {net}." not in used:
                return net
        raise RuntimeError("no free 10.x.y.0/24 subnet for the two-node cluster")

    def _ip(self, *args, netns=None):
        cmd = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    def _network(self):
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.made_links.append(self.bridge)
        self._ip("addr", "add", f"{self.ctl_addr}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        hosts = "".join(f"{a} {n}\n" for n, a in [(self.ctl_host, self.ctl_addr), *self.addrs.items()])
        for i, node in enumerate(self.NODES):
            ns, outside, inside = self.netns[node], f"{self.bridge}v{i}", f"{self.bridge}p{i}"
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            self.made_netns.append(ns)
            self._ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.made_links.append(outside)
            self._ip("link", "set", inside, "netns", ns)
            self._ip("link", "set", outside, "master", self.bridge)
            self._ip("link", "set", outside, "up")
            self._ip("addr", "add", f"{self.addrs[node]}/24", "dev", inside, netns=ns)
            self._ip("link", "set", inside, "up", netns=ns)
            self._ip("link", "set", "lo", "up", netns=ns)
            (self.root / f"hosts-{node}").write_text(f"127.0.0.1 localhost\n{hosts}")

    def start(self, timeout=60.0):
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        (self.root / "state").mkdir(exist_ok=True)
        (self.root / "plugstack.conf").write_text("")
        if not self.made_links:
            self._network()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        self.munge_socket = self.root / "munge.sock"
        self._spawn("munged", [_which("munged"), "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
                               f"--seed-file={self.root / 'munged.seed'}"], self.root / "munged.pid")
        self.conf.write_text(self._slurm_conf())
        # slurmctld insists on running on the host named in SlurmctldHost: its own UTS name.
        self._spawn("slurmctld", ["unshare", "--uts", "sh", "-c", f'hostname {self.ctl_host} && exec "$0" -i -f "$1"',
                                  _which("slurmctld"), str(self.conf)], self.root / "slurmctld.pid")
        for node in self.NODES:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
            # Its own network (nsenter), host name and /etc/hosts (unshare --uts --mount: the bind
            # mount and the name are private to this slurmd and the job steps it starts).
            hosts = self.root / f"hosts-{node}"
            self._spawn(f"slurmd-{node}", [
                "nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c",
                f'mount --bind "$2" /etc/hosts && hostname {node} && exec "$0" -f "$1" -N {node}',
                _which("slurmd"), str(self.conf), str(hosts)],
                self.root / f"slurmd-{node}.pid")
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            if states.count("idle") == len(self.NODES):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"two-node SLURM not idle after {timeout:.0f}s ({states}); see {self.root}")

    def _slurm_conf(self):
        base = super()._slurm_conf().splitlines()
        r = self.root
        drop = ("SlurmctldHost=", "SlurmdPidFile=", "SlurmdSpoolDir=", "SlurmdLogFile=", "NodeName=", "PartitionName=")
        lines = [ln for ln in base if not ln.startswith(drop)]
        lines += [f"SlurmctldHost={self.ctl_host}({self.ctl_addr})",
                  f"SlurmdPidFile={r}/slurmd-%n.pid", f"SlurmdSpoolDir={r}/spool-%n",
                  f"SlurmdLogFile={r}/slurmd-%n.log"]
        lines += [f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs=1 RealMemory=4000 State=UNKNOWN"
                  for n, a in self.addrs.items()]
        lines += [f"PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP", ""]
        return "\n".join(lines)

    def stop(self):
        try:
            super().stop()
        finally:
            for link in self.made_links:
                subprocess.run(["ip", "link", "del", link], capture_output=True)
            for ns in self.made_netns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def node_state(self, node):
        return self.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip()

    def release(self, job_id, timeout=90.0):
        """Back to work after a requeue: resume drained nodes, release a held job, start it now."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            busy = [n for n in self.NODES if self.node_state(n).rstrip("*") not in ("idle", "drained", "down",
                                                                                     "draining")]
            if not busy and not job_task_pids(job_id):
                break
            time.sleep(0.3)
        time.sleep(1.0)
        for node in self.NODES:
            if self.node_state(node).rstrip("*") in ("drained", "draining", "down"):
                self.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        if self.job(job_id).get("Reason", "").startswith(("JobHeld", "launch_failed")) or \
                self.job(job_id).get("Priority") == "0":
            self.run("scontrol", "release", str(job_id), check=False)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def job_task_pids(job_id, step="0"):
    """Pids of a job's task processes on this machine (any namespace), from their environment."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_STEP_ID={step}".encode()}
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= env and Path(cmd.split(b"\0")[0].decode()).name.startswith("python"):
            pids.append(int(d.name))
    return sorted(pids)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    skip_if(two_node_unavailable_reason())
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    try:
        try:
            cluster._network()
        except subprocess.CalledProcessError as e:  # namespaces allowed, links (veth, bridge) not
            skip_if(f"the two-node SLURM test cannot make its network here: {' '.join(e.cmd)}: "
                    f"{(e.stderr or '').strip()}")
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

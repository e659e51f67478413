"""A Flower federation on this machine: a real `flower-superlink` and two `flower-supernode` processes on 127.0.0.1
that run examples/flower with `flwr run` (tests/test_flower.py, bench/flower_round.py), and the same run simulated in
this process."""

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).parent.parent
APP = REPO / "examples" / "flower"
BIN = Path(sys.executable).parent
# MiniLM on 64 BBC articles, 2 clients, 2 rounds of 2 steps: each round costs a fresh ClientApp process per node.
TINY = "--num_rounds 2 --local_steps 2 --max_train_samples 64 --max_eval_samples 32 --max_seq_length 32"


def free_port() -> int:
    """A port nothing listens on now; another process may take it before ours binds it (see `listens`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a socket listening on `port` (not another process that took the port)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    try:
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # the process, or one of its descriptors, is gone
        return False


def certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)

    def signed(subject: str, public_key, issuer: str, issuer_key, extension, critical: bool):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = x509.CertificateBuilder().subject_name(name).public_key(public_key).serial_number(1)
        builder = builder.issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        builder = builder.not_valid_before(now - datetime.timedelta(minutes=5))
        builder = builder.not_valid_after(now + datetime.timedelta(days=1)).add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = signed("test CA", ca_key.public_key(), "test CA", ca_key, x509.BasicConstraints(True, None), True)
    names = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = signed("127.0.0.1", key.public_key(), "test CA", ca_key, names, False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    no_password = serialization.NoEncryption()
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, no_password))
    return paths


def node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format, as `ssh-keygen -t ecdsa` writes it: (private key, public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    openssh, no_password = serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, openssh, no_password))
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def flwr_run(app: Path, run_config: str) -> list[str]:
    """The command that runs the Flower app in folder `app` on this deployment with `run_config`."""
    return ["flwr", "run", str(app), "loopback", "--stream", "--run-config", run_config]


class Deployment:
    """A SuperLink and two SuperNodes (partition-id 0 and 1) on 127.0.0.1; `secure`: over TLS, and only SuperNodes
    whose public key is registered with the SuperLink may join; `node_config`: more `--node-config` entries for
    both SuperNodes ("key=value ...")."""

    def __init__(self, root: Path, secure: bool, node_config: str = ""):
        self.root = root
        self.env = dict(
            os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", FLWR_HOME=str(root / "flwr"),
            OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
        )  # fmt: skip
        (root / "flwr").mkdir(parents=True)
        link, node, connection = ["--insecure"], ["--insecure"], "insecure = true"
        if secure:
            ca, cert, key = certificates(root)
            link = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca)]
            link.append("--enable-supernode-auth")
            node, connection = ["--root-certificates", str(ca)], f'root-certificates = "{ca}"'
        self.processes = []
        _, self.port = self.start_listening(
            "superlink", ["flower-superlink", *link, "--disable-runtime-dependency-installation"]
        )
        (root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            f"{connection}\n"
        )
        self.node_flags, self.secure, self.node_config = node, secure, node_config
        self.nodes = [self.start_node(k) for k in range(2)]

    def start_node(self, k: int, register: bool = True) -> subprocess.Popen:
        flags = list(self.node_flags)
        if self.secure:
            private, public = node_key(self.root, f"node{k}")
            if register:
                done = subprocess.run(["flwr", "supernode", "register", str(public), "loopback"], capture_output=True,
                                      text=True, env=self.env, cwd=self.root, timeout=60)  # fmt: skip
                assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            flags += ["--auth-supernode-private-key", str(private)]
        config = f'partition-id={k} state-dir="{self.root / "nodes"}" {self.node_config}'.strip()  # files of the node
        node, _ = self.start_listening(f"supernode{k}", [
            "flower-supernode", *flags, "--superlink", f"127.0.0.1:{self.port}", "--node-config", config,
        ], may_end=not register)  # an unregistered node is refused and ends  # fmt: skip
        return node

    def start_listening(self, name: str, command: list[str], may_end: bool = False) -> tuple[subprocess.Popen, int]:
        """Start a server `command` on a free `--port`, and wait until it listens there itself (or, if `may_end`,
        has ended for another reason than the port); if another process took the port in between, start it again
        on another one. (The process, its port.)"""
        for _ in range(5):
            port = free_port()
            process = self.start(name, [*command, "--port", str(port)])
            deadline = time.monotonic() + 60
            while not listens(process.pid, port) and process.poll() is None:
                assert time.monotonic() < deadline, (self.root / f"{name}.log").read_text()[-3000:]
                time.sleep(0.2)
            self.processes.append(process)
            if process.poll() is None:
                return process, port
            log = (self.root / f"{name}.log").read_text()
            if "address already in use" not in log.lower():  # only a lost port is worth a retry
                assert may_end, log[-3000:]
                return process, port
        raise AssertionError(f"{name}: five free ports were taken before it could bind one")

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)  # fmt: skip

    def command(self, fed_args: str, output_dir: Path, round_timeout: int = 300) -> list[str]:
        config = f"fed-args='{fed_args} --output_dir {output_dir}' round-timeout={round_timeout}"
        return flwr_run(APP, config)

    def run(self, fed_args: str, output_dir: Path) -> Path:
        """`flwr run` the example app with `fed_args`; its output folder once the run has finished."""
        self.run_app(self.command(fed_args, output_dir), output_dir / "model.safetensors")
        return output_dir

    def run_app(self, command: list[str], written: Path) -> None:
        """Run `command` (a `flwr_run`) to its end; check that it succeeded and wrote `written`."""
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=self.root, timeout=400)
        assert done.returncode == 0 and written.exists(), done.stdout[-3000:] + done.stderr[-3000:]

    def run_signalling_node(
        self, k: int, fed_args: str, output_dir: Path, sig: int = signal.SIGKILL, round_timeout: int = 300
    ) -> str:
        """`flwr run`, and send `sig` to SuperNode `k` (with its ClientApp) as soon as it receives round 2's message
        (its second train message, or its first in a run resumed after round 1): SIGKILL kills it, SIGSTOP leaves it
        alive and silent (its sockets open). The run's output once it has ended."""
        log, round_two = self.root / f"supernode{k}.log", 1 if "--resume_from_checkpoint" in fed_args else 2
        with open(self.root / "run.log", "w+") as out:
            run = subprocess.Popen(self.command(fed_args, output_dir, round_timeout), stdout=out,
                                   stderr=subprocess.STDOUT, text=True, env=self.env, cwd=self.root)  # fmt: skip
            deadline = time.monotonic() + 300
            while log.read_text().count("Receiving: train message") < round_two:
                assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            os.killpg(self.nodes[k].pid, sig)
            run.wait(timeout=400)  # a killed node: the SuperLink reports it gone after missed heartbeats
            out.seek(0)
            return out.read()

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # ended already (a refused SuperNode exits by itself)
                pass
            process.wait()


def simulated(fed_args: str, output_dir: Path) -> Path:
    """The same run in this process (FederatedTrainer over the partitions of the bundled corpus)."""
    sys.path.insert(0, str(APP))
    try:
        from fed_flower.task import build_trainer
    finally:
        sys.path.remove(str(APP))
    trainer = build_trainer({"fed-args": f"{fed_args} --output_dir {output_dir}"})
    trainer.train()
    trainer.save_model()
    (output_dir / "rounds.json").write_text(json.dumps([e for e in trainer.state.log_history if "round" in e]))
    return output_dir

"""A real Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, ``flwr run`` against it.

Unlike ``localsim`` (Flower's simulation engine), every process here is the one a user
runs on real machines: ``flower-superlink`` without ``--simulation`` and one
``flower-supernode`` per device, told its partition through ``--node-config``. Optional
TLS uses a throw-away CA made at start-up. Everything lives in a private FLWR_HOME, and
every process we start (and its children) is stopped on exit.

    with LocalDeployment(num_supernodes=3, tls=True) as dep:
        result = dep.run(".", {"num-rounds": 2})
        assert result.ok, result.problems

Command line: ``python -m fedsplitkd.tools.deployment --supernodes 3 [--tls] [--run-config "k=v ..."]``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fedsplitkd.tools.localsim import _toml_value
from fedsplitkd.tools.processes import ProcessTree, alive, descendants, free_port, local_superlink_env

__all__ = ["DeploymentResult", "LocalDeployment", "alive", "parse_run_config", "write_tls_certificates"]

CONNECTION = "fedsplitkd-deploy"


def write_tls_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 / localhost; (ca, cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedsplitkd test CA")).issuer_name(name("fedsplitkd test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.crt", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


@dataclass
class DeploymentResult:
    """One ``flwr run`` against the deployment, judged by what the run left behind."""

    returncode: int
    stdout: str
    stderr: str
    run_id: int | None
    status: str
    run_dir: Path
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1 for the duration of a ``with`` block.

    SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N"`` plus
    ``node_configs[i]`` (e.g. its own ``data-path``); ``env`` adds to every process's environment. With
    ``tls=True`` a CA and a server certificate are generated under the home directory and
    every connection (SuperNodes, CLI) verifies the SuperLink against that CA.
    """

    def __init__(self, num_supernodes: int = 2, tls: bool = False, flwr_home: str | Path | None = None,
                 startup_timeout: float = 90.0, node_configs: list[dict] | None = None, auth: bool = False,
                 unregistered: int = 0, env: dict[str, str] | None = None):
        if (auth or unregistered) and not tls:
            raise ValueError("LocalDeployment 'auth': SuperNode authentication needs tls=True")
        self._tmp = None if flwr_home else tempfile.mkdtemp(prefix="fedsplitkd-deploy-")
        self.home = Path(flwr_home or self._tmp).resolve()
        self.num_supernodes, self.tls, self.startup_timeout = num_supernodes, tls, startup_timeout
        self.node_configs = node_configs or [{} for _ in range(num_supernodes)]  # extra keys per node
        # auth: a key per node, registered through the CLI; ``unregistered`` more nodes with keys
        # the SuperLink never saw (partition ids from num_supernodes on), which it must refuse.
        self.auth, self.unregistered = auth or bool(unregistered), unregistered
        self.supernodes: dict[int, subprocess.Popen] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ca: Path | None = None
        self.processes: list[subprocess.Popen] = []
        self.tree = ProcessTree()  # every process started under this deployment, to stop on exit
        # flwr's own local SuperLink gets free ports too, should anything run `flwr run` without ours
        self.env = self.tree.env({**os.environ, "FLWR_HOME": str(self.home),
                                  "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                                  "FLWR_DISABLE_UPDATE_CHECK": "1", **local_superlink_env(),
                                  **(env or {})})  # e.g. FLWR_SUPEREXEC_TASK_POLL_INTERVAL, FEDSPLITKD_TIMING

    # -- start and stop ---------------------------------------------------------------

    def _start(self, name: str, command: list[str], append: bool = False) -> subprocess.Popen:
        # Own session and process group: killpg stops it with the SuperExec and apps it spawns.
        with open(self.home / f"{name}.log", "a" if append else "w") as log:
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=self.home, start_new_session=True)
        self.processes.append(process)
        self.tree.add_root(process.pid)
        return process

    def superlink_command(self) -> list[str]:
        security = (["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.home / "certs" / "server.pem"),
                     "--ssl-keyfile", str(self.home / "certs" / "server.key")] if self.tls else ["--insecure"])
        auth = ["--enable-supernode-auth"] if self.auth else []
        return ["flower-superlink", *security, *auth, "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]

    def supernode_command(self, partition_id: int) -> list[str]:
        security = ["--root-certificates", str(self.ca)] if self.tls else ["--insecure"]
        if self.auth:
            security += ["--auth-supernode-private-key", str(self.key(partition_id))]
        # Each SuperNode serves its ClientApps on its own local port; the default collides.
        return ["flower-supernode", *security, "--superlink", self.address, "--host", "127.0.0.1",
                "--port", str(free_port()),
                "--node-config", " ".join(f"{k}={_toml_value(str(v) if isinstance(v, Path) else v)}"
                                         for k, v in self.node_config(partition_id).items())]

    def node_config(self, partition_id: int) -> dict:
        extra = self.node_configs[partition_id] if partition_id < len(self.node_configs) else {}
        return {"partition-id": partition_id, "num-partitions": self.num_supernodes, **extra}

    def key(self, partition_id: int) -> Path:
        """The node's private key (OpenSSH, EC P-384); the public key is beside it as ``.pub``."""
        return self.home / "keys" / f"supernode-{partition_id}"

    def _write_keys(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        (self.home / "keys").mkdir(parents=True, exist_ok=True)
        for i in range(self.num_supernodes + self.unregistered):
            private = ec.generate_private_key(ec.SECP384R1())
            self.key(i).write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()))
            self.key(i).chmod(0o600)
            self.key(i).with_suffix(".pub").write_bytes(private.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))

    def register(self, partition_id: int) -> None:
        """``flwr supernode register`` the node's public key with the SuperLink."""
        done = self.flwr("supernode", "register", str(self.key(partition_id).with_suffix(".pub")), CONNECTION)
        if done.returncode != 0 or "registered successfully" not in done.stdout:
            raise RuntimeError(f"flwr supernode register (node {partition_id}) failed: "
                               f"{(done.stdout + done.stderr).strip()[-500:]}")

    def start_supernode(self, partition_id: int) -> subprocess.Popen:
        """Start (or restart) SuperNode ``partition_id``; its log is appended to."""
        self.supernodes[partition_id] = self._start(f"supernode-{partition_id}", self.supernode_command(partition_id),
                                                    append=partition_id in self.supernodes)
        return self.supernodes[partition_id]

    def kill_supernode(self, partition_id: int) -> None:
        """SIGKILL SuperNode ``partition_id`` and what it started (a node that dies)."""
        process = self.supernodes[partition_id]
        self.tree.members()  # remembered for the clean-up, should any of them outlive the kill
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=10)

    def __enter__(self) -> LocalDeployment:  # noqa: PYI034
        self.home.mkdir(parents=True, exist_ok=True)
        connection = f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
        if self.tls:
            self.ca = write_tls_certificates(self.home / "certs")[0]
            connection += f'root-certificates = "{self.ca}"\n'
        else:
            connection += "insecure = true\n"
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n{connection}')
        try:
            superlink = self._start("superlink", self.superlink_command())
            self._wait_healthy(superlink)
            if self.auth:
                self._write_keys()
                for i in range(self.num_supernodes):
                    self.register(i)
            for i in range(self.num_supernodes + self.unregistered):
                self.start_supernode(i)
            self.wait_for_nodes(self.num_supernodes)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self, superlink: subprocess.Popen) -> None:
        context = ssl.create_default_context(cafile=str(self.ca)) if self.tls else None
        url = f"{'https' if self.tls else 'http'}://{self.address}/health"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {superlink.returncode}; "
                                   f"see {self.home / 'superlink.log'}")
            try:
                urllib.request.urlopen(url, timeout=0.5, context=context)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not answer on {url} in {self.startup_timeout:.0f} s")

    def nodes(self) -> list[dict]:
        """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``)."""
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        return json.loads(out.stdout).get("nodes", []) if out.returncode == 0 and out.stdout.strip() else []

    def wait_for_nodes(self, count: int) -> None:
        """Until ``count`` SuperNodes are online; a SuperNode that exits stops the wait."""
        deadline = time.monotonic() + self.startup_timeout
        expected = [i for i in self.supernodes if i < self.num_supernodes]  # not the unregistered
        while time.monotonic() < deadline:
            for i in expected:
                if self.supernodes[i].poll() is not None:
                    raise RuntimeError(f"flower-supernode {i} exited with {self.supernodes[i].returncode}; "
                                       f"see {self.home / f'supernode-{i}.log'}")
            # A SuperNode logs its ID once the SuperLink registered it; only then ask the
            # SuperLink (each ``flwr`` call is a Python start-up, dear on a small machine).
            logged = sum((self.home / f"supernode-{i}.log").read_text().count("SuperNode ID:") for i in expected)
            if logged >= count and sum(n.get("status") == "online" for n in self.nodes()) >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {count} SuperNodes came online in {self.startup_timeout:.0f} s")

    def pids(self) -> set[int]:
        """Our processes and all they started, running now (also remembered for the clean-up)."""
        return set(self.tree.members())

    @property
    def seen(self) -> set[int]:
        """Every PID observed under our processes so far."""
        return set(self.tree.seen)

    def __exit__(self, *exc) -> None:
        """Stop every process of the deployment's tree: SIGTERM, then SIGKILL after 10 s."""
        self.tree.stop(grace=10.0)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.processes = []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- runs -------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], check=False, env=self.env, capture_output=True, text=True, timeout=timeout)

    def run(self, app: str | Path, run_config: dict | None = None, timeout: float = 1800.0) -> DeploymentResult:
        """``flwr run APP <connection> --stream`` and judge it by its results.

        ``flwr run --stream`` exits 0 on failure, and a run counts as completed even when
        every ClientApp raised: the run must also have written ``metrics.csv`` with one row
        per round (and round 0) and a finite final accuracy. ``output-dir`` is made
        absolute (the ServerApp runs in the SuperLink's directory), ``run-name`` is set if
        missing, and ``min-nodes`` defaults to every SuperNode, so a round never starts short.
        """
        config = {"min-nodes": self.num_supernodes, **(run_config or {})}
        config["output-dir"] = str(Path(config.get("output-dir", "outputs")).expanduser().resolve())
        config.setdefault("run-name", f"deploy-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
        start = time.monotonic()
        done = subprocess.run(["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", overrides],
                              check=False, env=self.env, capture_output=True, text=True, timeout=timeout)
        wall = time.monotonic() - start
        self.pids()
        match = re.search(r"started run (\d+)", done.stdout)
        run_id = int(match.group(1)) if match else None
        status = self.run_status(run_id) if run_id is not None else "unknown"
        result = DeploymentResult(done.returncode, done.stdout, done.stderr, run_id, status,
                                  Path(config["output-dir"]) / str(config["run-name"]), wall_s=wall)
        self._judge(result, int(config.get("num-rounds", 0)) or None)
        return result

    def run_status(self, run_id: int) -> str:
        """``finished:completed``, ``finished:failed``, ``running`` ... as ``flwr ls`` reports it."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(out.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    @staticmethod
    def _judge(result: DeploymentResult, num_rounds: int | None) -> None:
        if result.run_id is None:
            result.problems.append("flwr run printed no run id")
        if result.status != "finished:completed":
            result.problems.append(f"run status is {result.status!r}")
        metrics = result.run_dir / "metrics.csv"
        if not metrics.is_file():
            result.problems.append(f"the run wrote no {metrics}")
            return
        with open(metrics, newline="") as f:
            result.rows = list(csv.DictReader(f))
        rounds = [int(r["round"]) for r in result.rows]
        if num_rounds is not None and rounds != list(range(num_rounds + 1)):
            result.problems.append(f"metrics.csv has rounds {rounds}, expected 0..{num_rounds}")
        if not result.rows or not math.isfinite(float(result.rows[-1]["test_accuracy"])):
            result.problems.append("no finite final test accuracy")
        elif any(int(r.get("completed") or 0) < int(r.get("devices") or 0) for r in result.rows[1:]):
            result.problems.append("devices failed in a round (completed < devices)")
        if not (result.run_dir / "summary.json").is_file():
            result.problems.append("the run wrote no summary.json")


def parse_run_config(text: str) -> dict:
    """``"num-rounds=2 dataset='digits' fading=true"`` -> dict, values typed as ``flwr run`` reads them."""
    config: dict = {}
    for key, value in re.findall(r"""([^\s=]+)=('[^']*'|"[^"]*"|\S*)""", text):
        if value[:1] in "'\"" and len(value) >= 2:
            config[key] = value[1:-1]
        elif value in ("true", "false"):
            config[key] = value == "true"
        else:
            try:
                config[key] = int(value)
            except ValueError:
                try:
                    config[key] = float(value)
                except ValueError:
                    config[key] = value
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsplitkd.tools.deployment", description=__doc__.split("\n")[0])
    parser.add_argument("--supernodes", type=int, default=3, help="SuperNodes (devices) to start")
    parser.add_argument("--tls", action="store_true", help="TLS with a CA generated now")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls): a key "
                        "per node, registered with flwr supernode register")
    parser.add_argument("--app", default=".", help="the Flower app directory (default: .)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=2 dataset=\'digits\'"')
    parser.add_argument("--keep-home", default=None, help="use this FLWR_HOME (logs, certificates) and keep it")
    args = parser.parse_args(argv)
    tls = args.tls or args.auth
    with LocalDeployment(args.supernodes, tls=tls, flwr_home=args.keep_home, auth=args.auth) as dep:
        print(f"SuperLink {dep.address} ({'TLS' if tls else 'insecure'}{', node auth' if args.auth else ''}), "
              f"{args.supernodes} SuperNodes online; FLWR_HOME {dep.home}", flush=True)
        result = dep.run(args.app, parse_run_config(args.run_config))
    sys.stdout.write(result.stdout)
    print(f"run {result.run_id}: {result.status}, {result.wall_s:.1f} s; results in {result.run_dir}")
    for problem in result.problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

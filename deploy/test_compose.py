#!/usr/bin/env python3
"""The container test (issue #12 point 5), run by `make docker-test` and CI.

Builds the image offline (deploy/build-offline.sh), starts deploy/docker-compose.yml under a
project name of its own, and drives the stack through the published port only:

* every service becomes healthy (their healthchecks are the binaries' `health` subcommands);
* a greedy /execute on the image's model (the demo model of models/default) gives HF's greedy
  text (the committed reference ids of fixtures/reference/demo/hello, decoded by the host's
  tokenizer), and /health names the model llorch-demo-…;
* `docker kill` of the engine: /health is 503 within 5 s and the running stream ends with the
  SSE `error` event; the engine started again serves again with no gateway restart;
* with `--scale engine=2`: 8 concurrent streams land on both replicas (each replica's Info
  counters), killing one mid-stream ends only its streams with `error`, new requests succeed;
* `docker-compose stop` ends every service with exit code 0 within its grace period, while a
  stream runs (it finishes or ends with CANCELLED);
* everything is removed afterwards (containers, networks, volumes), also when a step fails.

Python's standard library only (HTTP, SSE, threads): bash would need curl and ad-hoc SSE
parsing, and a Rust test would pull Docker into `make check`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
TELEMETRY_FILE = ROOT / "deploy" / "docker-compose.telemetry.yml"
PROJECT = f"llorch-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"docker-test [{time.monotonic() - STARTED:6.1f} s] {msg}", flush=True)


def run(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a command, output captured; raises with its stderr when it fails and `check`."""
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def compose_cmd() -> list[str]:
    """docker-compose (v1, as on CI) or, where only it exists, `docker compose` (v2)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


class Stack:
    """One compose project: its env, its commands, and the published gateway URL."""

    def __init__(self, image: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = dict(os.environ)
        self.env.update(
            LLORCH_IMAGE=image,
            LLORCH_GATEWAY_BIND="127.0.0.1",
            LLORCH_GATEWAY_PUBLISH_PORT=str(self.port),
            # Two cores on CI: one thread per engine replica leaves room for the other.
            LLORCH_THREADS="1",
            LLORCH_ENGINE_CPUS="1",
            LLORCH_ENGINE_MEMORY="1g",
            # Short grace periods: the test waits for them.
            LLORCH_GATEWAY_GRACE_SECS="10",
            LLORCH_ENGINE_GRACE_SECS="10",
            LLORCH_TOKENIZER_GRACE_SECS="5",
            LLORCH_LOG_FORMAT="json",
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = compose_cmd() + ["-p", PROJECT, "-f", str(COMPOSE_FILE), *args]
        return run(*cmd, check=check, env=self.env)

    def containers(self, service: str) -> list[str]:
        """Ids of the service's containers (running or not)."""
        out = run(
            "docker", "ps", "-aq",
            "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout
        return out.split()

    def inspect(self, container: str, fmt: str) -> str:
        return run("docker", "inspect", "-f", fmt, container).stdout.strip()

    def wait_healthy(self, timeout: float = 180.0) -> None:
        """Waits until every container of the project reports healthy."""
        until = time.monotonic() + timeout
        while True:
            ids = run(
                "docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"
            ).stdout.split()
            states = {c: self.inspect(c, "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}") for c in ids}
            if ids and all(s.endswith(" healthy") for s in states.values()):
                return
            if time.monotonic() > until:
                raise AssertionError(f"not healthy after {timeout} s: {sorted(states.values())}")
            time.sleep(0.5)

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)


# --- HTTP and SSE -------------------------------------------------------------------------


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class SseStream:
    """A running /execute stream, read event by event."""

    def __init__(self, base: str, body: dict) -> None:
        req = urllib.request.Request(
            f"{base}/execute",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        self.resp = urllib.request.urlopen(req, timeout=60)
        assert self.resp.headers["content-type"] == "text/event-stream", self.resp.headers

    def next(self) -> dict | None:
        """The next event as {"event", **data}; None at the end of the stream."""
        event, data = "", ""
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line == "":
                if event or data:
                    return {"event": event, **json.loads(data)}
                continue
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].lstrip(" ")

    def rest(self) -> list[dict]:
        out = []
        while (e := self.next()) is not None:
            out.append(e)
        return out


def execute_text(base: str, body: dict) -> tuple[str, dict]:
    """The streamed text and the last event of a whole /execute."""
    events = SseStream(base, body).rest()
    text = "".join(e["t"] for e in events if e["event"] == "token")
    return text, events[-1]


def longest_greedy(base: str) -> int:
    """The most tokens a "Hello." (2 tokens) job may ask of the served model."""
    code, health = http_json(f"{base}/health")
    assert code == 200, health
    return health["context_length"] - 2


def started_stream(base: str, job_id: str, max_tokens: int | None = None) -> SseStream:
    """A greedy stream read up to its first token; by default as long as the model's context
    allows ("Hello." is 2 tokens), so that it is still running when the test acts."""
    if max_tokens is None:
        max_tokens = longest_greedy(base)
    body = {"job_id": job_id, "prompt": "Hello.", "max_tokens": max_tokens, "temperature": 0}
    s = SseStream(base, body)
    first = [s.next(), s.next()]
    assert [e["event"] for e in first] == ["started", "token"], first
    return s


# --- the steps ----------------------------------------------------------------------------


def expected_greedy_text() -> str:
    """HF's greedy continuation of "Hello." on the image's model, the trained demo model of
    models/default (fixtures/reference/demo, checkpoint 12)."""
    meta = json.loads((ROOT / "fixtures/reference/demo/hello/meta.json").read_text())
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    ids = ",".join(str(i) for i in meta["greedy_24"])
    out = run(str(target / "release/llorch-tokenizer"), "decode", "--model", "models/default", ids)
    return json.loads(out.stdout)["text"]


def check_greedy(stack: Stack, want: str, job_id: str) -> None:
    body = {"job_id": job_id, "prompt": "Hello.", "max_tokens": 24, "temperature": 0}
    text, last = execute_text(stack.url, body)
    assert last["event"] == "end" and last["tokens_out"] == 24, last
    assert text == want, f"container text {text!r} != reference {want!r}"


def wait_health(stack: Stack, code: int, within: float) -> float:
    """Seconds until GET /health answers `code`; fails after `within`."""
    started = time.monotonic()
    while True:
        try:
            got, _ = http_json(f"{stack.url}/health", timeout=within)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            got = None
        waited = time.monotonic() - started
        if got == code:
            return waited
        assert waited < within, f"/health is {got}, not {code}, after {waited:.1f} s"
        time.sleep(0.1)


def kill_and_restart_engine(stack: Stack, want: str) -> None:
    (engine,) = stack.containers("engine")
    gateway_started = stack.inspect(stack.containers("gateway")[0], "{{.State.StartedAt}}")
    stream = started_stream(stack.url, "killed-engine")
    run("docker", "kill", engine)
    waited = wait_health(stack, 503, within=5.0)
    log(f"engine killed: /health 503 after {waited:.2f} s")
    last = stream.rest()[-1]
    assert last["event"] == "error", f"the stream ended with {last}"
    log(f"the running stream ended with error {last['code']}")
    run("docker", "start", engine)
    waited = wait_health(stack, 200, within=60.0)
    log(f"engine started again: /health 200 after {waited:.2f} s")
    check_greedy(stack, want, "after-restart")
    gateway = stack.containers("gateway")[0]
    assert stack.inspect(gateway, "{{.State.StartedAt}}") == gateway_started, "gateway restarted"


def engine_finished(stack: Stack, container: str) -> int:
    """Streams a replica finished since it started (its Info counters)."""
    out = run("docker", "exec", container, "llorch-engine", "info").stdout
    return sum(json.loads(out.splitlines()[-1])["finished"].values())


def wait_engines_up(stack: Stack, up: int, within: float) -> dict:
    until = time.monotonic() + within
    while True:
        _, body = http_json(f"{stack.url}/health")
        if body.get("engines_up") == up:
            return body
        assert time.monotonic() < until, f"engines_up is not {up} after {within} s: {body}"
        time.sleep(0.2)


def two_replicas(stack: Stack, want: str) -> None:
    """--scale engine=2: 8 streams spread over both; killing one ends only its streams."""
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "engine=2")
    stack.wait_healthy()
    wait_engines_up(stack, 2, within=15.0)
    engines = stack.containers("engine")
    assert len(engines) == 2, engines
    before = {c: engine_finished(stack, c) for c in engines}
    streams = [started_stream(stack.url, f"spread-{i}") for i in range(8)]
    victim, survivor = engines
    run("docker", "kill", victim)
    ends = [s.rest()[-1] for s in streams]
    errors = [e for e in ends if e["event"] == "error"]
    assert len(errors) == 4 and all(e["code"] == "INFERENCE_FAILED" for e in errors), ends
    n = longest_greedy(stack.url)
    assert all(e["event"] == "end" and e["tokens_out"] == n for e in ends if e not in errors), ends
    done = engine_finished(stack, survivor) - before[survivor]
    assert done == 4, f"the surviving replica finished {done} streams, not 4"
    log(f"8 streams over 2 replicas: the killed one's 4 ended with error, the other's 4 finished")
    body = wait_engines_up(stack, 1, within=10.0)
    assert body["status"] == "healthy", body
    for i in range(3):
        check_greedy(stack, want, f"one-left-{i}")
    run("docker", "start", victim)
    wait_engines_up(stack, 2, within=60.0)
    before = {c: engine_finished(stack, c) for c in engines}
    streams = [started_stream(stack.url, f"back-{i}") for i in range(2)]
    for s in streams:
        assert s.rest()[-1]["event"] == "end"
    after = {c: engine_finished(stack, c) - before[c] for c in engines}
    assert sorted(after.values()) == [1, 1], f"the restarted replica is not used: {after}"
    log("the restarted replica takes streams again")


def stop_gracefully(stack: Stack) -> None:
    """`stop` with a stream running: every container exits 0 within its grace period."""
    stream = started_stream(stack.url, "at-stop")
    ids = run(
        "docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"
    ).stdout.split()
    reader = threading.Thread(target=lambda: setattr(stream, "events", stream.rest()))
    reader.start()
    started = time.monotonic()
    stack.compose("stop")
    took = time.monotonic() - started
    reader.join(timeout=30)
    last = stream.events[-1]
    assert last["event"] == "end" or last.get("code") == "CANCELLED", last
    codes = {stack.inspect(c, "{{.Name}}"): stack.inspect(c, "{{.State.ExitCode}}") for c in ids}
    log(f"stop took {took:.1f} s; exit codes {codes}; the running stream ended with {last['event']}")
    assert all(code == "0" for code in codes.values()), codes
    # The longest stop_grace_period (40 s) is Docker's SIGKILL deadline; the drains are 10 s.
    assert took < 40, f"stop took {took:.1f} s"


def check_removed() -> None:
    leftovers = []
    for kind in ("container", "network", "volume"):
        cmd = ["docker", kind, "ls", "-q"]
        if kind == "container":
            cmd.insert(3, "-a")
        cmd += ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        leftovers += [f"{kind} {x}" for x in run(*cmd).stdout.split()]
    assert not leftovers, f"left behind: {leftovers}"


def main() -> int:
    # A CI timeout sends SIGTERM: raise SystemExit so that the cleanup in `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log(f"compose project {PROJECT}")
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, TELEMETRY_FILE]):
        args = [a for f in files for a in ("-f", str(f))]
        run(*compose_cmd(), *args, "config", "-q")
    log("compose files valid (with and without the telemetry overlay)")

    build = subprocess.run(
        [str(ROOT / "deploy/build-offline.sh")], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    if build.returncode != 0:
        raise RuntimeError(f"deploy/build-offline.sh exited {build.returncode}")
    image = build.stdout.strip().splitlines()[-1]
    size = run("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout.strip()
    log(f"image {image}: {int(size) / 1e6:.0f} MB")
    want = expected_greedy_text()

    stack = Stack(image)
    try:
        stack.compose("up", "-d", "--no-build")
        stack.wait_healthy()
        log("healthy:\n" + stack.compose("ps").stdout)
        code, health = http_json(f"{stack.url}/health")
        assert code == 200 and health["model"].startswith("llorch-demo-"), health
        check_greedy(stack, want, "greedy")
        log(f"/health names {health['model']}; greedy /execute equals the reference text")
        kill_and_restart_engine(stack, want)
        two_replicas(stack, want)
        stop_gracefully(stack)
    finally:
        stack.down()
    check_removed()
    log("passed; everything removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

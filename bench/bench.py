#!/usr/bin/env python3
"""keyroll's benchmark: every figure is printed next to a reference measured
in the same run, in alternated rounds, because the machine is shared and
absolute numbers drift. Started by bench/run, which builds and installs what
this needs; standard library only.

Sections (BENCH_ONLY=name,name... runs a subset):
  serve     JWKS throughput and p99: keyroll vs nginx (auto workers, and one
            worker) serving the same bytes, at wrk -t2 -c64 and -t1 -c32 (as
            fast as each server answers), and at -t2 -c64 with 1 ms between a
            connection's requests (a fixed load), with wrk beside the server
            and with wrk on CPU 0 and the server on the others; and at -t1
            -c32 with wrk on CPU 0 and a busy loop beside the server
  keygen    JWKS p99 while an RSA-4096 key is generated, vs nginx beside openssl
  genpkey   key generation per algorithm and size vs `openssl genpkey`
  rotate    `keyroll rotate --now --alg ES256`: store write landed -> new key served and in
            signing_dir (file store; also the baseline build, alternated, when given)
  idle      idle RSS (and its private part) and CPU per minute, vs an idle nginx
            serving the same JWKS and, with --keyroll-baseline, another build
  many      the daemon with 1,000 keysets: start-up pass, idle RSS and CPU (and the
            baseline build's, when given)
  reconcile one reconcile pass over 1,000 keysets (benches/reconcile.rs)
  signer    tokens/s and p50/p99 over the sign API socket at 1, 16, 64 clients vs
            the in-process limit; p99 while RSA-4096 keys are generated
            (benches/signer.rs, which starts keyroll itself)
"""

import argparse
import atexit
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

WRK_THREADS = 2
WRK_CONNECTIONS = 64


# Everything started or made here, stopped and removed at exit whatever happens.
STARTED = []
SCRATCH = []


@atexit.register
def clean_up():
    for process in STARTED:
        if process.poll() is None:
            process.kill()
            process.wait()
    for folder in SCRATCH:
        shutil.rmtree(folder, ignore_errors=True)


def scratch_dir(prefix):
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    SCRATCH.append(folder)
    return folder


def spawn(*args, **kwargs):
    process = subprocess.Popen(*args, **kwargs)
    STARTED.append(process)
    return process


def say(text=""):
    print(text, flush=True)


def die(text):
    print(f"bench: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url, headers=None, timeout=5):
    """(status, headers, body) of a GET; status 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    except OSError:
        return 0, {}, b""


def wait_for(what, probe, timeout=120, every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            die(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q))]


def fmt_s(seconds):
    if seconds < 1e-5:
        return f"{seconds * 1e6:.2f} us"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  " + "  ".join(
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    say(line(header))
    for row in rows:
        say(line(row))


# ---- processes ------------------------------------------------------------------


class Keyroll:
    """A `keyroll run` in its own temporary folder, on a free port."""

    def __init__(self, binary, keysets, reconcile_interval="30s"):
        self.binary = binary
        self.dir = scratch_dir("keyroll-bench-")
        self.port = free_port()
        self.reconcile_interval = reconcile_interval
        self.keysets = keysets
        self.write_config()
        self.log = open(self.dir / "keyroll.log", "wb")
        self.process = spawn(
            [binary, "--config", str(self.config), "run"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env=clean_env(), cwd=self.dir,
        )
        self.started = time.monotonic()
        wait_for("keyroll /readyz", lambda: self.alive() and fetch(self.url("/readyz"))[0] == 200,
                 timeout=600)
        self.ready_after = time.monotonic() - self.started

    @property
    def config(self):
        return self.dir / "keyroll.toml"

    def write_config(self):
        text = (f'reconcile_interval = "{self.reconcile_interval}"\n'
                f"state_dir = '{self.dir / 'state'}'\n"
                f"[store]\ntype = \"file\"\ndir = '{self.dir / 'store'}'\n"
                f"[http]\nlisten = \"127.0.0.1:{self.port}\"\n")
        self.config.write_text(text + "".join(self.keysets))

    def url(self, path="/.well-known/jwks.json"):
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self):
        if self.process.poll() is not None:
            die(f"keyroll exited with {self.process.returncode}; log in {self.dir}/keyroll.log")
        return True

    def cli(self, *args):
        return subprocess.run([self.binary, "--config", str(self.config), *args],
                              capture_output=True, env=clean_env(), cwd=self.dir, check=True)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUST_LOG", "KEYROLL_CONFIG", "STATE_DIRECTORY", "NOTIFY_SOCKET")}
    env["RUST_LOG"] = "warn"
    return env


def keyset(name, algorithms=("ES256", "RS256"), rsa_bits=2048):
    algs = ", ".join(f'"{a}"' for a in algorithms)
    bits = f"rsa_bits = {rsa_bits}\n" if "RS256" in algorithms else ""
    return f'\n[[keysets]]\nname = "{name}"\nalgorithms = [{algs}]\n{bits}'


class Nginx:
    """nginx in the foreground on a free port, serving `body` as a static file
    with keyroll's headers (same Content-Type, Cache-Control and ETag)."""

    def __init__(self, body, headers, workers="auto"):
        self.dir = scratch_dir("nginx-bench-")
        os.chmod(self.dir, 0o755)  # workers run as nobody
        self.port = free_port()
        root = self.dir / "root"
        (root / ".well-known").mkdir(parents=True)
        (root / ".well-known" / "jwks.json").write_bytes(body)
        for path in (root, root / ".well-known"):
            os.chmod(path, 0o755)
        os.chmod(root / ".well-known" / "jwks.json", 0o644)
        etag = headers["etag"].replace('"', '\\"')
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""
daemon off;
worker_processes {workers};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    # wrk keeps its connections, as it does with keyroll (nginx's default
    # closes a keep-alive connection after 1000 requests).
    keepalive_requests 1000000;
    client_body_temp_path {self.dir}/tmp;
    server {{
        listen 127.0.0.1:{self.port};
        location = /.well-known/jwks.json {{
            root {root};
            types {{ }}
            default_type {headers["content-type"]};
            etag off;
            if_modified_since off;
            add_header Last-Modified "";
            add_header ETag "{etag}";
            add_header Cache-Control "{headers["cache-control"]}";
        }}
    }}
}}
""")
        self.log = open(self.dir / "stderr.log", "wb")
        self.process = spawn(["nginx", "-p", str(self.dir), "-c", str(conf)],
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        wait_for("nginx to answer", lambda: self.alive() and fetch(self.url())[0] == 200, timeout=30)

    def url(self, path="/.well-known/jwks.json"):
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self):
        if self.process.poll() is not None:
            die(f"nginx exited: {(self.dir / 'error.log').read_text(errors='replace')}")
        return True

    def pids(self):
        children = [p for p in os.listdir("/proc") if p.isdigit() and ppid(int(p)) == self.process.pid]
        return [self.process.pid] + [int(p) for p in children]

    def stop(self):
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def ppid(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def cpu_seconds(pid):
    """CPU time of all of `pid`'s live threads, in nanoseconds' resolution
    (/proc/PID/task/*/schedstat; /proc/PID/stat counts in 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread just exited
    return total / 1e9


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---- wrk ----------------------------------------------------------------------------


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(url, pids=(), seconds=5, threads=WRK_THREADS, connections=WRK_CONNECTIONS,
        script=None, cpus=None):
    """wrk's figures; with `pids`, also the CPU those processes used per
    request. `script`: a wrk Lua script; `cpus`: run wrk on these CPUs only."""
    cpu_before = sum(cpu_seconds(p) for p in pids)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += ["-s", str(script)] if script else []
    if cpus is not None:
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] + command
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {}
    for pct in ("50", "99"):
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M).groups()
        latency[pct] = float(value) * UNITS[unit]
    value, unit = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)", out).groups()
    latency["max"] = float(value) * UNITS[unit]
    if "Non-2xx" in out or "Socket errors" in out:
        die(f"wrk saw errors against {url}:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
    return {"rps": rps, "p50": latency["50"], "p99": latency["99"], "max": latency["max"],
            "cpu": cpu / requests}


# ---- sections --------------------------------------------------------------------


def served_reference(daemon):
    status, headers, body = fetch(daemon.url())
    if status != 200:
        die(f"keyroll answered {status}")
    return headers, body


THINK_TIME = Path(__file__).resolve().parent / "think-time.lua"


@dataclasses.dataclass(frozen=True)
class ServeSetting:
    """One wrk setting of the serving section."""
    threads: int
    connections: int
    seconds: int
    # Each connection waits 1 ms between requests (bench/think-time.lua):
    # the client fixes the load, the same for every server.
    fixed_load: bool = False
    # wrk on the first CPU, the server on the others: what a server does,
    # without the scheduler putting the client on the server's CPU.
    isolated: bool = False
    # A busy loop on the server's CPUs, as another tenant's batch job: the
    # server shares its CPU with a task that is not its client.
    busy_neighbour: bool = False

    def title(self):
        extra = [" with 1 ms between a connection's requests (fixed load)"] if self.fixed_load else []
        extra += [", wrk on CPU 0 and the server on the other CPUs"] if self.isolated else []
        extra += [", with a busy loop on the server's CPUs"] if self.busy_neighbour else []
        return f"wrk -t{self.threads} -c{self.connections} -d{self.seconds}s" + "".join(extra)


# The wrk settings the serving section runs: bench/run's own, and one wrk
# thread against 32 connections, where one server thread meets one client
# thread on the two CPUs (the setting of the JWKS tail in issue 13). Both
# saturate: every server answers as fast as it can, and wrk shares the CPUs
# with it. The fixed-load settings compare latency at the same load, with
# and without the client on the server's CPU (docs/BENCHMARKS.md, "Issue
# 13, third part"). The last puts a busy loop on the server's CPU, as a
# neighbour's batch job: a server that gives its CPU away to let its clients
# run (sched_yield per request, tried for the -t2 -c64 tail) loses 99% of
# its throughput there ("Issue 13, fourth part").
SERVE_SETTINGS = (
    ServeSetting(WRK_THREADS, WRK_CONNECTIONS, 5),
    ServeSetting(1, 32, 8),
    ServeSetting(WRK_THREADS, WRK_CONNECTIONS, 5, fixed_load=True),
    ServeSetting(WRK_THREADS, WRK_CONNECTIONS, 5, fixed_load=True, isolated=True),
    ServeSetting(1, 32, 5, isolated=True, busy_neighbour=True),
)


def section_serve(args):
    rounds = 2 * args.rounds  # cheap, and the noisiest figure
    say(f"== JWKS serving: keyroll vs nginx (auto workers = {os.cpu_count()}, and one worker), "
        f"{rounds} alternated rounds (ABBA order) per wrk setting")
    daemon = Keyroll(args.keyroll, [keyset("default")])
    headers, body = served_reference(daemon)
    nginx = Nginx(body, headers)
    nginx_one = Nginx(body, headers, workers=1)
    _, nginx_headers, nginx_body = fetch(nginx.url())
    if nginx_body != body or fetch(nginx_one.url())[2] != body:
        die("nginx does not serve the same bytes")
    say(f"  same {len(body)} bytes; headers keyroll: "
        + ", ".join(f"{k}: {v}" for k, v in headers.items() if k != "date"))
    say("                  nginx:   "
        + ", ".join(f"{k}: {v}" for k, v in nginx_headers.items() if k != "date"))
    servers = {"keyroll": (daemon.url(), [daemon.process.pid]), "nginx": (nginx.url(), nginx.pids()),
               "nginx-1w": (nginx_one.url(), nginx_one.pids())}
    others = [nginx, nginx_one]
    if args.keyroll_baseline:
        # Another keyroll build (e.g. before a change), served the same JWKS
        # through its store file, in the same rounds.
        baseline = Keyroll(args.keyroll_baseline, [keyset("default")])
        shutil.copytree(daemon.dir / "store", baseline.dir / "store", dirs_exist_ok=True)
        wait_for("the baseline to serve the same JWKS", lambda: fetch(baseline.url())[2] == body, timeout=60)
        servers["baseline"] = (baseline.url(), [baseline.process.pid])
        others.append(baseline)
        say(f"  baseline: {args.keyroll_baseline}")
    for setting in SERVE_SETTINGS:
        if setting.isolated and (os.cpu_count() or 1) < 2:
            say(f"  -- {setting.title()}: skipped, one CPU")
            continue
        seconds = min(setting.seconds, args.serve_seconds or setting.seconds)
        serve_rounds(servers, rounds, dataclasses.replace(setting, seconds=seconds))
    for server in [daemon, *others]:
        server.stop()


def serve_rounds(servers, rounds, setting):
    """One wrk setting: every server in alternated rounds; a table of
    medians with each keyroll build's ratios to both nginx configurations."""
    say(f"  -- {setting.title()}")
    every_cpu = set(range(os.cpu_count() or 1))
    client_cpus = {0} if setting.isolated else None
    options = dict(threads=setting.threads, connections=setting.connections, cpus=client_cpus,
                   script=THINK_TIME if setting.fixed_load else None)
    server_cpus = every_cpu - {0} if setting.isolated else every_cpu
    try:
        for _, pids in servers.values():
            pin(pids, server_cpus)
    except PermissionError:
        say("     skipped: cannot set the servers' CPU affinity (run as root)")
        return
    busy = (spawn(["taskset", "-c", ",".join(map(str, sorted(server_cpus))), "sh", "-c", "while :; do :; done"])
            if setting.busy_neighbour else None)
    results = {name: [] for name in servers}
    for url, _ in servers.values():
        wrk(url, seconds=1, **options)  # warm-up
    for r in range(rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        for name in order:
            url, pids = servers[name]
            results[name].append(wrk(url, pids, setting.seconds, **options))
    if busy:
        busy.kill()
        busy.wait()
    for _, pids in servers.values():
        pin(pids, every_cpu)
    keyrolls = [name for name in servers if not name.startswith("nginx")]
    header = ["median of rounds", "nginx", "nginx-1w"]
    for name in keyrolls:
        header += [name, "/nginx", "/nginx-1w", "per round /nginx-1w"]
    rows = []
    for metric, label in (("rps", "requests/s"), ("p50", "p50 latency"), ("p99", "p99 latency"),
                          ("max", "max latency"), ("cpu", "server CPU per request")):
        show = (lambda v: f"{v:,.0f}") if metric == "rps" else fmt_s
        median = lambda name: statistics.median(x[metric] for x in results[name])
        row = [label, show(median("nginx")), show(median("nginx-1w"))]
        for name in keyrolls:
            ratios = {ref: [a[metric] / b[metric] for a, b in zip(results[name], results[ref])]
                      for ref in ("nginx", "nginx-1w")}
            row += [show(median(name)), f"{statistics.median(ratios['nginx']):.2f}x",
                    f"{statistics.median(ratios['nginx-1w']):.2f}x",
                    " ".join(f"{x:.2f}" for x in ratios["nginx-1w"])]
        rows.append(row)
    table(header, rows)
    say()


def pin(pids, cpus):
    """Every thread of `pids` on `cpus` only."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except ProcessLookupError:
                pass  # the thread just exited


def section_keygen_p99(args):
    say(f"== JWKS p99 while an RSA-4096 key is generated, wrk -d{args.gen_seconds}s, "
        f"{args.rounds} alternated rounds")
    say("   keyroll: SIGHUP adds a keyset with rsa_bits = 4096 (the daemon generates its two keys)")
    say("   nginx:   two `openssl genpkey` RSA-4096 loops run beside it for the whole window")
    say("            (keyroll generates the active and the next key in parallel)")
    daemon = Keyroll(args.keyroll, [keyset("default")])
    headers, body = served_reference(daemon)
    nginx = Nginx(body, headers)
    results = {(s, g): [] for s in ("keyroll", "nginx") for g in (False, True)}
    generation_times = []
    for r in range(args.rounds):
        for generating in (False, True) if r % 2 == 0 else (True, False):
            # keyroll
            if generating:
                name = f"gen{r}"
                daemon.keysets.append(keyset(name, ("RS256",), 4096))
                daemon.write_config()
                started = time.monotonic()
                appeared = {}

                def watch(name=name, started=started, appeared=appeared):
                    wait_for(f"keyset {name}", lambda: fetch(daemon.url(f"/keysets/{name}/jwks.json"))[0] == 200,
                             timeout=600, every=0.1)
                    appeared["at"] = time.monotonic() - started

                watcher = threading.Thread(target=watch)
                daemon.process.send_signal(signal.SIGHUP)
                watcher.start()
            results[("keyroll", generating)].append(wrk(daemon.url(), seconds=args.gen_seconds))
            if generating:
                watcher.join()
                generation_times.append(appeared["at"])
                if appeared["at"] > args.gen_seconds:
                    say(f"   (round {r}: the keyset appeared after {appeared['at']:.1f}s, "
                        f"past the {args.gen_seconds}s window: that round underestimates)")
            # nginx
            hog = None
            if generating:
                loop = (f"end=$(( $(date +%s) + {args.gen_seconds + 1} )); "
                        "while [ $(date +%s) -lt $end ]; do openssl genpkey -algorithm RSA "
                        "-pkeyopt rsa_keygen_bits:4096 -out /dev/null 2>/dev/null; done")
                hog = spawn(["sh", "-c", f"({loop}) & ({loop}); wait"])
            results[("nginx", generating)].append(wrk(nginx.url(), seconds=args.gen_seconds))
            if hog:
                hog.wait()
    daemon.stop()
    nginx.stop()
    median = lambda server, generating, metric: statistics.median(
        x[metric] for x in results[(server, generating)])
    rows = []
    for metric, label in (("p99", "p99 latency"), ("max", "max latency"), ("rps", "requests/s")):
        show = (lambda v: f"{v:,.0f}") if metric == "rps" else fmt_s
        row = [label]
        for server in ("keyroll", "nginx"):
            idle, gen = median(server, False, metric), median(server, True, metric)
            row += [show(idle), show(gen), f"{gen / idle:.2f}x"]
        row.append(f"{median('keyroll', True, metric) / median('nginx', True, metric):.2f}x")
        rows.append(row)
    table(["median of rounds", "keyroll idle", "generating", "ratio", "nginx idle", "generating",
           "ratio", "keyroll/nginx generating"], rows)
    say(f"  keyroll: the RSA-4096 keyset was served {', '.join(f'{t:.1f}s' for t in generation_times)} "
        "after SIGHUP (two keys generated)")
    say()


def keyroll_keygen_samples(args, alg, bits, runs):
    out = subprocess.run([args.keygen_bench, "--bench", "--samples", alg, str(bits), str(runs)],
                         capture_output=True, text=True, check=True).stdout
    return [float(x) for x in out.split()]


def openssl_samples(command, runs):
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - start)
    return samples


def section_genpkey(args):
    say(f"== Key generation (private key + PKCS#8 PEM) vs `openssl genpkey`, per key, "
        f"{args.rounds} alternated rounds")
    say("   openssl runs one process per key: the median of `openssl pkey` reading and writing a key")
    say("   of the same kind (start-up, providers, PEM), measured in the same rounds, is subtracted")
    specs = [("ES256", 256, "EC", ["-pkeyopt", "ec_paramgen_curve:P-256"], 40),
             ("RS256", 2048, "RSA", ["-pkeyopt", "rsa_keygen_bits:2048"], 12),
             ("RS256", 3072, "RSA", ["-pkeyopt", "rsa_keygen_bits:3072"], 4),
             ("RS256", 4096, "RSA", ["-pkeyopt", "rsa_keygen_bits:4096"], 3)]
    scratch = scratch_dir("genpkey-bench-")
    rows = []
    for alg, bits, kind, options, runs in specs:
        generate = ["openssl", "genpkey", "-algorithm", kind, *options]
        sample_key = scratch / f"{alg}-{bits}.pem"
        subprocess.run([*generate, "-out", str(sample_key)], check=True, capture_output=True)
        overhead_command = ["openssl", "pkey", "-in", str(sample_key), "-out", "/dev/null"]
        ours, theirs, overhead = [], [], []
        for r in range(args.rounds):
            openssl_round = lambda: (theirs.extend(openssl_samples([*generate, "-out", "/dev/null"], runs)),
                                     overhead.extend(openssl_samples(overhead_command, runs)))
            if r % 2 == 0:
                ours += keyroll_keygen_samples(args, alg, bits, runs)
                openssl_round()
            else:
                openssl_round()
                ours += keyroll_keygen_samples(args, alg, bits, runs)
        k = statistics.median(ours)
        raw = statistics.median(theirs)
        o = raw - statistics.median(overhead)
        label = "ES256 (P-256)" if alg == "ES256" else f"RS256 {bits}"
        # When the overhead is most of openssl's time, the difference is noise.
        ratio = f"{k / o:.2f}x" if o > 0.2 * raw else "n/a: overhead dominates"
        rows.append([label, fmt_s(k), fmt_s(quantile(ours, 0.9)), fmt_s(raw),
                     fmt_s(max(o, 0)), ratio, str(len(ours))])
    shutil.rmtree(scratch, ignore_errors=True)
    table(["key", "keyroll median", "keyroll p90", "openssl per run", "minus overhead",
           "keyroll/openssl", "keys"], rows)
    say()


def rotate_once(daemon, signing_dir):
    """One `keyroll rotate --now --alg ES256` against `daemon`: (rotate start
    -> served, CLI run, store write landed -> served and in signing_dir)."""
    before = fetch(daemon.url())[1].get("etag")
    kid_file = signing_dir / "ES256.kid"
    kid_before = kid_file.read_text()
    start = time.time()
    daemon.cli("rotate", "--now", "--alg", "ES256")
    cli_done = time.time()
    # The save renamed the new document into place, which set its ctime
    # (the kernel's coarse clock: up to a few ms early, never late).
    landed = (daemon.dir / "store" / "default.json").stat().st_ctime_ns / 1e9
    wait_for("the new JWKS and signing key",
             lambda: fetch(daemon.url())[1].get("etag") not in (None, before)
             and kid_file.read_text() != kid_before,
             timeout=120, every=0.002)
    served = time.time()
    return served - start, cli_done - start, served - landed


def section_rotate(args):
    say(f"== `keyroll rotate --now --alg ES256` until the new key is served over HTTP and written "
        f"to signing_dir, file store, {args.rotations} rotations per build")
    say("   default keyset (ES256 + RS256 2048) with signing_dir; the CLI generates the "
        "replacement next key and saves; the daemon notices the store change")
    builds = {"keyroll": args.keyroll}
    if args.keyroll_baseline:
        builds["baseline"] = args.keyroll_baseline
    daemons = {name: Keyroll(binary, [keyset("default") + "signing_dir = 'signing'\n"])
               for name, binary in builds.items()}
    for daemon in daemons.values():
        wait_for("signing_dir", lambda d=daemon: (d.dir / "signing" / "ES256.kid").exists(), timeout=60)
    results = {name: {"total": [], "cli": [], "landed": []} for name in daemons}
    rng = random.Random(7)
    for r in range(args.rotations):
        order = list(daemons) if r % 2 == 0 else list(reversed(daemons))
        for name in order:
            # A random phase against a polling daemon's 500 ms cycle; back to
            # back, every rotation would land at the same point of it.
            time.sleep(rng.uniform(0, 0.6))
            total, cli, landed = rotate_once(daemons[name], daemons[name].dir / "signing")
            results[name]["total"].append(total)
            results[name]["cli"].append(cli)
            results[name]["landed"].append(landed)
    for daemon in daemons.values():
        daemon.stop()
    rows = []
    for name in daemons:
        for label, key in (("write landed -> served + signing_dir", "landed"),
                           ("rotate start -> served", "total"), ("  of which the CLI", "cli")):
            xs = results[name][key]
            rows.append([f"{name}: {label}"] + [fmt_s(f(xs)) for f in
                        (min, statistics.median, lambda v: quantile(v, 0.9), max)])
    table(["", "min", "median", "p90", "max"], rows)
    if "baseline" in results:
        ratio = statistics.median(results["keyroll"]["landed"]) / statistics.median(results["baseline"]["landed"])
        say(f"  baseline: {args.keyroll_baseline}")
        say(f"  write landed -> served, median keyroll / baseline: {ratio:.2f}x")
    say()


def idle_figures(pids, seconds):
    before = [thread_cpu(p) for p in pids]
    time.sleep(seconds)
    after = [thread_cpu(p) for p in pids]
    # Per thread: a thread that exits meanwhile (an idle blocking-pool
    # thread) takes its CPU time with it, which summed totals would count
    # as negative; threads born meanwhile count from zero.
    cpu = sum(ns - start.get(tid, 0) for start, end in zip(before, after) for tid, ns in end.items())
    return sum(rss_kib(p) for p in pids), cpu / 1e9 * 60 / seconds


def thread_cpu(pid):
    """Thread id -> CPU time in nanoseconds, for each live thread of `pid`."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread just exited
    return times


def section_idle(args):
    say(f"== Idle: RSS and CPU per minute, measured together over {args.idle_seconds}s "
        "(scaled to a minute; CPU from /proc/PID/task/*/schedstat)")
    say("   the embedded default's shape: file store, HTTP, one keyset (ES256 + RS256), "
        "reconcile_interval 30s")
    daemon = Keyroll(args.keyroll, [keyset("default")])
    headers, body = served_reference(daemon)
    nginx = Nginx(body, headers)
    measured = {"keyroll": [daemon.process.pid], "nginx": nginx.pids()}
    servers = [daemon, nginx]
    if args.keyroll_baseline:
        baseline = Keyroll(args.keyroll_baseline, [keyset("default")])
        measured["baseline"] = [baseline.process.pid]
        servers.append(baseline)
    time.sleep(2)  # let start-up work settle
    results = {}
    threads = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(n, idle_figures(p, args.idle_seconds)))
               for n, p in measured.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    thread_counts = {n: sum(len(os.listdir(f"/proc/{pid}/task")) for pid in p) for n, p in measured.items()}
    private = {n: sum(rss_anon_kib(pid) for pid in p) for n, p in measured.items()}
    for server in servers:
        server.stop()
    n_rss, n_cpu = results["nginx"]
    header = ["", "nginx (master + workers)"]
    rows = [["RSS", f"{n_rss / 1024:.1f} MiB"], ["CPU per minute", f"{n_cpu * 1000:.0f} ms"],
            ["threads (processes for nginx)", str(thread_counts["nginx"])],
            ["  of the RSS, private (RssAnon)", f"{private['nginx'] / 1024:.1f} MiB"]]
    for name in measured:
        if name == "nginx":
            continue
        rss, cpu = results[name]
        header += [name, f"{name}/nginx"]
        rows[0] += [f"{rss / 1024:.1f} MiB", f"{rss / n_rss:.2f}x"]
        rows[1] += [f"{cpu * 1000:.1f} ms", f"{cpu / n_cpu:.1f}x" if n_cpu > 0 else "(nginx: 0)"]
        rows[2] += [str(thread_counts[name]), ""]
        rows[3] += [f"{private[name] / 1024:.1f} MiB", f"{private[name] / private['nginx']:.2f}x"]
    table(header, rows)
    if args.keyroll_baseline:
        say(f"  baseline: {args.keyroll_baseline}")
    say("  RSS less RssAnon is the executable's code and read-only data mapped from the page cache")
    say()


def rss_anon_kib(pid):
    """Private memory: RSS less the file-backed pages (code, read-only data)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def process_cpu_seconds(pid):
    """CPU time of `pid` including its threads that have exited (utime +
    stime of /proc/PID/stat, in clock ticks): a daemon's blocking-pool
    threads exit while it idles, and /proc/PID/task/* forgets theirs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_all_threads(pid, seconds):
    """RSS, and CPU seconds a minute over `seconds`: from `perf stat`'s
    task-clock (every thread, to the nanosecond, threads that exit in the
    window included) where perf can attach, else from /proc/PID/stat, whose
    10 ms ticks charge a pass of a millisecond a whole tick at times."""
    if shutil.which("perf"):
        out = subprocess.run(["perf", "stat", "-x", ",", "-e", "task-clock", "-p", str(pid),
                              "--", "sleep", str(seconds)], capture_output=True, text=True)
        for line in out.stderr.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("task-clock") and fields[1] == "msec":
                return rss_kib(pid), float(fields[0]) / 1000 * 60 / seconds
    before = process_cpu_seconds(pid)
    time.sleep(seconds)
    return rss_kib(pid), (process_cpu_seconds(pid) - before) * 60 / seconds


def section_many(args):
    count = 1000
    say(f"== The daemon with {count:,} ES256 keysets (file store); idle figures over "
        f"{args.many_idle_seconds}s from 20s after start, scaled to a minute (reconcile_interval 30s; CPU from "
        f"{'perf stat task-clock' if shutil.which('perf') else '/proc/PID/stat, 10 ms ticks'}, "
        "all threads)")
    sets = [keyset(f"keyset-{n:04}", ("ES256",)) for n in range(count)]
    daemons = {"one": Keyroll(args.keyroll, [keyset("keyset-0000", ("ES256",))]),
               "many": Keyroll(args.keyroll, sets)}
    if args.keyroll_baseline:
        daemons["baseline"] = Keyroll(args.keyroll_baseline, sets)
    # Ready means published; the saves of the bootstrap pass then wake a
    # pass over the 1,000 documents they changed, and the blocking threads
    # of both idle out: the window starts after that.
    time.sleep(20)
    results = {}
    threads = [threading.Thread(target=lambda n=n, p=d.process.pid: results.__setitem__(
                   n, idle_cpu_all_threads(p, args.many_idle_seconds)))
               for n, d in daemons.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A pass over every keyset, as every reconcile_interval makes one:
    # SIGHUP (which also reads the config again).
    full_pass = {}
    for name in [n for n in daemons if n != "one"]:
        pid = daemons[name].process.pid
        before = process_cpu_seconds(pid)
        daemons[name].process.send_signal(signal.SIGHUP)
        time.sleep(3)
        full_pass[name] = process_cpu_seconds(pid) - before
    one, many = daemons["one"], daemons["many"]
    header = ["", "1 keyset", f"{count:,} keysets", "ratio"]
    rows = [["start until /readyz (bootstrap pass)", fmt_s(one.ready_after), fmt_s(many.ready_after),
             f"{many.ready_after / one.ready_after:.0f}x"],
            ["idle RSS", f"{results['one'][0] / 1024:.1f} MiB", f"{results['many'][0] / 1024:.1f} MiB",
             f"{results['many'][0] / results['one'][0]:.1f}x"],
            ["idle CPU per minute", f"{results['one'][1] * 1000:.1f} ms",
             f"{results['many'][1] * 1000:.1f} ms",
             f"{results['many'][1] / results['one'][1]:.0f}x" if results["one"][1] else "-"],
            ["CPU of a SIGHUP pass over every keyset", "", fmt_s(full_pass["many"]), ""]]
    if "baseline" in daemons:
        base = daemons["baseline"]
        header += [f"baseline, {count:,} keysets", "keyroll / baseline"]
        rows[0] += [fmt_s(base.ready_after), f"{many.ready_after / base.ready_after:.2f}x"]
        rows[1] += [f"{results['baseline'][0] / 1024:.1f} MiB",
                    f"{results['many'][0] / results['baseline'][0]:.2f}x"]
        rows[2] += [f"{results['baseline'][1] * 1000:.1f} ms",
                    f"{results['many'][1] / results['baseline'][1]:.3f}x" if results["baseline"][1] else "-"]
        rows[3] += [fmt_s(full_pass["baseline"]), f"{full_pass['many'] / full_pass['baseline']:.2f}x"]
    for daemon in daemons.values():
        daemon.stop()
    table(header, rows)
    # Watched (inotify), a timer pass reads only what is due; each document
    # is still read once an hour (daemon.rs WATCHED_REREAD), which the idle
    # window above rarely holds: add it, at the SIGHUP pass's cost.
    hourly = full_pass["many"] / 60
    say(f"  keyroll re-reads every document of a watched store once an hour: "
        f"{hourly * 1000:.1f} ms a minute at the SIGHUP pass's cost, so "
        f"{(results['many'][1] + hourly) * 1000:.1f} ms a minute in all with 1,000 keysets")
    if "baseline" in daemons:
        say(f"  the baseline reconciles every keyset at every reconcile_interval (30s): about "
            f"{full_pass['baseline'] * 1000 * 2:.0f} ms a minute at its SIGHUP pass's cost")
    if args.keyroll_baseline:
        say(f"  baseline: {args.keyroll_baseline}")
    say()


def section_reconcile(args):
    say("== One reconcile pass over 1,000 keysets (benches/reconcile.rs, in-process)")
    env = dict(os.environ, KEYROLL_BENCH_ROUNDS=str(args.rounds))
    out = subprocess.run([args.reconcile_bench, "--bench"], capture_output=True, text=True,
                         check=True, env=env).stdout
    say(out.rstrip())
    say()


def section_signer(args):
    say("== The signer: tokens over the Unix socket vs in-process (benches/signer.rs)")
    out = subprocess.run([args.signer_bench, "--bench"], capture_output=True, text=True,
                         check=True).stdout
    say(out.rstrip())
    say()


SECTIONS = {
    "serve": section_serve,
    "keygen": section_keygen_p99,
    "genpkey": section_genpkey,
    "rotate": section_rotate,
    "idle": section_idle,
    "many": section_many,
    "reconcile": section_reconcile,
    "signer": section_signer,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keyroll", required=True)
    parser.add_argument("--keygen-bench", required=True)
    parser.add_argument("--reconcile-bench", required=True)
    parser.add_argument("--signer-bench", required=True)
    parser.add_argument("--keyroll-baseline",
                        help="another keyroll binary to measure beside (serve, idle, rotate and many sections)")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 2)))
    parser.add_argument("--serve-seconds", type=int, default=0,
                        help="cap each wrk run of the serve section (default: 5s and 8s)")
    parser.add_argument("--gen-seconds", type=int, default=10)
    parser.add_argument("--idle-seconds", type=int, default=20)
    parser.add_argument("--many-idle-seconds", type=int, default=60,
                        help="idle window of the 1,000-keyset daemon (two reconcile_intervals)")
    parser.add_argument("--rotations", type=int, default=15)
    args = parser.parse_args()
    for name in ("keyroll", "keygen_bench", "reconcile_bench", "signer_bench", "keyroll_baseline"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    only = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        die(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    load = os.getloadavg()
    say(f"keyroll benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    say()
    for name, section in SECTIONS.items():
        if not only or name in only:
            section(args)
    load = os.getloadavg()
    say(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

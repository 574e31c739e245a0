#!/usr/bin/env python3
"""The functions a running keyroll executes once started, for the linker.

Code is mapped from the executable file, and the kernel maps 64 KiB around
every page a process touches (fault-around). An idle daemon runs only a few
hundred functions, but scattered over 13 MiB of `.text` they kept 4 MiB of
code resident (issue 13). `link/hot-text.txt` lists those functions;
`build.rs` hands it to lld (`--symbol-ordering-file`), which places them
first and together.

This script writes that list: it runs a release keyroll under valgrind's
callgrind on the embedded default's shape (file store, HTTP, one keyset),
counts from the moment the daemon drops its start-up code
(`--zero-before=*release_startup_pages*`), and records every function with
a cost in the executable:

  1. serving and idling: the JWKS (200, 304, HEAD), /metrics, /readyz,
     /healthz, a 404, and timer passes;
  2. changes: a SIGHUP pass that reads every document, and a rotation by
     the CLI that the daemon reads, publishes and follows with a new key.

Symbol names are stable while a crate's version, features and dependencies
stay the same (the release profile's single codegen unit keeps LLVM's
`.llvm.NNN` suffixes away); a name that disappears is skipped by lld, and
`--check` says how much of the list a binary still has. Regenerate after a
dependency update or a change to the serving or reconcile path:

  python3 bench/hot_text.py                  # builds release, writes the list
  python3 bench/hot_text.py --check BINARY   # listed functions found in BINARY

Needs valgrind (Debian `valgrind`); installs it with apt-get when run as root.
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import fetch, free_port, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ORDER_FILE = REPO / "link" / "hot-text.txt"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", help="a release keyroll to profile (default: cargo build --release)")
    parser.add_argument("--check", metavar="BINARY", help="only report how much of the list BINARY has")
    parser.add_argument("--out", default=str(ORDER_FILE), help=f"where to write (default: {ORDER_FILE})")
    parser.add_argument("--require", type=float, metavar="FRACTION",
                        help="with --check: fail unless the list was applied and at least this "
                             "fraction of it is in the binary (CI)")
    args = parser.parse_args()
    if args.check:
        return check(Path(args.check), require=args.require)
    ensure_valgrind()
    binary = Path(args.binary).resolve() if args.binary else build_release()
    tiers = profile(binary)
    write_order(Path(args.out), tiers, binary)
    check(binary, Path(args.out))
    return 0


def ensure_valgrind():
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("hot_text: valgrind is missing: apt-get install valgrind")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def build_release():
    subprocess.run(["cargo", "build", "--release", "--bin", "keyroll"], cwd=REPO, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    return (target if target.is_absolute() else REPO / target).resolve() / "release" / "keyroll"


def profile(binary):
    """(tier name, [symbols]) for each stage, in the order they ran."""
    work = Path(tempfile.mkdtemp(prefix="keyroll-hot-text-"))
    try:
        return run_stages(binary, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_stages(binary, work):
    port = free_port()
    config = work / "keyroll.toml"
    # A short reconcile_interval so that timer passes happen within seconds;
    # everything else is the embedded default's shape.
    config.write_text(
        'reconcile_interval = "2s"\n'
        f"state_dir = '{work / 'state'}'\n"
        f"[store]\ntype = \"file\"\ndir = '{work / 'store'}'\n"
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        '[[keysets]]\nname = "default"\nalgorithms = ["ES256", "RS256"]\n')
    dumps = work / "callgrind"
    dumps.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "KEYROLL_CONFIG")}
    # The daemon logs "start-up code unmapped" at debug level: the moment
    # the counts start, before which no request may come (a thread's first
    # request also initialises its thread-locals, and that code must count).
    env["RUST_LOG"] = "warn,keyroll::daemon=debug"
    log_path = work / "keyroll.log"
    with open(log_path, "wb") as log:
        return drive(binary, work, config, dumps, env, log, log_path, port)


def drive(binary, work, config, dumps, env, log, log_path, port):
    """Runs the daemon under callgrind through both stages; their functions."""
    daemon = subprocess.Popen(
        # Counts start when the daemon drops its start-up code from memory
        # (src/footprint.rs): what runs from then on is what stays resident.
        ["valgrind", "--tool=callgrind", "--demangle=no", "--zero-before=*release_startup_pages*",
         f"--callgrind-out-file={dumps}/out",
         str(binary), "--config", str(config), "run"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=work)
    base = f"http://127.0.0.1:{port}"
    jwks = f"{base}/.well-known/jwks.json"
    try:
        wait_for("keyroll to drop its start-up code, under valgrind",
                 lambda: alive(daemon, work) and b"start-up code unmapped" in log_path.read_bytes())
        counting = time.monotonic()

        stamp = reconcile_stamp(base)
        for _ in range(3):
            _, headers, _ = fetch(jwks)
            fetch(jwks, {"If-None-Match": headers.get("etag", "")})
            head(jwks)
            for path in ("/metrics", "/readyz", "/healthz", "/no-such-page"):
                fetch(base + path)
            clients_that_keep_or_drop_connections(port)
        # Three timer passes move it by about 3 x reconcile_interval; and
        # idle blocking-pool threads exit after tokio's 10 s keep-alive.
        wait_for("three timer passes", lambda: reconcile_stamp(base) >= stamp + 5, timeout=60)
        time.sleep(max(0.0, counting + 15 - time.monotonic()))
        callgrind(daemon, "-d", "serve-and-idle")
        callgrind(daemon, "-z")

        stamp = reconcile_stamp(base)
        daemon.send_signal(signal.SIGHUP)
        wait_for("the SIGHUP pass", lambda: reconcile_stamp(base) > stamp, timeout=60)
        _, headers, _ = fetch(jwks)
        subprocess.run([str(binary), "--config", str(config), "rotate", "--now", "default"],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("the rotation served", lambda: fetch(jwks)[1].get("etag") != headers.get("etag"), timeout=120)
        for path in ("/metrics", "/readyz"):
            fetch(base + path)
        stamp = reconcile_stamp(base)
        wait_for("a timer pass after the rotation", lambda: reconcile_stamp(base) > stamp, timeout=60)
        callgrind(daemon, "-d", "changes")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    files = sorted(dumps.glob("out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    symbols = functions_with_cost(files, binary.name)
    return [("serve and idle: the JWKS, /metrics, probes, timer passes", symbols[-2]),
            ("changes: a SIGHUP pass, a rotation read and published, a new key made", symbols[-1])]


def alive(daemon, work):
    if daemon.poll() is not None:
        sys.exit(f"hot_text: keyroll exited with {daemon.returncode}:\n"
                 + (work / "keyroll.log").read_text(errors="replace")[-4000:])
    return True


def callgrind(daemon, *command):
    subprocess.run(["callgrind_control", *command, str(daemon.pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def head(url):
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5).read()
    except OSError:
        pass


def clients_that_keep_or_drop_connections(port):
    """What real clients do besides one request per connection: two
    requests on one kept connection, and a connection closed mid-request."""
    import http.client
    import socket
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(2):
        kept.request("GET", "/.well-known/jwks.json")
        kept.getresponse().read()
    kept.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as dropped:
        dropped.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x")


def reconcile_stamp(base):
    """The keyset's last reconcile success, in seconds: every pass moves it."""
    status, _, body = fetch(f"{base}/metrics")
    if status != 200:
        return 0
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("keyroll_last_reconcile_success_timestamp_seconds"):
            total += float(line.rsplit(" ", 1)[1])
    return total


CALLGRIND_NAME = re.compile(r"^(ob|fn|cob|cfn|fl|fi|fe|cfi|cfl)=\((\d+)\)(?: (.*))?$")


def functions_with_cost(files, executable):
    """For each dump, the functions of `executable` that have a cost in it.
    Callgrind compresses names across the dumps of one run, so the dumps are
    read in order."""
    names, objects, per_dump = {}, {}, []
    for path in files:
        current_object, seen, order = None, set(), []
        for line in path.read_text(errors="replace").splitlines():
            match = CALLGRIND_NAME.match(line)
            if not match:
                continue
            kind, ident, name = match.groups()
            if kind in ("fl", "fi", "fe", "cfi", "cfl"):
                continue
            table = objects if kind in ("ob", "cob") else names
            if name is not None:
                table[ident] = name
            if kind == "ob":
                current_object = objects.get(ident, "")
            elif kind == "fn" and os.path.basename(current_object or "") == executable:
                symbol = names[ident]
                # Callgrind's own entries, e.g. "(below main)" or "0x1ab70".
                if re.fullmatch(r"[A-Za-z_.$][\w.$]*", symbol) and symbol not in seen:
                    seen.add(symbol)
                    order.append(symbol)
        if order:
            per_dump.append(order)
    if len(per_dump) < 2:
        sys.exit(f"hot_text: expected two callgrind dumps with costs, found {len(per_dump)}")
    return per_dump


# Modules named for the CPU features their code needs: a crate picks one at
# run time. Valgrind hides some features (SHA-NI, AVX-512), so the variant
# that ran under it may not be the one a real CPU runs.
CPU_VARIANTS = {"soft", "x86", "x86_64", "x86_sha", "shani", "sse2", "ssse3", "sse41", "sse42",
                "avx", "avx2", "avx512", "aarch64", "neon", "generic", "fallback", "portable"}


def legacy_path(symbol):
    """The path of a legacy-mangled Rust symbol (`_ZN4sha26sha2563x86...E`),
    hash left out; [] for any other symbol."""
    if not symbol.startswith("_ZN"):
        return []
    parts, rest = [], symbol[3:]
    while rest and rest[0].isdigit():
        digits = re.match(r"\d+", rest).group()
        size = int(digits)
        parts.append(rest[len(digits):len(digits) + size])
        rest = rest[len(digits) + size:]
    return [p for p in parts if not re.fullmatch(r"h[0-9a-f]{16}", p)]


def cpu_variants(symbols, binary_functions):
    """Every variant of the CPU-dependent code the listed functions use: for
    `sha2::sha256::compress256` also `sha2::sha256::x86::digest_blocks`."""
    by_parent = {}
    for function in binary_functions:
        path = legacy_path(function)
        for i, part in enumerate(path[:-1]):
            if part in CPU_VARIANTS:
                by_parent.setdefault(tuple(path[:i]), []).append(function)
    extra = []
    for symbol in symbols:
        path = legacy_path(symbol)
        variant = next((i for i, part in enumerate(path[:-1]) if part in CPU_VARIANTS), None)
        parent = tuple(path[:variant] if variant is not None else path[:-1])
        extra.extend(by_parent.get(parent, []) if parent else [])
    return extra


def binary_functions(binary):
    """Function symbol -> (address, size) in `binary`."""
    out = subprocess.run(["nm", "-S", str(binary)], capture_output=True, text=True, check=True).stdout
    where = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tTwW":
            where[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
    return where


def write_order(path, tiers, binary):
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Functions a started keyroll runs, for lld's --symbol-ordering-file (build.rs).",
        "# Placed first in .text and together, they keep the idle daemon's resident",
        "# code small. Written by bench/hot_text.py; regenerate, do not edit.",
        f"# {datetime.date.today()}, {rustc}",
    ]
    listed = set()
    functions = binary_functions(binary)
    for title, symbols in tiers:
        symbols = symbols + cpu_variants(symbols, functions)
        fresh = sorted(set(s for s in symbols if s not in listed))
        listed.update(fresh)
        lines.append(f"# {title} ({len(fresh)})")
        lines.extend(fresh)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"hot_text: wrote {len(listed)} functions to {path}")


def listed_symbols(order_file):
    return [line.strip() for line in order_file.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def check(binary, order_file=ORDER_FILE, require=None):
    """How many listed functions `binary` has, and the span they take. With
    `require`, exit status 1 unless the linker applied the list (the span
    is about the size) and at least that fraction of it is there."""
    where = binary_functions(binary)
    listed = listed_symbols(order_file)
    found = [where[s] for s in listed if s in where]
    regenerate = "regenerate it: python3 bench/hot_text.py (needs valgrind)"
    if not found:
        print(f"hot_text: none of the {len(listed)} listed functions is in {binary}: {regenerate}")
        return 1 if require else 0
    start = min(a for a, _ in found)
    end = max(a + size for a, size in found)
    size = sum(size for _, size in found)
    # Placed by the linker, the span is about the size; a span many times
    # the size means the build was linked without the list (build.rs).
    print(f"hot_text: {len(found)} of {len(listed)} listed functions are in {binary}: "
          f"{size / 1024:.0f} KiB of code over a span of {(end - start) / 1024:.0f} KiB")
    if require is None:
        return 0
    if end - start > 2 * size:
        print("hot_text: the linker did not apply link/hot-text.txt (build.rs passes it to lld "
              "in release builds of x86_64 Linux with Rust 1.90 or later)")
        return 1
    if len(found) < require * len(listed):
        print(f"hot_text: less than {require:.0%} of link/hot-text.txt is in this build: {regenerate}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

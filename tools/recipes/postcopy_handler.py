#!/usr/bin/python3
"""The postcopy recipe's handler role in Python (Debian python3-grpcio, stubs generated from
protos/ by python3-grpc-tools at start).

The recipe runner starts it in place of the C# handler:

    uffdgrpc recipe postcopy --processes \
        --role-command handler="/usr/bin/python3 tools/recipes/postcopy_handler.py"

and it receives the role arguments every role process gets (--role handler --server URL
--machine ID --state key=value ... --wrong-handler NAME). It speaks the runner's line
protocol: "@recipe signal NAME" lines on stdin are signals other roles raised; it prints
"@recipe signal NAME" to raise one and "@recipe count KEY N" / "@recipe note TEXT" to report.

What it does is what src/UffdGrpc.Recipes/PostcopyHandler.cs does: a precopy pass reads
every source page into a cache; from switch-over on, one loop serves the destination uffd's
page faults first (UFFDIO_COPY, or UFFDIO_ZEROPAGE for a page of zeros, each cached page
checked against the source's page digest first) and pushes the next unsent page when no
fault waits; a page asked for is marked sent and never pushed again.
"""
import argparse
import hashlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

PAGE = 4096
PREFIX = "@recipe "


def generate_stubs():
    protos = os.environ.get("UFFDGRPC_PROTOS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "protos")
    out = tempfile.mkdtemp(prefix="uffd-py-recipe-")
    files = [os.path.join("uffd", "v1", f) for f in sorted(os.listdir(os.path.join(protos, "uffd", "v1"))) if f.endswith(".proto")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", protos, "--python_out", out, "--grpc_python_out", out] + files,
                   cwd=protos, check=True)
    sys.path.insert(0, out)


generate_stubs()

import grpc  # noqa: E402
from uffd.v1 import errno_pb2  # noqa: E402
from uffd.v1 import mm_pb2, mm_pb2_grpc  # noqa: E402
from uffd.v1 import thread_pb2, thread_pb2_grpc  # noqa: E402
from uffd.v1 import userfaultfd_pb2, userfaultfd_pb2_grpc  # noqa: E402

OK = errno_pb2.ERRNO_UNSPECIFIED
out_lock = threading.Lock()
counters = {}


def emit(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def count(key, n=1):
    counters[key] = counters.get(key, 0) + n


class Signals:
    """Signals from the runner (stdin); every arrival also goes to the handler's event queue."""

    def __init__(self, events):
        self.raised = set()
        self.cond = threading.Condition()
        self.events = events
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line.startswith(PREFIX + "signal "):
                name = line[len(PREFIX) + 7:]
                with self.cond:
                    self.raised.add(name)
                    self.cond.notify_all()
                self.events.put(("signal", name))

    def wait(self, name):
        with self.cond:
            while name not in self.raised:
                self.cond.wait()

    def raise_(self, name):
        emit(PREFIX + "signal " + name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--machine", type=int, required=True)
    ap.add_argument("--state", action="append", default=[])
    ap.add_argument("--wrong-handler")
    ap.add_argument("--seed")
    ap.add_argument("--stall-ms")
    ap.add_argument("--pages")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    if a.role != "handler":
        sys.exit("postcopy_handler.py runs the handler role only")
    state = dict(s.split("=", 1) for s in a.state)
    src, uffd = int(state["src"]), int(state["uffd"])
    base, pages = int(state["base"]), int(state["pages"])
    wrong = a.wrong_handler

    channel = grpc.insecure_channel(a.server.replace("http://", ""))
    mm = mm_pb2_grpc.MmServiceStub(channel)
    threads = thread_pb2_grpc.ThreadServiceStub(channel)
    uffds = userfaultfd_pb2_grpc.UserfaultfdServiceStub(channel)

    events = queue.Queue()
    signals = Signals(events)
    src_thread = threads.CreateThread(thread_pb2.CreateThreadRequest(mm_id=src)).thread.thread_id

    def read_source(page):
        # A read on a thread of the source process (the source's migration thread).
        op = thread_pb2.AccessOp(addr=base + page * PAGE, span=thread_pb2.ByteSpan(length=PAGE))
        r = threads.Access(thread_pb2.AccessRequest(thread_id=src_thread, access=op)).result
        if r.signal or r.errno != OK:
            raise RuntimeError("reading source page %d: signal %d errno %d" % (page, r.signal, r.errno))
        count("bytes-read-from-source", PAGE)
        return bytes(r.values)

    signals.wait("precopy")
    cache = [read_source(p) for p in range(pages)]
    count("precopy-pages", pages)
    signals.raise_("precopy-done")
    signals.wait("switchover")

    # The Serve stream: requests from a queue, responses split into messages (the event
    # queue, beside the signals) and results.
    requests = queue.Queue()
    results = queue.Queue()
    requests.put(userfaultfd_pb2.ServeRequest(uffd_id=uffd))

    def request_iter():
        while True:
            r = requests.get()
            if r is None:
                return
            yield r

    call = uffds.Serve(request_iter())

    def pump():
        try:
            for resp in call:
                if resp.messages:
                    events.put(("messages", list(resp.messages)))
                if resp.results:
                    results.put(list(resp.results))
        except grpc.RpcError:
            pass
        events.put(("ended", None))

    threading.Thread(target=pump, daemon=True).start()

    def place(page):
        addr = base + page * PAGE
        data = cache[page]
        if wrong != "stale-page":
            d = mm.Digest(mm_pb2.DigestRequest(mm_id=src, start=addr, pages=1)).pages[0]
            count("digest-checks")
            if hashlib.sha256(data).digest() != d.sha256:
                data = read_source(page)
                count("pages-reread")
        if any(data):
            return userfaultfd_pb2.Resolution(uffdio_copy=userfaultfd_pb2.UffdioCopyRequest(dst=addr, src=0x7F0000000000, len=PAGE, data=data))
        return userfaultfd_pb2.Resolution(uffdio_zeropage=userfaultfd_pb2.UffdioZeropageRequest(start=addr, len=PAGE))

    def resolve(res):
        if not res:
            return
        count("round-trips")
        requests.put(userfaultfd_pb2.ServeRequest(resolutions=res))
        wakes = []
        for op, r in zip(res, results.get()):
            kind = op.WhichOneof("op")
            if r.errno == errno_pb2.ERRNO_EEXIST:
                count("eexist")
                addr = op.uffdio_copy.dst if kind == "uffdio_copy" else op.uffdio_zeropage.start
                wakes.append(userfaultfd_pb2.Resolution(uffdio_wake=userfaultfd_pb2.UffdioWakeRequest(start=addr, len=PAGE)))
            elif r.errno != OK:
                raise RuntimeError("postcopy placement: errno %d" % r.errno)
            elif kind == "uffdio_copy":
                count("pages-copied")
                count("bytes-copied", PAGE)
            elif kind == "uffdio_zeropage":
                count("pages-zeroed")
            else:
                count("wakes")
        if wakes:
            count("round-trips")
            requests.put(userfaultfd_pb2.ServeRequest(resolutions=wakes))
            results.get()

    sent = [False] * pages
    nxt = 0
    # The push's bandwidth in pages per second (--set push-rate=N; 0: unlimited), as the C# handler.
    rate = float(dict(s.split("=", 1) for s in a.set).get("push-rate", "200"))
    started = time.monotonic()
    pushed = 0
    # Until the guest ended and every page was sent (the migration completes).
    while "guest-done" not in signals.raised or nxt < pages:
        try:
            kind, value = events.get_nowait()
        except queue.Empty:
            while nxt < pages and sent[nxt]:
                nxt += 1
            if nxt >= pages and "guest-done" in signals.raised:
                break
            due = (pushed / rate) - (time.monotonic() - started) if rate > 0 else 0
            if nxt < pages and due > 0:
                # Ahead of the push's bandwidth: wait for it, or for a fault.
                try:
                    kind, value = events.get(timeout=due)
                except queue.Empty:
                    continue
            elif nxt < pages:
                pushed += 1
                # The background push: the next page nobody asked for.
                sent[nxt] = True
                count("pushed")
                resolve([place(nxt)])
                continue
            else:
                kind, value = events.get()
        if kind == "ended":
            break
        if kind != "messages":
            continue
        res = []
        for m in value:
            if m.WhichOneof("arg") != "pagefault":
                continue
            count("faults")
            page = ((m.pagefault.address & ~0xFFF) - base) // PAGE
            if wrong == "wake-without-copy":
                sent[page] = True
                res.append(userfaultfd_pb2.Resolution(uffdio_wake=userfaultfd_pb2.UffdioWakeRequest(start=base + page * PAGE, len=PAGE)))
                continue
            if sent[page]:
                count("faults-on-sent-pages")
                continue
            sent[page] = True
            res.append(place(page))
        resolve(res)

    requests.put(None)
    call.cancel()
    count("python-handler")
    for k in sorted(counters):
        emit("%scount %s %d" % (PREFIX, k, counters[k]))


if __name__ == "__main__":
    main()

"""A UffdGrpc client in Python (Debian python3-grpcio + stubs generated from protos/).

usage: uffd_client.py HOST:PORT STUBS_DIR

Health check, map a page, register it for WP, write-protect it, start a write that blocks
in the userfault, read the fault event from the stream, resolve it with
UFFDIO_WRITEPROTECT mode=0, and see the write complete; then the same through the batched
Serve stream (with an EEXIST in the same batch). Kernel errnos come back in-band
(status OK, the response's `errno` field); only a malformed request or an unknown id is a
gRPC status.
"""
import queue
import sys
import threading

sys.path.insert(0, sys.argv[2])

import grpc  # noqa: E402
from uffd.v1 import errno_pb2  # noqa: E402
from uffd.v1 import inject_pb2, inject_pb2_grpc  # noqa: E402
from uffd.v1 import machine_pb2, machine_pb2_grpc  # noqa: E402
from uffd.v1 import mm_pb2, mm_pb2_grpc  # noqa: E402
from uffd.v1 import thread_pb2, thread_pb2_grpc  # noqa: E402
from uffd.v1 import userfaultfd_pb2, userfaultfd_pb2_grpc  # noqa: E402

A = 0x7E0000000000
PAGE = 4096


def errno_name(e):
    # The in-band errno: ERRNO_UNSPECIFIED (0) is success, else ERRNO_EEXIST etc.
    return "ok" if e == errno_pb2.ERRNO_UNSPECIFIED else errno_pb2.Errno.Name(e)[len("ERRNO_"):]


def expect_ok(what, e):
    if e != errno_pb2.ERRNO_UNSPECIFIED:
        raise RuntimeError("%s: %s" % (what, errno_name(e)))


def health(channel):
    # grpc.health.v1.Health/Check without generated stubs: an empty HealthCheckRequest, and
    # HealthCheckResponse{status = 1 (SERVING)} is field 1, varint.
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda _: b"",
                                response_deserializer=lambda b: b)
    raw = check(None, timeout=10)
    status = raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0
    return {1: "SERVING", 2: "NOT_SERVING"}.get(status, "UNKNOWN")


def touch(addr, write=False, value=0):
    return thread_pb2.AccessOp(addr=addr, write=write, touch=thread_pb2.TouchPattern(pages=1, value=value))


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    print("health:", health(channel))
    machines = machine_pb2_grpc.MachineServiceStub(channel)
    mm = mm_pb2_grpc.MmServiceStub(channel)
    threads = thread_pb2_grpc.ThreadServiceStub(channel)
    uffd = userfaultfd_pb2_grpc.UserfaultfdServiceStub(channel)
    inject = inject_pb2_grpc.FaultInjectionServiceStub(channel)

    machine = machines.CreateMachine(machine_pb2.CreateMachineRequest()).machine.machine_id
    try:
        proc = mm.CreateMm(mm_pb2.CreateMmRequest(machine_id=machine)).mm.mm_id
        thread = threads.CreateThread(thread_pb2.CreateThreadRequest(mm_id=proc)).thread.thread_id
        mapped = mm.Mmap(mm_pb2.MmapRequest(mm_id=proc, addr=A, len=PAGE, prot=3))
        expect_ok("mmap", mapped.errno)
        first = threads.Access(thread_pb2.AccessRequest(thread_id=thread, access=touch(A, True, 0x11))).result
        print("map 0x%x + first write: %s" % (mapped.addr, errno_name(first.errno)))

        created = uffd.Userfaultfd(userfaultfd_pb2.UserfaultfdRequest(mm_id=proc, flags=0x80800))
        expect_ok("userfaultfd", created.errno)
        u = created.uffd_id
        api = uffd.UffdioApi(userfaultfd_pb2.UffdioApiRequest(uffd_id=u, api=0xAA, features=1 << 8))
        expect_ok("UFFDIO_API", api.errno)
        reg = uffd.UffdioRegister(userfaultfd_pb2.UffdioRegisterRequest(uffd_id=u, start=A, len=PAGE, mode=2))
        expect_ok("UFFDIO_REGISTER", reg.errno)
        print("api features=0x%x register ioctls=0x%x" % (api.features, reg.ioctls))
        wp = uffd.UffdioWriteprotect(userfaultfd_pb2.UffdioWriteprotectRequest(uffd_id=u, start=A, len=PAGE, mode=1))
        expect_ok("UFFDIO_WRITEPROTECT", wp.errno)
        print("write-protected")

        # The handler's stream, read on this thread; the write runs on another.
        events = uffd.ReadEvents(userfaultfd_pb2.ReadEventsRequest(uffd_id=u))
        result = {}

        def writer():
            result["r"] = threads.Access(thread_pb2.AccessRequest(thread_id=thread, access=touch(A, True, 0x22))).result

        w = threading.Thread(target=writer)
        w.start()
        msg = next(events).msg
        pf = msg.pagefault
        flags = "|".join(n for n, b in (("WRITE", pf.write), ("WP", pf.wp), ("MINOR", pf.minor)) if b)
        print("event: pagefault %s at 0x%x ptid=%d" % (flags, pf.address, pf.ptid))
        state = threads.GetThread(thread_pb2.GetThreadRequest(thread_id=thread)).thread.state
        blocked = w.is_alive() and state == 3  # THREAD_STATE_BLOCKED_IN_USERFAULT
        print("write blocked while the fault is unresolved:", blocked)

        resolved = uffd.UffdioWriteprotect(userfaultfd_pb2.UffdioWriteprotectRequest(
            uffd_id=u, start=pf.address & ~(PAGE - 1), len=PAGE, mode=0))
        expect_ok("UFFDIO_WRITEPROTECT mode=0", resolved.errno)
        print("resolved: UFFDIO_WRITEPROTECT mode=0")
        w.join(30)
        r = result["r"]
        value = threads.Access(thread_pb2.AccessRequest(thread_id=thread, access=touch(A))).result.values[0]
        print("write completed: %s, value 0x%02x" % (errno_name(r.errno), value))
        events.cancel()

        # The batched handler: a Serve stream. Requests go through a queue that feeds the
        # request iterator; the first names the uffd.
        expect_ok("UFFDIO_WRITEPROTECT", uffd.UffdioWriteprotect(
            userfaultfd_pb2.UffdioWriteprotectRequest(uffd_id=u, start=A, len=PAGE, mode=1)).errno)
        requests = queue.Queue()
        requests.put(userfaultfd_pb2.ServeRequest(uffd_id=u, max_messages=16))
        serve = uffd.Serve(iter(requests.get, None))
        w = threading.Thread(target=lambda: result.__setitem__(
            "s", threads.Access(thread_pb2.AccessRequest(thread_id=thread, access=touch(A, True, 0x33))).result))
        w.start()
        batch = next(serve)
        faults = [m.pagefault for m in batch.messages]
        resolutions = [userfaultfd_pb2.Resolution(
            tag=i, uffdio_writeprotect=userfaultfd_pb2.UffdioWriteprotectRequest(start=f.address & ~(PAGE - 1), len=PAGE, mode=0))
            for i, f in enumerate(faults)]
        # One more in the same request: ZEROPAGE onto the present page is EEXIST, in-band.
        resolutions.append(userfaultfd_pb2.Resolution(
            tag=99, uffdio_zeropage=userfaultfd_pb2.UffdioZeropageRequest(start=A, len=PAGE)))
        requests.put(userfaultfd_pb2.ServeRequest(resolutions=resolutions))
        answers = next(serve).results
        w.join(30)
        print("serve: %d fault(s) read, results %s" % (
            len(faults), " ".join("%d:%s/%s" % (a.tag, errno_name(a.errno), a.field.value if a.HasField("field") else "-")
                                  for a in answers)))
        served = result["s"]
        print("serve write completed: %s" % errno_name(served.errno))
        requests.put(None)
        serve.cancel()

        # Fault injection: the next UFFDIO_WRITEPROTECT meets an mmap_changing window (EAGAIN,
        # in-band), and the firing is in the machine's injection log.
        inject.AddRule(inject_pb2.AddRuleRequest(machine_id=machine, rule=inject_pb2.InjectRule(
            site=inject_pb2.INJECT_SITE_MMAP_CHANGING, uffd_id=u, max_firings=1)))
        busy = uffd.UffdioWriteprotect(userfaultfd_pb2.UffdioWriteprotectRequest(uffd_id=u, start=A, len=PAGE, mode=1))
        log = inject.ReadLog(inject_pb2.ReadLogRequest(machine_id=machine))
        print("injected mmap_changing: WRITEPROTECT %s, log %d firing(s) at model step %d" % (
            errno_name(busy.errno), log.total, log.records[0].model_step))

        # A failed ioctl is a result: status OK, the errno in the response.
        again, call = uffd.UffdioApi.with_call(userfaultfd_pb2.UffdioApiRequest(uffd_id=u, api=0xAA))
        print("second UFFDIO_API: status %s, errno %s" % (call.code().name, errno_name(again.errno)))
        # A request naming no uffd is the server's rejection: a status.
        try:
            uffd.UffdioApi(userfaultfd_pb2.UffdioApiRequest(uffd_id=987654321, api=0xAA))
            unknown = "OK"
        except grpc.RpcError as e:
            unknown = e.code().name
        print("unknown uffd:", unknown)
        ok = (blocked and r.errno == errno_pb2.ERRNO_UNSPECIFIED and value == 0x22
              and served.errno == errno_pb2.ERRNO_UNSPECIFIED and len(faults) == 1
              and again.errno == errno_pb2.ERRNO_EINVAL and unknown == "NOT_FOUND"
              and busy.errno == errno_pb2.ERRNO_EAGAIN and log.total == 1)
        return 0 if ok else 1
    finally:
        machines.DestroyMachine(machine_pb2.DestroyMachineRequest(machine_id=machine))


if __name__ == "__main__":
    sys.exit(main())

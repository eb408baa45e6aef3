"""A UffdGrpc client in Python (Debian python3-grpcio + stubs generated from protos/).

usage: uffd_client.py HOST:PORT STUBS_DIR

Health check, map a page, register it for WP, write-protect it, start a write that blocks
in the userfault, read the fault event from the stream, resolve it with
UFFDIO_WRITEPROTECT mode=0, and see the write complete.
"""
import sys
import threading

sys.path.insert(0, sys.argv[2])

import grpc  # noqa: E402
from uffd.v1 import machine_pb2, machine_pb2_grpc  # noqa: E402
from uffd.v1 import mm_pb2, mm_pb2_grpc  # noqa: E402
from uffd.v1 import threads_pb2, threads_pb2_grpc  # noqa: E402
from uffd.v1 import userfaultfd_pb2, userfaultfd_pb2_grpc  # noqa: E402

A = 0x7E0000000000
PAGE = 4096


def health(channel):
    # grpc.health.v1.Health/Check without generated stubs: an empty HealthCheckRequest, and
    # HealthCheckResponse{status = 1 (SERVING)} is field 1, varint.
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda _: b"",
                                response_deserializer=lambda b: b)
    raw = check(None, timeout=10)
    status = raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0
    return {1: "SERVING", 2: "NOT_SERVING"}.get(status, "UNKNOWN")


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    print("health:", health(channel))
    machines = machine_pb2_grpc.MachinesStub(channel)
    mm = mm_pb2_grpc.MmStub(channel)
    threads = threads_pb2_grpc.ThreadsStub(channel)
    uffd = userfaultfd_pb2_grpc.UserfaultfdStub(channel)

    machine = machines.CreateMachine(machine_pb2.CreateMachineRequest()).machine_id
    try:
        proc = mm.CreateMm(mm_pb2.CreateMmRequest(machine_id=machine)).mm_id
        thread = threads.CreateThread(threads_pb2.CreateThreadRequest(mm_id=proc)).thread_id
        mm.Mmap(mm_pb2.MmapRequest(mm_id=proc, addr=A, len=PAGE, prot=3))
        first = threads.Access(threads_pb2.AccessRequest(
            thread_id=thread, access=threads_pb2.AccessOp(addr=A, write=True, value=0x11)))
        print("map + first write:", first.errno.name)

        u = uffd.Create(userfaultfd_pb2.UffdCreateRequest(mm_id=proc, flags=0x80800)).uffd_id
        api = uffd.UffdioApi(userfaultfd_pb2.UffdioApiRequest(uffd_id=u, api=0xAA, features=1 << 8))
        reg = uffd.UffdioRegister(userfaultfd_pb2.UffdioRegisterRequest(uffd_id=u, start=A, len=PAGE, mode=2))
        print("api features=0x%x register ioctls=0x%x" % (api.features, reg.ioctls))
        uffd.UffdioWriteprotect(userfaultfd_pb2.UffdioWriteprotectRequest(uffd_id=u, start=A, len=PAGE, mode=1))
        print("write-protected")

        # The handler's stream, read on this thread; the write runs on another.
        events = uffd.ReadEvents(userfaultfd_pb2.UffdRef(uffd_id=u))
        result = {}

        def writer():
            result["r"] = threads.Access(threads_pb2.AccessRequest(
                thread_id=thread, access=threads_pb2.AccessOp(addr=A, write=True, value=0x22)))

        w = threading.Thread(target=writer)
        w.start()
        msg = next(events)
        pf = msg.pagefault
        flags = "|".join(n for n, b in (("WRITE", pf.write), ("WP", pf.wp), ("MINOR", pf.minor)) if b)
        print("event: pagefault %s at 0x%x ptid=%d" % (flags, pf.address, pf.ptid))
        state = threads.GetThread(threads_pb2.ThreadRef(thread_id=thread)).state
        blocked = w.is_alive() and state == 3  # THREAD_STATE_BLOCKED_IN_USERFAULT
        print("write blocked while the fault is unresolved:", blocked)

        uffd.UffdioWriteprotect(userfaultfd_pb2.UffdioWriteprotectRequest(
            uffd_id=u, start=pf.address & ~(PAGE - 1), len=PAGE, mode=0))
        print("resolved: UFFDIO_WRITEPROTECT mode=0")
        w.join(30)
        r = result["r"]
        value = threads.Access(threads_pb2.AccessRequest(
            thread_id=thread, access=threads_pb2.AccessOp(addr=A))).values[0]
        print("write completed: %s, value 0x%02x" % (r.errno.name, value))
        events.cancel()

        # A failed ioctl: the errno travels in google.rpc.ErrorInfo; the status code is mapped.
        try:
            uffd.UffdioApi(userfaultfd_pb2.UffdioApiRequest(uffd_id=u, api=0xAA))
        except grpc.RpcError as e:
            print("second UFFDIO_API:", e.code().name)
        return 0 if blocked and r.errno.name == "ok" and value == 0x22 else 1
    finally:
        machines.DestroyMachine(machine_pb2.MachineRef(machine_id=machine))


if __name__ == "__main__":
    sys.exit(main())

using System.Buffers.Binary;
using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using UffdGrpc.Server.Security;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>The userfaultfds of kernel-backed address spaces: userfaultfd(2), the ioctls, read and close, and the messages the helper reads.</summary>
public sealed partial class KernelBackend
{
    private const uint ONonblock = 0x800;

    internal async Task<UserfaultfdResponse> Userfaultfd(UserfaultfdRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        lock (mm.Gate)
            Quotas.Check(mm.Uffds.Values.Count(u => !u.Closed), Limits.UffdsPerMachine, nameof(LimitOptions.UffdsPerMachine), $"kernel-backed address space {mm.Id}");
        var r = await CallAsync(mm, HelperOp.UffdOpen, [request.Flags]).ConfigureAwait(false);
        if (r.Err != 0)
            return new UserfaultfdResponse { Errno = E(r.Err) };
        var u = _registry.Add(id => new KernelUffdEntry(id, mm.Host, mm, r.R[0], (request.Flags & ONonblock) != 0));
        lock (mm.Gate)
            mm.Uffds[u.Handle] = u;
        return new UserfaultfdResponse { Errno = Errno.Unspecified, UffdId = u.Id };
    }

    /// <summary>One uffd ioctl in the helper: a[3..7] are its arguments; the reply's errno and result words are the kernel's.</summary>
    private static Task<HelperReply> IoctlAsync(KernelUffdEntry u, HelperIoctl kind, ulong a3, ulong a4 = 0, ulong a5 = 0, ulong a6 = 0, ulong a7 = 0, ReadOnlyMemory<byte> data = default)
    {
        lock (u.Mm.Gate)
        {
            // A closed uffd is a stale fd: every ioctl gives EBADF, as for the model.
            if (u.Closed)
                return Task.FromResult(new HelperReply((int)Errno.Ebadf, [unchecked((ulong)Untouched), 0, 0, 0, 0, 0], []));
        }
        return CallAsync(u.Mm, HelperOp.UffdIoctl, [u.Handle, 0, (ulong)kind, a3, a4, a5, a6, a7], data);
    }

    internal async Task<UffdioApiResponse> UffdioApi(UffdioApiRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await IoctlAsync(u, HelperIoctl.Api, request.Api, request.Features).ConfigureAwait(false);
        if (r.Err == 0)
        {
            lock (u.Mm.Gate)
                u.ApiDone = true;
        }
        return new UffdioApiResponse { Errno = E(r.Err), Features = r.R[0], Ioctls = r.R[1] };
    }

    internal async Task<UffdioRegisterResponse> UffdioRegister(UffdioRegisterRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        CheckRange(u.Mm, request.Start, request.Len, "start");
        var r = await IoctlAsync(u, HelperIoctl.Register, request.Start, request.Len, request.Mode).ConfigureAwait(false);
        return new UffdioRegisterResponse { Errno = E(r.Err), Ioctls = r.R[0] };
    }

    internal async Task<UffdioUnregisterResponse> UffdioUnregister(UffdioUnregisterRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        CheckRange(u.Mm, request.Start, request.Len, "start");
        var r = await IoctlAsync(u, HelperIoctl.Unregister, request.Start, request.Len).ConfigureAwait(false);
        return new UffdioUnregisterResponse { Errno = E(r.Err) };
    }

    internal async Task<UffdioWakeResponse> UffdioWake(UffdioWakeRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await Run(u, new Resolution { UffdioWake = request }).ConfigureAwait(false);
        return new UffdioWakeResponse { Errno = r.Errno };
    }

    internal async Task<UffdioWriteprotectResponse> UffdioWriteprotect(UffdioWriteprotectRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await Run(u, new Resolution { UffdioWriteprotect = request }).ConfigureAwait(false);
        return new UffdioWriteprotectResponse { Errno = r.Errno };
    }

    internal async Task<UffdioCopyResponse> UffdioCopy(UffdioCopyRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await Run(u, new Resolution { UffdioCopy = request }).ConfigureAwait(false);
        return new UffdioCopyResponse { Errno = r.Errno, Copy = r.Field };
    }

    internal async Task<UffdioZeropageResponse> UffdioZeropage(UffdioZeropageRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await Run(u, new Resolution { UffdioZeropage = request }).ConfigureAwait(false);
        return new UffdioZeropageResponse { Errno = r.Errno, Zeropage = r.Field };
    }

    internal async Task<UffdioContinueResponse> UffdioContinue(UffdioContinueRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await Run(u, new Resolution { UffdioContinue = request }).ConfigureAwait(false);
        return new UffdioContinueResponse { Errno = r.Errno, Mapped = r.Field };
    }

    internal async Task<UffdioPoisonResponse> UffdioPoison(UffdioPoisonRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        CheckRange(u.Mm, request.Start, request.Len, "start");
        var r = await IoctlAsync(u, HelperIoctl.Poison, request.Start, request.Len, request.Mode).ConfigureAwait(false);
        return new UffdioPoisonResponse { Errno = E(r.Err), Updated = Field(r.R[0]) };
    }

    internal async Task<UffdioMoveResponse> UffdioMove(UffdioMoveRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        var r = await Run(u, new Resolution { UffdioMove = request }).ConfigureAwait(false);
        return new UffdioMoveResponse { Errno = r.Errno, Move = r.Field };
    }

    /// <summary>
    /// One resolving ioctl (unary or in a Resolve/Serve batch) on <paramref name="stream"/> or
    /// the uffd it names, which must belong to the same address space.
    /// </summary>
    private async Task<ResolutionResult> Run(KernelUffdEntry stream, Resolution r, string field = "")
    {
        var p = field.Length == 0 ? "" : field + ".";
        var (id, name) = r.OpCase switch
        {
            Resolution.OpOneofCase.UffdioCopy => (r.UffdioCopy.UffdId, "uffdio_copy"),
            Resolution.OpOneofCase.UffdioZeropage => (r.UffdioZeropage.UffdId, "uffdio_zeropage"),
            Resolution.OpOneofCase.UffdioWriteprotect => (r.UffdioWriteprotect.UffdId, "uffdio_writeprotect"),
            Resolution.OpOneofCase.UffdioContinue => (r.UffdioContinue.UffdId, "uffdio_continue"),
            Resolution.OpOneofCase.UffdioMove => (r.UffdioMove.UffdId, "uffdio_move"),
            Resolution.OpOneofCase.UffdioWake => (r.UffdioWake.UffdId, "uffdio_wake"),
            _ => throw RequestErrors.Invalid(p + "op", "one of uffdio_copy, uffdio_zeropage, uffdio_writeprotect, uffdio_continue, uffdio_move, uffdio_wake is required"),
        };
        var u = stream;
        if (id != 0 && id != stream.Id)
        {
            u = Get<KernelUffdEntry>(id, p + name + ".uffd_id");
            if (u.Mm != stream.Mm)
                throw RequestErrors.Invalid(p + name + ".uffd_id", "the uffd belongs to another process");
        }
        var mm = u.Mm;
        HelperReply reply;
        switch (r.OpCase)
        {
            case Resolution.OpOneofCase.UffdioCopy:
                var c = r.UffdioCopy;
                var max = mm.Host.Kernel.Config.MaxCopyBytes;
                UffdIoctls.ValidateCopy(c, max, p + name);
                CheckRange(mm, c.Dst, c.Len, p + name + ".dst");
                // The source is the server's buffer (data, or len bytes of fill up to the largest source the server keeps): src is not used.
                reply = c.SourceCase == UffdioCopyRequest.SourceOneofCase.Data
                    ? await IoctlAsync(u, HelperIoctl.Copy, c.Dst, c.Len, c.Mode, data: c.Data.Memory).ConfigureAwait(false)
                    : await IoctlAsync(u, HelperIoctl.Copy, c.Dst, c.Len, c.Mode, c.Fill, Math.Max(1, Math.Min(c.Len, max))).ConfigureAwait(false);
                break;
            case Resolution.OpOneofCase.UffdioZeropage:
                CheckRange(mm, r.UffdioZeropage.Start, r.UffdioZeropage.Len, p + name + ".start");
                reply = await IoctlAsync(u, HelperIoctl.Zeropage, r.UffdioZeropage.Start, r.UffdioZeropage.Len, r.UffdioZeropage.Mode).ConfigureAwait(false);
                break;
            case Resolution.OpOneofCase.UffdioWriteprotect:
                CheckRange(mm, r.UffdioWriteprotect.Start, r.UffdioWriteprotect.Len, p + name + ".start");
                reply = await IoctlAsync(u, HelperIoctl.Writeprotect, r.UffdioWriteprotect.Start, r.UffdioWriteprotect.Len, r.UffdioWriteprotect.Mode).ConfigureAwait(false);
                break;
            case Resolution.OpOneofCase.UffdioContinue:
                CheckRange(mm, r.UffdioContinue.Start, r.UffdioContinue.Len, p + name + ".start");
                reply = await IoctlAsync(u, HelperIoctl.Continue, r.UffdioContinue.Start, r.UffdioContinue.Len, r.UffdioContinue.Mode).ConfigureAwait(false);
                break;
            case Resolution.OpOneofCase.UffdioMove:
                var m = r.UffdioMove;
                if (m.CallerMmId != 0 && m.CallerMmId != mm.Id)
                    throw RequestErrors.Precondition("KERNEL_BACKED", $"UffdioMove from another process is not served on kernel-backed address space {mm.Id}");
                CheckRange(mm, m.Dst, m.Len, p + name + ".dst");
                CheckRange(mm, m.Src, m.Len, p + name + ".src");
                reply = await IoctlAsync(u, HelperIoctl.Move, m.Dst, m.Len, m.Mode, m.Src).ConfigureAwait(false);
                break;
            default:
                reply = await IoctlAsync(u, HelperIoctl.Wake, r.UffdioWake.Start, r.UffdioWake.Len).ConfigureAwait(false);
                break;
        }
        var hasField = r.OpCase is not (Resolution.OpOneofCase.UffdioWake or Resolution.OpOneofCase.UffdioWriteprotect);
        return new ResolutionResult { Tag = r.Tag, Errno = E(reply.Err), Field = hasField ? Field(reply.R[0]) : null };
    }

    internal async Task<ResolveResponse> Resolve(ResolveRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        RequestErrors.Require(request.Resolutions.Count <= 1024, "resolutions", "at most 1024");
        return await RunBatchAsync(u, request.Resolutions).ConfigureAwait(false);
    }

    /// <summary>A batch of resolutions in order (each one's ioctl ends before the next begins).</summary>
    private async Task<ResolveResponse> RunBatchAsync(KernelUffdEntry u, IList<Resolution> resolutions)
    {
        var response = new ResolveResponse();
        for (var i = 0; i < resolutions.Count; i++)
            response.Results.Add(await Run(u, resolutions[i], $"resolutions[{i}]").ConfigureAwait(false));
        return response;
    }

    /// <summary>close(2): the helper closes the fd (userfaultfd_release wakes its faults); EBADF when it was already closed. Readers of its messages end.</summary>
    internal async Task<CloseResponse> Close(CloseRequest request)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        lock (u.Mm.Gate)
        {
            if (u.Closed)
                return new CloseResponse { Errno = Errno.Ebadf };
            u.Closed = true;
        }
        var r = await CallAsync(u.Mm, HelperOp.UffdClose, [u.Handle]).ConfigureAwait(false);
        lock (u.Mm.Gate)
            u.WakeAll();
        return new CloseResponse { Errno = E(r.Err) };
    }

    /// <summary>
    /// A uffd_msg the helper read (struct uffd_msg, include/uapi/linux/userfaultfd.h): queued
    /// on its uffd, and its readers woken.
    /// </summary>
    private static void OnEvent(KernelMmEntry mm, ulong handle, byte[] m)
    {
        if (m.Length < 32)
            return;
        var ev = (Model.UffdEvent)m[0];
        var a = BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(8));
        var b = BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(16));
        var c = BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(24));
        lock (mm.Gate)
        {
            if (!mm.Uffds.TryGetValue(handle, out var u) || u.Closed)
                return;
            var msg = new UffdMsg { Event = (UffdEvent)(int)ev, UffdId = u.Id };
            switch (ev)
            {
                case Model.UffdEvent.Pagefault:
                    msg.Pagefault = ProtoMapping.ToProto((Model.PagefaultFlags)a, b, (uint)c);
                    break;
                case Model.UffdEvent.Fork:
                    msg.Fork = new ForkEvent();
                    break;
                case Model.UffdEvent.Remap:
                    msg.Remap = new RemapEvent { From = a, To = b, Len = c };
                    break;
                case Model.UffdEvent.Remove:
                    msg.Remove = new RangeEvent { Start = a, End = b };
                    break;
                case Model.UffdEvent.Unmap:
                    msg.Unmap = new RangeEvent { Start = a, End = b };
                    break;
            }
            u.Messages.Enqueue(msg);
            u.WakeAll();
        }
    }

    /// <summary>
    /// Up to <paramref name="max"/> queued messages, or (none queued) the task to sleep on, or
    /// neither when the uffd is closed or its address space destroyed (the stream ends).
    /// </summary>
    private (List<UffdMsg>? Msgs, Task? Wait) Take(KernelUffdEntry u, int max)
    {
        if (_registry.Unusable(u.Host) is { } gone)
            throw gone;
        lock (u.Mm.Gate)
        {
            if (u.Messages.Count > 0)
            {
                var list = new List<UffdMsg>();
                while (list.Count < max && u.Messages.TryDequeue(out var m))
                    list.Add(m);
                return (list, null);
            }
            if (u.Mm.Broken is not null)
                throw Unusable(u)!;
            if (u.Closed || u.Mm.Exited)
                return (null, null);
            return (null, u.WaitTask());
        }
    }

    /// <summary>
    /// read(2) of one message (userfaultfd_read): EINVAL before UFFDIO_API; EAGAIN on an
    /// O_NONBLOCK uffd with nothing queued, else the caller sleeps until one is; EBADF once closed.
    /// </summary>
    internal async Task<ReadResponse> Read(ReadRequest request, ServerCallContext context)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        lock (u.Mm.Gate)
        {
            if (!u.Closed && !u.ApiDone)
                return new ReadResponse { Errno = Errno.Einval };
        }
        while (true)
        {
            var (msgs, wait) = Take(u, 1);
            if (msgs is not null)
                return new ReadResponse { Errno = Errno.Unspecified, Msg = msgs[0] };
            if (wait is null)
                return new ReadResponse { Errno = Errno.Ebadf };
            if (u.NonBlocking)
                return new ReadResponse { Errno = Errno.Eagain };
            await wait.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        }
    }
}

using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>userfaultfd: the context, its ioctls, read/poll and the event stream.</summary>
public sealed class UserfaultfdService(MachineRegistry registry, ILogger<UserfaultfdService> logger) : Userfaultfd.UserfaultfdBase
{
    public override Task<UffdCreateResponse> Create(UffdCreateRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var (errno, id) = e.Host.Run(() =>
        {
            var r = e.Host.Kernel.Userfaultfd(e.Mm, (int)request.Flags, out var ctx);
            return (r, ctx is null ? 0 : registry.IdOf(e.Host, ctx));
        });
        return Task.FromResult(ErrnoStatus.Check(errno, new UffdCreateResponse { UffdId = id }, "userfaultfd"));
    }

    public override Task<UffdioApiResponse> UffdioApi(UffdioApiRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        ulong features = 0, ioctls = 0;
        var errno = u.Host.Run(() => u.Ctx.Api(request.Api, request.Features, out features, out ioctls));
        return Task.FromResult(ErrnoStatus.Check(errno, new UffdioApiResponse { Features = features, Ioctls = ioctls }, "UFFDIO_API"));
    }

    public override Task<UffdioRegisterResponse> UffdioRegister(UffdioRegisterRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        ulong ioctls = 0;
        var errno = u.Host.Run(() => u.Ctx.Register(request.Start, request.Len, request.Mode, out ioctls));
        return Task.FromResult(ErrnoStatus.Check(errno, new UffdioRegisterResponse { Ioctls = ioctls }, "UFFDIO_REGISTER"));
    }

    public override Task<UffdioEmptyResponse> UffdioUnregister(UffdioRangeRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() => u.Ctx.Unregister(request.Start, request.Len));
        return Task.FromResult(ErrnoStatus.Check(errno, new UffdioEmptyResponse(), "UFFDIO_UNREGISTER"));
    }

    public override Task<UffdioEmptyResponse> UffdioWake(UffdioRangeRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() => u.Ctx.Wake(request.Start, request.Len));
        return Task.FromResult(ErrnoStatus.Check(errno, new UffdioEmptyResponse(), "UFFDIO_WAKE"));
    }

    public override Task<UffdioEmptyResponse> UffdioWriteprotect(UffdioWriteprotectRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() => u.Ctx.Writeprotect(request.Start, request.Len, request.Mode));
        return Task.FromResult(ErrnoStatus.Check(errno, new UffdioEmptyResponse(), "UFFDIO_WRITEPROTECT"));
    }

    public override Task<UffdioCopyResponse> UffdioCopy(UffdioCopyRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var max = u.Host.Kernel.Config.MaxCopyBytes;
        byte[] src;
        switch (request.SourceCase)
        {
            case UffdioCopyRequest.SourceOneofCase.Data:
                RequestErrors.Require((ulong)request.Data.Length <= max, "data", $"at most {max} bytes");
                src = request.Data.ToByteArray();
                break;
            case UffdioCopyRequest.SourceOneofCase.Fill:
                RequestErrors.Require(request.Fill <= 255, "fill", "a byte (0-255)");
                // The source buffer holds len bytes of fill, up to the largest source the
                // server keeps (a longer copy runs off its end: EFAULT, as in the kernel).
                src = new byte[Math.Min(request.Len, max)];
                Array.Fill(src, (byte)request.Fill);
                break;
            default:
                throw RequestErrors.Invalid("source", "data or fill is required");
        }
        var r = u.Host.Run(() => u.Ctx.Copy(request.Dst, src, request.Src, request.Len, request.Mode));
        return Task.FromResult(ErrnoStatus.Check(r.Errno, new UffdioCopyResponse { Copy = r.Field }, "UFFDIO_COPY"));
    }

    public override Task<UffdioZeropageResponse> UffdioZeropage(UffdioModeRangeRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var r = u.Host.Run(() => u.Ctx.Zeropage(request.Start, request.Len, request.Mode));
        return Task.FromResult(ErrnoStatus.Check(r.Errno, new UffdioZeropageResponse { Zeropage = r.Field }, "UFFDIO_ZEROPAGE"));
    }

    public override Task<UffdioContinueResponse> UffdioContinue(UffdioModeRangeRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var r = u.Host.Run(() => u.Ctx.Continue(request.Start, request.Len, request.Mode));
        return Task.FromResult(ErrnoStatus.Check(r.Errno, new UffdioContinueResponse { Mapped = r.Field }, "UFFDIO_CONTINUE"));
    }

    public override Task<UffdioPoisonResponse> UffdioPoison(UffdioModeRangeRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var r = u.Host.Run(() => u.Ctx.Poison(request.Start, request.Len, request.Mode));
        return Task.FromResult(ErrnoStatus.Check(r.Errno, new UffdioPoisonResponse { Updated = r.Field }, "UFFDIO_POISON"));
    }

    public override Task<UffdioMoveResponse> UffdioMove(UffdioMoveRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var caller = request.CallerMmId == 0 ? null : registry.Mm(request.CallerMmId, "caller_mm_id");
        if (caller is not null && caller.Host != u.Host)
            throw RequestErrors.Invalid("caller_mm_id", "the process belongs to another machine");
        var r = u.Host.Run(() => u.Ctx.Move(caller?.Mm ?? u.Ctx.Mm, request.Dst, request.Src, request.Len, request.Mode));
        return Task.FromResult(ErrnoStatus.Check(r.Errno, new UffdioMoveResponse { Move = r.Field }, "UFFDIO_MOVE"));
    }

    public override Task<PollResponse> Poll(UffdRef request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        return Task.FromResult(u.Host.Kernel.Locked(() =>
        {
            var (pin, perr) = u.Ctx.Poll();
            return new PollResponse
            {
                Pollin = pin,
                Pollerr = perr,
                Unread = (uint)u.Ctx.UnreadCount,
                BlockedFaults = (uint)u.Ctx.BlockedFaults,
                MmapChanging = u.Ctx.MmapChanging,
                ApiDone = u.Ctx.State == Model.UffdState.Running,
                NonBlocking = u.Ctx.NonBlocking,
                Released = u.Ctx.Released,
                Features = (ulong)u.Ctx.Features,
                Readers = (uint)u.Readers,
            };
        }));
    }

    /// <summary>
    /// Reads one message under the machine lock: this is the moment it leaves the queue
    /// (a read FORK installs the child uffd and gets an id; a read event completes and its
    /// syscall resumes). EAGAIN when nothing is queued.
    /// </summary>
    private (Model.Errno Errno, UffdMsg? Msg) ReadOne(UffdEntry u) => u.Host.Run(() =>
    {
        var errno = u.Ctx.Read(out var m);
        if (m is null)
            return (errno, (UffdMsg?)null);
        var msg = new UffdMsg { Event = (UffdEvent)(int)m.Event, UffdId = u.Id };
        switch (m.Event)
        {
            case Model.UffdEvent.Pagefault:
                msg.Pagefault = ProtoMapping.ToProto(m.Flags, m.Address, m.Ptid);
                break;
            case Model.UffdEvent.Fork:
                msg.Fork = new ForkEvent { UffdId = m.ForkCtx is { } c ? registry.IdOf(u.Host, c) : 0 };
                break;
            case Model.UffdEvent.Remap:
                msg.Remap = new RemapEvent { From = m.From, To = m.To, Len = m.Len };
                break;
            case Model.UffdEvent.Remove:
                msg.Remove = new RangeEvent { Start = m.From, End = m.To };
                break;
            case Model.UffdEvent.Unmap:
                msg.Unmap = new RangeEvent { Start = m.From, End = m.To };
                break;
        }
        return (errno, msg);
    });

    public override Task<UffdMsg> Read(UffdRef request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var (errno, msg) = ReadOne(u);
        return Task.FromResult(ErrnoStatus.Check(errno, msg ?? new UffdMsg { UffdId = u.Id }, "read"));
    }

    public override Task<UffdCloseResponse> Close(UffdRef request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        u.Host.Run(() =>
        {
            u.Closed = true;
            u.Ctx.Release();
        });
        return Task.FromResult(new UffdCloseResponse());
    }

    public override async Task ReadEvents(UffdRef request, IServerStreamWriter<UffdMsg> responseStream, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var ct = context.CancellationToken;
        long sent = 0;
        // Headers first: the handler knows its stream is open before any message, and a
        // deadline or cancellation then ends the call with a status rather than a reset.
        await context.WriteResponseHeadersAsync([]).ConfigureAwait(false);
        u.AddReader();
        Log.EventStreamOpened(logger, u.Id);
        try
        {
            while (!ct.IsCancellationRequested && !u.Closed && !u.Host.Destroyed)
            {
                // Take the change signal before reading, so a message queued after the read
                // completes the signal this loop then waits on.
                var changed = u.Host.Changed;
                var (errno, msg) = ReadOne(u);
                if (msg is not null)
                {
                    try
                    {
                        await responseStream.WriteAsync(msg, ct).ConfigureAwait(false);
                    }
                    catch (Exception) when (ct.IsCancellationRequested)
                    {
                        Log.MessageLostWithStream(logger, u.Id, msg.Event.ToString());
                        throw;
                    }
                    sent++;
                    continue;
                }
                if (errno != Model.Errno.EAGAIN)
                    throw ErrnoStatus.ToException(errno, null, "read");
                await changed.WaitAsync(ct).ConfigureAwait(false);
            }
        }
        finally
        {
            u.RemoveReader();
            Log.EventStreamClosed(logger, u.Id, sent);
        }
    }
}

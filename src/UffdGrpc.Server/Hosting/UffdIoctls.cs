using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The resolving ioctls shared by the unary RPCs and the Serve stream: request validation
/// (before anything runs) and the call into the model (under the machine lock), each
/// returning the errno and the result field exactly as the kernel leaves them.
/// </summary>
internal static class UffdIoctls
{
    /// <summary>Checks the parts of a COPY request the server (not the kernel) bounds.</summary>
    public static void ValidateCopy(UffdioCopyRequest r, ulong maxCopyBytes, string prefix)
    {
        var field = prefix.Length == 0 ? "" : prefix + ".";
        switch (r.SourceCase)
        {
            case UffdioCopyRequest.SourceOneofCase.Data:
                RequestErrors.Require((ulong)r.Data.Length <= maxCopyBytes, field + "data", $"at most {maxCopyBytes} bytes");
                break;
            case UffdioCopyRequest.SourceOneofCase.Fill:
                RequestErrors.Require(r.Fill <= 255, field + "fill", "a byte (0-255)");
                break;
            default:
                throw RequestErrors.Invalid(field + "source", "data or fill is required");
        }
    }

    /// <summary>UFFDIO_COPY: the source buffer is <c>data</c>, or <c>len</c> bytes of <c>fill</c> up to the largest source the server keeps (a longer copy runs off its end: EFAULT, as in the kernel). Caller holds the lock.</summary>
    public static Model.FillResult Copy(Model.UserfaultfdCtx ctx, UffdioCopyRequest r)
    {
        if (r.SourceCase == UffdioCopyRequest.SourceOneofCase.Data)
            return ctx.Copy(r.Dst, r.Data.Span, r.Src, r.Len, r.Mode);
        // A buffer of len bytes of fill, up to the largest source the server keeps; nothing is
        // allocated for it (every source page is the same).
        return ctx.CopyFill(r.Dst, (byte)r.Fill, Math.Min(r.Len, ctx.Kernel.Config.MaxCopyBytes), r.Src, r.Len, r.Mode);
    }

    /// <summary>UFFDIO_MOVE issued by <paramref name="caller"/> (null: the uffd's own process). Caller holds the lock.</summary>
    public static Model.FillResult Move(Model.UserfaultfdCtx ctx, Model.Mm? caller, UffdioMoveRequest r) =>
        ctx.Move(caller ?? ctx.Mm, r.Dst, r.Src, r.Len, r.Mode);

    /// <summary>The caller process of a MOVE (0: the uffd's own), which must be on the same machine.</summary>
    public static Model.Mm? MoveCaller(MachineRegistry registry, UffdEntry u, long callerMmId, string field)
    {
        if (callerMmId == 0)
            return null;
        var caller = registry.Mm(callerMmId, field);
        if (caller.Host != u.Host)
            throw RequestErrors.Invalid(field, "the process belongs to another machine");
        return caller.Mm;
    }

    /// <summary>A validated Serve resolution, ready to run under the lock.</summary>
    public readonly record struct Prepared(ulong Tag, UffdEntry Uffd, Resolution Resolution, Model.Mm? MoveCaller);

    /// <summary>Validates one Serve resolution; <paramref name="stream"/> is the stream's uffd.</summary>
    public static Prepared Prepare(MachineRegistry registry, UffdEntry stream, Resolution r, int index)
    {
        // The field name is formatted only for an error (a batch validates every resolution).
        string Field(string suffix) => $"resolutions[{index}]{suffix}";
        long id = r.OpCase switch
        {
            Resolution.OpOneofCase.UffdioCopy => r.UffdioCopy.UffdId,
            Resolution.OpOneofCase.UffdioZeropage => r.UffdioZeropage.UffdId,
            Resolution.OpOneofCase.UffdioWriteprotect => r.UffdioWriteprotect.UffdId,
            Resolution.OpOneofCase.UffdioContinue => r.UffdioContinue.UffdId,
            Resolution.OpOneofCase.UffdioMove => r.UffdioMove.UffdId,
            Resolution.OpOneofCase.UffdioWake => r.UffdioWake.UffdId,
            _ => throw RequestErrors.Invalid(Field(".op"), "one of uffdio_copy, uffdio_zeropage, uffdio_writeprotect, uffdio_continue, uffdio_move, uffdio_wake is required"),
        };
        var u = stream;
        if (id != 0 && id != stream.Id)
        {
            u = registry.Get<UffdEntry>(id, Field(".uffd_id"));
            if (u.Host != stream.Host)
                throw RequestErrors.Invalid(Field(".uffd_id"), "the uffd belongs to another machine");
        }
        if (r.OpCase == Resolution.OpOneofCase.UffdioCopy)
            ValidateCopy(r.UffdioCopy, u.Host.Kernel.Config.MaxCopyBytes, Field(".uffdio_copy"));
        var caller = r.OpCase == Resolution.OpOneofCase.UffdioMove ? MoveCaller(registry, u, r.UffdioMove.CallerMmId, Field(".uffdio_move.caller_mm_id")) : null;
        return new Prepared(r.Tag, u, r, caller);
    }

    /// <summary>Runs a prepared resolution. Caller holds the machine lock.</summary>
    public static ResolutionResult Run(Prepared p)
    {
        var ctx = p.Uffd.Ctx;
        var r = p.Resolution;
        var (errno, field) = r.OpCase switch
        {
            Resolution.OpOneofCase.UffdioCopy => Copy(ctx, r.UffdioCopy),
            Resolution.OpOneofCase.UffdioZeropage => ctx.Zeropage(r.UffdioZeropage.Start, r.UffdioZeropage.Len, r.UffdioZeropage.Mode),
            Resolution.OpOneofCase.UffdioContinue => ctx.Continue(r.UffdioContinue.Start, r.UffdioContinue.Len, r.UffdioContinue.Mode),
            Resolution.OpOneofCase.UffdioMove => Move(ctx, p.MoveCaller, r.UffdioMove),
            Resolution.OpOneofCase.UffdioWriteprotect => Model.FillResult.Untouched(ctx.Writeprotect(r.UffdioWriteprotect.Start, r.UffdioWriteprotect.Len, r.UffdioWriteprotect.Mode)),
            _ => Model.FillResult.Untouched(ctx.Wake(r.UffdioWake.Start, r.UffdioWake.Len)),
        };
        return new ResolutionResult { Tag = p.Tag, Errno = ProtoMapping.ToProto(errno), Field = field };
    }

    /// <summary>A uffd_msg as the API sends it. Caller holds the lock (a FORK child uffd gets its id here).</summary>
    public static UffdMsg ToProto(MachineRegistry registry, UffdEntry u, Model.UffdMsg m)
    {
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
        return msg;
    }
}

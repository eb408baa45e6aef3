using Google.Protobuf;
using UffdGrpc.Contracts.V1;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Mapping;

/// <summary>Conversions between the proto messages and the model's types.</summary>
public static class ProtoMapping
{
    /// <summary>The most pages an access, pagemap or page-table request may cover (a request bound, not a kernel rule).</summary>
    public const uint MaxPagesPerRequest = 1 << 20;

    /// <summary>The most bytes one span access may move (its response must fit a message).</summary>
    public const ulong MaxSpanBytes = 64UL << 20;

    /// <summary>
    /// The one mapping of a kernel outcome to the wire: the errno goes in-band, with the
    /// same x86-64 number (the proto enum and the model's enum share their values).
    /// </summary>
    public static Errno ToProto(Model.Errno e) => (Errno)(int)e;

    public static Model.KernelProfile ToModel(KernelProfile p) => p switch
    {
        KernelProfile.Unspecified or KernelProfile.V618 => Model.KernelProfile.V6_18,
        KernelProfile.V57 => Model.KernelProfile.V5_7,
        KernelProfile.V61 => Model.KernelProfile.V6_1,
        _ => throw RequestErrors.Invalid("profile", "unknown kernel profile"),
    };

    public static KernelProfile ToProto(Model.KernelProfile p) => p switch
    {
        Model.KernelProfile.V5_7 => KernelProfile.V57,
        Model.KernelProfile.V6_1 => KernelProfile.V61,
        _ => KernelProfile.V618,
    };

    public static Model.ThpMode ToModel(ThpMode m, Model.ThpMode current) => m switch
    {
        ThpMode.Unspecified => current,
        ThpMode.Never => Model.ThpMode.Never,
        ThpMode.Madvise => Model.ThpMode.Madvise,
        ThpMode.Always => Model.ThpMode.Always,
        _ => throw RequestErrors.Invalid("settings.thp", "unknown THP mode"),
    };

    public static ThpMode ToProto(Model.ThpMode m) => m switch
    {
        Model.ThpMode.Never => ThpMode.Never,
        Model.ThpMode.Always => ThpMode.Always,
        _ => ThpMode.Madvise,
    };

    public static SignalCode ToProto(Model.SigCode s) => s switch
    {
        Model.SigCode.SegvMaperr => SignalCode.SegvMaperr,
        Model.SigCode.SegvAccerr => SignalCode.SegvAccerr,
        Model.SigCode.BusAdrerr => SignalCode.BusAdrerr,
        Model.SigCode.BusMceerrAr => SignalCode.BusMceerrAr,
        _ => SignalCode.Unspecified,
    };

    /// <summary>The thread's state as the API reports it.</summary>
    public static Contracts.V1.ThreadState StateOf(Model.SimThread t) => t.State switch
    {
        Model.ThreadState.Exited => Contracts.V1.ThreadState.Exited,
        Model.ThreadState.BlockedInUserfault => Contracts.V1.ThreadState.BlockedInUserfault,
        Model.ThreadState.BlockedOnEvent => Contracts.V1.ThreadState.BlockedOnEvent,
        _ => t.Op is null ? Contracts.V1.ThreadState.Idle : Contracts.V1.ThreadState.Running,
    };

    public static PageState ToProto(Model.PageContentState s) => s switch
    {
        Model.PageContentState.Present => PageState.Present,
        Model.PageContentState.Swapped => PageState.Swapped,
        Model.PageContentState.NotPresent => PageState.NotPresent,
        Model.PageContentState.PageCache => PageState.PageCache,
        Model.PageContentState.Poisoned => PageState.Poisoned,
        Model.PageContentState.Guard => PageState.Guard,
        Model.PageContentState.BeyondEof => PageState.BeyondEof,
        _ => PageState.Unmapped,
    };

    public static Model.Prot ToProt(uint prot)
    {
        if ((prot & ~7u) != 0)
            throw RequestErrors.Invalid("prot", "only PROT_READ|PROT_WRITE|PROT_EXEC (1|2|4)");
        return (Model.Prot)prot;
    }

    public static Model.Madv ToAdvice(int advice)
    {
        if (!Enum.IsDefined((Model.Madv)advice))
            throw RequestErrors.Invalid("advice", "unknown MADV_* value");
        return (Model.Madv)advice;
    }

    /// <summary>The model operation for a ThreadOp run by <paramref name="thread"/> (ids it names are resolved through <paramref name="registry"/>).</summary>
    public static Model.SyscallOp ToModel(ThreadOp op, Hosting.MachineRegistry registry, Hosting.ThreadEntry thread) => op.OpCase switch
    {
        ThreadOp.OpOneofCase.Access => ToModel(op.Access),
        ThreadOp.OpOneofCase.Populate => new Model.PopulateOp(op.Populate.Start, op.Populate.Len, op.Populate.Write),
        ThreadOp.OpOneofCase.Madvise => Model.MadviseOp.Create(op.Madvise.Start, op.Madvise.Len, ToAdvice(op.Madvise.Advice)),
        ThreadOp.OpOneofCase.Munmap => new Model.MunmapOp(op.Munmap.Start, op.Munmap.Len),
        ThreadOp.OpOneofCase.Mremap => new Model.MremapOp(op.Mremap.OldAddr, op.Mremap.Len, op.Mremap.NewAddr),
        ThreadOp.OpOneofCase.Fork => new Model.ForkOp(),
        ThreadOp.OpOneofCase.ProcessVm => ToModel(op.ProcessVm, registry, thread),
        _ => throw RequestErrors.Invalid("op", "one of access, populate, madvise, munmap, mremap, fork, process_vm is required"),
    };

    /// <summary>
    /// process_vm_readv/writev by <paramref name="thread"/>. An unknown remote process is what
    /// the kernel calls ESRCH (find_get_task_by_vpid fails), not an unknown id: a pid is not
    /// an object handle the caller must own.
    /// </summary>
    public static Model.SyscallOp ToModel(ProcessVmOp p, Hosting.MachineRegistry registry, Hosting.ThreadEntry thread)
    {
        RequestErrors.Require(p.LocalIov.Count <= MaxIovecs, "local_iov", $"at most {MaxIovecs} entries");
        RequestErrors.Require(p.RemoteIov.Count <= MaxIovecs, "remote_iov", $"at most {MaxIovecs} entries");
        Model.Mm? remote = null;
        if (p.RemoteMmId > 0 && registry.TryGet<Hosting.MmEntry>(p.RemoteMmId, out var r) && r.Host == thread.Host)
            remote = r.Mm;
        return new Model.ProcessVmOp(remote, p.Write, [.. p.LocalIov.Select(v => new Model.IoVec(v.Base, v.Len))], [.. p.RemoteIov.Select(v => new Model.IoVec(v.Base, v.Len))], p.Flags);
    }

    /// <summary>The most iovecs the server passes to a process_vm call: UIO_MAXIOV (1024) and one more, so the model answers 1025 with EINVAL as iovec_from_user does; beyond that the request is refused.</summary>
    public const int MaxIovecs = 1025;

    public static Model.SyscallOp ToModel(AccessOp? a)
    {
        if (a is null)
            throw RequestErrors.Invalid("access", "required");
        var origin = a.Origin switch
        {
            AccessOrigin.Unspecified or AccessOrigin.User => Model.AccessOrigin.User,
            AccessOrigin.Kernel => Model.AccessOrigin.Kernel,
            _ => throw RequestErrors.Invalid("access.origin", "unknown origin"),
        };
        switch (a.FormCase)
        {
            case AccessOp.FormOneofCase.Touch:
                RequestErrors.Require(a.Touch.Value <= 255, "access.touch.value", "a byte (0-255)");
                RequestErrors.Require(a.Touch.Pages <= MaxPagesPerRequest, "access.touch.pages", $"at most {MaxPagesPerRequest} pages");
                return new Model.AccessOp(a.Addr, a.Write, (byte)a.Touch.Value, a.Touch.Pages == 0 ? 1 : (int)a.Touch.Pages, origin);
            case AccessOp.FormOneofCase.Span when a.Write:
                RequestErrors.Require(a.Span.Length == 0 || a.Span.Length == (ulong)a.Span.Data.Length, "access.span.length", "0 or the length of data for a write");
                RequestErrors.Require((ulong)a.Span.Data.Length <= MaxSpanBytes, "access.span.data", $"at most {MaxSpanBytes} bytes");
                return Model.BytesAccessOp.Write(a.Addr, a.Span.Data.Memory, origin);
            case AccessOp.FormOneofCase.Span:
                RequestErrors.Require(a.Span.Data.IsEmpty, "access.span.data", "empty for a read");
                RequestErrors.Require(a.Span.Length <= MaxSpanBytes, "access.span.length", $"at most {MaxSpanBytes} bytes");
                return Model.BytesAccessOp.Read(a.Addr, (int)a.Span.Length, origin);
            default:
                throw RequestErrors.Invalid("access.form", "touch or span is required");
        }
    }

    /// <summary>The result of a finished (or aborted) operation. Fork ids are filled in by the registry.</summary>
    public static ThreadOpResult ToResult(long opId, long threadId, Model.SyscallOp o)
    {
        var r = new ThreadOpResult { OpId = opId, ThreadId = threadId, Aborted = o.Aborted, Errno = ToProto(o.Result) };
        switch (o)
        {
            case Model.AccessOp a:
                r.Signal = ToProto(a.Signal);
                r.Done = (uint)a.Done;
                r.Values = ByteString.CopyFrom(a.Values);
                break;
            case Model.BytesAccessOp b:
                r.Signal = ToProto(b.Signal);
                r.DoneBytes = (ulong)b.Done;
                r.Values = ByteString.CopyFrom(b.Data.Span);
                break;
            case Model.ProcessVmOp pv:
                r.Transferred = (long)pv.Transferred;
                break;
        }
        return r;
    }

    public static Pagefault ToProto(Model.PagefaultFlags flags, ulong address, uint ptid) => new()
    {
        Flags = (ulong)flags,
        Address = address,
        Ptid = ptid,
        Write = (flags & Model.PagefaultFlags.Write) != 0,
        Wp = (flags & Model.PagefaultFlags.Wp) != 0,
        Minor = (flags & Model.PagefaultFlags.Minor) != 0,
    };

    private static readonly (Model.VmFlags Flag, string Name)[] s_vmFlagNames =
    [
        (Model.VmFlags.UffdMissing, "uffd_missing"),
        (Model.VmFlags.UffdWp, "uffd_wp"),
        (Model.VmFlags.UffdMinor, "uffd_minor"),
        (Model.VmFlags.HugePage, "hugepage"),
        (Model.VmFlags.NoHugePage, "nohugepage"),
        (Model.VmFlags.SoftDirty, "soft_dirty"),
        (Model.VmFlags.Shared, "shared"),
    ];

    public static IEnumerable<string> VmFlagNames(Model.VmFlags f) => s_vmFlagNames.Where(n => (f & n.Flag) != 0).Select(n => n.Name);

    public static PageTableEntry ToProto(ulong addr, Model.Pte pte)
    {
        var e = new PageTableEntry
        {
            Addr = addr,
            Raw = pte.Value,
            Present = pte.Present,
            Write = pte.Write,
            Dirty = pte.Dirty,
            Young = pte.Young,
            SoftDirty = pte.SoftDirty || pte.SwpSoftDirty,
            UffdWp = pte.AnyUffdWp,
            Special = pte.Special,
            Pfn = pte.Present ? pte.Pfn : 0,
            Swap = pte.IsSwap,
            SwapSlot = pte.IsSwap ? pte.SwapSlot : 0,
            Marker = pte.IsMarker,
        };
        if (pte.IsUffdWpMarker)
            e.MarkerBits.Add("uffd_wp");
        if (pte.IsPoisonMarker)
            e.MarkerBits.Add("poisoned");
        if (pte.IsGuardMarker)
            e.MarkerBits.Add("guard");
        return e;
    }

    public static PageTableEntry ToProto(ulong addr, Model.Pmd pmd) => new()
    {
        Addr = addr,
        Pmd = true,
        Raw = pmd.Value,
        Present = pmd.TransHuge,
        Write = pmd.Write,
        Dirty = pmd.Dirty,
        Young = pmd.Young,
        SoftDirty = pmd.SoftDirty,
        UffdWp = pmd.UffdWp,
        Pfn = pmd.Pfn,
    };

    public static PagemapEntry ToPagemap(ulong addr, ulong v) => new()
    {
        Addr = addr,
        Raw = v,
        Present = (v & Model.Uapi.PmPresent) != 0,
        Swapped = (v & Model.Uapi.PmSwap) != 0,
        File = (v & Model.Uapi.PmFile) != 0,
        Exclusive = (v & Model.Uapi.PmMmapExclusive) != 0,
        UffdWp = (v & Model.Uapi.PmUffdWp) != 0,
        SoftDirty = (v & Model.Uapi.PmSoftDirty) != 0,
        Guard = (v & Model.Uapi.PmGuard) != 0,
        Pfn = (v & Model.Uapi.PmPresent) != 0 ? v & Model.Uapi.PmPfnMask : 0,
    };
}

namespace UffdGrpc.Mm;

/// <summary>
/// A user access (the worker's <c>read</c>/<c>write</c>) or a kernel-origin access
/// (copy_to_user/copy_from_user: <c>kwrite</c>/<c>kread</c>) of byte 0 (or an offset)
/// of <see cref="Count"/> consecutive pages. Stops at the first signal; a kernel access
/// turns any signal into EFAULT.
/// </summary>
public sealed class AccessOp(ulong addr, bool write, byte value, int count, AccessOrigin origin) : SyscallOp
{
    public ulong Addr { get; } = addr;
    public bool Write { get; } = write;
    public byte Value { get; } = value;
    public int Count { get; } = count;
    public AccessOrigin Origin { get; } = origin;
    /// <summary>Pages completed so far.</summary>
    public int Done { get; private set; }
    /// <summary>The byte read (or, for a write, written) on each completed page.</summary>
    public byte[] Values { get; } = new byte[count];
    /// <summary>The signal that ended a user access, or None.</summary>
    public SigCode Signal { get; private set; }
    private int _yieldedAt = -1;

    protected internal override bool Step()
    {
        var budget = Kernel.ReschedPages;
        while (Done < Count)
        {
            if (budget-- == 0 && Mm.Kernel.CanYield)
            {
                Mm.Kernel.Yield(Thread);
                return false;
            }
            if (Done > 0 && _yieldedAt != Done && Mm.Kernel.SchedYield(Thread))
            {
                _yieldedAt = Done;
                return false;
            }
            var a = Addr + ((ulong)Done * Kernel.PageSize);
            var r = Mm.AccessByte(Thread, a, Write, Origin, Value, out var v);
            switch (r)
            {
                case FaultResult.Ok:
                    Values[Done++] = Write ? Value : v;
                    continue;
                case FaultResult.Blocked:
                    return false;
                default:
                    if (Origin == AccessOrigin.Kernel)
                        Result = Errno.EFAULT;
                    else
                        Signal = Mm.SignalOf(r);
                    return true;
            }
        }
        return true;
    }
}

/// <summary>
/// MADV_POPULATE_READ/WRITE (madvise_populate → faultin_page_range): kernel-origin faults
/// over the range. A hole gives ENOMEM, a VMA that does not allow the access EINVAL,
/// SIGBUS/SIGSEGV EFAULT, a poison marker EHWPOISON.
/// </summary>
public sealed class PopulateOp(ulong start, ulong len, bool write) : SyscallOp
{
    private ulong _cursor = start;
    private ulong _yieldedAt;

    public ulong Start { get; } = start;
    public ulong Len { get; } = len;
    public bool Write { get; } = write;

    protected internal override bool Step()
    {
        if (_cursor == Start)
        {
            // MADV_POPULATE_(READ|WRITE) arrived in 5.14: unknown advice (EINVAL) on v5.7.
            var end = Start;
            var v = Mm.Kernel.IsV6 ? Mm.MadviseValidate(Start, Len, out end) : Errno.EINVAL;
            if (v != Errno.OK || end == Start)
            {
                Result = v;
                return true;
            }
        }
        var stop = Start + Mm.PageAlignPublic(Len);
        var budget = Kernel.ReschedPages;
        while (_cursor < stop)
        {
            if (budget-- == 0 && Mm.Kernel.CanYield)
            {
                Mm.Kernel.Yield(Thread);
                return false;
            }
            if (_cursor != Start && _yieldedAt != _cursor && Mm.Kernel.SchedYield(Thread))
            {
                _yieldedAt = _cursor;
                return false;
            }
            var r = Mm.PopulateOne(Thread, _cursor, Write);
            if (r == FaultResult.Blocked)
                return false;
            if (r != FaultResult.Ok)
            {
                Result = Mm.PopulateErrno(r);
                return true;
            }
            _cursor += Kernel.PageSize;
        }
        return true;
    }
}

/// <summary>madvise(2): see <see cref="Mm.MadviseStep"/>.</summary>
public sealed class MadviseOp(ulong start, ulong len, Madv advice) : SyscallOp
{
    /// <summary>The operation madvise(2) runs: MADV_POPULATE_* go through GUP (<see cref="PopulateOp"/>).</summary>
    public static SyscallOp Create(ulong start, ulong len, Madv advice) => advice switch
    {
        Madv.PopulateRead => new PopulateOp(start, len, write: false),
        Madv.PopulateWrite => new PopulateOp(start, len, write: true),
        _ => new MadviseOp(start, len, advice),
    };

    public ulong Start { get; } = start;
    public ulong Len { get; } = len;
    public Madv Advice { get; } = advice;
    internal ulong Cursor;
    internal ulong End;
    internal bool Validated;
    internal Errno UnmappedError;
    /// <summary>The REMOVE event for the segment at <see cref="Cursor"/> was read.</summary>
    internal bool RemoveEventDone;

    protected internal override bool Step() => Mm.MadviseStep(this);
}

/// <summary>munmap(2): the unmap, then one UNMAP event per context, each waiting to be read.</summary>
public sealed class MunmapOp(ulong start, ulong len) : SyscallOp
{
    private List<(UserfaultfdCtx Ctx, ulong Start, ulong End)>? _events;
    private int _next;

    public ulong Start { get; } = start;
    public ulong Len { get; } = len;

    protected internal override bool Step()
    {
        if (_events is null)
        {
            _events = [];
            Result = Mm.DoMunmap(Start, Len, _events);
        }
        return Mm.SendUnmapEvents(Thread, _events, ref _next);
    }
}

/// <summary>
/// mremap(2) with MREMAP_MAYMOVE|MREMAP_FIXED and an unchanged length: the move, then the
/// REMAP event and the UNMAP events of the old range, each waiting to be read.
/// </summary>
public sealed class MremapOp(ulong oldAddr, ulong len, ulong newAddr) : SyscallOp
{
    private List<(UserfaultfdCtx Ctx, ulong Start, ulong End)>? _unmaps;
    private UserfaultfdCtx? _remapCtx;
    private int _next;

    public ulong OldAddr { get; } = oldAddr;
    public ulong Len { get; } = len;
    public ulong NewAddr { get; } = newAddr;

    protected internal override bool Step()
    {
        if (_unmaps is null)
        {
            _unmaps = [];
            Result = Mm.MremapMove(OldAddr, Len, NewAddr, _unmaps, out _remapCtx);
        }
        if (_remapCtx is { } ctx)
        {
            _remapCtx = null;
            if (!ctx.Released)
            {
                ctx.QueueEvent(Thread, new UffdMsg { Event = UffdEvent.Remap, From = OldAddr, To = NewAddr, Len = Len });
                return false;
            }
            ctx.MmapChanging--;
        }
        return Mm.SendUnmapEvents(Thread, _unmaps, ref _next);
    }
}

/// <summary>fork(2): dup_mmap, then one FORK event per context with EVENT_FORK, each waiting to be read.</summary>
public sealed class ForkOp : SyscallOp
{
    private List<(UserfaultfdCtx Parent, UserfaultfdCtx Child)>? _forks;
    private int _next;

    /// <summary>The child's address space.</summary>
    public Mm? Child { get; private set; }
    /// <summary>The child's first thread.</summary>
    public SimThread? ChildThread { get; private set; }

    protected internal override bool Step()
    {
        if (_forks is null)
        {
            _forks = [];
            Child = Mm.DupMmap(_forks);
            ChildThread = Mm.Kernel.CreateThread(Child);
        }
        while (_next < _forks.Count)
        {
            var (parent, child) = _forks[_next++];
            if (parent.Released)
            {
                parent.MmapChanging--;
                child.Release();
                continue;
            }
            parent.QueueEvent(Thread, new UffdMsg { Event = UffdEvent.Fork, ForkCtx = child });
            return false;
        }
        return true;
    }
}

namespace UffdGrpc.Mm;

/// <summary>The ioctls of a userfaultfd (fs/userfaultfd.c: userfaultfd_ioctl and its handlers).</summary>
public sealed partial class UserfaultfdCtx
{
    private bool IsV6 => Kernel.IsV6;

    /// <summary>
    /// Models validate_range (and validate_unaligned_range when <paramref name="allowUnaligned"/>):
    /// start and len page aligned, len non-zero, the range below TASK_SIZE.
    /// </summary>
    internal static Errno ValidateRange(ulong start, ulong len, bool allowUnaligned = false)
    {
        if (!allowUnaligned && (start % Kernel.PageSize != 0 || len % Kernel.PageSize != 0))
            return Errno.EINVAL;
        if (len == 0)
            return Errno.EINVAL;
        if (start >= Kernel.TaskSize)
            return Errno.EINVAL;
        if (len > Kernel.TaskSize - start)
            return Errno.EINVAL;
        return Errno.OK;
    }

    private Errno CheckState() => Released ? Errno.EBADF : State == UffdState.WaitApi ? Errno.EINVAL : Errno.OK;

    /// <summary>
    /// Models userfaultfd_api: api must be 0xAA; WP_ASYNC implies WP_UNPOPULATED; unknown
    /// features and a second call give EINVAL. On success the kernel reports every
    /// available feature and REGISTER|UNREGISTER|API; on failure it zeroes the struct.
    /// </summary>
    public Errno Api(ulong api, ulong requested, out ulong features, out ulong ioctls)
    {
        using var _ = Kernel.Enter();
        features = 0;
        ioctls = 0;
        if (Released)
            return Errno.EBADF;
        if (api != Uapi.UffdApi)
            return Errno.EINVAL;
        var req = (UffdFeatures)requested;
        if ((req & UffdFeatures.WpAsync) != 0)
            req |= UffdFeatures.WpUnpopulated;
        var available = AvailableFeatures(Kernel.Profile);
        if ((req & ~available) != 0)
            return Errno.EINVAL;
        if (State != UffdState.WaitApi)
            return Errno.EINVAL;
        State = UffdState.Running;
        Features = req;
        features = (ulong)available;
        ioctls = Uapi.ApiIoctls;
        return Errno.OK;
    }

    /// <summary>
    /// Models userfaultfd_register: mode checks, validate_range, at least one VMA in the
    /// range (holes allowed), every VMA eligible (EINVAL), writable-capable (EPERM) and not
    /// owned by another context (EBUSY) before anything changes; then the VMAs are split
    /// and flagged. Returns the range ioctls the registration guarantees.
    /// </summary>
    public Errno Register(ulong start, ulong len, ulong mode, out ulong ioctls)
    {
        using var _ = Kernel.Enter();
        ioctls = 0;
        var st = CheckState();
        if (st != Errno.OK)
            return st;
        var known = IsV6 ? Uapi.RegisterModeMissing | Uapi.RegisterModeWp | Uapi.RegisterModeMinor
                         : Uapi.RegisterModeMissing | Uapi.RegisterModeWp;
        if (mode == 0 || (mode & ~known) != 0)
            return Errno.EINVAL;
        var vmFlags = VmFlags.None;
        if ((mode & Uapi.RegisterModeMissing) != 0)
            vmFlags |= VmFlags.UffdMissing;
        if ((mode & Uapi.RegisterModeWp) != 0)
            vmFlags |= VmFlags.UffdWp;
        if ((mode & Uapi.RegisterModeMinor) != 0)
            vmFlags |= VmFlags.UffdMinor;
        var r = ValidateRange(start, len);
        if (r != Errno.OK)
            return r;
        if (Mm.Exited)
            return Errno.ENOMEM;
        var end = start + len;
        var vmas = Mm.VmasIn(start, end);
        if (vmas.Count == 0)
            return Errno.EINVAL;
        foreach (var v in vmas)
        {
            if (!Mm.VmaCanUserfault(v, vmFlags, WpAsync, IsV6))
                return Errno.EINVAL;
            if ((v.Flags & VmFlags.MayWrite) == 0)
                return Errno.EPERM;
            if (v.UffdCtx is not null && v.UffdCtx != this)
                return Errno.EBUSY;
        }
        Mm.UserfaultfdRegisterRange(this, vmFlags, start, end);
        ioctls = Kernel.RangeIoctls;
        if ((mode & Uapi.RegisterModeWp) == 0)
            ioctls &= ~(1UL << Uapi.UffdioWriteprotect);
        if ((mode & Uapi.RegisterModeMinor) == 0)
            ioctls &= ~(1UL << Uapi.UffdioContinue);
        return Errno.OK;
    }

    /// <summary>
    /// Models userfaultfd_unregister: EINVAL when no VMA intersects, when a VMA belongs to
    /// another context or could not be registered at all. For each registered VMA piece a
    /// MISSING registration wakes its waiters (WP and MINOR do not), 6.x resolves uffd-wp,
    /// and the registration is dropped.
    /// </summary>
    public Errno Unregister(ulong start, ulong len)
    {
        using var _ = Kernel.Enter();
        var st = CheckState();
        if (st != Errno.OK)
            return st;
        var r = ValidateRange(start, len);
        if (r != Errno.OK)
            return r;
        if (Mm.Exited)
            return Errno.ENOMEM;
        var end = start + len;
        var vmas = Mm.VmasIn(start, end);
        if (vmas.Count == 0)
            return Errno.EINVAL;
        foreach (var v in vmas)
        {
            if (Kernel.UnregisterChecksOwner && v.UffdCtx is not null && v.UffdCtx != this)
                return Errno.EINVAL;
            if (!Mm.VmaCanUserfault(v, v.Flags, WpAsync, IsV6))
                return Errno.EINVAL;
        }
        foreach (var v in vmas)
        {
            if (v.UffdCtx is null)
                continue;
            var s = Math.Max(start, v.Start);
            var e = Math.Min(end, v.End);
            if (v.UserfaultfdMissing)
                v.UffdCtx.WakeUserfault(s, e - s, UserfaultOutcome.Unregister);
            Mm.UserfaultfdClearVma(v, s, e);
        }
        return Errno.OK;
    }

    /// <summary>Models userfaultfd_wake: wakes blocked faults in the range; no VMA checks.</summary>
    public Errno Wake(ulong start, ulong len)
    {
        using var _ = Kernel.Enter();
        var st = CheckState();
        if (st != Errno.OK)
            return st;
        var r = ValidateRange(start, len);
        if (r != Errno.OK)
            return r;
        Kernel.InjectPoint(Mm);
        CountRoundTrip();
        WakeUserfault(start, len, UserfaultOutcome.Wake);
        return Errno.OK;
    }

    /// <summary>
    /// Models userfaultfd_writeprotect: mmap_changing first (EAGAIN), then the range and
    /// mode checks (WP|DONTWAKE is EINVAL), then mwriteprotect_range. Mode 0 without
    /// DONTWAKE wakes the range; mode WP never wakes.
    /// </summary>
    public Errno Writeprotect(ulong start, ulong len, ulong mode)
    {
        using var _ = Kernel.Enter();
        if ((mode & Uapi.WriteprotectModeWp) == 0)
            CountRoundTrip();
        var st = CheckState();
        if (st != Errno.OK)
            return st;
        Kernel.InjectPoint(Mm);
        if (MmapChangingSeen(start))
            return Errno.EAGAIN;
        var r = ValidateRange(start, len);
        if (r != Errno.OK)
            return r;
        if ((mode & ~(Uapi.WriteprotectModeWp | Uapi.WriteprotectModeDontwake)) != 0)
            return Errno.EINVAL;
        var wp = (mode & Uapi.WriteprotectModeWp) != 0;
        var dontwake = (mode & Uapi.WriteprotectModeDontwake) != 0;
        if (wp && dontwake)
            return Errno.EINVAL;
        if (Mm.Exited || TargetExiting(start))
            return Errno.ESRCH;
        r = Mm.MwriteprotectRange(this, start, len, wp);
        if (r != Errno.OK)
            return r;
        if (!wp && !dontwake)
            WakeUserfault(start, len, UserfaultOutcome.Writeprotect);
        return Errno.OK;
    }

    /// <summary>
    /// Models userfaultfd_copy: mmap_changing (<see cref="EarlyEagain"/>), source and
    /// destination ranges (the source may be unaligned), mode bits; then mfill_atomic_copy. The field
    /// gets bytes copied or -errno; a partial copy fails with EAGAIN; the copied range is
    /// woken unless DONTWAKE.
    /// </summary>
    public FillResult Copy(ulong dst, ReadOnlySpan<byte> src, ulong srcAddr, ulong len, ulong mode) =>
        Copy(dst, src, (ulong)src.Length, repeat: false, srcAddr, len, mode);

    /// <summary>
    /// UFFDIO_COPY from a source buffer of <paramref name="srcLength"/> bytes that all hold
    /// <paramref name="fill"/> (the scenario language's `copy NAME FIRST COUNT BYTE`), without
    /// materialising the buffer: a copy longer than the buffer runs off its end (EFAULT).
    /// </summary>
    public FillResult CopyFill(ulong dst, byte fill, ulong srcLength, ulong srcAddr, ulong len, ulong mode)
    {
        Span<byte> page = stackalloc byte[(int)Kernel.PageSize];
        page.Fill(fill);
        return Copy(dst, page, srcLength, repeat: true, srcAddr, len, mode);
    }

    /// <summary>The copy itself: <paramref name="src"/> is the whole buffer, or (<paramref name="repeat"/>) one page that every source page equals.</summary>
    private FillResult Copy(ulong dst, ReadOnlySpan<byte> src, ulong srcLength, bool repeat, ulong srcAddr, ulong len, ulong mode)
    {
        using var _ = Kernel.Enter();
        return Account(CopyCore(dst, src, srcLength, repeat, srcAddr, len, mode), dst, len, carriesBytes: true);
    }

    private FillResult CopyCore(ulong dst, ReadOnlySpan<byte> src, ulong srcLength, bool repeat, ulong srcAddr, ulong len, ulong mode)
    {
        var st = CheckState();
        if (st != Errno.OK)
            return FillResult.Untouched(st);
        Kernel.InjectPoint(Mm);
        if (MmapChangingSeen(dst))
            return EarlyEagain();
        var r = Kernel.CopyValidatesSourceRange ? ValidateRange(srcAddr, len, allowUnaligned: true) : Errno.OK;
        if (r == Errno.OK)
            r = ValidateRange(dst, len);
        if (r == Errno.OK && !Kernel.CopyValidatesSourceRange && srcAddr + len <= srcAddr)
            r = Errno.EINVAL;
        if (r != Errno.OK)
            return FillResult.Untouched(r);
        if ((mode & ~(Uapi.CopyModeDontwake | Uapi.CopyModeWp)) != 0)
            return FillResult.Untouched(Errno.EINVAL);
        if (srcLength < len)
            return FillResult.Untouched(Errno.EFAULT);
        if (Mm.Exited || TargetExiting(dst))
            return FillResult.Untouched(Errno.ESRCH);
        var ret = Mm.MfillAtomic(this, dst, src, repeat, len, MfillMode.Copy, (mode & Uapi.CopyModeWp) != 0);
        return FinishFill(dst, len, ret, (mode & Uapi.CopyModeDontwake) != 0, UserfaultOutcome.Copy);
    }

    /// <summary>The ioctl's early mmap_changing check (<see cref="Kernel.FillEagainWritesField"/>).</summary>
    private FillResult EarlyEagain() =>
        Kernel.FillEagainWritesField ? new(Errno.EAGAIN, -(long)Errno.EAGAIN) : FillResult.Untouched(Errno.EAGAIN);

    /// <summary>
    /// The common entry checks of the fill ioctls, in the kernel's order: state, an ioctl
    /// number the profile does not know (userfaultfd_ioctl's default -EINVAL), then
    /// mmap_changing (<see cref="EarlyEagain"/>), then the range, unknown mode bits and a gone
    /// mm (field untouched). Null when the operation may run.
    /// </summary>
    private FillResult? FillPrelude(ulong start, ulong len, ulong mode, ulong knownModes, bool known)
    {
        var st = CheckState();
        if (st != Errno.OK)
            return FillResult.Untouched(st);
        if (!known)
            return FillResult.Untouched(Errno.EINVAL);
        Kernel.InjectPoint(Mm);
        if (MmapChangingSeen(start))
            return EarlyEagain();
        var r = ValidateRange(start, len);
        if (r != Errno.OK)
            return FillResult.Untouched(r);
        if ((mode & ~knownModes) != 0)
            return FillResult.Untouched(Errno.EINVAL);
        if (Mm.Exited || TargetExiting(start))
            return FillResult.Untouched(Errno.ESRCH);
        return null;
    }

    /// <summary>Models userfaultfd_zeropage (mode DONTWAKE only).</summary>
    public FillResult Zeropage(ulong start, ulong len, ulong mode)
    {
        using var _ = Kernel.Enter();
        return Account(ZeropageCore(start, len, mode), start, len, carriesBytes: false);
    }

    private FillResult ZeropageCore(ulong start, ulong len, ulong mode)
    {
        if (FillPrelude(start, len, mode, Uapi.ZeropageModeDontwake, known: true) is { } early)
            return early;
        var ret = Mm.MfillAtomic(this, start, default, false, len, MfillMode.Zeropage, false);
        return FinishFill(start, len, ret, (mode & Uapi.ZeropageModeDontwake) != 0, UserfaultOutcome.Zeropage);
    }

    /// <summary>Models userfaultfd_continue (modes DONTWAKE, and WP since 6.4: <see cref="Kernel.HasContinueModeWp"/>).</summary>
    public FillResult Continue(ulong start, ulong len, ulong mode)
    {
        using var _ = Kernel.Enter();
        return Account(ContinueCore(start, len, mode), start, len, carriesBytes: false);
    }

    private FillResult ContinueCore(ulong start, ulong len, ulong mode)
    {
        var modes = Uapi.ContinueModeDontwake | (Kernel.HasContinueModeWp ? Uapi.ContinueModeWp : 0);
        if (FillPrelude(start, len, mode, modes, known: Kernel.IsV6) is { } early)
            return early;
        var ret = Mm.MfillAtomic(this, start, default, false, len, MfillMode.Continue, (mode & Uapi.ContinueModeWp) != 0);
        return FinishFill(start, len, ret, (mode & Uapi.ContinueModeDontwake) != 0, UserfaultOutcome.Continue);
    }

    /// <summary>Models userfaultfd_poison (mode DONTWAKE only).</summary>
    public FillResult Poison(ulong start, ulong len, ulong mode)
    {
        using var _ = Kernel.Enter();
        return Account(PoisonCore(start, len, mode), start, len, carriesBytes: false);
    }

    private FillResult PoisonCore(ulong start, ulong len, ulong mode)
    {
        if (FillPrelude(start, len, mode, Uapi.PoisonModeDontwake, known: Kernel.HasPoison) is { } early)
            return early;
        var ret = Mm.MfillAtomic(this, start, default, false, len, MfillMode.Poison, false);
        return FinishFill(start, len, ret, (mode & Uapi.PoisonModeDontwake) != 0, UserfaultOutcome.Poison);
    }

    /// <summary>
    /// Models userfaultfd_move: only a thread of the context's own process may move
    /// (EINVAL otherwise, field untouched); both ranges page aligned; then move_pages.
    /// </summary>
    public FillResult Move(Mm caller, ulong dst, ulong src, ulong len, ulong mode)
    {
        using var _ = Kernel.Enter();
        return Account(MoveCore(caller, dst, src, len, mode), dst, len, carriesBytes: true);
    }

    private FillResult MoveCore(Mm caller, ulong dst, ulong src, ulong len, ulong mode)
    {
        var st = CheckState();
        if (st != Errno.OK)
            return FillResult.Untouched(st);
        if (!Kernel.HasMove)
            return FillResult.Untouched(Errno.EINVAL);
        Kernel.InjectPoint(Mm);
        if (MmapChangingSeen(dst))
            return new(Errno.EAGAIN, -(long)Errno.EAGAIN);
        if (caller != Mm)
            return FillResult.Untouched(Errno.EINVAL);
        var r = ValidateRange(dst, len);
        if (r == Errno.OK)
            r = ValidateRange(src, len);
        if (r != Errno.OK)
            return FillResult.Untouched(r);
        if ((mode & ~(Uapi.MoveModeDontwake | Uapi.MoveModeAllowSrcHoles)) != 0)
            return FillResult.Untouched(Errno.EINVAL);
        if (Mm.Exited || TargetExiting(dst))
            return FillResult.Untouched(Errno.ESRCH);
        var ret = Mm.MovePages(this, dst, src, len, (mode & Uapi.MoveModeAllowSrcHoles) != 0);
        return FinishFill(dst, len, ret, (mode & Uapi.MoveModeDontwake) != 0, UserfaultOutcome.Move);
    }

    /// <summary>
    /// atomic_read(&amp;ctx->mmap_changing): a non-cooperative event is prepared and not yet
    /// read, or an injected window (<see cref="InjectSite.MmapChanging"/>) holds it open.
    /// </summary>
    private bool MmapChangingSeen(ulong addr) =>
        MmapChanging > 0 || Kernel.Inject(InjectSite.MmapChanging, Mm, this, null, addr) is not null;

    /// <summary>
    /// mmget_not_zero(ctx->mm) fails because the target process is exiting
    /// (<see cref="InjectSite.TargetExiting"/>): the process exits, and the ioctl gets ESRCH.
    /// </summary>
    private bool TargetExiting(ulong addr)
    {
        if (Kernel.Inject(InjectSite.TargetExiting, Mm, this, null, addr) is null)
            return false;
        Mm.Exit();
        return true;
    }

    /// <summary>The §3.10 convention: field = bytes done or -errno; partial → EAGAIN; wake the done range.</summary>
    private FillResult FinishFill(ulong start, ulong len, long ret, bool dontwake, UserfaultOutcome by)
    {
        if (ret < 0)
            return new((Errno)(-ret), ret);
        if (!dontwake)
            WakeUserfault(start, (ulong)ret, by);
        return new((ulong)ret == len ? Errno.OK : Errno.EAGAIN, ret);
    }

    /// <summary>dup_userfaultfd: the child context of a fork (same features; fd created when the FORK event is read).</summary>
    internal UserfaultfdCtx ForkChild(Mm child)
    {
        var c = new UserfaultfdCtx(child, Kernel.NextCtxId(), NonBlocking, UserModeOnly)
        {
            State = UffdState.Running,
            Features = Features,
            Installed = false,
        };
        Kernel.RegisterCtx(c);
        return c;
    }
}

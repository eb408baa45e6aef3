using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>The kernel version whose behaviour the model follows (spec §0.3, §7).</summary>
public enum KernelProfile
{
    /// <summary>The seed: Linux 5.7, uffd-wp for private anonymous memory only.</summary>
    V5_7,
    /// <summary>The reference machine's kernel, Linux 6.18 (default).</summary>
    V6_18,
    /// <summary>Linux 6.1 as Debian 12 builds it (6.1.0-56-amd64): no WP_UNPOPULATED, POISON, WP_ASYNC or MOVE; soft-dirty and memory-failure built in.</summary>
    V6_1,
}

/// <summary>transparent_hugepage/enabled.</summary>
public enum ThpMode
{
    Never,
    Madvise,
    Always,
}

/// <summary>
/// Machine settings that are configuration rather than kernel logic (spec errata 8, 18).
/// The defaults are the reference machine's.
/// </summary>
public sealed record MachineConfig
{
    /// <summary>A swap device is active (default: none).</summary>
    public bool Swap { get; init; }
    /// <summary>CONFIG_MEM_SOFT_DIRTY (default: off).</summary>
    public bool SoftDirty { get; init; }
    /// <summary>CONFIG_MEMORY_FAILURE (default: off; poison then raises BUS_ADRERR).</summary>
    public bool MemoryFailure { get; init; }
    /// <summary>transparent_hugepage/enabled (default: madvise).</summary>
    public ThpMode Thp { get; init; } = ThpMode.Madvise;
    /// <summary>transparent_hugepage/use_zero_page (default: 1).</summary>
    public bool ThpUseZeroPage { get; init; } = true;
    /// <summary>
    /// Whether a read fault on empty private anonymous memory maps the zero page (4 KiB, and
    /// the huge zero page for a THP-sized fault) (default: yes, as mainline's
    /// do_anonymous_page and do_huge_pmd_anonymous_page do). No on hosts whose kernel forbids
    /// it there: a PVM guest kernel booted with <c>pvm_no_zero_page=1</c> allocates a page on
    /// a read fault as a write fault does, while UFFDIO_ZEROPAGE still maps the zero page
    /// (recorded with kuffd on such a host). <c>uffdgrpc probe</c> reports it as
    /// <c>read_fault_zero_page</c>.
    /// </summary>
    public bool ReadFaultZeroPage { get; init; } = true;
    /// <summary>
    /// The machine's RAM in bytes (MemTotal; default 4 GiB). Anon pages, page cache, THPs and
    /// page tables together never exceed it: an allocation beyond it reclaims, then runs the
    /// OOM killer (<see cref="Kernel.AllocPagesSlowpath"/>).
    /// </summary>
    public ulong MemoryBytes { get; init; } = 4UL << 30;
    /// <summary>The swap device's size in bytes when <see cref="Swap"/> is set (default 1 GiB); a full device fails swap-out.</summary>
    public ulong SwapBytes { get; init; } = 1UL << 30;
    /// <summary>Frames of RAM (totalram_pages), derived from <see cref="MemoryBytes"/>.</summary>
    public long MaxPages => (long)(MemoryBytes / Kernel.PageSize);
    /// <summary>Swap slots (total_swap_pages): 0 without a swap device.</summary>
    public long SwapPages => Swap ? (long)(SwapBytes / Kernel.PageSize) : 0;
    /// <summary>Largest request payload (COPY length) accepted, in bytes.</summary>
    public ulong MaxCopyBytes { get; init; } = 64UL << 20;
}

/// <summary>
/// One simulated machine: frames, the swap device, address spaces, userfaultfd contexts and
/// simulated threads, all protected by one lock.
/// </summary>
/// <remarks>
/// Lock order: <see cref="Lock"/> is the only lock of the model. It stands for the mmap
/// locks, page-table locks and uffd wait-queue locks of the real kernel together, so every
/// operation is atomic with respect to every other one on the same machine. Operations
/// never sleep while holding it: a thread that must wait (in handle_userfault or for a
/// non-cooperative event to be read) parks its operation and releases the lock; a wake
/// marks it runnable and it is retried from the top of its fault path when the waking
/// operation ends (<see cref="RunPending"/>), as the kernel retries a fault after the
/// waker drops the mmap lock. Callers outside the model take no other lock while holding
/// this one, and completion callbacks run under it and must not block.
/// </remarks>
public sealed partial class Kernel
{
    public const ulong PageSize = 4096;
    public const int PageShift = 12;
    public const int PtrsPerTable = 512;
    public const ulong PmdSize = 2UL << 20;
    public const ulong PmdMask = ~(PmdSize - 1);
    public const ulong TaskSize = 0x0000_7fff_ffff_f000;
    public const ulong FirstPfn = 0x1000;

    private readonly FrameTable _frames = new(FirstPfn);
    private readonly Dictionary<ulong, SwapSlot> _swap = [];
    private readonly Queue<SimThread> _runnable = new();
    private readonly List<Mm> _mms = [];
    private ulong _nextSwapSlot = 1;
    private int _nextTid = 1000;
    private int _nextFileId = 1;
    private int _nextMmId = 1;
    private int _nextCtxId = 1;
    private readonly List<UserfaultfdCtx> _ctxs = [];
    private int _depth;
    private long _liveFrames;
    private long _pgtablePages;
    private long _pgtableReserved;
    private long _shmemSwapped;
    private readonly List<MemFile> _files = [];
    private List<Action> _afterUnlock = [];

    public Kernel(KernelProfile profile = KernelProfile.V6_18, MachineConfig? config = null)
    {
        Profile = profile;
        Config = config ?? DefaultConfig(profile);
        ZeroPage = NewFrame(PageKind.Zero);
        HugeZeroFolio = NewFolio(PageKind.Zero, hugeZero: true);
    }

    /// <summary>The machine lock (see the type remarks for the lock order).</summary>
    public object Lock { get; } = new();
    public KernelProfile Profile { get; }
    public MachineConfig Config { get; private set; }
    public Page ZeroPage { get; }
    public Folio HugeZeroFolio { get; }
    public IReadOnlyList<Mm> Mms => _mms;

    /// <summary>Frames currently allocated (anon, page cache), for accounting tests.</summary>
    public long LiveFrames => Interlocked.Read(ref _liveFrames);

    /// <summary>Chunks of the frame table held now (<see cref="FrameTable"/>): bounded by the live frames, not by every allocation ever made.</summary>
    public int FrameTableChunks => Locked(() => _frames.ChunkCount);

    /// <summary>Slabs of page contents held now (<see cref="ContentPool"/>): bounded by the live frames with contents.</summary>
    public int ContentSlabs => Locked(() => _frames.Contents.SlabCount);

    /// <summary>Frames holding contents (a written non-zero byte); the others read as zeros.</summary>
    public long FramesWithContents => Locked(() => _frames.Contents.UsedSlots);
    public int SwapSlotsInUse => _swap.Count;

    /// <summary>The machine's RAM in bytes (<see cref="MachineConfig.MemoryBytes"/>).</summary>
    public ulong MemoryBytes => Config.MemoryBytes;
    /// <summary>Frames of RAM (totalram_pages).</summary>
    public long TotalPages => Config.MaxPages;
    /// <summary>Page-table pages of every address space (PUD, PMD and PTE tables).</summary>
    public long PageTablePages => Interlocked.Read(ref _pgtablePages);
    /// <summary>Frames in use: <see cref="LiveFrames"/> plus <see cref="PageTablePages"/> (MemTotal − MemFree).</summary>
    public long UsedPages => LiveFrames + PageTablePages;
    /// <summary>Swap slots of the device (total_swap_pages).</summary>
    public long SwapTotalPages => Config.SwapPages;
    /// <summary>Swap slots in use: anon swap entries and swap cache, plus shmem pages in swap.</summary>
    public long SwapUsedPages => _swap.Count + _shmemSwapped;

    /// <summary>
    /// Changes machine settings (swap, soft-dirty) before the first mapping exists. On a
    /// profile whose build fixes soft-dirty and memory-failure (<see cref="ConfigIsBuiltIn"/>)
    /// turning either off is an <see cref="ArgumentException"/> and changes nothing.
    /// </summary>
    public void Configure(Func<MachineConfig, MachineConfig> change)
    {
        using var _ = Enter();
        var next = change(Config);
        if (ConfigIsBuiltIn(Profile) && (!next.SoftDirty || !next.MemoryFailure))
            throw new ArgumentException($"the {Profile} profile's kernel has CONFIG_MEM_SOFT_DIRTY and CONFIG_MEMORY_FAILURE built in", nameof(change));
        Config = next;
    }

    /// <summary>Creates a new, empty address space (a process).</summary>
    public Mm CreateMm()
    {
        using var _ = Enter();
        var mm = new Mm(this, _nextMmId++);
        _mms.Add(mm);
        return mm;
    }

    internal void RemoveMm(Mm mm) => _mms.Remove(mm);

    /// <summary>Creates a simulated thread in <paramref name="mm"/>.</summary>
    public SimThread CreateThread(Mm mm)
    {
        using var _ = Enter();
        var t = new SimThread(this, mm, _nextTid++);
        mm.Threads.Add(t);
        t.Listed = true;
        mm.LiveThreads++;
        BlocktimeThreadsChanged(mm);
        return t;
    }

    internal int NextTid() => _nextTid++;

    internal int NextCtxId() => _nextCtxId++;

    internal void RegisterCtx(UserfaultfdCtx ctx) => _ctxs.Add(ctx);

    /// <summary>Every context created on this machine and not yet freed (released ones included until <see cref="UserfaultfdCtxPut"/>).</summary>
    public IReadOnlyList<UserfaultfdCtx> Contexts => _ctxs;

    /// <summary>
    /// Models the last userfaultfd_ctx_put (fs/userfaultfd.c): a context that was released
    /// (its file closed, every VMA unregistered, its waiters woken) is freed once nothing
    /// names it any more; the host calls this when it forgets the context's id. A context that
    /// is not released stays.
    /// </summary>
    public void UserfaultfdCtxPut(UserfaultfdCtx ctx)
    {
        using var _ = Enter();
        if (ctx.Released)
            _ctxs.Remove(ctx);
    }

    /// <summary>
    /// Models userfaultfd(2) (or ioctl(USERFAULTFD_IOC_NEW) on /dev/userfaultfd): flags other
    /// than O_CLOEXEC, O_NONBLOCK and UFFD_USER_MODE_ONLY are EINVAL. The caller is
    /// privileged (CAP_SYS_PTRACE), as the reference harness runs as root.
    /// </summary>
    public Errno Userfaultfd(Mm mm, int flags, out UserfaultfdCtx? ctx)
    {
        using var _ = Enter();
        ctx = null;
        if ((flags & ~(Uapi.OCloexec | Uapi.ONonblock | Uapi.UffdUserModeOnly)) != 0)
            return Errno.EINVAL;
        if ((flags & Uapi.UffdUserModeOnly) != 0 && !HasUserModeOnly)
            return Errno.EINVAL;
        ctx = new UserfaultfdCtx(mm, _nextCtxId++, (flags & Uapi.ONonblock) != 0, (flags & Uapi.UffdUserModeOnly) != 0);
        _ctxs.Add(ctx);
        return Errno.OK;
    }

    /// <summary>memfd_create(2) + ftruncate, or an unlinked regular file (O_TMPFILE).</summary>
    public MemFile CreateFile(string name, bool shmem, ulong size)
    {
        using var _ = Enter();
        var f = new MemFile(_nextFileId++, name, shmem, size);
        _files.Add(f);
        return f;
    }

    /// <summary>Every file of the machine (the inodes whose page cache reclaim scans).</summary>
    internal IReadOnlyList<MemFile> Files => _files;

    // ---------------------------------------------------------------- frames

    public Page? PageOf(ulong pfn) => _frames.Get(pfn);

    private Page NewFrame(PageKind kind) => _frames.Add(kind);

    private Folio NewFolio(PageKind kind, bool hugeZero)
    {
        // Keep THP frames naturally aligned, as the buddy allocator does.
        _frames.Align(PtrsPerTable);
        var pages = new Page[PtrsPerTable];
        for (var i = 0; i < pages.Length; i++)
            pages[i] = NewFrame(kind);
        var f = new Folio(pages, hugeZero);
        foreach (var p in pages)
            p.Folio = f;
        return f;
    }

    /// <summary>
    /// Allocates a zero-filled small page for <paramref name="mm"/> (vma_alloc_folio with
    /// GFP_HIGHUSER_MOVABLE, order 0): beyond the machine's memory it reclaims and then
    /// runs the OOM killer (<see cref="AllocPagesSlowpath"/>); null when it still fails.
    /// </summary>
    internal Page? AllocPage(PageKind kind, Mm? mm)
    {
        if (!AllocPagesSlowpath(1, mm, Gfp.HighUserMovable))
            return null;
        _liveFrames++;
        return NewFrame(kind);
    }

    /// <summary>
    /// Allocates a PMD-sized anonymous THP folio (vma_alloc_anon_folio_pmd): an order-9
    /// allocation is costly, so it may reclaim (defrag=madvise: only for VM_HUGEPAGE,
    /// <paramref name="mayReclaim"/>) but never runs the OOM killer; null means fall back.
    /// </summary>
    internal Folio? AllocThp(Mm? mm, bool mayReclaim)
    {
        if (!AllocPagesSlowpath(PtrsPerTable, mm, mayReclaim ? Gfp.TransHuge : Gfp.TransHugeLight))
            return null;
        _liveFrames += PtrsPerTable;
        return NewFolio(PageKind.Anon, hugeZero: false);
    }

    /// <summary>Allocates a PMD-sized page-cache folio for <paramref name="file"/> at <paramref name="index"/> (shmem_alloc_folio, HPAGE_PMD_ORDER; no direct reclaim here).</summary>
    internal Folio? AllocFileThp(MemFile file, ulong index, Mm? mm)
    {
        if (!AllocPagesSlowpath(PtrsPerTable, mm, Gfp.TransHugeLight))
            return null;
        _liveFrames += PtrsPerTable;
        var f = NewFolio(PageKind.File, hugeZero: false);
        for (var i = 0; i < f.Pages.Length; i++)
        {
            f.Pages[i].Mapping = file;
            f.Pages[i].Index = index + (ulong)i;
        }
        return f;
    }

    /// <summary>
    /// __pte_alloc → pte_alloc_one (GFP_PGTABLE_USER, which reclaims and may OOM-kill): makes
    /// room for one page-table page that the caller installs next; false is -ENOMEM.
    /// </summary>
    internal bool PteAllocOne(Mm mm)
    {
        if (!AllocPagesSlowpath(1, mm, Gfp.PgtableUser))
            return false;
        _pgtableReserved++;
        return true;
    }

    /// <summary>
    /// mm_inc_nr_ptes / mm_dec_nr_ptes (and the PMD and PUD counterparts) for a table an
    /// address space gained or freed. A table installed after <see cref="PteAllocOne"/> uses
    /// its reservation; the other paths (split of a huge PMD, fork, mremap, MOVE, uffd-wp
    /// markers, upper levels) cannot fail in the model and are charged as they come.
    /// </summary>
    internal void AccountPgtable(int delta)
    {
        _pgtablePages += delta;
        if (delta > 0)
        {
            if (_pgtableReserved > 0)
                _pgtableReserved--;
            else
                FrameBudget?.ForceCharge(this, delta);
        }
        else
        {
            FrameBudget?.Uncharge(this, -delta);
        }
    }

    /// <summary>Frames went back to the machine (and to the host's budget).</summary>
    private void FramesFreed(long n)
    {
        _liveFrames -= n;
        FrameBudget?.Uncharge(this, n);
    }

    internal void ShmemSwapped(int delta) => _shmemSwapped += delta;

    /// <summary>Frees <paramref name="page"/> once nothing maps or caches it.</summary>
    internal void MaybeFree(Page page)
    {
        if (page.IsZeroPage || page.PreciseMapCount > 0 || page.Pins > 0 || page.HwPoison)
            return;
        if (page.SwapCacheSlot != 0)
        {
            if (_swap.TryGetValue(page.SwapCacheSlot, out var sc) && sc.Count > 0)
                return;
            SwapCacheDelete(page);
        }
        if (page.Kind == PageKind.File && page.Mapping is { } f && f.Cache.GetValueOrDefault(page.Index) == page)
            return;
        if (page.Folio is { } folio)
        {
            if (folio.Mapped)
                return;
            foreach (var sub in folio.Pages)
            {
                if (_frames.Remove(sub.Pfn))
                    FramesFreed(1);
            }
            return;
        }
        if (_frames.Remove(page.Pfn))
            FramesFreed(1);
    }

    /// <summary>
    /// The last VMA of a shared anonymous mapping went away: as the final fput of its shmem
    /// file evicts the inode (shmem_evict_inode → shmem_truncate_range), its page cache and
    /// swap are freed. Files with a name (memfd, regular) outlive their mappings.
    /// </summary>
    internal void ReleaseAnonShmemIfUnmapped(MemFile file)
    {
        if (!file.AnonymousShared)
            return;
        foreach (var mm in _mms)
        {
            foreach (var v in mm.Vmas)
            {
                if (v.File == file)
                    return;
            }
        }
        var pages = file.Cache.Values.ToList();
        file.Cache.Clear();
        file.Swapped.Clear();
        file.Disk.Clear();
        foreach (var page in pages)
            MaybeFree(page);
    }

    // ---------------------------------------------------------------- swap

    /// <summary>get_nr_swap_pages() == 0: no free slot on the swap device (or no device).</summary>
    internal bool SwapFull => SwapUsedPages >= Config.SwapPages;

    /// <summary>Writes <paramref name="page"/> to a new swap slot (add_to_swap + swap_writepage); the caller checked <see cref="SwapFull"/>.</summary>
    internal ulong SwapOut(Page page)
    {
        var slot = _nextSwapSlot++;
        _swap[slot] = new SwapSlot { Data = page.CopyData(), Count = 1 };
        return slot;
    }

    internal SwapSlot SwapSlotOf(ulong slot) => _swap[slot];

    /// <summary>swap_duplicate.</summary>
    internal void SwapDup(ulong slot) => _swap[slot].Count++;

    /// <summary>swap_free / free_swap_and_cache: drops one reference to a swap slot.</summary>
    internal void SwapFree(ulong slot)
    {
        if (!_swap.TryGetValue(slot, out var s))
            return;
        s.Count--;
        if (s.Count > 0)
            return;
        if (s.Cache is { } page && page.PreciseMapCount == 0)
        {
            SwapCacheDelete(page);
            MaybeFree(page);
            return;
        }
        if (s.Cache is null)
            _swap.Remove(slot);
    }

    /// <summary>
    /// folio_free_swap: drops the page from the swap cache only when no swap entry refers to
    /// its slot any more (after fork both processes hold the entry until each swaps in).
    /// </summary>
    internal bool TryFreeSwap(Page page)
    {
        if (page.SwapCacheSlot == 0)
            return true;
        if (_swap.TryGetValue(page.SwapCacheSlot, out var s) && s.Count > 0)
            return false;
        SwapCacheDelete(page);
        return true;
    }

    /// <summary>delete_from_swap_cache / folio_free_swap: the page leaves the swap cache; a slot nobody references is freed.</summary>
    internal void SwapCacheDelete(Page page)
    {
        if (page.SwapCacheSlot == 0)
            return;
        var id = page.SwapCacheSlot;
        page.SwapCacheSlot = 0;
        if (_swap.TryGetValue(id, out var s))
        {
            s.Cache = null;
            if (s.Count <= 0)
                _swap.Remove(id);
        }
    }

    // ---------------------------------------------------------------- scheduling

    /// <summary>Enters the machine lock; the outermost exit runs woken threads.</summary>
    internal Scope Enter()
    {
        Monitor.Enter(Lock);
        _depth++;
        return new Scope(this);
    }

    internal readonly struct Scope(Kernel kernel) : IDisposable
    {
        public void Dispose()
        {
            try
            {
                if (kernel._depth == 1)
                    kernel.RunPending();
            }
            finally
            {
                // Whatever a woken thread threw, the lock is released and the depth restored:
                // the caller (the server) decides whether the machine can still be trusted.
                kernel._depth--;
                List<Action>? after = null;
                if (kernel._depth == 0 && kernel._afterUnlock.Count > 0)
                {
                    after = kernel._afterUnlock;
                    kernel._afterUnlock = [];
                }
                Monitor.Exit(kernel.Lock);
                if (after is not null)
                {
                    foreach (var a in after)
                        a();
                }
            }
        }
    }

    /// <summary>
    /// Runs <paramref name="action"/> once the outermost holder has released the machine lock,
    /// as the kernel wakes a waiter after dropping its spinlock: wakeups of sleepers outside
    /// the model (a reader of a uffd, a caller waiting for an operation) may then run their
    /// continuation at once, on the releasing thread, without holding the lock.
    /// </summary>
    public void DeferUntilUnlocked(Action action)
    {
        Debug.Assert(Monitor.IsEntered(Lock));
        _afterUnlock.Add(action);
    }

    /// <summary>
    /// Pages a long operation (populate, a multi-page access) handles before it yields the
    /// machine lock, as the kernel's loops call cond_resched() and GUP drops the mmap lock.
    /// </summary>
    public const int ReschedPages = 4096;

    private Queue<SimThread> _yielded = new();

    /// <summary>
    /// Set by a host that lets other calls run between the chunks of a long operation: it is
    /// called (after the lock is released) when a thread yielded, and must arrange for
    /// <see cref="RunYielded"/> to run soon on another thread. Without it (in-process replay)
    /// operations run to completion or to their next sleep, as before.
    /// </summary>
    public Action? ScheduleYielded { get; set; }

    /// <summary>Whether a long operation may yield here (a host schedules the rest).</summary>
    internal bool CanYield => ScheduleYielded is not null;

    /// <summary>cond_resched(): <paramref name="t"/>'s operation continues from where it stopped once the host runs <see cref="RunYielded"/>.</summary>
    internal void Yield(SimThread t)
    {
        Debug.Assert(Monitor.IsEntered(Lock) && CanYield);
        _yielded.Enqueue(t);
        if (_yielded.Count == 1)
            DeferUntilUnlocked(ScheduleYielded!);
    }

    /// <summary>Continues every operation that yielded (each for at most another chunk).</summary>
    public void RunYielded()
    {
        using var _ = Enter();
        var batch = _yielded;
        _yielded = new Queue<SimThread>();
        foreach (var t in batch)
        {
            if (t.Op is not null && !t.IsBlocked && t.State != ThreadState.Exited)
                t.RunOp();
        }
    }

    /// <summary>Marks a parked thread runnable: it retries when the current operation ends.</summary>
    internal void MakeRunnable(SimThread t)
    {
        Debug.Assert(Monitor.IsEntered(Lock));
        if (t.Op is null || t.Queued)
            return;
        t.Queued = true;
        _runnable.Enqueue(t);
    }

    /// <summary>Runs every runnable thread until each completes or parks again.</summary>
    private void RunPending()
    {
        while (_runnable.Count > 0)
        {
            var t = NextRunnable();
            t.Queued = false;
            t.RunOp();
        }
    }

    /// <summary>Starts <paramref name="op"/> on <paramref name="thread"/> and runs it until it completes or parks.</summary>
    public void Start(SimThread thread, SyscallOp op)
    {
        using var _ = Enter();
        if (thread.Op is not null)
            throw new InvalidOperationException($"thread {thread.Tid} is busy");
        if (thread.State == ThreadState.Exited)
            throw new InvalidOperationException($"thread {thread.Tid} has exited");
        InjectPoint(thread.Mm);
        if (thread.State == ThreadState.Exited)
        {
            // Killed at syscall entry (an injected event, or a preempted thread's allocation
            // that ran the OOM killer): the fatal signal wins and the call never runs, as
            // when a SIGKILL is pending on entry. The caller gets an aborted operation.
            op.Thread = thread;
            op.Abort();
            return;
        }
        thread.Op = op;
        op.Thread = thread;
        thread.RunOp();
    }

    /// <summary>Runs <paramref name="fn"/> under the machine lock (woken threads run afterwards).</summary>
    public T Locked<T>(Func<T> fn)
    {
        using var _ = Enter();
        return fn();
    }

    /// <summary>
    /// Runs <paramref name="fn"/> on <paramref name="state"/> under the machine lock (woken
    /// threads run afterwards): with a static lambda, a call allocates no closure.
    /// </summary>
    public T Locked<TState, T>(TState state, Func<TState, T> fn)
    {
        using var _ = Enter();
        return fn(state);
    }

    /// <summary>Runs <paramref name="fn"/> under the machine lock (woken threads run afterwards).</summary>
    public void Locked(Action fn)
    {
        using var _ = Enter();
        fn();
    }
}

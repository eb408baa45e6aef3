namespace UffdGrpc.Mm;

/// <summary>The allocation contexts the model distinguishes (the gfp_t and order of the kernel's call).</summary>
internal enum Gfp
{
    /// <summary>GFP_HIGHUSER_MOVABLE, order 0: direct reclaim, then the OOM killer.</summary>
    HighUserMovable,
    /// <summary>GFP_PGTABLE_USER (GFP_KERNEL | __GFP_ZERO | __GFP_ACCOUNT), order 0: likewise.</summary>
    PgtableUser,
    /// <summary>GFP_TRANSHUGE, order 9: direct reclaim, but no OOM killer for a costly order.</summary>
    TransHuge,
    /// <summary>GFP_TRANSHUGE_LIGHT, order 9: no direct reclaim, no OOM killer.</summary>
    TransHugeLight,
}

/// <summary>
/// A host-wide budget consulted for every frame a machine allocates (pages and page tables).
/// Called under the machine lock, possibly from several machines at once: implementations
/// must be thread-safe and must not block.
/// </summary>
public interface IFrameBudget
{
    /// <summary>
    /// May <paramref name="machine"/> take <paramref name="pages"/> more frames? True charges
    /// them; false refuses (nothing charged) and the machine behaves as if out of memory:
    /// it reclaims, then runs the OOM killer.
    /// </summary>
    bool TryCharge(Kernel machine, long pages);

    /// <summary>Frames the machine takes without being able to fail (some page tables); always charged.</summary>
    void ForceCharge(Kernel machine, long pages);

    /// <summary>Frames <paramref name="machine"/> gave back.</summary>
    void Uncharge(Kernel machine, long pages);
}

/// <summary>What made the machine run out of memory.</summary>
public enum OomCause
{
    /// <summary>The machine's own memory (<see cref="MachineConfig.MemoryBytes"/>) was full.</summary>
    MachineMemory,
    /// <summary>The host's <see cref="IFrameBudget"/> refused the frames.</summary>
    HostBudget,
}

/// <summary>
/// One run of the OOM killer (the "Killed process" line of oom_kill_process, or "Out of
/// memory and no killable processes..." when <see cref="VictimMmId"/> is null).
/// </summary>
/// <param name="Seq">1 for the machine's first OOM event, then 2, 3, …</param>
/// <param name="VictimMmId">The killed address space, or null when nothing was killable.</param>
/// <param name="Badness">oom_badness of the victim (points; with oom_score_adj applied).</param>
/// <param name="Reason">The kernel's message: "Out of memory" or "Out of memory and no killable processes...".</param>
/// <param name="Cause">Whether the machine's memory or the host's budget was exhausted.</param>
/// <param name="RequestedPages">The allocation that failed (1 or 512 frames).</param>
/// <param name="RssPages">The victim's resident pages (MM_ANONPAGES + MM_FILEPAGES + MM_SHMEMPAGES).</param>
/// <param name="SwapEntries">The victim's swap entries (MM_SWAPENTS).</param>
/// <param name="PgtablePages">The victim's page-table pages (mm_pgtables_bytes / PAGE_SIZE).</param>
/// <param name="OomScoreAdj">The victim's oom_score_adj.</param>
/// <param name="KilledTids">The victim's threads, which died as with SIGKILL.</param>
public sealed record OomKill(
    long Seq,
    int? VictimMmId,
    long Badness,
    string Reason,
    OomCause Cause,
    long RequestedPages,
    long RssPages,
    long SwapEntries,
    long PgtablePages,
    int OomScoreAdj,
    IReadOnlyList<int> KilledTids);

/// <summary>The page allocator's slow path and the OOM killer (mm/page_alloc.c, mm/oom_kill.c).</summary>
public sealed partial class Kernel
{
    /// <summary>OOM_SCORE_ADJ_MIN: a process the OOM killer never selects.</summary>
    public const int OomScoreAdjMin = -1000;
    /// <summary>OOM_SCORE_ADJ_MAX.</summary>
    public const int OomScoreAdjMax = 1000;
    /// <summary>The most recent OOM events kept in <see cref="OomKills"/>.</summary>
    public const int OomLogCapacity = 256;

    private readonly Queue<OomKill> _oomLog = new();
    private long _oomSeq;

    /// <summary>The host's budget, consulted by every frame allocation (null: no host limit).</summary>
    public IFrameBudget? FrameBudget { get; set; }

    /// <summary>The most recent OOM events, oldest first (at most <see cref="OomLogCapacity"/>).</summary>
    public IReadOnlyList<OomKill> OomKills
    {
        get
        {
            using var _ = Enter();
            return [.. _oomLog];
        }
    }

    /// <summary>OOM events since the machine started (the log keeps only the latest).</summary>
    public long OomKillCount => Interlocked.Read(ref _oomSeq);

    /// <summary>
    /// Raised after the machine lock is released, once per OOM event, so that the host can
    /// close what the victim held (its file descriptors, among them its uffds).
    /// </summary>
    public event Action<OomKill>? OomKilled;

    /// <summary>
    /// get_page_from_freelist's watermark check plus the host's budget: room for
    /// <paramref name="pages"/> more frames. True charges the budget.
    /// </summary>
    private bool TryTakeFrames(long pages, out OomCause cause)
    {
        cause = OomCause.MachineMemory;
        if (_liveFrames + _pgtablePages + _pgtableReserved + pages > Config.MaxPages)
            return false;
        if (FrameBudget is { } b && !b.TryCharge(this, pages))
        {
            cause = OomCause.HostBudget;
            return false;
        }
        return true;
    }

    /// <summary>
    /// Models __alloc_pages_slowpath for the allocation of <paramref name="pages"/> frames on
    /// behalf of <paramref name="mm"/>: direct reclaim (__alloc_pages_direct_reclaim →
    /// try_to_free_pages, unless GFP_TRANSHUGE_LIGHT), then for order 0
    /// (__alloc_pages_may_oom; never for a costly order) the OOM killer, and a retry. An
    /// allocation for an address space that is dead — the OOM victim is current —
    /// fails (tsk_is_oom_victim: goto nopage), as does one when nothing is left to kill
    /// (the kernel panics: "System is deadlocked on memory"; the model fails the call).
    /// </summary>
    internal bool AllocPagesSlowpath(long pages, Mm? mm, Gfp gfp)
    {
        if (TryTakeFrames(pages, out var cause))
            return true;
        while (mm is not { Exited: true })
        {
            if (gfp != Gfp.TransHugeLight)
            {
                TryToFreePages(pages);
                if (TryTakeFrames(pages, out cause))
                    return true;
            }
            if (gfp is Gfp.TransHuge or Gfp.TransHugeLight)
                return false;
            if (!OutOfMemory(pages, cause))
                return false;
            if (mm is { Exited: true })
                return false;
            if (TryTakeFrames(pages, out cause))
                return true;
        }
        return false;
    }

    /// <summary>
    /// Models out_of_memory for a global (not memcg) OOM: select_bad_process picks the live
    /// process with the highest <see cref="OomBadness"/> (on a tie the later one, as
    /// oom_evaluate_task only skips lower points), and oom_kill_process kills it. With no
    /// killable process the event is logged with no victim and false is returned.
    /// </summary>
    private bool OutOfMemory(long pages, OomCause cause)
    {
        var totalPages = Config.MaxPages + Config.SwapPages;
        Mm? chosen = null;
        var chosenPoints = long.MinValue;
        foreach (var mm in _mms)
        {
            var points = OomBadness(mm, totalPages);
            if (points == long.MinValue || points < chosenPoints)
                continue;
            chosen = mm;
            chosenPoints = points;
        }
        if (chosen is null)
        {
            LogOom(new OomKill(0, null, 0, "Out of memory and no killable processes...", cause, pages, 0, 0, 0, 0, []));
            return false;
        }
        OomKillProcess(chosen, chosenPoints, cause, pages);
        return true;
    }

    /// <summary>
    /// Models oom_badness: LONG_MIN for an exited mm or OOM_SCORE_ADJ_MIN; otherwise
    /// get_mm_rss + MM_SWAPENTS + mm_pgtables_bytes / PAGE_SIZE, plus oom_score_adj ×
    /// totalpages / 1000 (totalpages: RAM plus swap).
    /// </summary>
    internal static long OomBadness(Mm mm, long totalPages)
    {
        if (mm.Exited || mm.OomScoreAdj == OomScoreAdjMin)
            return long.MinValue;
        var (rss, swap) = mm.RssAndSwapEntries();
        var points = rss + swap + mm.PageTable.Pages;
        return points + (mm.OomScoreAdj * (totalPages / 1000));
    }

    /// <summary>
    /// Models oom_kill_process → __oom_kill_process: the victim gets SIGKILL (every thread
    /// dies; one asleep in a userfault is woken by the fatal signal and exits), and its
    /// memory is freed by exit_mmap (the OOM reaper's work and the exit together).
    /// </summary>
    private void OomKillProcess(Mm victim, long points, OomCause cause, long pages)
    {
        var (rss, swap) = victim.RssAndSwapEntries();
        var ev = new OomKill(0, victim.Id, points, "Out of memory", cause, pages, rss, swap, victim.PageTable.Pages,
            victim.OomScoreAdj, [.. victim.Threads.Where(t => t.State != ThreadState.Exited).Select(t => t.Tid)]);
        victim.Exit();
        LogOom(ev);
    }

    private void LogOom(OomKill ev)
    {
        ev = ev with { Seq = Interlocked.Increment(ref _oomSeq) };
        _oomLog.Enqueue(ev);
        while (_oomLog.Count > OomLogCapacity)
            _oomLog.Dequeue();
        if (OomKilled is { } handler)
            DeferUntilUnlocked(() => handler(ev));
    }

    /// <summary>
    /// Models try_to_free_pages → shrink_node for a direct reclaim of at least
    /// max(SWAP_CLUSTER_MAX, <paramref name="pages"/>) frames (<see cref="Mm.ShrinkNode"/>).
    /// </summary>
    private void TryToFreePages(long pages) => Mm.ShrinkNode(this, Math.Max(SwapClusterMax, pages));

    /// <summary>SWAP_CLUSTER_MAX: the batch direct reclaim tries to free.</summary>
    internal const long SwapClusterMax = 32;
}

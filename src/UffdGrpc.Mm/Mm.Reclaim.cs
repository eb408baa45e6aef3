namespace UffdGrpc.Mm;

/// <summary>
/// One pass of direct reclaim (struct scan_control): which folios it may reclaim and how
/// many frames it must free.
/// </summary>
internal sealed class ScanControl(Kernel kernel, long nrToReclaim, bool mayWriteback, bool maySwap)
{
    private readonly long _start = kernel.LiveFrames;

    /// <summary>The second pass: dirty regular-file pages nothing maps are written back and dropped.</summary>
    public bool MayWriteback { get; } = mayWriteback;

    /// <summary>The second pass with swap space left: anon pages go to swap, shmem pages to swap.</summary>
    public bool MaySwap { get; } = maySwap;

    /// <summary>sc->nr_reclaimed ≥ sc->nr_to_reclaim.</summary>
    public bool Done => _start - kernel.LiveFrames >= nrToReclaim;

    /// <summary>
    /// Whether this pass reclaims a small folio mapped by <paramref name="pte"/> only: a
    /// clean lazily freed anon page or a clean regular-file page always; other anon pages
    /// and shmem pages only when swapping. A dirty regular-file page is left to writeback
    /// (direct reclaim does not write file pages), a pinned or in-use page is skipped.
    /// </summary>
    public bool MayReclaim(Page page, Pte pte)
    {
        if (page.Pins > 0)
            return false;
        if (page.IsAnon)
            return (page.LazyFree && !page.Dirty && !pte.Dirty) || MaySwap;
        if (page.Mapping is not { } file)
            return false;
        return file.IsShmem ? MaySwap : !page.Dirty && !pte.Dirty;
    }
}

/// <summary>Direct reclaim (mm/vmscan.c) and the OOM killer's per-mm counters (mm/oom_kill.c).</summary>
public sealed partial class Mm
{
    /// <summary>/proc/PID/oom_score_adj (default 0).</summary>
    public int OomScoreAdj { get; private set; }

    /// <summary>
    /// Models a write of /proc/PID/oom_score_adj (__set_oom_adj): a value outside
    /// [OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX] is EINVAL.
    /// </summary>
    public Errno SetOomScoreAdj(int value)
    {
        using var _ = Kernel.Enter();
        if (value is < Kernel.OomScoreAdjMin or > Kernel.OomScoreAdjMax)
            return Errno.EINVAL;
        OomScoreAdj = value;
        return Errno.OK;
    }

    /// <summary>
    /// Models /proc/PID/oom_score (proc_oom_score): 1000 + oom_badness × 1000 / totalpages,
    /// 0 for a process the OOM killer never selects.
    /// </summary>
    public long OomScore()
    {
        using var _ = Kernel.Enter();
        var total = Kernel.Config.MaxPages + Kernel.Config.SwapPages;
        var badness = Kernel.OomBadness(this, total);
        return badness == long.MinValue ? 0 : 1000 + (badness * 1000 / total);
    }

    /// <summary>
    /// get_mm_rss (MM_ANONPAGES + MM_FILEPAGES + MM_SHMEMPAGES) and MM_SWAPENTS, counted
    /// from the page tables that exist: present normal PTEs, PMD-mapped folios (the huge
    /// zero page excluded) and anon swap entries.
    /// </summary>
    internal (long Rss, long Swap) RssAndSwapEntries()
    {
        long rss = 0, swap = 0;
        foreach (var slot in PageTable.PopulatedSlots())
        {
            var pmdt = PageTable.PmdTableOf(slot, false)!;
            var pi = PageTable.PmdIndex(slot);
            var pmd = pmdt.Entries[pi];
            if (pmd.TransHuge)
            {
                if (Kernel.PageOf(pmd.Pfn)?.Folio is { IsHugeZero: false })
                    rss += Kernel.PtrsPerTable;
                continue;
            }
            if (pmdt.Tables[pi] is not { } table)
                continue;
            foreach (var pte in table.Entries)
            {
                if (pte.Present && !pte.Special)
                    rss++;
                else if (pte.IsSwap)
                    swap++;
            }
        }
        return (rss, swap);
    }

    /// <summary>
    /// Allocates a page while the fault holds <paramref name="held"/> (the kernel's folio
    /// reference, which keeps reclaim from unmapping or freeing it meanwhile).
    /// </summary>
    private Page? AllocPageHolding(Page? held, PageKind kind)
    {
        if (held is not null)
            held.Pins++;
        try
        {
            return Kernel.AllocPage(kind, this);
        }
        finally
        {
            if (held is not null)
                held.Pins--;
        }
    }

    /// <summary>
    /// Models shrink_node → shrink_lruvec → shrink_folio_list for a direct reclaim of
    /// <paramref name="nrToReclaim"/> frames, in the order get_scan_count gives: first the
    /// file LRU (clean page cache, then lazily freed MADV_FREE anon pages, which live on the
    /// file LRU and need no swap), then, only with swap space left, anon pages to swap and
    /// shmem pages to swap, and dirty regular-file pages written back (pageout). Mapped
    /// folios go through the MADV_PAGEOUT path (<see cref="MadviseColdOrPageout"/>), so
    /// uffd-wp markers, swap-entry bits and THP splits are exactly those of PAGEOUT. Folios
    /// mapped more than once (shared after fork, or by several processes) are not unmapped,
    /// and reference bits are not aged (no active/inactive LRU in the model).
    /// </summary>
    internal static void ShrinkNode(Kernel kernel, long nrToReclaim)
    {
        var before = kernel.LiveFrames;
        foreach (var second in new[] { false, true })
        {
            var maySwap = second && kernel.Config.Swap && !kernel.SwapFull;
            var sc = new ScanControl(kernel, nrToReclaim - (before - kernel.LiveFrames), second, maySwap);
            foreach (var file in kernel.Files.ToList())
            {
                if (!sc.Done)
                    ShrinkUnmappedCache(kernel, file, sc);
            }
            foreach (var mm in kernel.Mms.ToList())
            {
                if (!sc.Done)
                    mm.ShrinkMm(sc);
            }
            if (sc.Done)
                break;
        }
        if (kernel.LiveFrames < before)
            kernel.ReclaimEpoch++;
    }

    /// <summary>Reclaims the mapped folios of every VMA (the rmap side of shrink_folio_list), over the page tables that exist.</summary>
    private void ShrinkMm(ScanControl sc)
    {
        foreach (var slot in PageTable.PopulatedSlots().ToList())
        {
            foreach (var v in VmasIn(slot, slot + Kernel.PmdSize))
            {
                if (sc.Done)
                    return;
                if ((v.Flags & VmFlags.Locked) == 0)
                    MadviseColdOrPageout(v, Math.Max(v.Start, slot), Math.Min(v.End, slot + Kernel.PmdSize), pageout: true, sc);
            }
        }
    }

    /// <summary>shrink_folio_list for the page-cache folios of <paramref name="file"/> that nothing maps.</summary>
    private static void ShrinkUnmappedCache(Kernel kernel, MemFile file, ScanControl sc)
    {
        foreach (var (_, page) in file.Cache.OrderBy(e => e.Key).ToList())
        {
            if (sc.Done)
                return;
            if (page.Folio is not null || page.PreciseMapCount > 0 || page.Pins > 0)
                continue;
            if (file.IsShmem ? sc.MaySwap : !page.Dirty || sc.MayWriteback)
                kernel.ReclaimUnmappedFilePage(page, writeback: sc.MayWriteback);
        }
    }
}

/// <summary>The page-cache end of reclaim (mm/vmscan.c).</summary>
public sealed partial class Kernel
{
    /// <summary>Bumped whenever direct reclaim frees frames: a caller that allocated across it revalidates what it scanned.</summary>
    internal long ReclaimEpoch { get; set; }

    /// <summary>
    /// shrink_folio_list for a page-cache page no PTE maps any more: shmem goes to swap
    /// (shmem_writeout) when there is swap space, a clean regular-file page is dropped
    /// (__remove_mapping), a dirty one only with <paramref name="writeback"/> (pageout);
    /// anything else stays cached.
    /// </summary>
    internal void ReclaimUnmappedFilePage(Page page, bool writeback)
    {
        var file = page.Mapping!;
        if (page.PreciseMapCount > 0 || file.Cache.GetValueOrDefault(page.Index) != page)
            return;
        if (file.IsShmem && Config.Swap && !SwapFull)
        {
            file.Cache.Remove(page.Index);
            file.Swapped[page.Index] = new SwapSlot { Data = page.CopyData(), Count = 1 };
            ShmemSwapped(1);
            MaybeFree(page);
        }
        else if (!file.IsShmem && (!page.Dirty || writeback))
        {
            file.Disk[page.Index] = page.CopyData();
            file.Cache.Remove(page.Index);
            MaybeFree(page);
        }
    }
}

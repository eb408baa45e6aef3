namespace UffdGrpc.Mm;

/// <summary>PAGEMAP_SCAN (fs/proc/task_mmu.c: do_pagemap_scan and its walk callbacks).</summary>
public sealed partial class Mm
{
    /// <summary>walk_page_range stopped early because the output is full (-ENOSPC).</summary>
    private const int WalkEnospc = -(int)Errno.ENOSPC;

    /// <summary>PAGEMAP_WALK_SIZE &gt;&gt; PAGE_SHIFT: the most entries the bounce buffer holds.</summary>
    private const int PagemapScanBounceEntries = (int)(Kernel.PmdSize / Kernel.PageSize);

    /// <summary>The bounce buffer and counters of one scan (struct pagemap_scan_private).</summary>
    private sealed class ScanState(PmScanArg arg)
    {
        public readonly PmScanArg Arg = arg;
        /// <summary>The user's vector (vec_out): what the flushes copied out so far.</summary>
        public readonly List<PageRegion> Out = [];
        public readonly ulong MaxPages = arg.MaxPages == 0 ? ulong.MaxValue : arg.MaxPages;
        public readonly ulong MasksOfInterest = arg.CategoryMask | arg.CategoryAnyofMask | arg.ReturnMask;
        /// <summary>arg.vec_len: the slots left in the user's vector.</summary>
        public ulong VecLen = arg.VecLen;
        public PageRegion[]? VecBuf;
        public int VecBufLen;
        public int VecBufIndex;
        public ulong FoundPages;
        /// <summary>arg.walk_end (0: not set).</summary>
        public ulong WalkEnd;
        public ulong VmaCategory;
        public bool WpMatching => (Arg.Flags & (ulong)Uapi.PmScanWpMatching) != 0;
        public bool HasVec => VecBuf is not null;
    }

    /// <summary>
    /// Models do_pagemap_scan. Argument errors leave walk_end unwritten (0). The walk runs in
    /// rounds: each collects regions in a bounce buffer of at most 512 entries and copies
    /// them out (pagemap_scan_flush_buffer); a round that stops on a full buffer starts the
    /// next one at walk_end, until the user's vector or max_pages is used up. walk_end is
    /// whatever the last round that set it left (the range end if none did).
    /// </summary>
    public PmScanResult PagemapScan(PmScanArg arg)
    {
        using var _ = Kernel.Enter();
        Kernel.InjectPoint(this);
        if (!Kernel.HasPagemapScan)
            return new(Errno.ENOTTY, 0, []);
        if (arg.Size != 96)
            return new(Errno.EINVAL, 0, []);
        if ((arg.Flags & ~3UL) != 0)
            return new(Errno.EINVAL, 0, []);
        if (((arg.CategoryInverted | arg.CategoryMask | arg.CategoryAnyofMask | arg.ReturnMask) & ~Uapi.PmScanCategories) != 0)
            return new(Errno.EINVAL, 0, []);
        if (arg.Start % Kernel.PageSize != 0)
            return new(Errno.EINVAL, 0, []);
        if (arg.End < arg.Start || arg.End > Kernel.TaskSize)
            return new(Errno.EFAULT, 0, []);
        var end = PageAlign(arg.End);
        var p = new ScanState(arg);
        PagemapScanInitBounceBuffer(p);
        var ret = 0;
        for (var walkStart = arg.Start; walkStart < end; walkStart = p.WalkEnd)
        {
            ret = PagemapScanWalk(walkStart, end, p);
            PagemapScanFlushBuffer(p);
            if (ret != WalkEnospc)
                break;
            if (p.VecLen == 0 || p.FoundPages == p.MaxPages)
                break;
        }
        var err = ret is 0 or WalkEnospc ? Errno.OK : (Errno)(-ret);
        var walkEnd = p.WalkEnd != 0 ? p.WalkEnd : end;
        return new(err, walkEnd, p.Out);
    }

    /// <summary>Models pagemap_scan_init_bounce_buffer: min(PAGEMAP_WALK_SIZE &gt;&gt; PAGE_SHIFT, vec_len) entries.</summary>
    private static void PagemapScanInitBounceBuffer(ScanState p)
    {
        if (p.VecLen == 0)
            return;
        p.VecBufLen = (int)Math.Min(PagemapScanBounceEntries, p.VecLen);
        p.VecBuf = new PageRegion[p.VecBufLen];
    }

    /// <summary>
    /// Models pagemap_scan_flush_buffer: copies the filled entries (the current one only if
    /// non-empty) to the user's vector and empties the buffer, shrinking it to the slots left.
    /// </summary>
    private static void PagemapScanFlushBuffer(ScanState p)
    {
        if (p.VecBuf is not { } buf)
            return;
        var n = p.VecBufIndex;
        if (buf[n].End != buf[n].Start)
            n++;
        if (n == 0)
            return;
        for (var i = 0; i < n; i++)
            p.Out.Add(buf[i]);
        p.VecLen -= (ulong)n;
        p.VecBufIndex = 0;
        p.VecBufLen = (int)Math.Min((ulong)p.VecBufLen, p.VecLen);
        buf[0] = buf[0] with { Start = 0, End = 0 };
    }

    /// <summary>
    /// Models walk_page_range with pagemap_scan_ops over [start, end): pagemap_scan_test_walk
    /// per VMA (EPERM for CHECK_WPASYNC, skipping with WP_MATCHING), then the PMD walk. A
    /// callback's nonzero return (-ENOSPC) ends the walk.
    /// </summary>
    private int PagemapScanWalk(ulong start, ulong end, ScanState p)
    {
        var arg = p.Arg;
        foreach (var vma in VmasIn(start, end))
        {
            var s = Math.Max(start, vma.Start);
            var e = Math.Min(end, vma.End);
            var wpAllowed = vma.UserfaultfdWpAsync && vma.UserfaultfdWpUseMarkers;
            if (!wpAllowed)
            {
                if ((arg.Flags & (ulong)Uapi.PmScanCheckWpasync) != 0)
                    return -(int)Errno.EPERM;
                if (p.WpMatching)
                    continue;
            }
            var vmaCategory = (wpAllowed ? Uapi.PageIsWpallowed : 0)
                | (Kernel.Config.SoftDirty && (vma.Flags & VmFlags.SoftDirty) != 0 ? Uapi.PageIsSoftDirty : 0);
            var required = arg.CategoryMask & Uapi.PageIsWpallowed;
            if (((vmaCategory ^ arg.CategoryInverted) & required) != required)
                continue;
            p.VmaCategory = vmaCategory;
            var ret = ScanVma(vma, s, e, p);
            if (ret != 0)
                return ret;
        }
        return 0;
    }

    private int ScanVma(Vma vma, ulong start, ulong end, ScanState p)
    {
        foreach (var st in PageTable.Walk(start, end))
        {
            int ret;
            if (st.IsHuge && PagemapScanThpEntry(vma, st.Table!, st.Index, st.Addr, st.End, p, out ret))
            {
                if (ret != 0)
                    return ret;
                continue;
            }
            // After a split a file THP leaves no table: ACTION_AGAIN finds pmd_none (pte_hole).
            ret = st.PteTable is { } table
                ? PagemapScanPmdEntry(vma, table, st.Addr, st.End, p)
                : PagemapScanPteHole(vma, st.Addr, st.End, p);
            if (ret != 0)
                return ret;
        }
        return 0;
    }

    /// <summary>
    /// Models pagemap_scan_pte_hole: a range without a page table reports the VMA categories,
    /// and reads as WRITTEN in a uffd-wp VMA (hugetlb aside), matching pte_none in
    /// pagemap_page_category (the mm-hotfix "fs/proc/task_mmu: fix PAGEMAP_SCAN written
    /// state for PMD holes"); WP_MATCHING then arms it with uffd_wp_range.
    /// </summary>
    private int PagemapScanPteHole(Vma vma, ulong addr, ulong end, ScanState p)
    {
        var categories = p.VmaCategory;
        if (vma.UserfaultfdWp)
            categories |= Uapi.PageIsWritten;
        if (!IsInterestingPage(categories, p))
            return 0;
        var e = end;
        var ret = PagemapScanOutput(categories, p, addr, ref e);
        if (e == addr || !p.WpMatching)
            return ret;
        ChangeProtection(vma, addr, e, CpFlags.UffdWp);
        return ret;
    }

    /// <summary>
    /// Models pagemap_scan_thp_entry. Returns false (-ENOENT: "as if there was no THP") when
    /// the slot is no huge PMD any more or when a WP_MATCHING scan had to split it because its
    /// output ends inside the THP; the output is then backed out and the PTEs are scanned.
    /// </summary>
    private bool PagemapScanThpEntry(Vma vma, PmdTable pmdt, int pi, ulong addr, ulong end, ScanState p, out int ret)
    {
        ret = 0;
        var pmd = pmdt.Entries[pi];
        var folio = Kernel.PageOf(pmd.Pfn)!.Folio!;
        var cat = p.VmaCategory | Uapi.PageIsPresent | Uapi.PageIsHuge;
        if (!pmd.UffdWp)
            cat |= Uapi.PageIsWritten;
        if ((p.MasksOfInterest & Uapi.PageIsFile) != 0 && !folio.IsHugeZero && !folio.Head.IsAnon)
            cat |= Uapi.PageIsFile;
        if (folio.IsHugeZero)
            cat |= Uapi.PageIsPfnzero;
        if (Kernel.Config.SoftDirty && pmd.SoftDirty)
            cat |= Uapi.PageIsSoftDirty;
        if (!IsInterestingPage(cat, p))
            return true;
        var e = end;
        ret = PagemapScanOutput(cat, p, addr, ref e);
        if (e == addr || !p.WpMatching || (cat & Uapi.PageIsWritten) == 0)
            return true;
        if (e != addr + Kernel.PmdSize)
        {
            SplitHugePmd(vma, pmdt, pi, addr & Kernel.PmdMask);
            PagemapScanBackoutRange(p, addr, e);
            ret = 0;
            return false;
        }
        pmdt.Entries[pi] = pmd.MkUffdWp();
        return true;
    }

    /// <summary>
    /// Models pagemap_scan_backout_range: the current bounce-buffer entry loses [addr, end)
    /// (trimmed back to addr when it began earlier, emptied when it began at addr) and the
    /// pages are uncounted. walk_end is left as the output set it.
    /// </summary>
    private static void PagemapScanBackoutRange(ScanState p, ulong addr, ulong end)
    {
        if (p.VecBuf is not { } buf)
            return;
        ref var cur = ref buf[p.VecBufIndex];
        cur = cur.Start != addr ? cur with { End = addr } : cur with { Start = 0, End = 0 };
        p.FoundPages -= (end - addr) / Kernel.PageSize;
    }

    /// <summary>
    /// Models the PTE part of pagemap_scan_pmd_entry, with its two fast paths (WP_MATCHING
    /// without a vector; mask and return mask both WRITTEN). Returns the last output's result.
    /// </summary>
    private int PagemapScanPmdEntry(Vma vma, PteTable table, ulong start, ulong end, ScanState p)
    {
        var arg = p.Arg;
        var ret = 0;
        if (p.WpMatching && !p.HasVec)
        {
            for (var a = start; a < end; a += Kernel.PageSize)
            {
                var i = PageTable.PteIndex(a);
                var pte = table.Entries[i];
                if ((pte.Present && pte.UffdWp) || pte.SwpUffdWpAny)
                    continue;
                table.Entries[i] = MakeUffdWpPte(pte);
            }
            return 0;
        }
        if (arg.CategoryAnyofMask == 0 && arg.CategoryInverted == 0 && arg.CategoryMask == Uapi.PageIsWritten && arg.ReturnMask == Uapi.PageIsWritten)
        {
            for (var a = start; a < end; a += Kernel.PageSize)
            {
                var i = PageTable.PteIndex(a);
                var pte = table.Entries[i];
                if ((pte.Present && pte.UffdWp) || pte.SwpUffdWpAny)
                    continue;
                var next = a + Kernel.PageSize;
                ret = PagemapScanOutput(p.VmaCategory | Uapi.PageIsWritten, p, a, ref next);
                if (next == a)
                    break;
                if (p.WpMatching)
                    table.Entries[i] = MakeUffdWpPte(pte);
            }
            return ret;
        }
        for (var a = start; a < end; a += Kernel.PageSize)
        {
            var i = PageTable.PteIndex(a);
            var pte = table.Entries[i];
            var cat = p.VmaCategory | PageCategory(pte, p);
            if (!IsInterestingPage(cat, p))
                continue;
            var next = a + Kernel.PageSize;
            ret = PagemapScanOutput(cat, p, a, ref next);
            if (next == a)
                break;
            if (p.WpMatching && (cat & Uapi.PageIsWritten) != 0)
                table.Entries[i] = MakeUffdWpPte(pte);
        }
        return ret;
    }

    /// <summary>
    /// pagemap_page_category. On 6.18 a none PTE inside an existing page table counts as
    /// WRITTEN (erratum 4).
    /// </summary>
    private ulong PageCategory(Pte pte, ScanState p)
    {
        ulong c = 0;
        if (pte.Present)
        {
            c |= Uapi.PageIsPresent;
            if (!pte.UffdWp)
                c |= Uapi.PageIsWritten;
            if ((p.MasksOfInterest & Uapi.PageIsFile) != 0 && NormalPage(pte) is { IsAnon: false })
                c |= Uapi.PageIsFile;
            if (pte.Special)
                c |= Uapi.PageIsPfnzero;
            if (Kernel.Config.SoftDirty && pte.SoftDirty)
                c |= Uapi.PageIsSoftDirty;
        }
        else if (pte.IsSwapLike)
        {
            c |= Uapi.PageIsSwapped;
            if (!pte.SwpUffdWpAny)
                c |= Uapi.PageIsWritten;
            if (pte.IsGuardMarker)
                c |= Uapi.PageIsGuard;
            if (Kernel.Config.SoftDirty && pte.SwpSoftDirty)
                c |= Uapi.PageIsSoftDirty;
        }
        else
        {
            c |= Uapi.PageIsWritten;
        }
        return c;
    }

    /// <summary>make_uffd_wp_pte.</summary>
    private static Pte MakeUffdWpPte(Pte pte) =>
        pte.Present ? pte.MkUffdWp() : pte.IsSwapLike ? pte.SwpMkUffdWp() : Pte.Marker(PteMarker.UffdWp);

    private static bool IsInterestingPage(ulong categories, ScanState p)
    {
        categories ^= p.Arg.CategoryInverted;
        if ((categories & p.Arg.CategoryMask) != p.Arg.CategoryMask)
            return false;
        return p.Arg.CategoryAnyofMask == 0 || (categories & p.Arg.CategoryAnyofMask) != 0;
    }

    /// <summary>
    /// Models pagemap_scan_push_range: extends the current bounce-buffer entry when [addr,
    /// end) continues it with the same categories, else starts the next entry; false when
    /// the buffer is full.
    /// </summary>
    private static bool PagemapScanPushRange(ulong categories, ScanState p, ulong addr, ulong end)
    {
        var buf = p.VecBuf!;
        ref var cur = ref buf[p.VecBufIndex];
        if (addr == cur.End && categories == cur.Categories)
        {
            cur = cur with { End = end };
            return true;
        }
        if (cur.End != 0)
        {
            if (p.VecBufIndex >= p.VecBufLen - 1)
                return false;
            cur = ref buf[++p.VecBufIndex];
        }
        cur = new PageRegion(addr, end, categories);
        return true;
    }

    /// <summary>
    /// Models pagemap_scan_output: cuts [addr, end) at max_pages and pushes it; returns
    /// -ENOSPC and sets walk_end when the budget or the buffer ran out (end becomes addr when
    /// nothing fit). Without a vector it does nothing.
    /// </summary>
    private static int PagemapScanOutput(ulong categories, ScanState p, ulong addr, ref ulong end)
    {
        if (!p.HasVec)
            return 0;
        categories &= p.Arg.ReturnMask;
        var nPages = (end - addr) / Kernel.PageSize;
        var ret = 0;
        var total = p.FoundPages + nPages;
        if (total < p.FoundPages || total > p.MaxPages)
        {
            var tooMuch = total - p.MaxPages;
            end -= tooMuch * Kernel.PageSize;
            nPages -= tooMuch;
            ret = WalkEnospc;
        }
        if (!PagemapScanPushRange(categories, p, addr, end))
        {
            end = addr;
            nPages = 0;
            ret = WalkEnospc;
        }
        p.FoundPages += nPages;
        if (ret != 0)
            p.WalkEnd = end;
        return ret;
    }
}

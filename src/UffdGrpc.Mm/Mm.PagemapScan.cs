namespace UffdGrpc.Mm;

/// <summary>PAGEMAP_SCAN (fs/proc/task_mmu.c: do_pagemap_scan and its walk callbacks).</summary>
public sealed partial class Mm
{
    /// <summary>The bounce buffer and counters of one scan (struct pagemap_scan_private).</summary>
    private sealed class ScanState(PmScanArg arg)
    {
        public readonly PmScanArg Arg = arg;
        public readonly List<PageRegion> Out = [];
        public readonly ulong MaxPages = arg.MaxPages == 0 ? ulong.MaxValue : arg.MaxPages;
        public readonly ulong MasksOfInterest = arg.CategoryMask | arg.CategoryAnyofMask | arg.ReturnMask;
        public ulong FoundPages;
        public ulong WalkEnd;
        public ulong VmaCategory;
        public bool Full;
        public bool WpMatching => (Arg.Flags & (ulong)Uapi.PmScanWpMatching) != 0;
        public bool HasVec => Arg.VecLen > 0;
    }

    /// <summary>
    /// Models do_pagemap_scan. Argument errors leave walk_end unwritten (0); a VMA that is
    /// not WP-async capable fails CHECK_WPASYNC with EPERM, is skipped by WP_MATCHING, and
    /// is scanned otherwise. Matching pages are reported as coalesced regions until the
    /// vector or max_pages budget runs out (walk_end marks where); with WP_MATCHING the
    /// WRITTEN ones are write-protected (uffd-wp bit or marker).
    /// </summary>
    public PmScanResult PagemapScan(PmScanArg arg)
    {
        using var _ = Kernel.Enter();
        if (!IsV6)
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
        var err = Errno.OK;
        foreach (var vma in VmasIn(arg.Start, end))
        {
            var s = Math.Max(arg.Start, vma.Start);
            var e = Math.Min(end, vma.End);
            var wpAllowed = vma.UserfaultfdWpAsync && vma.UserfaultfdWpUseMarkers;
            if (!wpAllowed)
            {
                if ((arg.Flags & (ulong)Uapi.PmScanCheckWpasync) != 0)
                {
                    err = Errno.EPERM;
                    break;
                }
                if (p.WpMatching)
                    continue;
            }
            p.VmaCategory = (wpAllowed ? Uapi.PageIsWpallowed : 0)
                | (Kernel.Config.SoftDirty && (vma.Flags & VmFlags.SoftDirty) != 0 ? Uapi.PageIsSoftDirty : 0);
            var required = arg.CategoryMask & Uapi.PageIsWpallowed;
            if (((p.VmaCategory ^ arg.CategoryInverted) & required) != required)
                continue;
            ScanVma(vma, s, e, p);
            if (p.Full)
                break;
        }
        var walkEnd = p.WalkEnd != 0 ? p.WalkEnd : end;
        return new(err, walkEnd, p.Out);
    }

    private void ScanVma(Vma vma, ulong start, ulong end, ScanState p)
    {
        foreach (var st in PageTable.Walk(start, end))
        {
            if (p.Full)
                break;
            if (st.IsHuge && ScanThp(vma, st.Table!, st.Index, st.Addr, st.End, p))
                continue;
            if (st.PteTable is not { } table)
            {
                ScanHole(vma, st.Addr, st.End, p);
                continue;
            }
            ScanPtes(vma, table, st.Addr, st.End, p);
        }
    }

    /// <summary>pagemap_scan_pte_hole: no page table; only the VMA categories apply.</summary>
    private void ScanHole(Vma vma, ulong addr, ulong end, ScanState p)
    {
        if (!IsInterestingPage(p.VmaCategory, p))
            return;
        var e = end;
        ScanOutput(p.VmaCategory, p, addr, ref e);
        if (e == addr || !p.WpMatching)
            return;
        ChangeProtection(vma, addr, e, CpFlags.UffdWp);
    }

    /// <summary>pagemap_scan_thp_entry. Returns false when the PMD was split and the range must be walked as PTEs.</summary>
    private bool ScanThp(Vma vma, PmdTable pmdt, int pi, ulong addr, ulong end, ScanState p)
    {
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
        var before = (p.Out.Count, p.FoundPages);
        ScanOutput(cat, p, addr, ref e);
        if (e == addr || !p.WpMatching || (cat & Uapi.PageIsWritten) == 0)
            return true;
        if (e != (addr & Kernel.PmdMask) + Kernel.PmdSize || addr % Kernel.PmdSize != 0)
        {
            SplitHugePmd(vma, pmdt, pi, addr & Kernel.PmdMask);
            BackoutRange(p, before.Count, before.FoundPages, addr);
            return false;
        }
        pmdt.Entries[pi] = pmd.MkUffdWp();
        return true;
    }

    /// <summary>pagemap_scan_backout_range: undo the output of [addr, …) after a THP split.</summary>
    private static void BackoutRange(ScanState p, int count, ulong found, ulong addr)
    {
        while (p.Out.Count > count + 1)
            p.Out.RemoveAt(p.Out.Count - 1);
        if (p.Out.Count == count + 1)
        {
            var last = p.Out[^1];
            if (last.Start >= addr)
                p.Out.RemoveAt(p.Out.Count - 1);
            else
                p.Out[^1] = last with { End = addr };
        }
        p.FoundPages = found;
        p.Full = false;
        p.WalkEnd = 0;
    }

    /// <summary>pagemap_scan_pmd_entry for a PTE table, with its two fast paths.</summary>
    private void ScanPtes(Vma vma, PteTable table, ulong start, ulong end, ScanState p)
    {
        var arg = p.Arg;
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
            return;
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
                ScanOutput(p.VmaCategory | Uapi.PageIsWritten, p, a, ref next);
                if (next == a)
                    return;
                if (p.WpMatching)
                    table.Entries[i] = MakeUffdWpPte(pte);
                if (p.Full)
                    return;
            }
            return;
        }
        for (var a = start; a < end; a += Kernel.PageSize)
        {
            var i = PageTable.PteIndex(a);
            var pte = table.Entries[i];
            var cat = p.VmaCategory | PageCategory(pte, p);
            if (!IsInterestingPage(cat, p))
                continue;
            var next = a + Kernel.PageSize;
            ScanOutput(cat, p, a, ref next);
            if (next == a)
                return;
            if (p.WpMatching && (cat & Uapi.PageIsWritten) != 0)
                table.Entries[i] = MakeUffdWpPte(pte);
            if (p.Full)
                return;
        }
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
    /// pagemap_scan_output + pagemap_scan_push_range: appends [addr, end) to the output,
    /// coalescing with the last region; cuts at max_pages; sets walk_end and stops when
    /// the budget is used up (end becomes addr when nothing fit).
    /// </summary>
    private static void ScanOutput(ulong categories, ScanState p, ulong addr, ref ulong end)
    {
        if (!p.HasVec)
            return;
        categories &= p.Arg.ReturnMask;
        var nPages = (end - addr) / Kernel.PageSize;
        var stop = false;
        if (p.FoundPages + nPages > p.MaxPages || p.FoundPages + nPages < p.FoundPages)
        {
            var tooMuch = p.FoundPages + nPages - p.MaxPages;
            end -= tooMuch * Kernel.PageSize;
            nPages -= tooMuch;
            stop = true;
        }
        if (end > addr)
        {
            if (p.Out.Count > 0 && p.Out[^1].End == addr && p.Out[^1].Categories == categories)
            {
                p.Out[^1] = p.Out[^1] with { End = end };
            }
            else if ((ulong)p.Out.Count >= p.Arg.VecLen)
            {
                end = addr;
                nPages = 0;
                stop = true;
            }
            else
            {
                p.Out.Add(new PageRegion(addr, end, categories));
            }
        }
        p.FoundPages += nPages;
        if (stop)
        {
            p.WalkEnd = end;
            p.Full = true;
        }
    }
}

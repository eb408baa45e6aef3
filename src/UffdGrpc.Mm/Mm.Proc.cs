namespace UffdGrpc.Mm;

/// <summary>One VMA as /proc/PID/smaps reports it.</summary>
public sealed record SmapsEntry(ulong Start, ulong End, string Perms, VmFlags Flags, long RssPages, long SwapPages, long PmdMapped);

/// <summary>A PAGEMAP_SCAN request (struct pm_scan_arg, without the user pointers).</summary>
public sealed record PmScanArg
{
    public ulong Size { get; init; } = 96;
    public ulong Flags { get; init; }
    public ulong Start { get; init; }
    public ulong End { get; init; }
    /// <summary>Number of page_region slots in the output vector (0: no vector).</summary>
    public ulong VecLen { get; init; }
    public ulong MaxPages { get; init; }
    public ulong CategoryInverted { get; init; }
    public ulong CategoryMask { get; init; }
    public ulong CategoryAnyofMask { get; init; }
    public ulong ReturnMask { get; init; }
}

/// <summary>struct page_region.</summary>
public readonly record struct PageRegion(ulong Start, ulong End, ulong Categories);

/// <summary>The outcome of PAGEMAP_SCAN: errno, walk_end (0: not written) and the regions written.</summary>
public sealed record PmScanResult(Errno Errno, ulong WalkEnd, IReadOnlyList<PageRegion> Regions);

/// <summary>/proc/PID/pagemap, kpageflags, smaps, clear_refs and PAGEMAP_SCAN (fs/proc/task_mmu.c).</summary>
public sealed partial class Mm
{
    /// <summary>
    /// Models pte_to_pagemap_entry / pagemap_pmd_range: the 64-bit pagemap value of the
    /// page at <paramref name="addr"/>, PFN included (a privileged reader).
    /// </summary>
    public ulong PagemapEntry(ulong addr)
    {
        using var _ = Kernel.Enter();
        var vma = VmaLookup(addr);
        if (vma is null)
            return 0;
        ulong flags = 0;
        if (Kernel.Config.SoftDirty && (vma.Flags & VmFlags.SoftDirty) != 0)
            flags |= Uapi.PmSoftDirty;
        var sd = Kernel.Config.SoftDirty;
        var pmdt = PageTable.PmdTableOf(addr, false);
        var pi = PageTable.PmdIndex(addr);
        if (pmdt is not null && pmdt.Entries[pi].TransHuge)
        {
            var pmd = pmdt.Entries[pi];
            var idx = (ulong)PageTable.PteIndex(addr);
            var head = Kernel.PageOf(pmd.Pfn)!;
            flags |= Uapi.PmPresent | (pmd.Pfn + idx);
            if (sd && pmd.SoftDirty)
                flags |= Uapi.PmSoftDirty;
            if (pmd.UffdWp && IsV6)
                flags |= Uapi.PmUffdWp;
            if (!head.IsAnon)
                flags |= Uapi.PmFile;
            // pagemap_pmd_range asks __folio_page_mapped_exclusively about the head page for
            // every subpage (CONFIG_PAGE_MAPCOUNT: precise mapcount == 1).
            if (!head.Folio!.IsHugeZero && head.PreciseMapCount == 1)
                flags |= Uapi.PmMmapExclusive;
            return flags;
        }
        var pte = pmdt?.Tables[pi]?.Entries[PageTable.PteIndex(addr)] ?? Pte.None;
        Page? page = null;
        if (pte.Present)
        {
            flags |= Uapi.PmPresent | pte.Pfn;
            page = NormalPage(pte);
            if (sd && pte.SoftDirty)
                flags |= Uapi.PmSoftDirty;
            if (pte.UffdWp && IsV6)
                flags |= Uapi.PmUffdWp;
        }
        else if (pte.IsSwapLike)
        {
            if (sd && pte.SwpSoftDirty)
                flags |= Uapi.PmSoftDirty;
            if ((pte.SwpUffdWp || pte.IsUffdWpMarker) && IsV6)
                flags |= Uapi.PmUffdWp;
            if (pte.IsGuardMarker)
                flags |= Uapi.PmGuard;
            flags |= Uapi.PmSwap;
            if (pte.IsSwap)
                flags |= pte.SwapSlot << 5;
            else if (pte.IsHwpoison)
            {
                // A pfn swap entry: swp_type | swp_offset_pfn << MAX_SWAPFILES_SHIFT, and its page.
                flags |= PteBits.SwpTypeHwpoison | (pte.SwapSlot << 5);
                page = Kernel.PageOf(pte.SwapSlot);
            }
        }
        if (page is not null)
        {
            if (!page.IsAnon)
                flags |= Uapi.PmFile;
            if (page.PreciseMapCount == 1)
                flags |= Uapi.PmMmapExclusive;
        }
        return flags;
    }

    /// <summary>/proc/kpageflags of <paramref name="pfn"/>: KPF_ZERO_PAGE and KPF_THP as stable_page_flags computes them.</summary>
    public ulong KpageFlags(ulong pfn)
    {
        using var _ = Kernel.Enter();
        var page = Kernel.PageOf(pfn);
        if (page is null)
            return 0;
        ulong u = 0;
        if (page.IsZeroPage)
            u |= 1UL << Uapi.KpfZeroPage;
        if (page.Folio is not null)
            u |= 1UL << Uapi.KpfThp;
        if (page.HwPoison)
            u |= 1UL << Uapi.KpfHwpoison;
        return u;
    }

    /// <summary>/proc/PID/smaps for the VMAs overlapping [start, end).</summary>
    public List<SmapsEntry> Smaps(ulong start, ulong end)
    {
        using var _ = Kernel.Enter();
        var list = new List<SmapsEntry>();
        foreach (var v in VmasIn(start, end))
        {
            long rss = 0, swap = 0, pmdMapped = 0;
            var countShmemUnderHoles = v.IsShmem && !(v.IsShared || (v.Flags & VmFlags.Write) == 0);
            foreach (var st in PageTable.Walk(v.Start, v.End))
            {
                if (st.IsHuge)
                {
                    var hpmd = st.Table!.Entries[st.Index];
                    var folio = Kernel.PageOf(hpmd.Pfn)!.Folio!;
                    if (!folio.IsHugeZero && (hpmd.HwPresent || Kernel.SmapsCountsProtnonePmd))
                    {
                        rss += (long)((st.End - st.Addr) / Kernel.PageSize);
                        pmdMapped++;
                    }
                    continue;
                }
                var table = st.PteTable;
                // No PTE table: nothing resident or swapped here, unless a shmem file's
                // swapped pages count under the hole (the work is bounded by what exists).
                if (table is null && !countShmemUnderHoles)
                    continue;
                for (var a = st.Addr; a < st.End; a += Kernel.PageSize)
                {
                    var pte = table?.Entries[PageTable.PteIndex(a)] ?? Pte.None;
                    if (pte.Present && !pte.Special)
                        rss++;
                    else if (pte.IsSwap)
                        swap++;
                    else if (countShmemUnderHoles && pte.IsNone && v.File!.Swapped.ContainsKey(v.LinearPageIndex(a)))
                        swap++;
                }
            }
            if (v.IsShmem && !countShmemUnderHoles)
            {
                for (var idx = v.PgOff; idx < v.PgOff + v.Pages; idx++)
                {
                    if (v.File!.Swapped.ContainsKey(idx))
                        swap++;
                }
            }
            list.Add(new SmapsEntry(v.Start, v.End, v.PermString, v.Flags, rss, swap, pmdMapped));
        }
        return list;
    }

    /// <summary>
    /// Models clear_refs_write: 1-5 are accepted (anything else EINVAL). Value 4 clears
    /// VM_SOFTDIRTY and write-protects and cleans the soft-dirty bit of every entry
    /// (clear_soft_dirty) — a no-op without CONFIG_MEM_SOFT_DIRTY. 1-3 clear accessed bits.
    /// </summary>
    public Errno ClearRefs(string text)
    {
        using var _ = Kernel.Enter();
        if (!int.TryParse(text.Trim(), System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out var type))
            return Errno.EINVAL;
        if (type < 1 || type > 5)
            return Errno.EINVAL;
        if (type == 5)
            return Errno.OK;
        foreach (var v in _vmas)
        {
            if (type == 2 && !v.IsAnonymous)
                continue;
            if (type == 3 && v.IsAnonymous)
                continue;
            if (type == 4)
            {
                if (!Kernel.Config.SoftDirty)
                    continue;
                v.Flags &= ~VmFlags.SoftDirty;
            }
            ClearRefsRange(v, type == 4);
        }
        return Errno.OK;
    }

    private void ClearRefsRange(Vma v, bool softDirty)
    {
        foreach (var st in PageTable.Walk(v.Start, v.End))
        {
            if (st.Table is not { } pmdt)
                continue;
            if (st.IsHuge)
            {
                var pmd = pmdt.Entries[st.Index];
                pmdt.Entries[st.Index] = softDirty ? pmd.Wrprotect().ClearSoftDirty() : pmd.MkOld();
                continue;
            }
            var table = st.PteTable;
            for (var a = st.Addr; table is not null && a < st.End; a += Kernel.PageSize)
            {
                var i = PageTable.PteIndex(a);
                var pte = table.Entries[i];
                if (pte.Present)
                {
                    if (softDirty && !(NormalPage(pte) is { Pins: > 0 } && v.IsCowMapping && pte.Write))
                        table.Entries[i] = pte.Wrprotect().ClearSoftDirty();
                    else if (!softDirty)
                        table.Entries[i] = pte.MkOld();
                }
                else if (softDirty && pte.IsSwapLike)
                {
                    table.Entries[i] = pte.SwpClearSoftDirty();
                }
            }
        }
    }
}

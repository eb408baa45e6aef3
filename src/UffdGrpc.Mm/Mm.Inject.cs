namespace UffdGrpc.Mm;

/// <summary>
/// The kernel-internal events an injection rule makes happen in an address space, each the
/// kernel path that does it for real (no handler is told about any of them).
/// </summary>
public sealed partial class Mm
{
    /// <summary>
    /// Addresses in [start, end) where <paramref name="site"/> can act, in address order, at
    /// most <paramref name="cap"/>: PMD-mapped THPs (split), PMD ranges with a PTE table
    /// in a VMA khugepaged may collapse (collapse), present pages (reclaim, pin), present
    /// small pages mapped once (migrate).
    /// </summary>
    internal List<ulong> InjectCandidates(InjectSite site, ulong start, ulong end, int cap)
    {
        var list = new List<ulong>();
        foreach (var v in _vmas)
        {
            var s = Math.Max(v.Start, start);
            var e = Math.Min(v.End, end);
            if (s >= e)
                continue;
            if (site == InjectSite.Collapse)
            {
                if (!KhugepagedEligible(v))
                    continue;
                for (var h = (s + Kernel.PmdSize - 1) & Kernel.PmdMask; h + Kernel.PmdSize <= e && list.Count < cap; h += Kernel.PmdSize)
                {
                    if (PageTable.PmdTableOf(h, false) is { } t && t.Tables[PageTable.PmdIndex(h)] is not null)
                        list.Add(h);
                }
                continue;
            }
            foreach (var st in PageTable.Walk(s, e))
            {
                if (list.Count >= cap)
                    return list;
                if (st.Table is not { } pmdt)
                    continue;
                if (st.IsHuge)
                {
                    if (site is InjectSite.ThpSplit or InjectSite.Reclaim or InjectSite.LongtermPin)
                        list.Add(st.Addr);
                    continue;
                }
                if (site == InjectSite.ThpSplit || pmdt.Tables[st.Index] is not { } table)
                    continue;
                for (var a = st.Addr; a < st.End && list.Count < cap; a += Kernel.PageSize)
                {
                    var pte = table.Entries[PageTable.PteIndex(a)];
                    if (!pte.Present || NormalPage(pte) is not { IsZeroPage: false } p)
                        continue;
                    if (site == InjectSite.Migrate && !Migratable(p))
                        continue;
                    if (site == InjectSite.HwPoison && !MemoryFailureHandles(v, p))
                        continue;
                    list.Add(a);
                }
            }
        }
        return list;
    }

    /// <summary>
    /// Applies a kernel-internal event at <paramref name="addr"/>; the detail for the log, or
    /// null when the kernel would have done nothing there.
    /// </summary>
    internal string? ApplyInjectedEvent(InjectSite site, ulong addr, ActiveRule rule)
    {
        var vma = VmaLookup(addr);
        if (vma is null)
            return null;
        switch (site)
        {
            case InjectSite.ThpSplit:
                if (PageTable.PmdTableOf(addr, false) is not { } pmdt || !pmdt.Entries[PageTable.PmdIndex(addr)].TransHuge)
                    return null;
                SplitHugePmdAt(vma, addr);
                return "split_huge_pmd";
            case InjectSite.Collapse:
                {
                    var r = vma.IsShmem ? CollapseFile(vma, addr) : CollapseOne(vma, addr);
                    return r == Errno.OK ? "collapse_huge_page" : null;
                }
            case InjectSite.Reclaim:
                {
                    var len = PageTable.PmdTableOf(addr, false) is { } t && t.Entries[PageTable.PmdIndex(addr)].TransHuge ? Kernel.PmdSize : Kernel.PageSize;
                    var before = PagemapEntry(addr);
                    MadviseColdOrPageout(vma, addr, addr + len, pageout: true);
                    return PagemapEntry(addr) == before ? null : "reclaim";
                }
            case InjectSite.Migrate:
                return MigratePage(vma, addr) is { } pfns ? pfns : null;
            case InjectSite.LongtermPin:
                return LongtermPin(addr, rule) ? "pin_user_pages FOLL_LONGTERM" : null;
            case InjectSite.HwPoison:
                return MemoryFailure(vma, addr);
            default:
                return null;
        }
    }

    /// <summary>
    /// Reclaim of [start, end): per VMA piece, the reclaim MADV_PAGEOUT runs
    /// (madvise_cold_or_pageout_pte_range → reclaim_pages), so the injected event and the
    /// syscall leave the same state. Mlocked VMAs are not reclaimed. The pieces acted on.
    /// </summary>
    internal List<(ulong Start, ulong End)> InjectReclaimRange(ulong start, ulong end)
    {
        var done = new List<(ulong, ulong)>();
        foreach (var v in VmasIn(start, end))
        {
            var s = Math.Max(v.Start, start);
            var e = Math.Min(v.End, end);
            if ((v.Flags & VmFlags.Locked) == 0 && MadviseColdOrPageout(v, s, e, pageout: true) == Errno.OK)
                done.Add((s, e));
        }
        return done;
    }

    /// <summary>
    /// khugepaged's hugepage_vma_check (thp_vma_allowable_order with TVA_ENFORCE_SYSFS): an
    /// anon or shmem VMA, not VM_NOHUGEPAGE, and THP enabled for it (always, or madvise with
    /// VM_HUGEPAGE).
    /// </summary>
    private bool KhugepagedEligible(Vma v) =>
        (v.IsAnonymous || v.IsShmem) && (v.Flags & VmFlags.NoHugePage) == 0
        && (Kernel.Config.Thp == ThpMode.Always || (Kernel.Config.Thp == ThpMode.Madvise && (v.Flags & VmFlags.HugePage) != 0));

    /// <summary>
    /// migrate_folio_unmap's preconditions for a small folio the model moves: mapped by this
    /// one PTE, no pin or swap cache reference (folio_expected_refs; a pinned page fails
    /// with -EAGAIN and stays).
    /// </summary>
    private static bool Migratable(Page p) =>
        p.Folio is null && p.MapCount == 1 && p.Pins == 0 && p.SwapCacheSlot == 0;

    /// <summary>
    /// Models migrate_pages for one small folio (mm/migrate.c): try_to_migrate replaces the
    /// PTE by a migration entry that remembers write, anon-exclusive, soft-dirty, uffd-wp,
    /// young and dirty; the contents move to a new frame (folio_migrate_mapping replaces a
    /// page-cache slot); remove_migration_pte maps the new frame with the VMA's protection,
    /// soft-dirty as the entry had it, write back for a writable entry or else uffd-wp, old
    /// unless the entry was young, and pte_mkdirty (which sets soft-dirty on x86) for a
    /// dirty one. Returns "pfn OLD -> NEW", or null when the page cannot move.
    /// </summary>
    private string? MigratePage(Vma vma, ulong addr)
    {
        var table = PageTable.PteTableOf(addr);
        if (table is null)
            return null;
        var i = PageTable.PteIndex(addr);
        var old = table.Entries[i];
        if (!old.Present || NormalPage(old) is not { IsZeroPage: false } page || !Migratable(page))
            return null;
        var np = Kernel.AllocPage(page.Kind, this);
        if (np is null)
            return null;
        np.CopyFrom(page);
        np.Mapping = page.Mapping;
        np.Index = page.Index;
        np.Dirty = page.Dirty;
        np.LazyFree = page.LazyFree;
        np.MapCount = 1;
        np.AnonExclusive = page.AnonExclusive;
        if (page.Kind == PageKind.File && page.Mapping is { } f && f.Cache.GetValueOrDefault(page.Index) == page)
            f.Cache[page.Index] = np;
        var dirty = old.Dirty || page.Dirty;
        var pte = new Pte((np.Pfn << Kernel.PageShift) | PageProt(vma));
        pte = old.SoftDirty ? pte.MkSoftDirty() : pte.ClearSoftDirty();
        if (old.Write)
            pte = pte.MkWrite();
        else if (old.UffdWp)
            pte = pte.MkUffdWp();
        if (old.Young)
            pte = pte.MkYoung();
        if (dirty)
            pte = pte.MkDirty();
        table.Entries[i] = pte;
        page.MapCount = 0;
        page.AnonExclusive = false;
        if (page.Kind == PageKind.File)
            page.Mapping = null;
        Kernel.MaybeFree(page);
        return $"pfn {page.Pfn:x} -> {np.Pfn:x}";
    }

    /// <summary>
    /// The pages the model's memory_failure handles: a machine with CONFIG_MEMORY_FAILURE, a
    /// small anonymous page of a private anonymous VMA mapped by this one PTE and not in the
    /// swap cache (shared, THP, shmem and file pages are not injected).
    /// </summary>
    private bool MemoryFailureHandles(Vma vma, Page p) =>
        Kernel.Config.MemoryFailure && vma.IsAnonymous && p.IsAnon && p.Folio is null && p.MapCount == 1 && p.SwapCacheSlot == 0 && !p.HwPoison;

    /// <summary>
    /// Models memory_failure (mm/memory-failure.c) of the frame mapped at <paramref name="addr"/>,
    /// as an asynchronous hardware error reports it (no MF_ACTION_REQUIRED; with the default
    /// late kill no process is signalled now): the frame gets PG_hwpoison and is never freed
    /// or reused; hwpoison_user_mappings runs try_to_unmap with TTU_HWPOISON, and
    /// try_to_unmap_one replaces the PTE by a hwpoison entry (make_hwpoison_entry: no
    /// uffd-wp, soft-dirty or exclusive bit survives). The next access faults with
    /// VM_FAULT_HWPOISON (do_swap_page): SIGBUS BUS_MCEERR_AR, EFAULT for a kernel access.
    /// Returns "pfn N", or null when the page is not one the model handles.
    /// </summary>
    private string? MemoryFailure(Vma vma, ulong addr)
    {
        var table = PageTable.PteTableOf(addr);
        if (table is null)
            return null;
        var i = PageTable.PteIndex(addr);
        var pte = table.Entries[i];
        if (!pte.Present || NormalPage(pte) is not { IsZeroPage: false } page || !MemoryFailureHandles(vma, page))
            return null;
        page.HwPoison = true;
        if (pte.Dirty)
            page.Dirty = true;
        table.Entries[i] = Pte.HwpoisonEntry(page.Pfn);
        page.AnonExclusive = false;
        RemoveRmap(page);
        return $"memory_failure pfn {page.Pfn:x}";
    }

    /// <summary>
    /// pin_user_pages(FOLL_LONGTERM | FOLL_WRITE) of the present page at <paramref name="addr"/>
    /// (a THP subpage included), as vfio or io_uring hold it: the pin lasts until the rule
    /// is removed, and marks the mm MMF_HAS_PINNED so that fork copies the page
    /// (folio_needs_cow_for_dma).
    /// </summary>
    private bool LongtermPin(ulong addr, ActiveRule rule)
    {
        if (!FollowPageMask(addr, write: false, pin: true, out var page, out _) || page is null || page.IsZeroPage)
            return false;
        if (rule.Pinned.Contains(page))
            return false;
        page.Pins++;
        rule.Pinned.Add(page);
        HasPinned = true;
        return true;
    }

    /// <summary>MMF_HAS_PINNED: a page of this mm was pinned with FOLL_PIN at some point.</summary>
    public bool HasPinned { get; internal set; }
}

namespace UffdGrpc.Mm;

/// <summary>fork (kernel/fork.c dup_mmap, mm/memory.c copy_page_range) and exit.</summary>
public sealed partial class Mm
{
    /// <summary>
    /// Models dup_mmap: copies every VMA but VM_DONTCOPY ones (a VM_WIPEONFORK VMA arrives
    /// empty). A VMA on a context with EVENT_FORK is attached to that context's child
    /// context (dup_userfaultfd: one per parent context, queued in
    /// <paramref name="forks"/>); otherwise the child VMA loses its registration. Page
    /// tables are copied for VMAs with anon pages and for uffd-wp child VMAs
    /// (vma_needs_copy).
    /// </summary>
    internal Mm DupMmap(List<(UserfaultfdCtx Parent, UserfaultfdCtx Child)> forks)
    {
        var child = Kernel.CreateMm();
        foreach (var v in _vmas)
        {
            if ((v.Flags & VmFlags.DontCopy) != 0)
                continue;
            var cv = new Vma(child, v.Start, v.End, v.Flags & ~VmFlags.Locked, v.File, v.PgOff)
            {
                // anon_vma_fork: each child VMA gets an anon_vma of its own, and its chain
                // also links the parent's (so it is not singular).
                AnonVma = (v.Flags & VmFlags.WipeOnFork) != 0 || v.AnonVma is null ? null : new AnonVma(),
            };
            cv.AnonVmaChainSingular = cv.AnonVma is null;
            if (v.UffdCtx is { } octx)
            {
                if ((octx.Features & UffdFeatures.EventFork) != 0 && !octx.Released)
                {
                    var found = forks.Find(f => f.Parent == octx);
                    var nctx = found.Child;
                    if (nctx is null)
                    {
                        nctx = octx.ForkChild(child);
                        octx.MmapChanging++;
                        forks.Add((octx, nctx));
                    }
                    cv.UffdCtx = nctx;
                }
                else
                {
                    cv.Flags &= ~VmFlags.UffdFlags;
                }
            }
            child.InsertVma(cv);
            if ((v.Flags & VmFlags.WipeOnFork) != 0)
                continue;
            if (cv.UserfaultfdWp || v.AnonVma is not null)
                CopyPageRange(child, cv, v);
        }
        return child;
    }

    /// <summary>copy_page_range → copy_pmd_range → copy_pte_range for one VMA.</summary>
    private void CopyPageRange(Mm child, Vma dst, Vma src)
    {
        var childWp = IsV6 ? dst.UserfaultfdWp : src.UserfaultfdWp;
        foreach (var st in PageTable.Walk(src.Start, src.End))
        {
            if (st.Table is not { } pmdt)
                continue;
            if (st.IsHuge)
            {
                // copy_huge_pmd skips file PMDs: the child refaults them. An anon folio that
                // may be pinned cannot be shared (folio_try_dup_anon_rmap_pmd fails): the PMD
                // is split and its pages are copied one by one below.
                var folio = Kernel.PageOf(pmdt.Entries[st.Index].Pfn)!.Folio!;
                if (!src.IsAnonymous)
                    continue;
                if (!(HasPinned && !folio.IsHugeZero && Array.Exists(folio.Pages, p => p.Pins > 0 && p.AnonExclusive)))
                {
                    CopyHugePmd(child, src, pmdt, st.Index, st.Addr, childWp);
                    continue;
                }
                SplitHugePmd(src, pmdt, st.Index, st.Addr & Kernel.PmdMask);
            }
            if (st.PteTable is not { } table)
                continue;
            var ctable = child.PageTable.PteAlloc(st.Addr)!;
            for (var a = st.Addr; a < st.End; a += Kernel.PageSize)
            {
                var i = PageTable.PteIndex(a);
                var pte = table.Entries[i];
                if (pte.IsNone)
                    continue;
                if (pte.Present && NormalPage(pte) is { IsAnon: true, AnonExclusive: true, Pins: > 0 } pinned && HasPinned)
                    ctable.Entries[i] = CopyPresentPage(child, dst, pinned, pte);
                else if (pte.Present)
                    ctable.Entries[i] = CopyPresentPte(child, src, table, i, pte, childWp);
                else
                    ctable.Entries[i] = CopyNonpresentPte(table, i, pte, childWp);
            }
        }
    }

    /// <summary>
    /// copy_present_pte: an anon page becomes shared (anon-exclusive cleared, one more
    /// mapping); a writable COW mapping is write-protected in parent and child; the child
    /// entry is old, clean for shared mappings, and keeps uffd-wp only if the child VMA is
    /// uffd-wp (6.x; v5.7 looked at the parent VMA).
    /// </summary>
    private Pte CopyPresentPte(Mm child, Vma src, PteTable table, int i, Pte pte, bool childWp)
    {
        var page = NormalPage(pte);
        if (page is not null)
        {
            child.AddRmap(page);
            if (page.IsAnon)
                page.AnonExclusive = false;
        }
        if (src.IsCowMapping && pte.Write)
        {
            table.Entries[i] = pte.Wrprotect();
            pte = pte.Wrprotect();
        }
        if (src.IsShared)
            pte = pte.MkClean();
        pte = pte.MkOld();
        if (!childWp)
            pte = pte.ClearUffdWp();
        return pte;
    }

    /// <summary>
    /// copy_present_page: a page that may be pinned for DMA (folio_needs_cow_for_dma: the mm
    /// has MMF_HAS_PINNED and the exclusive page is pinned) is copied into the child at fork
    /// instead of shared; the parent keeps its page and entry untouched. The child's entry
    /// is dirty (soft-dirty too, pte_mkdirty), writable where the VMA is, and uffd-wp when
    /// the child VMA is uffd-wp and the parent's entry was (userfaultfd_pte_wp), i.e. only
    /// with EVENT_FORK.
    /// </summary>
    private Pte CopyPresentPage(Mm child, Vma dst, Page page, Pte srcPte)
    {
        var np = Kernel.AllocPage(PageKind.Anon, child)
            ?? throw new InvalidOperationException("fork: no frame for a pinned page's copy");
        np.CopyFrom(page);
        AddNewAnonRmap(np);
        var pte = MaybeMkWrite(child.MkPte(np, dst).MkDirty(), dst);
        if (dst.UserfaultfdWp && srcPte.UffdWp)
            pte = pte.MkUffdWp();
        return pte;
    }

    /// <summary>copy_nonpresent_pte: swap entries are shared; markers copied per copy_pte_marker; hwpoison entries copied.</summary>
    private Pte CopyNonpresentPte(PteTable table, int i, Pte pte, bool childWp)
    {
        if (pte.IsSwap)
        {
            Kernel.SwapDup(pte.SwapSlot);
            if (pte.SwpExclusive)
            {
                table.Entries[i] = pte.SwpClearExclusive();
                pte = pte.SwpClearExclusive();
            }
            return childWp ? pte : pte.SwpClearUffdWp();
        }
        // Other non-swap entries (hwpoison) are copied as they are, uffd-wp only for a uffd-wp child.
        if (pte.IsHwpoison)
            return childWp ? pte : pte.SwpClearUffdWp();
        var marker = pte.MarkerBits & (PteMarker.Poisoned | PteMarker.Guard);
        if ((pte.MarkerBits & PteMarker.UffdWp) != 0 && childWp)
            marker |= PteMarker.UffdWp;
        return marker == PteMarker.None ? Pte.None : Pte.Marker(marker);
    }

    /// <summary>copy_huge_pmd: both PMDs write-protected; the folio becomes shared.</summary>
    private void CopyHugePmd(Mm child, Vma src, PmdTable pmdt, int pi, ulong addr, bool childWp)
    {
        var pmd = pmdt.Entries[pi];
        var folio = Kernel.PageOf(pmd.Pfn)!.Folio!;
        if (!folio.IsHugeZero)
        {
            folio.EntireMapCount++;
            folio.Track(child, 1);
            foreach (var p in folio.Pages)
                p.AnonExclusive = false;
            if (src.IsCowMapping)
                pmd = pmd.Wrprotect();
            pmdt.Entries[pi] = pmd;
        }
        var cpmd = pmd.MkOld();
        if (!childWp)
            cpmd = cpmd.ClearUffdWp();
        child.PageTable.PmdTableOf(addr, true)!.Entries[pi] = cpmd;
    }

    /// <summary>
    /// exit of the process: its threads die (a thread asleep in a userfault is woken by the
    /// fatal signal and exits), then exit_mmap tears the address space down.
    /// </summary>
    public void Exit()
    {
        using var _ = Kernel.Enter();
        if (Exited)
            return;
        foreach (var t in Threads.ToList())
            t.Exit();
        ExitMmap();
    }
}

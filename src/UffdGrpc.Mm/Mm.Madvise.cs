namespace UffdGrpc.Mm;

/// <summary>madvise(2) (mm/madvise.c), MADV_POPULATE (mm/gup.c) and reclaim (mm/vmscan.c, mm/rmap.c).</summary>
public sealed partial class Mm
{
    internal static ulong PageAlignPublic(ulong len) => PageAlign(len);

    /// <summary>The signal a user access gets for a fault result (mm_fault_error / do_sigbus).</summary>
    internal SigCode SignalOf(FaultResult r) => r switch
    {
        FaultResult.SigSegvMaperr => SigCode.SegvMaperr,
        FaultResult.SigSegvAccerr => SigCode.SegvAccerr,
        FaultResult.HwPoison => Kernel.Config.MemoryFailure ? SigCode.BusMceerrAr : SigCode.BusAdrerr,
        _ => SigCode.BusAdrerr,
    };

    internal static Errno PopulateErrno(FaultResult r) => r switch
    {
        FaultResult.HwPoison => Errno.EHWPOISON,
        FaultResult.Oom => Errno.ENOMEM,
        FaultResult.VmaInval => Errno.EINVAL,
        _ => Errno.EFAULT,
    };

    /// <summary>do_madvise argument checks: unaligned start or a wrapping length is EINVAL.</summary>
    internal static Errno MadviseValidate(ulong start, ulong lenIn, out ulong end)
    {
        end = start;
        if (start % Kernel.PageSize != 0)
            return Errno.EINVAL;
        var len = PageAlign(lenIn);
        if (lenIn != 0 && len == 0)
            return Errno.EINVAL;
        end = start + len;
        if (end < start)
            return Errno.EINVAL;
        return Errno.OK;
    }

    /// <summary>
    /// One page of faultin_page_range (MADV_POPULATE): the VMA checks of __get_user_pages
    /// with FOLL_MADV_POPULATE, then follow_page or a kernel-origin fault until the page
    /// is mapped with the access it needs.
    /// </summary>
    internal FaultResult PopulateOne(SimThread t, ulong addr, bool write)
    {
        var vma = VmaLookup(addr);
        if (vma is null)
            return FaultResult.Oom;
        if (write ? (vma.Flags & VmFlags.Write) == 0 : (vma.Flags & VmFlags.Read) == 0)
            return FaultResult.VmaInval;
        for (var tries = 0; tries < 64; tries++)
        {
            if (GupFollow(addr, write))
                return FaultResult.Ok;
            _faulting = t;
            var r = HandleMmFault(t, addr, write, AccessOrigin.Kernel);
            _faulting = null;
            _oomInjected = false;
            if (r != FaultResult.Ok || Exited)
                return Exited ? FaultResult.Oom : r;
        }
        throw new InvalidOperationException("populate livelock");
    }

    internal static bool IsKnownAdvice(Madv a) => a is Madv.Normal or Madv.Random or Madv.Sequential or Madv.Willneed
        or Madv.Dontneed or Madv.Free or Madv.Remove or Madv.Dontfork or Madv.Dofork or Madv.Hugepage
        or Madv.Nohugepage or Madv.Wipeonfork or Madv.Keeponfork or Madv.Cold or Madv.Pageout
        or Madv.PopulateRead or Madv.PopulateWrite or Madv.Collapse or Madv.Dontdump or Madv.Dodump;

    /// <summary>
    /// Models do_madvise → madvise_walk_vmas: each VMA piece of the range gets the advice;
    /// holes are skipped and reported as ENOMEM at the end. DONTNEED, FREE and REMOVE first
    /// raise a REMOVE event on a context with EVENT_REMOVE and sleep until it is read
    /// (userfaultfd_remove), before anything is zapped.
    /// </summary>
    internal bool MadviseStep(MadviseOp op)
    {
        if (!op.Validated)
        {
            op.Validated = true;
            if (!IsKnownAdvice(op.Advice) || (!IsV6 && op.Advice is Madv.Collapse))
            {
                op.Result = Errno.EINVAL;
                return true;
            }
            op.Result = MadviseValidate(op.Start, op.Len, out op.End);
            if (op.Result != Errno.OK || op.End == op.Start)
                return true;
            op.Cursor = op.Start;
        }
        while (op.Cursor < op.End)
        {
            var vma = FindVma(op.Cursor);
            if (vma is null)
            {
                op.Result = Errno.ENOMEM;
                return true;
            }
            if (op.Cursor < vma.Start)
            {
                op.UnmappedError = Errno.ENOMEM;
                op.Cursor = vma.Start;
                if (op.Cursor >= op.End)
                    break;
            }
            var segEnd = Math.Min(op.End, vma.End);
            if (op.Advice is Madv.Dontneed or Madv.Free or Madv.Remove && !op.RemoveEventDone)
            {
                var pre = op.Advice == Madv.Remove ? MadviseRemoveCheck(vma) : MadviseDontneedCheck(vma);
                if (pre != Errno.OK)
                {
                    op.Result = pre;
                    return true;
                }
                if (vma.UffdCtx is { } ctx && (ctx.Features & UffdFeatures.EventRemove) != 0 && !ctx.Released)
                {
                    op.RemoveEventDone = true;
                    ctx.MmapChanging++;
                    ctx.QueueEvent(op.Thread, new UffdMsg { Event = UffdEvent.Remove, From = op.Cursor, To = segEnd });
                    return false;
                }
            }
            if (op.RemoveEventDone)
            {
                vma = VmaLookup(op.Cursor);
                if (vma is null)
                {
                    op.Result = Errno.ENOMEM;
                    return true;
                }
                segEnd = Math.Min(segEnd, vma.End);
            }
            op.RemoveEventDone = false;
            var err = MadviseVma(vma, op.Cursor, segEnd, op.Advice);
            if (err != Errno.OK)
            {
                op.Result = err;
                return true;
            }
            op.Cursor = segEnd;
        }
        op.Result = op.UnmappedError;
        return true;
    }

    private static Errno MadviseDontneedCheck(Vma vma) =>
        (vma.Flags & VmFlags.Locked) != 0 ? Errno.EINVAL : Errno.OK;

    private static Errno MadviseRemoveCheck(Vma vma)
    {
        if ((vma.Flags & VmFlags.Locked) != 0 || vma.File is null)
            return Errno.EINVAL;
        if ((vma.Flags & (VmFlags.Shared | VmFlags.MayWrite)) != (VmFlags.Shared | VmFlags.MayWrite))
            return Errno.EACCES;
        return Errno.OK;
    }

    /// <summary>madvise_vma_behavior for one VMA piece [start, end).</summary>
    private Errno MadviseVma(Vma vma, ulong start, ulong end, Madv advice)
    {
        switch (advice)
        {
            case Madv.Dontneed:
                ZapRange(vma, start, end, new ZapDetails(DropMarkers: false, EvenCows: true, ReclaimPt: true));
                return Errno.OK;
            case Madv.Free:
                return MadviseFree(vma, start, end);
            case Madv.Remove:
                return ShmemPunchHole(vma, start, end);
            case Madv.Pageout:
                return MadviseColdOrPageout(vma, start, end, pageout: true);
            case Madv.Cold:
                return MadviseColdOrPageout(vma, start, end, pageout: false);
            case Madv.Willneed:
                return (vma.Flags & VmFlags.Locked) != 0 ? Errno.EINVAL : Errno.OK;
            case Madv.Collapse:
                return MadviseCollapse(vma, start, end);
            case Madv.Normal:
            case Madv.Random:
            case Madv.Sequential:
            case Madv.Dontdump:
            case Madv.Dodump:
                return Errno.OK;
            case Madv.Hugepage:
                return UpdateVmaFlags(vma, start, end, (vma.Flags | VmFlags.HugePage) & ~VmFlags.NoHugePage);
            case Madv.Nohugepage:
                return UpdateVmaFlags(vma, start, end, (vma.Flags | VmFlags.NoHugePage) & ~VmFlags.HugePage);
            case Madv.Dontfork:
                return UpdateVmaFlags(vma, start, end, vma.Flags | VmFlags.DontCopy);
            case Madv.Dofork:
                return UpdateVmaFlags(vma, start, end, vma.Flags & ~VmFlags.DontCopy);
            case Madv.Wipeonfork:
                if (vma.File is not null || vma.IsShared)
                    return Errno.EINVAL;
                return UpdateVmaFlags(vma, start, end, vma.Flags | VmFlags.WipeOnFork);
            case Madv.Keeponfork:
                return UpdateVmaFlags(vma, start, end, vma.Flags & ~VmFlags.WipeOnFork);
            default:
                return Errno.EINVAL;
        }
    }

    /// <summary>madvise_update_vma: split/merge only when the flags change.</summary>
    private Errno UpdateVmaFlags(Vma vma, ulong start, ulong end, VmFlags newFlags)
    {
        if (newFlags == vma.Flags)
            return Errno.OK;
        vma = IsolateRange(vma, start, end);
        vma.Flags = newFlags;
        MergeVma(vma);
        return Errno.OK;
    }

    /// <summary>
    /// madvise_free_single_vma / madvise_free_pte_range: anon only. Exclusively mapped
    /// present pages are made clean and old and marked lazily freeable; swap entries and
    /// poison markers are dropped; uffd-wp PTEs and markers stay.
    /// </summary>
    private Errno MadviseFree(Vma vma, ulong start, ulong end)
    {
        if (!vma.IsAnonymous)
            return Errno.EINVAL;
        foreach (var st in PageTable.Walk(start, end))
        {
            if (st.Table is not { } pmdt)
                continue;
            var pi = st.Index;
            if (st.IsHuge)
            {
                // madvise_free_huge_pmd: a whole PMD stays mapped and its folio becomes lazily
                // freeable; part of one splits the PMD and the folio.
                var pmd = pmdt.Entries[pi];
                var folio = Kernel.PageOf(pmd.Pfn)!.Folio!;
                if (folio.IsHugeZero)
                    continue;
                if (st.CoversPmd)
                {
                    if (!folio.MaybeMappedShared)
                    {
                        pmdt.Entries[pi] = pmd.MkOld().MkClean();
                        MarkLazyFree(folio.Pages);
                    }
                    continue;
                }
                SplitAnonFolioAt(vma, st.Addr);
            }
            var table = pmdt.Tables[pi];
            for (var a = st.Addr; table is not null && a < st.End; a += Kernel.PageSize)
            {
                var i = PageTable.PteIndex(a);
                var pte = table.Entries[i];
                if (pte.Present && NormalPage(pte) is { Folio: { } f })
                {
                    if (f.MaybeMappedShared && !Kernel.FreeKeepsWholeLargeFolio)
                        break;
                    if (!f.MaybeMappedShared && (!Kernel.FreeKeepsWholeLargeFolio || !FolioWithin(a, start, end)))
                    {
                        SplitAnonFolioAt(vma, a);
                        pte = table.Entries[i];
                    }
                }
                if (pte.IsSwap)
                {
                    Kernel.SwapFree(pte.SwapSlot);
                    table.Entries[i] = Pte.None;
                }
                else if (pte.IsPoisonMarker)
                {
                    table.Entries[i] = Pte.None;
                }
                else if (pte.Present && NormalPage(pte) is { IsAnon: true } page
                         && (page.Folio is { } lf ? !lf.MaybeMappedShared : page.PreciseMapCount == 1))
                {
                    table.Entries[i] = pte.MkOld().MkClean();
                    MarkLazyFree([page]);
                }
            }
        }
        return Errno.OK;
    }

    private static void MarkLazyFree(IEnumerable<Page> pages)
    {
        foreach (var p in pages)
        {
            p.Dirty = false;
            p.LazyFree = true;
        }
    }

    /// <summary>Whether the whole folio whose subpage is mapped at <paramref name="addr"/> lies in [start, end).</summary>
    private static bool FolioWithin(ulong addr, ulong start, ulong end)
    {
        var b = addr & Kernel.PmdMask;
        return b >= start && b + Kernel.PmdSize <= end;
    }

    /// <summary>
    /// split_folio of the anon THP mapped at <paramref name="addr"/> (its PMD is split
    /// first): the subpages become small pages, and zero-filled ones are remapped to the
    /// shared zero page keeping soft-dirty and uffd-wp (try_to_map_unused_to_zeropage).
    /// A folio mapped by other processes is left alone.
    /// </summary>
    internal bool SplitAnonFolioAt(Vma vma, ulong addr)
    {
        var pmdt = PageTable.PmdTableOf(addr, false);
        if (pmdt is null)
            return false;
        var pi = PageTable.PmdIndex(addr);
        Folio? folio;
        if (pmdt.Entries[pi].TransHuge)
        {
            folio = Kernel.PageOf(pmdt.Entries[pi].Pfn)!.Folio!;
            if (folio.IsHugeZero || folio.MaybeMappedShared)
                return false;
            SplitHugePmd(vma, pmdt, pi, addr & Kernel.PmdMask);
        }
        else
        {
            var pte = pmdt.Tables[pi]?.Entries[PageTable.PteIndex(addr)] ?? Pte.None;
            folio = pte.Present ? NormalPage(pte)?.Folio : null;
            if (folio is null || folio.MaybeMappedShared)
                return false;
        }
        SplitFolio(folio, vma, pmdt.Tables[pi]!);
        return true;
    }

    /// <summary>
    /// madvise_cold_or_pageout_pte_range, and for PAGEOUT reclaim_pages → shrink_folio_list.
    /// A THP only partly in the range is split (PMD and folio) by both advices; COLD
    /// otherwise changes nothing visible. PAGEOUT of a lazily freed folio discards it when
    /// no mapping wrote it since (else keeps it whole); any other anon THP is split first
    /// (add_to_swap takes no large folio here). Small anon pages mapped once go to swap (a
    /// swap entry keeping soft-dirty and uffd-wp) when a swap device is active; a clean
    /// lazily freed page is discarded even without swap. Page-cache pages mapped once are
    /// unmapped everywhere (a uffd-wp PTE leaves a marker); shmem pages then go to swap
    /// when there is swap, otherwise stay in the page cache. Direct reclaim runs the same
    /// walk with a <see cref="ScanControl"/> that says which folios this pass may reclaim
    /// and stops once enough frames are free.
    /// </summary>
    private Errno MadviseColdOrPageout(Vma vma, ulong start, ulong end, bool pageout, ScanControl? sc = null)
    {
        if ((vma.Flags & VmFlags.Locked) != 0)
            return Errno.EINVAL;
        foreach (var st in PageTable.Walk(start, end))
        {
            if (st.Table is not { } pmdt)
                continue;
            var pi = st.Index;
            if (st.IsHuge)
            {
                var folio = Kernel.PageOf(pmdt.Entries[pi].Pfn)!.Folio!;
                if (folio.IsHugeZero || folio.MaybeMappedShared || !vma.IsAnonymous)
                    continue;
                if (sc is { Done: true })
                    return Errno.OK;
                if (st.CoversPmd)
                {
                    if (!pageout)
                        continue;
                    if (Array.TrueForAll(folio.Pages, p => p.LazyFree))
                    {
                        ReclaimLazyFreeFolio(folio, st.Addr);
                        continue;
                    }
                }
                if (sc is { MaySwap: false })
                    continue;
                SplitAnonFolioAt(vma, st.Addr);
            }
            var table = pmdt.Tables[pi];
            Folio? decided = null;
            for (var a = st.Addr; table is not null && a < st.End; a += Kernel.PageSize)
            {
                var i = PageTable.PteIndex(a);
                var pte = table.Entries[i];
                if (!pte.Present || NormalPage(pte) is not { } page)
                    continue;
                if (sc is { Done: true })
                    return Errno.OK;
                if (page.Folio is { } f)
                {
                    if (f.MaybeMappedShared || f == decided || !page.IsAnon)
                        continue;
                    var within = FolioWithin(a, start, end);
                    if (!pageout && within)
                        continue;
                    if (pageout && within && Array.TrueForAll(f.Pages, p => p.LazyFree))
                    {
                        ReclaimLazyFreeFolio(f, a);
                        decided = f;
                        continue;
                    }
                    if (sc is { MaySwap: false })
                        continue;
                    SplitAnonFolioAt(vma, a);
                    pte = table.Entries[i];
                    if (!pte.Present || NormalPage(pte) is not { } small)
                        continue;
                    page = small;
                }
                if (pageout && page.PreciseMapCount == 1 && (sc is null || sc.MayReclaim(page, pte)))
                    ReclaimPage(page, vma, table, i, pte);
            }
        }
        return Errno.OK;
    }

    /// <summary>
    /// shrink_folio_list for a lazily freed anon THP: try_to_unmap finds a dirty mapping and
    /// gives the folio back (swap-backed again, kept whole), or discards the whole folio.
    /// </summary>
    private void ReclaimLazyFreeFolio(Folio folio, ulong addr)
    {
        var pmdt = PageTable.PmdTableOf(addr, false)!;
        var pi = PageTable.PmdIndex(addr);
        var dirty = Array.Exists(folio.Pages, p => p.Dirty);
        if (pmdt.Entries[pi].TransHuge)
        {
            dirty |= pmdt.Entries[pi].Dirty;
        }
        else if (pmdt.Tables[pi] is { } t)
        {
            foreach (var e in t.Entries)
                dirty |= e.Present && e.Dirty && Array.IndexOf(folio.Pages, Kernel.PageOf(e.Pfn)) >= 0;
        }
        if (dirty)
        {
            foreach (var p in folio.Pages)
                p.LazyFree = false;
            return;
        }
        if (pmdt.Entries[pi].TransHuge)
        {
            ZapHugePmd(pmdt, pi);
            return;
        }
        var table = pmdt.Tables[pi]!;
        for (var i = 0; i < Kernel.PtrsPerTable; i++)
        {
            var e = table.Entries[i];
            if (e.Present && !e.Special && Kernel.PageOf(e.Pfn) is { } p && p.Folio == folio)
            {
                table.Entries[i] = Pte.None;
                RemoveRmap(p);
            }
        }
    }

    /// <summary>shrink_folio_list for one page mapped by exactly one PTE.</summary>
    private void ReclaimPage(Page page, Vma vma, PteTable table, int i, Pte pte)
    {
        if (page.IsAnon)
        {
            if (page.LazyFree && !pte.Dirty && !page.Dirty)
            {
                table.Entries[i] = Pte.None;
                RemoveRmap(page);
                return;
            }
            if (!Kernel.Config.Swap || Kernel.SwapFull)
                return;
            var slot = Kernel.SwapOut(page);
            var swp = Pte.SwapEntry(slot);
            if (pte.SoftDirty)
                swp = swp.SwpMkSoftDirty();
            if (pte.UffdWp)
                swp = swp.SwpMkUffdWp();
            if (page.AnonExclusive)
                swp = swp.SwpMkExclusive();
            table.Entries[i] = swp;
            RemoveRmap(page);
            return;
        }
        if (pte.Dirty)
            page.Dirty = true;
        table.Entries[i] = Pte.None;
        InstallUffdWpIfNeeded(vma, table, i, pte);
        RemoveRmap(page);
        Kernel.ReclaimUnmappedFilePage(page, writeback: false);
    }

    /// <summary>
    /// madvise_remove → shmem_fallocate(PUNCH_HOLE): every mapping of the file is unmapped in
    /// the range (unmap_mapping_range, private COW copies kept; uffd-wp entries leave
    /// markers, poison markers stay), then the page-cache pages and swap are freed.
    /// </summary>
    private Errno ShmemPunchHole(Vma vma, ulong start, ulong end)
    {
        var file = vma.File!;
        var first = vma.LinearPageIndex(start);
        var last = vma.LinearPageIndex(end);
        foreach (var mm in Kernel.Mms)
        {
            foreach (var v in mm.Vmas.Where(v => v.File == file).ToList())
            {
                var vFirst = Math.Max(first, v.PgOff);
                var vLast = Math.Min(last, v.PgOff + v.Pages);
                if (vFirst >= vLast)
                    continue;
                var s = v.Start + ((vFirst - v.PgOff) * Kernel.PageSize);
                var e = v.Start + ((vLast - v.PgOff) * Kernel.PageSize);
                mm.ZapRange(v, s, e, new ZapDetails(DropMarkers: false, EvenCows: false));
            }
        }
        for (var idx = first; idx < last; idx++)
        {
            if (file.Swapped.ContainsKey(idx))
                Kernel.ShmemSwapped(-1);
            if (file.Cache.TryGetValue(idx, out var cached) && cached.Folio is { } large)
            {
                // truncate_inode_partial_folio: the large folio is split first.
                foreach (var p in large.Pages)
                    p.Folio = null;
            }
            if (file.Cache.Remove(idx, out var page))
                Kernel.MaybeFree(page);
            file.Swapped.Remove(idx);
            file.Disk.Remove(idx);
        }
        return Errno.OK;
    }

    /// <summary>
    /// madvise_collapse (mm/khugepaged.c) for anon memory: every 2 MiB-aligned range fully
    /// inside the request is collapsed into a new PMD-mapped THP. A range holding a
    /// uffd-wp entry fails (SCAN_PTE_UFFD_WP: EINVAL); an empty slot in a uffd-armed VMA
    /// fails (SCAN_EXCEED_NONE_PTE: EBUSY, EINVAL in 6.1); no PTE table at all is SCAN_PMD_NULL
    /// (EINVAL). In 6.1 a range without a writable PTE is SCAN_PAGE_RO (EINVAL).
    /// </summary>
    private Errno MadviseCollapse(Vma vma, ulong start, ulong end)
    {
        if ((vma.Flags & VmFlags.NoHugePage) != 0 || Kernel.Config.Thp == ThpMode.Never || !(vma.IsAnonymous || vma.IsShmem))
            return Errno.EINVAL;
        // thp_vma_allowable_order: the VMA must be able to hold an aligned PMD at all.
        if (((vma.Start + Kernel.PmdSize - 1) & Kernel.PmdMask) + Kernel.PmdSize > vma.End)
            return Errno.EINVAL;
        var hstart = (start + Kernel.PmdSize - 1) & Kernel.PmdMask;
        var hend = end & Kernel.PmdMask;
        var last = Errno.OK;
        var thps = 0;
        var total = 0;
        for (var h = hstart; h < hend; h += Kernel.PmdSize)
        {
            total++;
            if (h < vma.Start || h + Kernel.PmdSize > vma.End)
            {
                last = Errno.EINVAL;
                continue;
            }
            var r = vma.IsShmem ? CollapseFile(vma, h) : CollapseOne(vma, h);
            if (r == Errno.OK)
                thps++;
            else
                last = r;
        }
        return thps == total ? Errno.OK : last;
    }

    private Errno CollapseOne(Vma vma, ulong haddr, bool rescanned = false)
    {
        var pmdt = PageTable.PmdTableOf(haddr, false);
        var pi = PageTable.PmdIndex(haddr);
        if (pmdt is not null && pmdt.Entries[pi].TransHuge)
            return Errno.OK;
        var table = pmdt?.Tables[pi];
        if (table is null)
            return Errno.EINVAL;
        var writable = false;
        for (var i = 0; i < Kernel.PtrsPerTable; i++)
        {
            var pte = table.Entries[i];
            if (pte.IsNone || (pte.Present && pte.Special))
            {
                if (vma.UserfaultfdArmed)
                    return Kernel.CollapseNonePteIsEbusy ? Errno.EBUSY : Errno.EINVAL;
                continue;
            }
            if (!pte.Present)
                return Errno.EINVAL;
            if (pte.UffdWp)
                return Errno.EINVAL;
            writable |= pte.Write;
            var page = NormalPage(pte)!;
            if (!page.IsAnon)
                return Errno.EINVAL;
        }
        if (!writable && Kernel.CollapseNeedsWritablePte)
            return Errno.EINVAL;
        // hugepage_vma_revalidate: a VMA that never had an anon page has no anon_vma
        // (SCAN_PAGE_ANON). MADV_COLLAPSE ignores max_ptes_shared and read-only PTEs.
        if (vma.AnonVma is null)
            return Errno.EINVAL;
        // collapse_huge_page: alloc_charge_folio (GFP_TRANSHUGE: may reclaim), then the
        // range is revalidated; a reclaim that ran meanwhile may have changed it.
        var epoch = Kernel.ReclaimEpoch;
        var folio = Kernel.AllocThp(this, mayReclaim: true);
        if (folio is null)
            return Errno.ENOMEM;
        if (epoch != Kernel.ReclaimEpoch)
        {
            foreach (var p in folio.Pages)
                Kernel.MaybeFree(p);
            return rescanned ? Errno.EAGAIN : CollapseOne(vma, haddr, rescanned: true);
        }
        var dirty = false;
        for (var i = 0; i < Kernel.PtrsPerTable; i++)
        {
            var pte = table.Entries[i];
            if (pte.Present && !pte.Special)
            {
                var page = NormalPage(pte)!;
                folio.Pages[i].CopyFrom(page);
                dirty |= pte.Dirty;
                RemoveRmap(page);
            }
        }
        pmdt!.Tables[pi] = null;
        MapNewThp(vma, pmdt, pi, folio);
        if (!dirty)
            pmdt.Entries[pi] = new Pmd(pmdt.Entries[pi].Value & ~PteBits.PageDirty);
        return Errno.OK;
    }

    /// <summary>
    /// collapse_file for shmem (MADV_COLLAPSE ignores shmem_enabled unless deny): the cached
    /// pages of the aligned range are copied into a new PMD-sized folio and unmapped from
    /// every mapping (a uffd-wp PTE leaves a marker); holes are zero-filled, unless some VMA
    /// of the file is MISSING-registered there (SCAN_EXCEED_NONE_PTE: EBUSY, with the pages
    /// already unmapped). Empty page tables are retracted (not in uffd-wp VMAs), then the
    /// calling VMA maps the folio with a PMD (collapse_pte_mapped_thp; EINVAL in a uffd-wp
    /// VMA).
    /// </summary>
    private Errno CollapseFile(Vma vma, ulong haddr)
    {
        var file = vma.File!;
        var start = vma.LinearPageIndex(haddr);
        if (start % Kernel.PtrsPerTable != 0 || start + Kernel.PtrsPerTable > file.SizePages)
            return Errno.EINVAL;
        var end = start + Kernel.PtrsPerTable;
        if (file.FindCachePage(start)?.Folio is not { IsHugeZero: false } existing || existing.Head.Index != start)
        {
            var present = 0;
            for (var i = start; i < end; i++)
            {
                if (file.Cache.ContainsKey(i) || file.Swapped.ContainsKey(i))
                    present++;
            }
            if (present == 0)
                return Errno.EINVAL;
            for (var i = start; i < end; i++)
            {
                if (file.FindCachePage(i) is not null || ShmemSwapin(file, i) is not null)
                    UnmapFilePage(file, i);
            }
            if (Kernel.CollapseFileChecksMissingHoles && present < Kernel.PtrsPerTable && FileVmas(file).Any(v => v.Vma.UserfaultfdMissing
                && v.Vma.PgOff < end && v.Vma.PgOff + v.Vma.Pages > start))
                return Errno.EBUSY;
            var folio = Kernel.AllocFileThp(file, start, this);
            if (folio is null)
                return Errno.ENOMEM;
            for (var i = start; i < end; i++)
            {
                var np = folio.Pages[(int)(i - start)];
                if (file.Cache.Remove(i, out var old))
                {
                    np.CopyFrom(old);
                    np.Dirty = true;
                    Kernel.MaybeFree(old);
                }
                file.Cache[i] = np;
            }
            existing = folio;
            foreach (var (mm, v) in FileVmas(file))
                mm.RetractPageTable(v, start);
        }
        if (vma.UserfaultfdWp)
            return Errno.EINVAL;
        var pmdt = PageTable.PmdTableOf(haddr, true)!;
        var pi = PageTable.PmdIndex(haddr);
        if (pmdt.Entries[pi].IsNone && pmdt.Tables[pi] is null)
            DoSetPmd(vma, pmdt, pi, haddr, write: false);
        return Errno.OK;
    }

    /// <summary>Every VMA (of every address space) that maps <paramref name="file"/> (the i_mmap tree).</summary>
    private IEnumerable<(Mm Mm, Vma Vma)> FileVmas(MemFile file) =>
        Kernel.Mms.SelectMany(m => m.Vmas.Where(v => v.File == file).Select(v => (m, v))).ToList();

    /// <summary>try_to_unmap of a page-cache page from every mapping (uffd-wp PTEs leave markers).</summary>
    private void UnmapFilePage(MemFile file, ulong index)
    {
        foreach (var (mm, v) in FileVmas(file))
        {
            if (index < v.PgOff || index >= v.PgOff + v.Pages)
                continue;
            var addr = v.Start + ((index - v.PgOff) * Kernel.PageSize);
            var table = mm.PageTable.PteTableOf(addr);
            if (table is null)
                continue;
            var i = PageTable.PteIndex(addr);
            var pte = table.Entries[i];
            if (!pte.Present || mm.NormalPage(pte) is not { Kind: PageKind.File } page || page.Index != index)
                continue;
            table.Entries[i] = Pte.None;
            InstallUffdWpIfNeeded(v, table, i, pte);
            mm.RemoveRmap(page);
        }
    }

    /// <summary>retract_page_tables: an empty PTE table over an aligned range of a VMA without anon pages or uffd-wp is freed.</summary>
    internal void RetractPageTable(Vma v, ulong fileIndex)
    {
        if (v.AnonVma is not null || v.UserfaultfdWp || fileIndex < v.PgOff)
            return;
        var addr = v.Start + ((fileIndex - v.PgOff) * Kernel.PageSize);
        if (addr % Kernel.PmdSize != 0 || addr + Kernel.PmdSize > v.End)
            return;
        var pmdt = PageTable.PmdTableOf(addr, false);
        var pi = PageTable.PmdIndex(addr);
        if (pmdt?.Tables[pi] is { } t && Array.TrueForAll(t.Entries, e => e.IsNone))
            pmdt.Tables[pi] = null;
    }

    /// <summary>userfaultfd_unmap_complete: sends the collected UNMAP events one by one.</summary>
    internal static bool SendUnmapEvents(SimThread t, List<(UserfaultfdCtx Ctx, ulong Start, ulong End)> events, ref int next)
    {
        while (next < events.Count)
        {
            var (ctx, s, e) = events[next++];
            if (ctx.Released)
            {
                ctx.MmapChanging--;
                continue;
            }
            ctx.QueueEvent(t, new UffdMsg { Event = UffdEvent.Unmap, From = s, To = e });
            return false;
        }
        return true;
    }
}

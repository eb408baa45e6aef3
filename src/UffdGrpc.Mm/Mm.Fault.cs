namespace UffdGrpc.Mm;

/// <summary>Where an access comes from (FAULT_FLAG_USER or a kernel copy/GUP).</summary>
public enum AccessOrigin
{
    User,
    Kernel,
}

/// <summary>Outcome of one pass through the fault handler (vm_fault_t, simplified).</summary>
internal enum FaultResult
{
    /// <summary>The fault was handled (or there was nothing to do): retry the access.</summary>
    Ok,
    SigSegvMaperr,
    SigSegvAccerr,
    /// <summary>VM_FAULT_SIGBUS.</summary>
    SigBus,
    /// <summary>VM_FAULT_HWPOISON (a poison marker).</summary>
    HwPoison,
    Oom,
    /// <summary>The thread sleeps in handle_userfault.</summary>
    Blocked,
    /// <summary>GUP found a VMA that does not allow the access (check_vma_flags under FOLL_MADV_POPULATE).</summary>
    VmaInval,
}

/// <summary>
/// The fault path: mm/memory.c (handle_mm_fault, do_anonymous_page, do_fault, do_swap_page,
/// do_wp_page), mm/huge_memory.c (THP faults) and fs/userfaultfd.c (handle_userfault).
/// </summary>
public sealed partial class Mm
{
    private const int FaultAroundPages = 16;

    /// <summary>
    /// Models handle_mm_fault → __handle_mm_fault (mm/memory.c): VMA lookup and permission
    /// (F0/F1), the huge-PMD paths, then handle_pte_fault.
    /// </summary>
    internal FaultResult HandleMmFault(SimThread t, ulong addr, bool write, AccessOrigin origin)
    {
        var vma = VmaLookup(addr);
        if (vma is null)
            return FaultResult.SigSegvMaperr;
        if (write ? (vma.Flags & VmFlags.Write) == 0 : (vma.Flags & VmFlags.AccessFlags) == 0)
            return FaultResult.SigSegvAccerr;

        var pmdt = PageTable.PmdTableOf(addr, true)!;
        var pi = PageTable.PmdIndex(addr);
        if (pmdt.Entries[pi].IsNone && pmdt.Tables[pi] is null && ThpEligible(vma, addr))
        {
            var r = DoHugePmdAnonymousPage(t, vma, pmdt, pi, addr, write, origin, out var fallback);
            if (!fallback)
                return r;
        }
        // A MINOR-registered VMA takes the userfault in shmem_get_folio_gfp before finish_fault
        // could reach do_set_pmd, and CONTINUE installs PTEs, so the fault path never maps it
        // with a PMD (MADV_COLLAPSE's set_huge_pmd does: CollapseFile).
        if (pmdt.Entries[pi].IsNone && pmdt.Tables[pi] is null && !vma.UserfaultfdMinor && DoSetPmd(vma, pmdt, pi, addr, write))
            return FaultResult.Ok;
        var pmd = pmdt.Entries[pi];
        if (pmd.TransHuge)
        {
            if (write && !pmd.Write)
            {
                var r = WpHugePmd(t, vma, pmdt, pi, addr, origin, out var fallback);
                if (!fallback)
                    return r;
            }
            else
            {
                pmdt.Entries[pi] = write ? pmd.MkYoung().MkDirty() : pmd.MkYoung();
                return FaultResult.Ok;
            }
        }
        // __handle_mm_fault → handle_pte_fault: pte_alloc (GFP_PGTABLE_USER) may fail: VM_FAULT_OOM.
        if (pmdt.Tables[pi] is null && !Kernel.PteAllocOne(this))
            return FaultResult.Oom;
        var table = pmdt.Tables[pi] ??= new PteTable();
        return HandlePteFault(t, vma, table, addr, write, origin);
    }

    /// <summary>
    /// do_set_pmd (via filemap_map_pages / finish_fault, and set_huge_pmd after MADV_COLLAPSE):
    /// a page-cache page that belongs to a PMD-sized folio is mapped with one PMD when the PMD
    /// is none and the VMA covers the aligned range; do_set_pmd itself does not look at the
    /// userfaultfd registration. A private write COWs a 4 KiB page instead.
    /// </summary>
    private bool DoSetPmd(Vma vma, PmdTable pmdt, int pi, ulong addr, bool write)
    {
        if (vma.File is not { } file || (write && !vma.IsShared))
            return false;
        var haddr = addr & Kernel.PmdMask;
        if (haddr < vma.Start || haddr + Kernel.PmdSize > vma.End)
            return false;
        var page = file.FindCachePage(vma.LinearPageIndex(addr));
        if (page?.Folio is not { IsHugeZero: false } folio || folio.Head.Index != vma.LinearPageIndex(haddr))
            return false;
        var pmd = new Pmd(Pmd.Huge(folio.Head.Pfn).Value | PageProt(vma)).MkYoung();
        if (write && pmd.Write)
        {
            pmd = pmd.MkDirty();
            folio.Head.Dirty = true;
        }
        else if (write)
        {
            return false;
        }
        folio.EntireMapCount++;
        folio.Track(this, 1);
        pmdt.Entries[pi] = pmd;
        return true;
    }

    /// <summary>handle_pte_fault.</summary>
    private FaultResult HandlePteFault(SimThread t, Vma vma, PteTable table, ulong addr, bool write, AccessOrigin origin)
    {
        var i = PageTable.PteIndex(addr);
        var pte = table.Entries[i];
        if (pte.IsNone)
            return DoPteMissing(t, vma, table, addr, write, origin, uffdWp: false);
        if (!pte.Present)
        {
            if (pte.IsMarker)
                return HandlePteMarker(t, vma, table, addr, write, origin);
            // do_swap_page: a hwpoison entry is VM_FAULT_HWPOISON before anything else (uffd-wp included).
            if (pte.IsHwpoison)
                return FaultResult.HwPoison;
            return DoSwapPage(t, vma, table, addr, write, origin);
        }
        if (write)
        {
            if (!pte.Write)
                return DoWpPage(t, vma, table, addr, origin);
            table.Entries[i] = pte.MkYoung().MkDirty();
            return FaultResult.Ok;
        }
        table.Entries[i] = pte.MkYoung();
        return FaultResult.Ok;
    }

    /// <summary>
    /// handle_pte_marker: poison has priority (VM_FAULT_HWPOISON), then guard (SIGSEGV);
    /// a uffd-wp marker faults like a none PTE but the new entry inherits uffd-wp. A stale
    /// uffd-wp marker in a VMA that is no longer WP-registered is simply cleared.
    /// </summary>
    private FaultResult HandlePteMarker(SimThread t, Vma vma, PteTable table, ulong addr, bool write, AccessOrigin origin)
    {
        var i = PageTable.PteIndex(addr);
        var marker = table.Entries[i].MarkerBits;
        if ((marker & PteMarker.Poisoned) != 0)
            return FaultResult.HwPoison;
        if ((marker & PteMarker.Guard) != 0)
            return FaultResult.SigSegvMaperr;
        if ((marker & PteMarker.UffdWp) != 0)
        {
            if (!vma.UserfaultfdWp)
            {
                table.Entries[i] = Pte.None;
                return FaultResult.Ok;
            }
            return DoPteMissing(t, vma, table, addr, write, origin, uffdWp: true);
        }
        return FaultResult.SigBus;
    }

    private FaultResult DoPteMissing(SimThread t, Vma vma, PteTable table, ulong addr, bool write, AccessOrigin origin, bool uffdWp) =>
        vma.IsAnonymous
            ? DoAnonymousPage(t, vma, table, addr, write, origin, uffdWp)
            : DoFault(t, vma, table, addr, write, origin, uffdWp);

    /// <summary>
    /// do_anonymous_page: a read maps the zero page (read-only); a write maps a new zeroed
    /// exclusive page, writable and dirty. A MISSING-registered VMA raises the userfault
    /// instead. A slot that held a uffd-wp marker yields a uffd-wp (hence read-only) entry.
    /// Without <see cref="MachineConfig.ReadFaultZeroPage"/> a read takes the write path
    /// (a new page, writable and dirty when the VMA is writable).
    /// </summary>
    private FaultResult DoAnonymousPage(SimThread t, Vma vma, PteTable table, ulong addr, bool write, AccessOrigin origin, bool uffdWp)
    {
        var i = PageTable.PteIndex(addr);
        if (!write && Kernel.Config.ReadFaultZeroPage)
        {
            if (vma.UserfaultfdMissing)
                return HandleUserfault(t, vma, addr, VmFlags.UffdMissing, write, origin);
            var zero = new Pte((Kernel.ZeroPage.Pfn << Kernel.PageShift) | PageProt(vma)).MkSpecial();
            if (uffdWp)
                zero = zero.MkUffdWp();
            table.Entries[i] = zero;
            return FaultResult.Ok;
        }
        AnonVmaPrepare(vma);
        var page = FaultOomInjected(addr) ? null : Kernel.AllocPage(PageKind.Anon, this);
        if (page is null)
            return FaultResult.Oom;
        if (vma.UserfaultfdMissing)
        {
            Kernel.MaybeFree(page);
            return HandleUserfault(t, vma, addr, VmFlags.UffdMissing, write, origin);
        }
        var entry = MkPte(page, vma).MkYoung();
        if ((vma.Flags & VmFlags.Write) != 0)
            entry = entry.MkDirty().MkWrite();
        if (uffdWp)
            entry = entry.MkUffdWp();
        AddNewAnonRmap(page);
        table.Entries[i] = entry;
        return FaultResult.Ok;
    }

    /// <summary>
    /// do_fault for shmem and file VMAs: do_read_fault (with fault-around), do_cow_fault
    /// (private write) or do_shared_fault. The page comes from <see cref="ShmemGetFolio"/>,
    /// which raises MISSING or MINOR userfaults.
    /// </summary>
    private FaultResult DoFault(SimThread t, Vma vma, PteTable table, ulong addr, bool write, AccessOrigin origin, bool uffdWp)
    {
        var file = vma.File!;
        var index = vma.LinearPageIndex(addr);
        var i = PageTable.PteIndex(addr);
        // do_read_fault: fault-around (filemap_map_pages) runs before __do_fault, so cached
        // neighbours — and the faulting page itself, if cached — are mapped even when the
        // fault then raises MISSING or SIGBUS. uffd_disable_fault_around: not in WP/MINOR VMAs.
        if (!write && !uffdWp && !vma.UserfaultfdWp && !vma.UserfaultfdMinor)
        {
            FaultAround(vma, table, addr);
            if (table.Entries[i].Present)
                return FaultResult.Ok;
        }
        var r = ShmemGetFolio(t, vma, file, index, addr, write, origin, out var page);
        if (r != FaultResult.Ok || page is null)
            return r;
        if (write && !vma.IsShared)
        {
            // do_cow_fault: copy the page-cache page into a new exclusive anon page.
            AnonVmaPrepare(vma);
            var copy = FaultOomInjected(addr) ? null : AllocPageHolding(page, PageKind.Anon);
            if (copy is null)
                return FaultResult.Oom;
            copy.CopyFrom(page!);
            var entry = MaybeMkWrite(MkPte(copy, vma).MkYoung().MkDirty(), vma);
            if (uffdWp)
                entry = entry.MkUffdWp();
            AddNewAnonRmap(copy);
            table.Entries[i] = entry;
            return FaultResult.Ok;
        }
        table.Entries[i] = FileFaultPte(vma, page!, write, uffdWp);
        AddRmap(page!);
        return FaultResult.Ok;
    }

    /// <summary>set_pte_range for a page-cache page.</summary>
    private Pte FileFaultPte(Vma vma, Page page, bool write, bool uffdWp)
    {
        var entry = MkPte(page, vma).MkYoung();
        if (write)
        {
            entry = MaybeMkWrite(entry.MkDirty(), vma);
            page.Dirty = true;
        }
        else if (entry.Write && page.Dirty)
        {
            entry = entry.MkDirty();
        }
        if (uffdWp)
            entry = entry.MkUffdWp();
        return entry;
    }

    /// <summary>
    /// do_fault_around / filemap_map_pages: a read fault also maps the page-cache pages of
    /// the surrounding 16-page aligned window that are cached and whose PTEs are none (not
    /// done in VMAs registered for WP or MINOR: uffd_disable_fault_around).
    /// </summary>
    private void FaultAround(Vma vma, PteTable table, ulong addr)
    {
        var window = FaultAroundPages * Kernel.PageSize;
        var start = Math.Max(addr & ~(window - 1), Math.Max(vma.Start, addr & Kernel.PmdMask));
        var end = Math.Min((addr & ~(window - 1)) + window, Math.Min(vma.End, (addr & Kernel.PmdMask) + Kernel.PmdSize));
        for (var a = start; a < end; a += Kernel.PageSize)
        {
            var i = PageTable.PteIndex(a);
            if (!table.Entries[i].IsNone)
                continue;
            var index = vma.LinearPageIndex(a);
            if (index >= vma.File!.SizePages)
                continue;
            var page = vma.File.FindCachePage(index);
            // next_uptodate_page (6.1): a PG_readahead folio is left to the fault path.
            if (page is null || page.Readahead)
                continue;
            var pte = FileFaultPte(vma, page, write: false, uffdWp: false);
            table.Entries[i] = a == (addr & ~(Kernel.PageSize - 1)) ? pte : pte.MkOld();
            AddRmap(page);
        }
    }

    /// <summary>
    /// shmem_get_folio_gfp (SGP_CACHE) / filemap_fault: beyond EOF is SIGBUS; a cached (or
    /// swapped) page raises MINOR in a MINOR VMA; a hole raises MISSING in a MISSING VMA,
    /// else shmem adds a zero-filled page to the page cache and a regular file reads the
    /// window around the index and asks for a retry (page null).
    /// </summary>
    private FaultResult ShmemGetFolio(SimThread t, Vma vma, MemFile file, ulong index, ulong addr, bool write, AccessOrigin origin, out Page? page)
    {
        page = null;
        if (index >= file.SizePages)
            return FaultResult.SigBus;
        page = file.FindCachePage(index) ?? ShmemSwapin(file, index);
        if (page is not null)
        {
            if (page.Readahead)
                AsyncMmapReadahead(file, page);
            if (vma.UserfaultfdMinor)
            {
                page = null;
                return HandleUserfault(t, vma, addr, VmFlags.UffdMinor, write, origin);
            }
            return FaultResult.Ok;
        }
        if (vma.UserfaultfdMissing)
            return HandleUserfault(t, vma, addr, VmFlags.UffdMissing, write, origin);
        if (!file.IsShmem)
        {
            // filemap_fault: a miss starts read-around I/O, drops the mmap lock and returns
            // VM_FAULT_RETRY; the retried fault finds the window cached (and fault-around
            // maps it). A null page with Ok means "retry".
            ReadAround(file, index);
            page = null;
            return FaultResult.Ok;
        }
        page = ReadFilePage(file, index);
        return page is null ? FaultResult.Oom : FaultResult.Ok;
    }

    /// <summary>Default file readahead window (ra_pages: 128 KiB).</summary>
    private const ulong RaPages = 32;

    /// <summary>
    /// do_sync_mmap_readahead's read-around for a regular file: a page-cache miss reads the
    /// window [index - ra_pages/2, index + ra_pages/2), clipped at EOF, into the cache. Only
    /// the faulting page is mapped; a later fault-around maps the rest. shmem has no readahead.
    /// </summary>
    private void ReadAround(MemFile file, ulong index)
    {
        var start = index >= RaPages / 2 ? index - (RaPages / 2) : 0;
        if (Kernel.ReadaheadMarksFolios)
        {
            (file.RaStart, file.RaSize, file.RaAsync) = (start, RaPages, RaPages / 4);
            DoPageCacheRa(file, start, RaPages, RaPages / 4);
            return;
        }
        var end = Math.Min(start + RaPages, file.SizePages);
        for (var i = start; i < end; i++)
        {
            if (file.FindCachePage(i) is null)
                ReadFilePage(file, i);
        }
    }

    /// <summary>
    /// do_page_cache_ra → page_cache_ra_unbounded (6.1, order 0): nr_to_read pages from
    /// <paramref name="start"/>, clipped at EOF; cached ones are skipped; the new folio at
    /// nr_to_read - lookahead gets PG_readahead.
    /// </summary>
    private void DoPageCacheRa(MemFile file, ulong start, ulong nrToRead, ulong lookahead)
    {
        if (file.SizePages == 0 || start > file.SizePages - 1)
            return;
        nrToRead = Math.Min(nrToRead, file.SizePages - start);
        for (ulong i = 0; i < nrToRead; i++)
        {
            if (file.FindCachePage(start + i) is not null)
                continue;
            var page = ReadFilePage(file, start + i);
            if (page is null)
                break;
            if (lookahead <= nrToRead && i == nrToRead - lookahead)
                page.Readahead = true;
        }
    }

    /// <summary>
    /// do_async_mmap_readahead → page_cache_async_ra → ondemand_readahead (6.1): a fault on a
    /// PG_readahead folio clears the mark and reads the next window: the expected index of
    /// the file's readahead state pushes the window forward; any other marked folio starts a
    /// window at the next page-cache miss (at most ra_pages away).
    /// </summary>
    private void AsyncMmapReadahead(MemFile file, Page page)
    {
        page.Readahead = false;
        var index = page.Index;
        if (index == file.RaStart + file.RaSize - file.RaAsync || index == file.RaStart + file.RaSize)
        {
            file.RaStart += file.RaSize;
            file.RaSize = NextRaSize(file.RaSize);
        }
        else
        {
            var miss = index + 1;
            while (miss <= index + RaPages && file.FindCachePage(miss) is not null)
                miss++;
            if (miss - index > RaPages)
                return;
            file.RaStart = miss;
            file.RaSize = NextRaSize(miss - index + RaPages);
        }
        file.RaAsync = file.RaSize;
        DoPageCacheRa(file, file.RaStart, file.RaSize, file.RaAsync);
    }

    /// <summary>get_next_ra_size with max_pages = ra_pages.</summary>
    private static ulong NextRaSize(ulong cur) =>
        cur < RaPages / 16 ? 4 * cur : cur <= RaPages / 2 ? 2 * cur : RaPages;

    /// <summary>Reads one page of a regular file (or allocates a zero page for shmem) into the page cache.</summary>
    private Page? ReadFilePage(MemFile file, ulong index)
    {
        var page = AddToPageCache(file, index);
        if (page is not null && !file.IsShmem && file.Disk.TryGetValue(index, out var data) && data is not null)
            page.SetData(data);
        return page;
    }

    internal Page? AddToPageCache(MemFile file, ulong index)
    {
        var page = Kernel.AllocPage(PageKind.File, this);
        if (page is null)
            return null;
        page.Mapping = file;
        page.Index = index;
        file.Cache[index] = page;
        return page;
    }

    /// <summary>shmem_swapin_folio: brings a swapped shmem page back into the page cache.</summary>
    private Page? ShmemSwapin(MemFile file, ulong index)
    {
        if (!file.Swapped.TryGetValue(index, out var slot))
            return null;
        var page = AddToPageCache(file, index);
        if (page is null)
            return null;
        file.Swapped.Remove(index);
        Kernel.ShmemSwapped(-1);
        page.SetData(slot.Data);
        page.Dirty = true;
        return page;
    }

    /// <summary>
    /// do_swap_page: reads the page back from swap. The entry's soft-dirty and uffd-wp bits
    /// carry over; an exclusive entry comes back writable unless uffd-wp or soft-dirty
    /// tracking needs a write fault. A write that still finds the PTE read-only continues
    /// into do_wp_page.
    /// </summary>
    private FaultResult DoSwapPage(SimThread t, Vma vma, PteTable table, ulong addr, bool write, AccessOrigin origin)
    {
        var i = PageTable.PteIndex(addr);
        var entry = table.Entries[i];
        var slotId = entry.SwapSlot;
        var slot = Kernel.SwapSlotOf(slotId);
        var page = slot.Cache;
        if (page is null)
        {
            // swapin_readahead: a new folio enters the swap cache.
            page = FaultOomInjected(addr) ? null : Kernel.AllocPage(PageKind.Anon, this);
            if (page is null)
                return FaultResult.Oom;
            page.SetData(slot.Data);
            slot.Cache = page;
            page.SwapCacheSlot = slotId;
        }
        page.Kind = PageKind.Anon;
        var exclusive = entry.SwpExclusive;
        var pte = MkPte(page, vma).MkYoung();
        if (entry.SwpSoftDirty)
            pte = pte.MkSoftDirty();
        if (entry.SwpUffdWp)
            pte = pte.MkUffdWp();
        var othersMapped = page.MapCount > 0;
        AddRmap(page);
        Kernel.SwapFree(slotId);
        // should_try_to_free_swap: a write fault by the only user drops the swap cache
        // (folio_free_swap fails while another process still holds a swap entry for it).
        if (write && !othersMapped && page.Pins == 0)
            Kernel.TryFreeSwap(page);
        var refOne = page.SwapCacheSlot == 0 && !othersMapped && page.Pins == 0;
        if (exclusive || refOne)
        {
            if ((Kernel.SwapinMapsWritableOnRead || write) && (vma.Flags & VmFlags.Write) != 0 && !(vma.UserfaultfdWp && pte.UffdWp) && !NeedsSoftDirtyWp(vma, pte))
            {
                pte = pte.MkWrite();
                if (write)
                    pte = pte.MkDirty();
            }
            page.AnonExclusive = true;
        }
        table.Entries[i] = pte;
        if (write && !pte.Write)
            return DoWpPage(t, vma, table, addr, origin);
        return FaultResult.Ok;
    }

    /// <summary>
    /// Models do_wp_page (mm/memory.c): a write to a present read-only PTE. uffd-wp is
    /// handled first, before any COW decision (the seed commit): a uffd-wp PTE in a WP VMA
    /// raises the WP userfault (or, with WP_ASYNC, loses the bit in place and goes on).
    /// Then a shared mapping is made writable, an exclusive (or reusable) anon page is
    /// reused, and anything else is copied (wp_page_copy).
    /// </summary>
    /// With <paramref name="unshare"/> (FAULT_FLAG_UNSHARE, from a FOLL_PIN read of a
    /// shared anon page) uffd-wp is skipped, a reusable page is only marked exclusive and a
    /// copy stays read-only.
    internal FaultResult DoWpPage(SimThread t, Vma vma, PteTable table, ulong addr, AccessOrigin origin, bool unshare = false)
    {
        var i = PageTable.PteIndex(addr);
        var pte = table.Entries[i];
        if (!unshare && Userfaultfd.PteWp(vma, pte))
        {
            if (!vma.UserfaultfdWpAsync)
                return HandleUserfault(t, vma, addr, VmFlags.UffdWp, write: true, origin);
            pte = pte.ClearUffdWp();
            table.Entries[i] = pte;
        }
        var page = NormalPage(pte);
        if (vma.IsSharedMapping && !unshare)
        {
            // wp_page_shared / wp_pfn_shared: write-notify satisfied, reuse the PTE.
            table.Entries[i] = MaybeMkWrite(pte.MkYoung().MkDirty(), vma);
            if (page is not null)
                page.Dirty = true;
            return FaultResult.Ok;
        }
        if (page is not null && page.IsAnon && (page.AnonExclusive || CanReuseAnonFolio(page)))
        {
            page.AnonExclusive = true;
            if (unshare)
                return FaultResult.Ok;
            page.LazyFree = false;
            table.Entries[i] = MaybeMkWrite(pte.MkYoung().MkDirty(), vma);
            return FaultResult.Ok;
        }
        return WpPageCopy(vma, table, addr, pte, page, unshare);
    }

    /// <summary>
    /// wp_can_reuse_anon_folio (6.x: refcount 1 after dropping a swap-cache reference) or,
    /// in v5.7, reuse_swap_page (mapcount 1).
    /// </summary>
    private bool CanReuseAnonFolio(Page page)
    {
        if (!IsV6)
            return page.PreciseMapCount == 1;
        if (page.Folio is { } folio && Kernel.ReusesLargeAnonFolio)
        {
            // __wp_can_reuse_large_anon_folio: mapped by this mm only, more than one page mapped, no extra references.
            return folio.LargeMapCount > 1 && !folio.MaybeMappedShared && folio.MmMaps.ContainsKey(this)
                && Array.TrueForAll(folio.Pages, p => p.Pins == 0);
        }
        // wp_can_reuse_anon_folio: only our mapping plus, at most, the swap cache may hold it;
        // the swap cache can be dropped only when no swap entry refers to the page any more.
        if (page.RefCount > 1 + (page.SwapCacheSlot != 0 ? 1 : 0))
            return false;
        Kernel.TryFreeSwap(page);
        return page.RefCount == 1;
    }

    /// <summary>
    /// wp_page_copy: a new exclusive anon page (zeros for the zero page); uffd-wp is not
    /// carried. An unshare copy stays read-only and keeps soft-dirty and uffd-wp.
    /// </summary>
    private FaultResult WpPageCopy(Vma vma, PteTable table, ulong addr, Pte old, Page? oldPage, bool unshare = false)
    {
        AnonVmaPrepare(vma);
        var copy = FaultOomInjected(addr) ? null : AllocPageHolding(oldPage, PageKind.Anon);
        if (copy is null)
            return FaultResult.Oom;
        if (oldPage is not null)
            copy.CopyFrom(oldPage);
        AddNewAnonRmap(copy);
        var entry = MkPte(copy, vma).MkYoung();
        if (unshare)
        {
            if (old.SoftDirty)
                entry = entry.MkSoftDirty();
            if (old.UffdWp)
                entry = entry.MkUffdWp();
        }
        else
        {
            entry = MaybeMkWrite(entry.MkDirty(), vma);
        }
        table.Entries[PageTable.PteIndex(addr)] = entry;
        if (oldPage is not null)
            RemoveRmap(oldPage);
        return FaultResult.Ok;
    }

    // ------------------------------------------------------------------ huge PMDs

    /// <summary>
    /// thp_vma_allowable_order for a PMD fault: THP enabled for the VMA (always, or madvise
    /// with VM_HUGEPAGE), private anonymous, and the aligned 2 MiB range inside the VMA.
    /// </summary>
    internal bool ThpEligible(Vma vma, ulong addr)
    {
        if (!vma.IsAnonymous || (vma.Flags & VmFlags.NoHugePage) != 0)
            return false;
        var enabled = Kernel.Config.Thp switch
        {
            ThpMode.Always => true,
            ThpMode.Madvise => (vma.Flags & VmFlags.HugePage) != 0,
            _ => false,
        };
        if (!enabled)
            return false;
        var haddr = addr & Kernel.PmdMask;
        return haddr >= vma.Start && haddr + Kernel.PmdSize <= vma.End;
    }

    /// <summary>
    /// do_huge_pmd_anonymous_page: a read maps the huge zero page, a write a new THP; a
    /// MISSING-registered VMA raises the userfault (for the 4 KiB page address). Without
    /// use_zero_page or <see cref="MachineConfig.ReadFaultZeroPage"/> a read allocates a THP.
    /// </summary>
    private FaultResult DoHugePmdAnonymousPage(SimThread t, Vma vma, PmdTable pmdt, int pi, ulong addr, bool write, AccessOrigin origin, out bool fallback)
    {
        fallback = false;
        // vmf_anon_prepare comes first, also for the huge zero page (fork then copies the PMD).
        AnonVmaPrepare(vma);
        if (!write && Kernel.Config.ThpUseZeroPage && Kernel.Config.ReadFaultZeroPage)
        {
            if (vma.UserfaultfdMissing)
                return HandleUserfault(t, vma, addr, VmFlags.UffdMissing, write, origin);
            pmdt.Entries[pi] = new Pmd(Pmd.Huge(Kernel.HugeZeroFolio.Head.Pfn).Value | (PageProt(vma) & ~PteBits.PageRw));
            return FaultResult.Ok;
        }
        var folio = Kernel.AllocThp(this, (vma.Flags & VmFlags.HugePage) != 0);
        if (folio is null)
        {
            if (Exited)
                return FaultResult.Oom;
            fallback = true;
            return FaultResult.Ok;
        }
        if (vma.UserfaultfdMissing)
        {
            foreach (var p in folio.Pages)
                Kernel.MaybeFree(p);
            return HandleUserfault(t, vma, addr, VmFlags.UffdMissing, write, origin);
        }
        MapNewThp(vma, pmdt, pi, folio);
        return FaultResult.Ok;
    }

    private void MapNewThp(Vma vma, PmdTable pmdt, int pi, Folio folio)
    {
        AnonVmaPrepare(vma);
        foreach (var p in folio.Pages)
        {
            p.Kind = PageKind.Anon;
            p.AnonExclusive = true;
        }
        folio.EntireMapCount = 1;
        folio.Track(this, 1);
        var pmd = new Pmd(Pmd.Huge(folio.Head.Pfn).Value | PageProt(vma)).MkDirty();
        pmdt.Entries[pi] = (vma.Flags & VmFlags.Write) != 0 ? pmd.MkWrite() : pmd;
    }

    /// <summary>
    /// wp_huge_pmd → do_huge_pmd_wp_page: uffd-wp first (sync: WP userfault, the PMD stays
    /// huge; async: split and redo at PTE level); a write to the huge zero page allocates a
    /// new THP (do_huge_zero_wp_pmd) or falls back to PTEs; an exclusive THP is reused;
    /// otherwise the PMD is split and the 4 KiB page is COWed at PTE level.
    /// </summary>
    private FaultResult WpHugePmd(SimThread t, Vma vma, PmdTable pmdt, int pi, ulong addr, AccessOrigin origin, out bool fallback)
    {
        fallback = false;
        var pmd = pmdt.Entries[pi];
        var haddr = addr & Kernel.PmdMask;
        if (!vma.IsAnonymous)
        {
            // COW or write-notify of a file PMD is handled at PTE level: split (drop) it.
            SplitHugePmd(vma, pmdt, pi, haddr);
            fallback = true;
            return FaultResult.Ok;
        }
        if (vma.UserfaultfdWp && pmd.UffdWp)
        {
            if (!vma.UserfaultfdWpAsync)
                return HandleUserfault(t, vma, addr, VmFlags.UffdWp, write: true, origin);
            SplitHugePmd(vma, pmdt, pi, haddr);
            fallback = true;
            return FaultResult.Ok;
        }
        var head = Kernel.PageOf(pmd.Pfn)!;
        var folio = head.Folio!;
        if (folio.IsHugeZero && !Kernel.HugeZeroWpAllocatesThp)
        {
            SplitHugePmd(vma, pmdt, pi, haddr);
            fallback = true;
            return FaultResult.Ok;
        }
        if (folio.IsHugeZero)
        {
            var thp = Kernel.AllocThp(this, (vma.Flags & VmFlags.HugePage) != 0);
            if (Exited)
                return FaultResult.Oom;
            if (thp is not null)
            {
                MapNewThp(vma, pmdt, pi, thp);
                return FaultResult.Ok;
            }
            SplitHugePmd(vma, pmdt, pi, haddr);
            fallback = true;
            return FaultResult.Ok;
        }
        if (head.AnonExclusive || (IsV6 && folio.RefCount == 1))
        {
            foreach (var p in folio.Pages)
                p.AnonExclusive = true;
            pmdt.Entries[pi] = pmd.MkYoung().MkDirty().MkWrite();
            return FaultResult.Ok;
        }
        SplitHugePmd(vma, pmdt, pi, haddr);
        fallback = true;
        return FaultResult.Ok;
    }

    /// <summary>Splits the huge PMD covering <paramref name="addr"/>, if any (split_huge_pmd_address).</summary>
    internal void SplitHugePmdAt(Vma vma, ulong addr)
    {
        var pmdt = PageTable.PmdTableOf(addr, false);
        if (pmdt is null)
            return;
        var pi = PageTable.PmdIndex(addr);
        if (pmdt.Entries[pi].TransHuge)
            SplitHugePmd(vma, pmdt, pi, addr & Kernel.PmdMask);
    }

    /// <summary>
    /// __split_huge_pmd_locked: a file (shmem) PMD is simply cleared. Otherwise the PMD
    /// becomes a PTE table of 512 entries. Anon THP
    /// subpages inherit write, young, dirty, soft-dirty and uffd-wp and keep the folio's
    /// anon-exclusive state (the folio stays a PTE-mapped THP); the huge zero page splits
    /// into small zero-page PTEs that keep uffd-wp.
    /// </summary>
    internal void SplitHugePmd(Vma vma, PmdTable pmdt, int pi, ulong haddr)
    {
        var pmd = pmdt.Entries[pi];
        var head = Kernel.PageOf(pmd.Pfn)!;
        var folio = head.Folio!;
        if (head.Kind == PageKind.File)
        {
            // A file PMD is not split into PTEs: the mapping is dropped and refaults.
            if (pmd.Dirty)
                head.Dirty = true;
            pmdt.Entries[pi] = default;
            folio.EntireMapCount--;
            folio.Track(this, -1);
            return;
        }
        var table = new PteTable();
        var prot = PageProt(vma);
        for (var i = 0; i < Kernel.PtrsPerTable; i++)
        {
            Pte e;
            if (folio.IsHugeZero)
            {
                e = new Pte((Kernel.ZeroPage.Pfn << Kernel.PageShift) | prot).MkSpecial();
            }
            else
            {
                var sub = folio.Pages[i];
                e = new Pte((sub.Pfn << Kernel.PageShift) | prot);
                if (pmd.Write)
                    e = e.MkWrite();
                if (pmd.Dirty)
                    e = new Pte(e.Value | PteBits.PageDirty);
                sub.MapCount++;
                folio.Track(this, 1);
            }
            e = pmd.Young ? e.MkYoung() : e.MkOld();
            if (pmd.SoftDirty)
                e = e.MkSoftDirty();
            if (pmd.UffdWp && (IsV6 || !folio.IsHugeZero))
                e = e.MkUffdWp();
            if (!pmd.HwPresent)
                e = new Pte((e.Value & ~PteBits.PagePresent) | PteBits.PageProtNone);
            table.Entries[i] = e;
        }
        if (!folio.IsHugeZero)
        {
            folio.EntireMapCount--;
            folio.Track(this, -1);
        }
        pmdt.Entries[pi] = default;
        pmdt.Tables[pi] = table;
    }

    // ------------------------------------------------------------------ userfaults

    /// <summary>
    /// Models handle_userfault (fs/userfaultfd.c): with UFFD_FEATURE_SIGBUS, or for a kernel
    /// access on a UFFD_USER_MODE_ONLY context, VM_FAULT_SIGBUS; otherwise a page-fault
    /// message is queued on the VMA's context and the thread sleeps until woken.
    /// </summary>
    private FaultResult HandleUserfault(SimThread t, Vma vma, ulong addr, VmFlags reason, bool write, AccessOrigin origin)
    {
        var ctx = vma.UffdCtx!;
        if ((ctx.Features & UffdFeatures.Sigbus) != 0)
            return FaultResult.SigBus;
        if (origin == AccessOrigin.Kernel && ctx.UserModeOnly)
            return FaultResult.SigBus;
        var flags = PagefaultFlags.None;
        if (write)
            flags |= PagefaultFlags.Write;
        if (reason == VmFlags.UffdWp)
            flags |= PagefaultFlags.Wp;
        if (reason == VmFlags.UffdMinor)
            flags |= PagefaultFlags.Minor;
        var msg = UffdMsg.Pagefault(
            flags,
            (ctx.Features & UffdFeatures.ExactAddress) != 0 ? addr : addr & ~(Kernel.PageSize - 1),
            (ctx.Features & UffdFeatures.ThreadId) != 0 ? (uint)t.Tid : 0,
            addr);
        ctx.QueueFault(t, msg, origin);
        return FaultResult.Blocked;
    }
}

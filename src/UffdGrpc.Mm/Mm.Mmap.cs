namespace UffdGrpc.Mm;

/// <summary>Zap options (struct zap_details).</summary>
internal readonly record struct ZapDetails(bool DropMarkers, bool EvenCows, bool ReclaimPt = false);

/// <summary>mmap, munmap, exit and the zap machinery (mm/mmap.c, mm/vma.c, mm/memory.c).</summary>
public sealed partial class Mm
{
    /// <summary>
    /// Implements the semantics of mmap(2) at a fixed address with MAP_FIXED_NOREPLACE:
    /// creates a VMA (lazily populated unless <paramref name="populate"/>). A
    /// <paramref name="shared"/> mapping of no file is shmem (shmem_zero_setup). A
    /// read-only file descriptor clears VM_MAYWRITE (and VM_SHARED) from a shared mapping.
    /// </summary>
    public Errno Mmap(ulong addr, ulong len, Prot prot, bool shared, MemFile? file, ulong offset, bool readOnlyFd = false, bool populate = false)
    {
        using var _ = Kernel.Enter();
        if (Exited)
            return Errno.ENOMEM;
        if (len == 0 || addr % Kernel.PageSize != 0 || offset % Kernel.PageSize != 0)
            return Errno.EINVAL;
        // do_mmap: PAGE_ALIGN of a length within a page of 2^64 wraps to 0: ENOMEM.
        len = PageAlign(len);
        if (len == 0 || addr + len < addr || addr + len > Kernel.TaskSize)
            return Errno.ENOMEM;
        if (VmasIn(addr, addr + len).Count > 0)
            return Errno.EEXIST;
        if (shared && file is null)
        {
            file = Kernel.CreateFile("dev/zero", shmem: true, len);
            file.AnonymousShared = true;
        }
        var flags = (VmFlags)(int)prot | VmFlags.MayRead | VmFlags.MayWrite | VmFlags.MayExec;
        if (shared)
        {
            flags |= VmFlags.Shared | VmFlags.MayShare;
            if (readOnlyFd)
            {
                if ((prot & Prot.Write) != 0)
                    return Errno.EACCES;
                flags &= ~(VmFlags.MayWrite | VmFlags.Shared);
            }
        }
        if (Kernel.Config.SoftDirty)
            flags |= VmFlags.SoftDirty;
        if (AccountableMapping(flags))
            flags |= VmFlags.Account;
        var vma = new Vma(this, addr, addr + len, flags, file, file is null ? addr / Kernel.PageSize : offset / Kernel.PageSize);
        InsertVma(vma);
        if (populate && (flags & VmFlags.AccessFlags) != 0)
            PopulateVmaPageRange(vma);
        return Errno.OK;
    }

    /// <summary>
    /// Models accountable_mapping (mm/mmap.c): a private writable mapping is charged
    /// (VM_ACCOUNT); the model has no VM_NORESERVE and no hugetlb mappings.
    /// </summary>
    private static bool AccountableMapping(VmFlags flags) => (flags & (VmFlags.Shared | VmFlags.Write)) == VmFlags.Write;

    internal static ulong PageAlign(ulong len) => (len + Kernel.PageSize - 1) & ~(Kernel.PageSize - 1);

    /// <summary>
    /// populate_vma_page_range for MAP_POPULATE: write faults for private writable VMAs, read
    /// faults otherwise. __mm_populate ignores errors but stops the VMA at the first one
    /// (faultin_page: VM_FAULT_OOM is -ENOMEM), and __get_user_pages stops when the
    /// process was killed (fatal_signal_pending: the OOM killer chose it); mmap still
    /// returns success.
    /// </summary>
    private void PopulateVmaPageRange(Vma vma)
    {
        var write = (vma.Flags & (VmFlags.Write | VmFlags.Shared)) == VmFlags.Write;
        var t = new SimThread(Kernel, this, 0);
        for (var a = vma.Start; a < vma.End && !Exited; a += Kernel.PageSize)
        {
            if (GupFollow(a, write))
                continue;
            var r = HandleMmFault(t, a, write, AccessOrigin.Kernel);
            if (r == FaultResult.Oom)
                return;
        }
    }

    /// <summary>
    /// The part of munmap(2) that runs under the mmap lock (do_vmi_munmap): splits the VMAs
    /// at the edges, collects UNMAP events (userfaultfd_unmap_prep, one per context with
    /// EVENT_UNMAP, for the whole range), zaps everything including markers, removes the
    /// VMAs and frees page tables no VMA uses any more.
    /// </summary>
    internal Errno DoMunmap(ulong start, ulong len, List<(UserfaultfdCtx Ctx, ulong Start, ulong End)>? unmapEvents)
    {
        // do_vmi_munmap: the unaligned length is checked against TASK_SIZE first, then an
        // empty range (len 0) is EINVAL.
        if (start % Kernel.PageSize != 0 || start > Kernel.TaskSize || len > Kernel.TaskSize - start)
            return Errno.EINVAL;
        len = PageAlign(len);
        var end = start + len;
        if (end == start)
            return Errno.EINVAL;
        var vmas = VmasIn(start, end);
        if (vmas.Count == 0)
            return Errno.OK;
        foreach (var v in vmas)
        {
            if (unmapEvents is not null && v.UffdCtx is { } ctx && (ctx.Features & UffdFeatures.EventUnmap) != 0
                && !unmapEvents.Exists(e => e.Ctx == ctx && e.Start == start && e.End == end))
            {
                ctx.MmapChanging++;
                unmapEvents.Add((ctx, start, end));
            }
        }
        foreach (var v0 in vmas)
        {
            var v = IsolateRange(v0, Math.Max(start, v0.Start), Math.Min(end, v0.End));
            ZapRange(v, v.Start, v.End, new ZapDetails(DropMarkers: true, EvenCows: true));
            RemoveVma(v);
            if (v.File is { AnonymousShared: true } f)
                Kernel.ReleaseAnonShmemIfUnmapped(f);
        }
        FreePgtables(start, end);
        return Errno.OK;
    }

    /// <summary>free_pgtables: drops PTE tables in [start, end) that no VMA overlaps any more (only where tables exist).</summary>
    private void FreePgtables(ulong start, ulong end)
    {
        foreach (var st in PageTable.Walk(start & Kernel.PmdMask, end))
        {
            var a = st.Addr & Kernel.PmdMask;
            if (st.PteTable is not null && VmasIn(a, a + Kernel.PmdSize).Count == 0)
                PageTable.FreePteTable(a);
        }
    }

    /// <summary>
    /// exit_mmap: every VMA is unmapped (markers dropped) and every page table freed
    /// (free_pgtables); contexts on this mm stay but fail.
    /// </summary>
    internal void ExitMmap()
    {
        var vmas = _vmas.ToList();
        foreach (var v in vmas)
        {
            ZapRange(v, v.Start, v.End, new ZapDetails(DropMarkers: true, EvenCows: true));
            RemoveVma(v);
        }
        PageTable.FreeAll();
        Exited = true;
        Kernel.RemoveMm(this);
        foreach (var v in vmas)
        {
            if (v.File is { AnonymousShared: true } f)
                Kernel.ReleaseAnonShmemIfUnmapped(f);
        }
    }

    /// <summary>
    /// zap_page_range / unmap_page_range over [start, end) of <paramref name="vma"/>: present
    /// pages are unmapped, swap entries freed, markers dropped in anon VMAs (and with
    /// DropMarkers). In file VMAs a zapped entry that carried uffd-wp leaves a uffd-wp
    /// marker (zap_install_uffd_wp_if_needed). Huge PMDs partly covered are split first.
    /// With ReclaimPt (MADV_DONTNEED) a PTE table is freed only when the zap covered its
    /// whole 2 MiB range and left every entry none; a partial zap keeps it, so a later
    /// PAGEMAP_SCAN still sees the empty entries as WRITTEN.
    /// </summary>
    internal void ZapRange(Vma vma, ulong start, ulong end, ZapDetails details)
    {
        foreach (var st in PageTable.Walk(start, end))
        {
            if (st.Table is not { } pmdt)
                continue;
            if (st.IsHuge)
            {
                if (st.CoversPmd)
                {
                    ZapHugePmd(pmdt, st.Index);
                    continue;
                }
                SplitHugePmd(vma, pmdt, st.Index, st.Addr & Kernel.PmdMask);
            }
            if (st.PteTable is not { } table)
                continue;
            for (var a = st.Addr; a < st.End; a += Kernel.PageSize)
                ZapPte(vma, table, PageTable.PteIndex(a), details);
            // CONFIG_PT_RECLAIM (reclaim_pt_is_enabled): a zap covering a whole PMD range
            // frees the PTE table once every entry is none.
            if (details.ReclaimPt && Kernel.HasPtReclaim && st.CoversPmd && Array.TrueForAll(table.Entries, e => e.IsNone))
                pmdt.Tables[st.Index] = null;
        }
    }

    private void ZapHugePmd(PmdTable pmdt, int pi)
    {
        var folio = Kernel.PageOf(pmdt.Entries[pi].Pfn)!.Folio!;
        pmdt.Entries[pi] = default;
        if (folio.IsHugeZero)
            return;
        folio.EntireMapCount--;
        folio.Track(this, -1);
        Kernel.MaybeFree(folio.Head);
    }

    private void ZapPte(Vma vma, PteTable table, int i, ZapDetails details)
    {
        var pte = table.Entries[i];
        if (pte.IsNone)
            return;
        if (pte.Present)
        {
            var page = NormalPage(pte);
            if (page is not null && !details.EvenCows && page.IsAnon)
                return;
            table.Entries[i] = Pte.None;
            if (page is not null)
            {
                if (page.Kind == PageKind.File && pte.Dirty)
                    page.Dirty = true;
                RemoveRmap(page);
            }
        }
        else if (pte.IsSwap)
        {
            if (!details.EvenCows)
                return;
            table.Entries[i] = Pte.None;
            Kernel.SwapFree(pte.SwapSlot);
        }
        else
        {
            if (!vma.IsAnonymous && !details.DropMarkers && pte.IsUffdWpMarker && !pte.IsPoisonMarker)
                return;
            if (pte.IsGuardMarker && !details.DropMarkers)
                return;
            // is_hwpoison_entry || is_poisoned_swp_entry: kept unless should_zap_cows.
            if (!vma.IsAnonymous && !details.DropMarkers && (pte.IsPoisonMarker || pte.IsHwpoison) && !details.EvenCows)
                return;
            table.Entries[i] = Pte.None;
        }
        if (!details.DropMarkers)
            InstallUffdWpIfNeeded(vma, table, i, pte);
    }

    /// <summary>
    /// pte_install_uffd_wp_if_needed: in a WP-registered file VMA, a zapped entry that
    /// carried uffd-wp (present, swap or marker) is replaced by a uffd-wp marker, so the
    /// protection survives the zap.
    /// </summary>
    internal static void InstallUffdWpIfNeeded(Vma vma, PteTable table, int i, Pte old)
    {
        if (vma.IsAnonymous || !vma.UserfaultfdWp)
            return;
        if (old.UffdWp || old.SwpUffdWpAny)
            table.Entries[i] = Pte.Marker(PteMarker.UffdWp);
    }
}

namespace UffdGrpc.Mm;

/// <summary>The fill modes of mfill_atomic (MFILL_ATOMIC_*).</summary>
internal enum MfillMode
{
    Copy,
    Zeropage,
    Continue,
    Poison,
}

/// <summary>The userfaultfd memory operations (mm/userfaultfd.c) and registration changes.</summary>
public sealed partial class Mm
{
    /// <summary>
    /// vma_can_userfault: anon, shmem (and hugetlb) VMAs; MINOR only on shmem; with
    /// WP_ASYNC and mode exactly WP any VMA kind.
    /// </summary>
    internal static bool VmaCanUserfault(Vma vma, VmFlags vmFlags, bool wpAsync, bool isV6)
    {
        vmFlags &= VmFlags.UffdFlags;
        if ((vmFlags & VmFlags.UffdMinor) != 0 && (!isV6 || !vma.IsShmem))
            return false;
        if (isV6 && wpAsync && vmFlags == VmFlags.UffdWp)
            return true;
        if (!isV6)
            return vma.IsAnonymous || (vma.IsShmem && (vmFlags & VmFlags.UffdWp) == 0);
        return vma.IsAnonymous || vma.IsShmem;
    }

    /// <summary>userfaultfd_set_ctx + vma_set_page_prot.</summary>
    private void SetUffdCtx(Vma vma, UserfaultfdCtx? ctx, VmFlags uffdFlags)
    {
        vma.UffdCtx = ctx;
        vma.Flags = (vma.Flags & ~VmFlags.UffdFlags) | uffdFlags;
    }

    /// <summary>
    /// userfaultfd_register_range: per VMA, skip if already a superset on this ctx, else split
    /// and set exactly these modes, then merge (not for a piece starting inside its VMA in
    /// 6.1: <see cref="Kernel.UffdMergeUsesVmaPgoff"/>).
    /// </summary>
    internal void UserfaultfdRegisterRange(UserfaultfdCtx ctx, VmFlags vmFlags, ulong start, ulong end)
    {
        foreach (var v0 in VmasIn(start, end))
        {
            if (v0.UffdCtx == ctx && (v0.Flags & vmFlags) == vmFlags)
                continue;
            var v = IsolateRange(v0, Math.Max(start, v0.Start), Math.Min(end, v0.End));
            SetUffdCtx(v, ctx, vmFlags);
            if (!(Kernel.UffdMergeUsesVmaPgoff && start > v0.Start))
                MergeVma(v);
        }
    }

    /// <summary>
    /// userfaultfd_clear_vma: a WP VMA first gets its uffd-wp state resolved (6.x: bits and
    /// markers cleared, write restored where allowed); then the registration is dropped and
    /// the VMA merged with its neighbours.
    /// </summary>
    internal Vma UserfaultfdClearVma(Vma vma, ulong start, ulong end)
    {
        if (vma.UserfaultfdWp && IsV6)
            UffdWpRange(vma, start, end - start, enableWp: false);
        var inside = start > vma.Start;
        vma = IsolateRange(vma, start, end);
        SetUffdCtx(vma, null, VmFlags.None);
        return Kernel.UffdMergeUsesVmaPgoff && inside ? vma : MergeVma(vma);
    }

    /// <summary>userfaultfd_release_all: unregisters every VMA of <paramref name="ctx"/>.</summary>
    internal void UserfaultfdReleaseAll(UserfaultfdCtx ctx)
    {
        foreach (var v in _vmas.Where(v => v.UffdCtx == ctx).ToList())
        {
            if (_vmas.Contains(v) && v.UffdCtx == ctx)
                UserfaultfdClearVma(v, v.Start, v.End);
        }
    }

    /// <summary>
    /// Models uffd_wp_range: change_protection with MM_CP_UFFD_WP or
    /// MM_CP_UFFD_WP_RESOLVE; resolve also tries to make PTEs writable when the VMA wants a
    /// manual write upgrade (6.x; never in v5.7).
    /// </summary>
    internal long UffdWpRange(Vma vma, ulong start, ulong len, bool enableWp)
    {
        var flags = enableWp ? CpFlags.UffdWp : CpFlags.UffdWpResolve;
        if (!enableWp && Kernel.ResolveTriesChangeWritable && WantsManualPteWriteUpgrade(vma))
            flags |= CpFlags.TryChangeWritable;
        return ChangeProtection(vma, start, start + len, flags);
    }

    /// <summary>
    /// Models mwriteprotect_range: every VMA intersecting the range must be WP-registered
    /// (ENOENT otherwise, after the earlier VMAs were already changed; holes are skipped;
    /// no VMA at all is ENOENT). Before that (<see cref="Kernel.WriteprotectSpansVmas"/>) the
    /// range must lie in one VMA (find_dst_vma): in 6.1 a WP-registered VMA that
    /// vma_can_userfault accepts, in v5.7 an anonymous private one.
    /// </summary>
    internal Errno MwriteprotectRange(UserfaultfdCtx ctx, ulong start, ulong len, bool enableWp)
    {
        if (ctx.MmapChanging > 0)
            return Errno.EAGAIN;
        var end = start + len;
        if (!Kernel.WriteprotectSpansVmas)
        {
            var v = FindVma(start);
            if (v is null || v.Start > start || end > v.End || !v.UserfaultfdWp)
                return Errno.ENOENT;
            if (IsV6 ? !VmaCanUserfault(v, v.Flags, ctx.WpAsync, isV6: true) : !v.IsAnonymous || v.IsShared)
                return Errno.ENOENT;
            UffdWpRange(v, start, len, enableWp);
            return Errno.OK;
        }
        var err = Errno.ENOENT;
        foreach (var v in VmasIn(start, end))
        {
            if (!v.UserfaultfdWp)
                return Errno.ENOENT;
            var s = Math.Max(v.Start, start);
            var e = Math.Min(v.End, end);
            UffdWpRange(v, s, e - s, enableWp);
            err = Errno.OK;
        }
        return err;
    }

    /// <summary>
    /// Models uffd_mfill_lock (mm/userfaultfd.c): uffd_lock_vma finds the VMA holding
    /// <paramref name="start"/> (ENOENT without one) and prepares the anon_vma of a private
    /// VMA; only then does validate_dst_vma require the range to end inside that VMA and the
    /// VMA to be registered (any context), else ENOENT. So a failed fill into an unregistered
    /// private VMA still leaves it with an anon_vma.
    /// </summary>
    private Vma? UffdMfillLock(ulong start, ulong len)
    {
        var v = VmaLookup(start);
        if (v is null)
            return null;
        if (!v.IsShared)
            AnonVmaPrepare(v);
        if (start + len > v.End || v.UffdCtx is null)
            return null;
        return v;
    }

    /// <summary>
    /// Models mfill_atomic (6.18) or __mcopy_atomic (6.1, <see cref="Kernel.FillPreparesAnonVmaFirst"/>):
    /// the destination VMA checks (ENOENT, EINVAL for MODE_WP without
    /// VM_UFFD_WP, unsupported kinds, CONTINUE on anon), then page by page from the start,
    /// stopping at the first error. Returns bytes done if any, else the errno. A PTE table
    /// (__pte_alloc) or page that cannot be allocated is -ENOMEM; both allocations reclaim
    /// and may run the OOM killer first. When the OOM victim is the address space being
    /// filled, the kernel (holding mm_users) would go on filling the reaped mm until
    /// exit_mmap frees it; the model, whose exit_mmap runs at once, stops there (ENOMEM).
    /// </summary>
    internal long MfillAtomic(UserfaultfdCtx ctx, ulong dst, ReadOnlySpan<byte> src, bool repeat, ulong len, MfillMode mode, bool wp)
    {
        Vma? vma;
        if (Kernel.FillPreparesAnonVmaFirst)
        {
            vma = UffdMfillLock(dst, len);
            if (vma is null)
                return -(long)Errno.ENOENT;
            if (ctx.MmapChanging > 0)
                return -(long)Errno.EAGAIN;
        }
        else
        {
            // __mcopy_atomic (6.1): mmap_changing, then find_dst_vma.
            if (ctx.MmapChanging > 0)
                return -(long)Errno.EAGAIN;
            vma = FindVma(dst);
            if (vma is null || vma.Start > dst || dst + len > vma.End || vma.UffdCtx is null)
                return -(long)Errno.ENOENT;
        }
        if (wp && !vma.UserfaultfdWp)
            return -(long)Errno.EINVAL;
        if (!vma.IsAnonymous && !vma.IsShmem)
            return -(long)Errno.EINVAL;
        if (!vma.IsShmem && mode == MfillMode.Continue)
            return -(long)Errno.EINVAL;
        if (!Kernel.FillPreparesAnonVmaFirst && !vma.IsShared)
            AnonVmaPrepare(vma);
        long copied = 0;
        var err = Errno.OK;
        var pages = (long)(len / Kernel.PageSize);
        var stopAt = Kernel.Inject(InjectSite.FillPartial, this, ctx, null, dst, "", r => r.Pages < pages) is { } stop ? stop.Rule.Pages : -1;
        var race = Kernel.Inject(InjectSite.FillRace, this, ctx, null, dst, "", r => r.Pages < pages);
        for (ulong off = 0; off < len; off += Kernel.PageSize)
        {
            var addr = dst + off;
            if (Exited)
            {
                err = Errno.ENOMEM;
                break;
            }
            if ((long)(off / Kernel.PageSize) == stopAt)
            {
                // The loop ends early, as when mmap_changing is seen again after a retry of
                // the source copy: bytes done so far are the result (EAGAIN to the caller).
                err = Errno.EAGAIN;
                break;
            }
            var pmdt = PageTable.PmdTableOf(addr, true)!;
            var pi = PageTable.PmdIndex(addr);
            if (pmdt.Entries[pi].TransHuge)
            {
                err = Errno.EEXIST;
                break;
            }
            var allocates = pmdt.Tables[pi] is null || mode == MfillMode.Copy || (mode == MfillMode.Zeropage && vma.IsShmem);
            if (allocates && Kernel.Inject(InjectSite.FillNomem, this, ctx, null, addr) is not null)
            {
                err = Errno.ENOMEM;
                break;
            }
            if (pmdt.Tables[pi] is null && !Kernel.PteAllocOne(this))
            {
                err = Errno.ENOMEM;
                break;
            }
            var table = pmdt.Tables[pi] ??= new PteTable();
            var srcPage = mode != MfillMode.Copy ? default : repeat ? src : src.Slice((int)off, (int)Kernel.PageSize);
            if (race is not null && (long)(off / Kernel.PageSize) == race.Rule.Pages)
            {
                // Another handler thread's identical fill of this page wins the race; ours
                // then finds the entry populated (EEXIST). The winner wakes unless DONTWAKE.
                if (MfillAtomicPte(vma, table, addr, mode, wp, srcPage) == Errno.OK && race.Rule.Wake)
                    ctx.WakeUserfault(addr, Kernel.PageSize, mode switch
                    {
                        MfillMode.Zeropage => UserfaultOutcome.Zeropage,
                        MfillMode.Continue => UserfaultOutcome.Continue,
                        MfillMode.Poison => UserfaultOutcome.Poison,
                        _ => UserfaultOutcome.Copy,
                    });
            }
            err = MfillAtomicPte(vma, table, addr, mode, wp, srcPage);
            if (err != Errno.OK)
                break;
            copied += (long)Kernel.PageSize;
        }
        return copied > 0 ? copied : -(long)err;
    }

    /// <summary>mfill_atomic_pte: dispatches on the mode and the VMA kind.</summary>
    private Errno MfillAtomicPte(Vma vma, PteTable table, ulong addr, MfillMode mode, bool wp, ReadOnlySpan<byte> src)
    {
        var i = PageTable.PteIndex(addr);
        switch (mode)
        {
            case MfillMode.Continue:
                return MfillAtomicPteContinue(vma, table, addr, wp);
            case MfillMode.Poison:
                if (MfillFileOverSize(vma, addr))
                    return Errno.EFAULT;
                if (!table.Entries[i].IsNone)
                    return Errno.EEXIST;
                table.Entries[i] = Pte.Marker(PteMarker.Poisoned);
                return Errno.OK;
        }
        if (!vma.IsShared)
        {
            if (mode == MfillMode.Copy)
            {
                // mfill_atomic_pte_copy: vma_alloc_folio(GFP_HIGHUSER_MOVABLE) reclaims and may
                // OOM-kill; a failure is -ENOMEM.
                var page = Kernel.AllocPage(PageKind.Anon, this);
                if (page is null)
                    return Errno.ENOMEM;
                page.Fill(src);
                var r = MfillAtomicInstallPte(vma, table, addr, page, wp);
                if (r != Errno.OK)
                    Kernel.MaybeFree(page);
                return r;
            }
            // mfill_atomic_pte_zeropage: only a truly none slot (a marker is EEXIST).
            if (MfillFileOverSize(vma, addr))
                return Errno.EFAULT;
            if (!table.Entries[i].IsNone)
                return Errno.EEXIST;
            table.Entries[i] = new Pte((Kernel.ZeroPage.Pfn << Kernel.PageShift) | PageProt(vma)).MkSpecial();
            return Errno.OK;
        }
        return ShmemMfillAtomicPte(vma, table, addr, mode, wp, src);
    }

    /// <summary>shmem_mfill_atomic_pte: a new page enters the page cache (EEXIST if the file has one), then the PTE.</summary>
    private Errno ShmemMfillAtomicPte(Vma vma, PteTable table, ulong addr, MfillMode mode, bool wp, ReadOnlySpan<byte> src)
    {
        var file = vma.File!;
        var index = vma.LinearPageIndex(addr);
        if (index >= file.SizePages)
            return Errno.EFAULT;
        if (file.Cache.ContainsKey(index) || file.Swapped.ContainsKey(index))
            return Errno.EEXIST;
        var page = AddToPageCache(file, index);
        if (page is null)
            return Errno.ENOMEM;
        if (mode == MfillMode.Copy)
            page.Fill(src);
        page.Dirty = true;
        var r = MfillAtomicInstallPte(vma, table, addr, page, wp);
        if (r != Errno.OK)
        {
            file.Cache.Remove(index);
            Kernel.MaybeFree(page);
        }
        return r;
    }

    /// <summary>mfill_atomic_pte_continue: maps the existing page-cache page (EFAULT if none).</summary>
    private Errno MfillAtomicPteContinue(Vma vma, PteTable table, ulong addr, bool wp)
    {
        var file = vma.File!;
        var index = vma.LinearPageIndex(addr);
        if (index >= file.SizePages)
            return Errno.EFAULT;
        var page = file.FindCachePage(index) ?? ShmemSwapin(file, index);
        if (page is null)
            return Errno.EFAULT;
        return MfillAtomicInstallPte(vma, table, addr, page, wp);
    }

    private bool MfillFileOverSize(Vma vma, ulong addr) =>
        vma.File is { } f && vma.LinearPageIndex(addr) >= f.SizePages;

    /// <summary>
    /// Models mfill_atomic_install_pte: the slot must be none or a uffd-wp/poison marker
    /// (EEXIST otherwise); the PTE is dirty, writable iff VM_WRITE (never for a page-cache
    /// page in a private VMA), and uffd-wp iff MODE_WP.
    /// </summary>
    private Errno MfillAtomicInstallPte(Vma vma, PteTable table, ulong addr, Page page, bool wp)
    {
        var i = PageTable.PteIndex(addr);
        var pageInCache = page.Kind == PageKind.File;
        var writable = (vma.Flags & VmFlags.Write) != 0;
        if (pageInCache && !vma.IsShared)
            writable = false;
        var pte = MkPte(page, vma).MkDirty();
        if (writable)
            pte = pte.MkWrite();
        if (wp)
            pte = pte.MkUffdWp();
        if (MfillFileOverSize(vma, addr))
            return Errno.EFAULT;
        var cur = table.Entries[i];
        if (!cur.IsNone && !(cur.IsMarker && !cur.IsGuardMarker))
            return Errno.EEXIST;
        if (pageInCache)
            AddRmap(page);
        else
            AddNewAnonRmap(page);
        table.Entries[i] = pte;
        return Errno.OK;
    }

    /// <summary>
    /// Models move_pages (UFFDIO_MOVE): both ranges in single private anonymous writable
    /// VMAs with equal protections, the destination registered on this context; page by
    /// page, an exclusive anon page changes address without a copy (uffd-wp dropped, soft-
    /// dirty set); a THP is moved whole when aligned, else split first.
    /// </summary>
    internal long MovePages(UserfaultfdCtx ctx, ulong dst, ulong src, ulong len, bool allowSrcHoles)
    {
        var dstVma = VmaLookup(dst);
        if (dstVma is null)
            return -(long)Errno.ENOENT;
        if (!dstVma.IsShared)
            AnonVmaPrepare(dstVma);
        var srcVma = VmaLookup(src);
        if (srcVma is null)
            return -(long)Errno.ENOENT;
        if (ctx.MmapChanging > 0)
            return -(long)Errno.EAGAIN;
        if (srcVma.IsShared || src + len > srcVma.End || dstVma.IsShared || dst + len > dstVma.End)
            return -(long)Errno.EINVAL;
        var e = ValidateMoveAreas(ctx, srcVma, dstVma);
        if (e != Errno.OK)
            return -(long)e;
        long moved = 0;
        var err = Errno.OK;
        var srcEnd = src + len;
        for (ulong s = src, d = dst; s < srcEnd;)
        {
            var step = Kernel.PageSize;
            var spmdt = PageTable.PmdTableOf(s, false);
            var spi = PageTable.PmdIndex(s);
            if (spmdt is null || (spmdt.Entries[spi].IsNone && spmdt.Tables[spi] is null))
            {
                if (!allowSrcHoles)
                {
                    err = Errno.ENOENT;
                    break;
                }
                spmdt = PageTable.PmdTableOf(s, true)!;
            }
            var dpmdt = PageTable.PmdTableOf(d, true)!;
            var dpi = PageTable.PmdIndex(d);
            if (dpmdt.Entries[dpi].TransHuge)
            {
                err = Errno.EEXIST;
                break;
            }
            if (spmdt.Entries[spi].TransHuge)
            {
                var pmd = spmdt.Entries[spi];
                var folio = Kernel.PageOf(pmd.Pfn)!.Folio!;
                var splits = s % Kernel.PmdSize != 0 || d % Kernel.PmdSize != 0 || srcEnd - s < Kernel.PmdSize;
                if (splits || dpmdt.Tables[dpi] is not null)
                {
                    if (!folio.IsHugeZero && !folio.Head.AnonExclusive)
                    {
                        err = Errno.EBUSY;
                        break;
                    }
                    SplitHugePmd(srcVma, spmdt, spi, s & Kernel.PmdMask);
                    continue;
                }
                if (!folio.IsHugeZero && !folio.Head.AnonExclusive)
                {
                    err = Errno.EBUSY;
                    break;
                }
                spmdt.Entries[spi] = default;
                var npmd = new Pmd(Pmd.Huge(pmd.Pfn).Value | PageProt(dstVma));
                if (!folio.IsHugeZero)
                    npmd = npmd.MkDirty().MkWrite();
                dpmdt.Entries[dpi] = npmd;
                step = Kernel.PmdSize;
            }
            else
            {
                var stable = spmdt.Tables[spi] ??= new PteTable();
                var dtable = dpmdt.Tables[dpi] ??= new PteTable();
                err = MovePagesPte(srcVma, dstVma, stable, dtable, s, d, allowSrcHoles);
                if (err == Errno.EAGAIN)
                    continue;
                if (err != Errno.OK)
                    break;
            }
            s += step;
            d += step;
            moved += (long)step;
        }
        return moved > 0 ? moved : -(long)err;
    }

    /// <summary>validate_move_areas.</summary>
    private Errno ValidateMoveAreas(UserfaultfdCtx ctx, Vma src, Vma dst)
    {
        if ((src.Flags & VmFlags.AccessFlags) != (dst.Flags & VmFlags.AccessFlags) || PageProt(src) != PageProt(dst))
            return Errno.EINVAL;
        if ((src.Flags & VmFlags.Locked) != (dst.Flags & VmFlags.Locked))
            return Errno.EINVAL;
        if ((src.Flags & VmFlags.Write) == 0)
            return Errno.EINVAL;
        if (dst.UffdCtx != ctx)
            return Errno.EINVAL;
        if (!src.IsAnonymous || !dst.IsAnonymous)
            return Errno.EINVAL;
        return Errno.OK;
    }

    /// <summary>move_pages_pte for one page.</summary>
    private Errno MovePagesPte(Vma srcVma, Vma dstVma, PteTable stable, PteTable dtable, ulong s, ulong d, bool allowSrcHoles)
    {
        var si = PageTable.PteIndex(s);
        var di = PageTable.PteIndex(d);
        var spte = stable.Entries[si];
        if (!dtable.Entries[di].IsNone)
            return Errno.EEXIST;
        if (spte.IsNone)
            return allowSrcHoles ? Errno.OK : Errno.ENOENT;
        if (spte.Present)
        {
            if (spte.Special)
            {
                stable.Entries[si] = Pte.None;
                dtable.Entries[di] = new Pte((Kernel.ZeroPage.Pfn << Kernel.PageShift) | PageProt(dstVma)).MkSpecial();
                return Errno.OK;
            }
            var page = NormalPage(spte);
            if (page is null || !page.IsAnon || !page.AnonExclusive)
                return Errno.EBUSY;
            if (page.Folio is { } folio)
            {
                SplitFolio(folio, srcVma, stable);
                return Errno.EAGAIN;
            }
            stable.Entries[si] = Pte.None;
            var npte = MkPte(page, dstVma).MkSoftDirty();
            if (spte.Dirty)
                npte = npte.MkDirty();
            dtable.Entries[di] = npte.MkWrite();
            return Errno.OK;
        }
        if (spte.IsMarker)
            return Errno.EFAULT;
        if (!spte.SwpExclusive)
            return Errno.EBUSY;
        stable.Entries[si] = Pte.None;
        dtable.Entries[di] = spte.SwpMkSoftDirty();
        return Errno.OK;
    }

    /// <summary>
    /// split_folio of a PTE-mapped anon THP mapped by <paramref name="table"/>: the folio
    /// becomes 512 small pages; subpages that are mapped and hold only zeros are replaced by
    /// the shared zero page (RMP_USE_SHARED_ZEROPAGE), keeping soft-dirty and uffd-wp
    /// (<see cref="Kernel.SplitMapsZeroFilledToZeroPage"/>; 6.1 keeps them all).
    /// </summary>
    internal void SplitFolio(Folio folio, Vma vma, PteTable table)
    {
        foreach (var p in folio.Pages)
            p.Folio = null;
        for (var i = 0; i < Kernel.PtrsPerTable && Kernel.SplitMapsZeroFilledToZeroPage; i++)
        {
            var pte = table.Entries[i];
            if (!pte.Present || pte.Special)
                continue;
            var page = Kernel.PageOf(pte.Pfn);
            if (page is null || Array.IndexOf(folio.Pages, page) < 0)
                continue;
            if (page.Data.Span.ContainsAnyExcept((byte)0))
                continue;
            var z = new Pte((Kernel.ZeroPage.Pfn << Kernel.PageShift) | PageProt(vma)).MkSpecial();
            if (pte.SoftDirty)
                z = z.MkSoftDirty();
            if (pte.UffdWp)
                z = z.MkUffdWp();
            table.Entries[i] = z;
            RemoveRmap(page);
        }
        foreach (var p in folio.Pages)
            Kernel.MaybeFree(p);
    }
}

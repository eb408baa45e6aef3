namespace UffdGrpc.Mm;

/// <summary>mremap (mm/mremap.c): moving a range to a new address.</summary>
public sealed partial class Mm
{
    /// <summary>
    /// The locked part of mremap(old, len, len, MREMAP_MAYMOVE|MREMAP_FIXED, new): the old
    /// range must lie in one VMA (EFAULT otherwise); the range is moved to a new VMA with
    /// its entries (each gains soft-dirty). Without EVENT_REMAP the new VMA is unregistered
    /// and (6.13+) its uffd-wp bits and markers are cleared; with it the registration stays
    /// and a REMAP event is sent (<paramref name="remapCtx"/>). The old range is then
    /// unmapped, which may queue UNMAP events.
    /// </summary>
    internal Errno MremapMove(ulong oldAddr, ulong len, ulong newAddr, List<(UserfaultfdCtx Ctx, ulong Start, ulong End)> unmaps, out UserfaultfdCtx? remapCtx)
    {
        remapCtx = null;
        if (oldAddr % Kernel.PageSize != 0 || newAddr % Kernel.PageSize != 0 || len == 0)
            return Errno.EINVAL;
        len = PageAlign(len);
        if (newAddr < oldAddr + len && oldAddr < newAddr + len)
            return Errno.EINVAL;
        var vma = VmaLookup(oldAddr);
        if (vma is null || len > vma.End - oldAddr)
            return Errno.EFAULT;
        var r = DoMunmap(newAddr, len, unmaps);
        if (r != Errno.OK)
            return r;
        // The unmap may have split the VMA (the destination lay in the same VMA): the old
        // range is in the piece that contains it now (mremap_to looks the VMA up again).
        vma = VmaLookup(oldAddr)!;
        vma = IsolateRange(vma, oldAddr, oldAddr + len);
        var nv = vma.CloneRange(oldAddr, oldAddr + len);
        nv.Start = newAddr;
        nv.End = newAddr + len;
        var clearWp = false;
        if (vma.UffdCtx is { } ctx)
        {
            if ((ctx.Features & UffdFeatures.EventRemap) != 0)
            {
                ctx.MmapChanging++;
                remapCtx = ctx;
            }
            else
            {
                clearWp = Kernel.MremapClearsUffdWp;
                nv.UffdCtx = null;
                nv.Flags &= ~VmFlags.UffdFlags;
            }
        }
        InsertVma(nv);
        MovePageTables(vma, oldAddr, newAddr, len, clearWp);
        DoMunmap(oldAddr, len, unmaps);
        MergeVma(nv);
        return Errno.OK;
    }

    /// <summary>
    /// move_page_tables: huge PMDs move whole when aligned, else split; PTEs move with
    /// move_soft_dirty_pte. Ranges without tables are skipped whole, so the cost follows what
    /// is mapped, not the length.
    /// </summary>
    private void MovePageTables(Vma oldVma, ulong oldAddr, ulong newAddr, ulong len, bool clearWp)
    {
        for (ulong off = 0; off < len; off += Kernel.PageSize)
        {
            var src = oldAddr + off;
            var dst = newAddr + off;
            PageTable.WalkSteps++;
            var spmdt = PageTable.PmdTableOf(src, false);
            if (spmdt is null)
            {
                // pud_none/pgd_none: nothing to move up to the end of the empty range.
                off = Math.Min(PageTable.UpperHoleEnd(src) - oldAddr, len) - Kernel.PageSize;
                continue;
            }
            var spi = PageTable.PmdIndex(src);
            if (spmdt.Entries[spi].TransHuge)
            {
                if (src % Kernel.PmdSize == 0 && dst % Kernel.PmdSize == 0 && len - off >= Kernel.PmdSize)
                {
                    var pmd = spmdt.Entries[spi];
                    spmdt.Entries[spi] = default;
                    pmd = pmd.UffdWp && clearWp ? pmd.ClearUffdWp() : pmd;
                    PageTable.PmdTableOf(dst, true)!.Entries[PageTable.PmdIndex(dst)] = new Pmd(pmd.Value | PteBits.PageSoftDirty);
                    off += Kernel.PmdSize - Kernel.PageSize;
                    continue;
                }
                SplitHugePmd(oldVma, spmdt, spi, src & Kernel.PmdMask);
            }
            var stable = spmdt.Tables[spi];
            if (stable is null)
            {
                // pmd_none: the next PMD.
                off = Math.Min((src & Kernel.PmdMask) + Kernel.PmdSize - oldAddr, len) - Kernel.PageSize;
                continue;
            }
            var si = PageTable.PteIndex(src);
            var pte = stable.Entries[si];
            if (pte.IsNone)
                continue;
            stable.Entries[si] = Pte.None;
            if (pte.Present)
            {
                pte = pte.MkSoftDirty();
                if (clearWp)
                    pte = pte.ClearUffdWp();
            }
            else if (pte.IsSwap || pte.IsHwpoison)
            {
                pte = pte.SwpMkSoftDirty();
                if (clearWp)
                    pte = pte.SwpClearUffdWp();
            }
            else if (clearWp && pte.IsUffdWpMarker)
            {
                var rest = pte.MarkerBits & ~PteMarker.UffdWp;
                if (rest == PteMarker.None)
                    continue;
                pte = Pte.Marker(rest);
            }
            var dtable = PageTable.PteAlloc(dst)!;
            dtable.Entries[PageTable.PteIndex(dst)] = pte;
        }
    }
}

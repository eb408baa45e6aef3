namespace UffdGrpc.Mm;

/// <summary>change_protection flags (MM_CP_*).</summary>
[Flags]
public enum CpFlags
{
    None = 0,
    /// <summary>MM_CP_DIRTY_ACCT (v5.7): write-upgrade dirty PTEs of write-notify mappings.</summary>
    DirtyAcct = 1 << 0,
    /// <summary>MM_CP_UFFD_WP: write-protect and set uffd-wp.</summary>
    UffdWp = 1 << 2,
    /// <summary>MM_CP_UFFD_WP_RESOLVE: clear uffd-wp.</summary>
    UffdWpResolve = 1 << 3,
    /// <summary>MM_CP_TRY_CHANGE_WRITABLE (6.x): let eligible PTEs become writable at once.</summary>
    TryChangeWritable = 1 << 4,
}

/// <summary>mprotect and change_protection (mm/mprotect.c, mm/huge_memory.c).</summary>
public sealed partial class Mm
{
    /// <summary>
    /// Implements the semantics of mprotect(2) (do_mprotect_pkey): the range must be covered
    /// by VMAs (a hole gives ENOMEM after the VMAs before it were changed), the VM_MAY*
    /// ceiling gives EACCES, each VMA is split/merged (mprotect_fixup) and its PTEs go
    /// through <see cref="ChangeProtection"/> without uffd flags, so uffd-wp survives.
    /// </summary>
    public Errno Mprotect(ulong start, ulong len, Prot prot)
    {
        using var _ = Kernel.Enter();
        if (start % Kernel.PageSize != 0)
            return Errno.EINVAL;
        if (((int)prot & ~7) != 0)
            return Errno.EINVAL;
        if (len == 0)
            return Errno.OK;
        len = PageAlign(len);
        var end = start + len;
        if (end <= start)
            return Errno.ENOMEM;
        var first = FindVma(start);
        if (first is null || first.Start > start)
            return Errno.ENOMEM;
        var tmp = start;
        foreach (var v0 in VmasIn(start, end))
        {
            if (v0.Start > tmp)
                return Errno.ENOMEM;
            var newFlags = (v0.Flags & ~VmFlags.AccessFlags) | (VmFlags)(int)prot;
            var may = (VmFlags)((ulong)(newFlags & (VmFlags.MayRead | VmFlags.MayWrite | VmFlags.MayExec)) >> 4);
            if ((newFlags & VmFlags.AccessFlags & ~may) != 0)
                return Errno.EACCES;
            var segEnd = Math.Min(end, v0.End);
            MprotectFixup(v0, Math.Max(start, v0.Start), segEnd, newFlags);
            tmp = segEnd;
        }
        return tmp < end ? Errno.ENOMEM : Errno.OK;
    }

    /// <summary>
    /// Models mprotect_fixup: nothing to do when the flags do not change. Making a private
    /// VMA that is not yet charged writable adds VM_ACCOUNT; making it non-writable drops
    /// VM_ACCOUNT only from an anonymous VMA that has no anon_vma yet (the commit cannot be
    /// returned once pages may exist; 6.1 never drops it: <see cref="Kernel.MprotectDropsAccount"/>).
    /// The flags then take part in the merge.
    /// </summary>
    private void MprotectFixup(Vma vma, ulong start, ulong end, VmFlags newFlags)
    {
        var oldFlags = vma.Flags;
        if (newFlags == oldFlags)
            return;
        if ((newFlags & VmFlags.Write) != 0)
        {
            if ((oldFlags & (VmFlags.Account | VmFlags.Write | VmFlags.Shared)) == 0)
                newFlags |= VmFlags.Account;
        }
        else if (Kernel.MprotectDropsAccount && (oldFlags & VmFlags.Account) != 0 && vma.IsAnonymous && vma.AnonVma is null)
        {
            newFlags &= ~VmFlags.Account;
        }
        vma = IsolateRange(vma, start, end);
        vma.Flags = newFlags;
        var cp = CpFlags.None;
        if (IsV6 ? WantsManualPteWriteUpgrade(vma) : WantsWriteNotify(vma))
            cp |= IsV6 ? CpFlags.TryChangeWritable : CpFlags.DirtyAcct;
        ChangeProtection(vma, vma.Start, vma.End, cp);
        MergeVma(vma);
    }

    /// <summary>vma_wants_manual_pte_write_upgrade: shared VMAs using write-notify, or private VMAs with VM_WRITE.</summary>
    internal bool WantsManualPteWriteUpgrade(Vma vma) =>
        vma.IsShared ? WantsWriteNotify(vma) : (vma.Flags & VmFlags.Write) != 0;

    /// <summary>
    /// Models change_protection → change_pmd_range → change_pte_range (mm/mprotect.c). Each
    /// present PTE is rebuilt with pte_modify(old, vma page_prot), which keeps uffd-wp;
    /// MM_CP_UFFD_WP then sets uffd-wp (and clears write), MM_CP_UFFD_WP_RESOLVE clears it;
    /// with TRY_CHANGE_WRITABLE an eligible PTE regains write at once
    /// (<see cref="CanChangePteWritable"/>). Swap entries gain or lose the swap uffd-wp
    /// bit, uffd-wp markers are installed on none slots (when the VMA uses markers) or
    /// dropped on resolve; poison and guard markers are left alone. Walks the page-table
    /// arrays in place and allocates nothing per entry.
    /// </summary>
    /// <returns>The number of entries changed.</returns>
    public long ChangeProtection(Vma vma, ulong start, ulong end, CpFlags cpFlags)
    {
        if ((cpFlags & (CpFlags.UffdWp | CpFlags.UffdWpResolve)) == (CpFlags.UffdWp | CpFlags.UffdWpResolve))
            throw new InvalidOperationException("MM_CP_UFFD_WP_ALL");
        var newProt = PageProt(vma);
        var uffdWp = (cpFlags & CpFlags.UffdWp) != 0;
        var useMarkers = uffdWp && IsV6 && vma.UserfaultfdWpUseMarkers;
        long pages = 0;
        foreach (var st in PageTable.Walk(start, end, alloc: useMarkers))
        {
            if (st.Table is not { } pmdt)
                continue;
            if (st.IsHuge)
            {
                if (!st.CoversPmd || (uffdWp && !vma.IsAnonymous))
                {
                    SplitHugePmd(vma, pmdt, st.Index, st.Addr & Kernel.PmdMask);
                }
                else
                {
                    pages += ChangeHugePmd(vma, pmdt, st.Index, newProt, cpFlags);
                    continue;
                }
            }
            var table = pmdt.Tables[st.Index];
            if (table is null)
            {
                if (!useMarkers)
                    continue;
                table = pmdt.Tables[st.Index] = new PteTable();
            }
            pages += ChangePteRange(vma, table.Entries, PageTable.PteIndex(st.Addr), (int)((st.End - st.Addr) / Kernel.PageSize), newProt, cpFlags, useMarkers);
        }
        return pages;
    }

    private long ChangePteRange(Vma vma, Pte[] entries, int first, int count, ulong newProt, CpFlags cpFlags, bool useMarkers)
    {
        var uffdWp = (cpFlags & CpFlags.UffdWp) != 0;
        var resolve = (cpFlags & CpFlags.UffdWpResolve) != 0;
        long pages = 0;
        for (var i = first; i < first + count; i++)
        {
            ref var slot = ref entries[i];
            var old = slot;
            if (old.Present)
            {
                var pte = old.Modify(newProt);
                if (uffdWp)
                    pte = pte.MkUffdWp();
                else if (resolve)
                    pte = pte.ClearUffdWp();
                if (IsV6)
                {
                    if ((cpFlags & CpFlags.TryChangeWritable) != 0 && !pte.Write && CanChangePteWritable(vma, pte))
                        pte = pte.MkWrite();
                }
                else if ((cpFlags & CpFlags.DirtyAcct) != 0 && pte.Dirty && !pte.UffdWp
                         && (pte.SoftDirty || (vma.Flags & VmFlags.SoftDirty) == 0 || !Kernel.Config.SoftDirty))
                {
                    pte = pte.MkWrite();
                }
                slot = pte;
                pages++;
            }
            else if (old.IsSwap || old.IsHwpoison)
            {
                if (uffdWp)
                    slot = old.SwpMkUffdWp();
                else if (resolve)
                    slot = old.SwpClearUffdWp();
                if (slot != old)
                    pages++;
            }
            else if (old.IsMarker)
            {
                if (old.IsPoisonMarker || old.IsGuardMarker)
                    continue;
                if (resolve)
                {
                    slot = Pte.None;
                    pages++;
                }
            }
            else if (useMarkers)
            {
                slot = Pte.Marker(PteMarker.UffdWp);
                pages++;
            }
        }
        return pages;
    }

    /// <summary>
    /// can_change_pte_writable (6.x): VM_WRITE, not PROT_NONE, no soft-dirty write fault
    /// needed, not uffd-wp protected; private VMAs only for anon-exclusive pages, shared
    /// VMAs only for dirty PTEs.
    /// </summary>
    internal bool CanChangePteWritable(Vma vma, Pte pte)
    {
        if ((vma.Flags & VmFlags.Write) == 0 || !pte.HwPresent)
            return false;
        if (NeedsSoftDirtyWp(vma, pte) || Userfaultfd.PteWp(vma, pte))
            return false;
        if (!vma.IsShared)
        {
            var page = NormalPage(pte);
            return page is { IsAnon: true, AnonExclusive: true } && (Kernel.CleanAnonPteMayBecomeWritable || pte.Dirty);
        }
        return pte.Dirty;
    }

    /// <summary>change_huge_pmd: the PMD analogue of the PTE rules.</summary>
    private long ChangeHugePmd(Vma vma, PmdTable pmdt, int pi, ulong newProt, CpFlags cpFlags)
    {
        var pmd = pmdt.Entries[pi].Modify(newProt);
        if ((cpFlags & CpFlags.UffdWp) != 0)
            pmd = pmd.MkUffdWp();
        else if ((cpFlags & CpFlags.UffdWpResolve) != 0)
            pmd = pmd.ClearUffdWp();
        if (Kernel.PmdTryChangeWritable && (cpFlags & CpFlags.TryChangeWritable) != 0 && !pmd.Write && (vma.Flags & VmFlags.Write) != 0
            && pmd.HwPresent && !Userfaultfd.HugePmdWp(vma, pmd) && !(SoftDirtyEnabled(vma) && !pmd.SoftDirty))
        {
            var head = Kernel.PageOf(pmd.Pfn)!;
            if (vma.IsShared ? pmd.Dirty : head is { IsAnon: true, AnonExclusive: true })
                pmd = pmd.MkWrite();
        }
        pmdt.Entries[pi] = pmd;
        return Kernel.PtrsPerTable;
    }
}

namespace UffdGrpc.Mm;

/// <summary>One VMA of an address-space snapshot: its mapping, its own (anonymous) pages with data, and the pages that carry uffd-wp.</summary>
public sealed record VmaSnapshot(
    ulong Start,
    ulong End,
    VmFlags Flags,
    MemFile? File,
    ulong PgOff,
    UserfaultfdCtx? Uffd,
    IReadOnlyList<(ulong Index, byte[] Data)> Pages,
    IReadOnlyList<ulong> UffdWpPages);

/// <summary>What a checkpoint/restore tool reads of an address space (as CRIU reads /proc/PID/maps, pagemap and the pages).</summary>
public sealed partial class Mm
{
    /// <summary>
    /// The VMAs with their own pages that hold data (anonymous pages, present or swapped;
    /// page-cache pages belong to the file) and their uffd-wp pages (a PTE or PMD bit, a swap
    /// entry's bit, or a marker), found by walking only the populated page tables. No side
    /// effect. Caller holds the machine lock.
    /// </summary>
    public List<VmaSnapshot> Snapshot()
    {
        AssertLocked();
        var slots = PageTable.PopulatedSlots().ToList();
        var list = new List<VmaSnapshot>(Vmas.Count);
        foreach (var v in Vmas)
        {
            var pages = new List<(ulong, byte[])>();
            var wp = new List<ulong>();
            foreach (var slot in slots)
            {
                var from = Math.Max(slot, v.Start);
                var to = Math.Min(slot + Kernel.PmdSize, v.End);
                for (var a = from; a < to; a += Kernel.PageSize)
                    SnapshotPage(v, a, pages, wp);
            }
            list.Add(new VmaSnapshot(v.Start, v.End, v.Flags, v.File, v.PgOff, v.UffdCtx, pages, wp));
        }
        return list;
    }

    private void SnapshotPage(Vma v, ulong a, List<(ulong, byte[])> pages, List<ulong> wp)
    {
        var index = (a - v.Start) / Kernel.PageSize;
        var pmdt = PageTable.PmdTableOf(a, false)!;
        var pmd = pmdt.Entries[PageTable.PmdIndex(a)];
        ReadOnlyMemory<byte> data = default;
        if (pmd.TransHuge)
        {
            var page = Kernel.PageOf(pmd.Pfn)!.Folio!.Pages[PageTable.PteIndex(a)];
            if (page.IsAnon)
                data = page.Data;
            if (pmd.UffdWp)
                wp.Add(index);
        }
        else if (pmdt.Tables[PageTable.PmdIndex(a)] is { } table)
        {
            var pte = table.Entries[PageTable.PteIndex(a)];
            if (pte.Present && PteToPage(pte) is { IsAnon: true } page)
                data = page.Data;
            else if (pte.IsSwap)
                ObservePte(v, pte, a, out data);
            if (pte.AnyUffdWp)
                wp.Add(index);
        }
        if (data.Span.ContainsAnyExcept((byte)0))
            pages.Add((index, data.ToArray()));
    }

    /// <summary>
    /// Models pwrite(2) of one whole page to a file (generic_perform_write / shmem_write_begin):
    /// the page-cache page at <paramref name="index"/> (allocated if absent; a swapped shmem
    /// page is brought back) gets <paramref name="data"/> and is dirty. ENOSPC past the file's
    /// size (the model's files do not grow), ENOMEM when no frame can be had.
    /// </summary>
    public Errno PwriteFilePage(MemFile file, ulong index, ReadOnlySpan<byte> data)
    {
        using var _ = Kernel.Enter();
        if (index >= file.SizePages || data.Length != (int)Kernel.PageSize)
            return Errno.ENOSPC;
        var page = file.FindCachePage(index) ?? (file.IsShmem ? ShmemSwapin(file, index) : null) ?? AddToPageCache(file, index);
        if (page is null)
            return Errno.ENOMEM;
        if (!file.IsShmem)
            file.Disk.Remove(index);
        page.Write(0, data);
        page.Dirty = true;
        return Errno.OK;
    }
}

using System.Security.Cryptography;

namespace UffdGrpc.Mm;

/// <summary>What a read of one page would find, as <see cref="Mm.Digest"/> and <see cref="Mm.PeekBytes"/> see it.</summary>
public enum PageContentState : byte
{
    /// <summary>No VMA covers the page (a read raises SIGSEGV); no hash.</summary>
    Unmapped,
    /// <summary>No page yet: an anonymous VMA without a PTE (or with a uffd-wp marker), or a file hole; reads as zeros.</summary>
    NotPresent,
    /// <summary>A present PTE or huge PMD (the zero page reads as zeros).</summary>
    Present,
    /// <summary>An anonymous swap entry, or a shmem page that was swapped out: the slot's contents.</summary>
    Swapped,
    /// <summary>A file or shmem VMA without a PTE whose page is in the page cache (or, for a regular file, written back to disk).</summary>
    PageCache,
    /// <summary>A poison marker (UFFDIO_POISON): a read raises SIGBUS; no hash.</summary>
    Poisoned,
    /// <summary>A guard marker (MADV_GUARD_INSTALL): a read raises SIGSEGV; no hash.</summary>
    Guard,
    /// <summary>A file VMA page beyond the end of the file: a read raises SIGBUS; no hash.</summary>
    BeyondEof,
}

/// <summary>Side-effect-free views of memory contents: per-page digests and peeks.</summary>
public sealed partial class Mm
{
    /// <summary>Bytes of one page digest (SHA-256).</summary>
    public const int DigestSize = 32;

    private static readonly byte[] s_zeroHash = SHA256.HashData(new byte[Kernel.PageSize]);

    /// <summary>SHA-256 of a page of zeros, the digest of every page that reads as zeros.</summary>
    public static ReadOnlySpan<byte> ZeroPageHash => s_zeroHash;

    /// <summary>
    /// Digests the <paramref name="pages"/> pages from the page-aligned <paramref name="start"/>:
    /// for page i, <paramref name="states"/>[i] says where a read would find its contents and
    /// <paramref name="hashes"/>[32i..32i+32) holds their SHA-256 (<see cref="ZeroPageHash"/>
    /// for all-zero pages; 32 zero bytes when the page has no contents: Unmapped, Poisoned,
    /// Guard, BeyondEof). Nothing changes: no fault, no allocation, no accessed/dirty bit, no
    /// userfault. Ranges without page tables are classified in bulk.
    /// </summary>
    /// <remarks>
    /// Walks like a privileged reader of /proc/PID/pagemap plus the swap and page-cache
    /// lookups a read fault would make (pagemap_pmd_range, fs/proc/task_mmu.c;
    /// do_swap_page / shmem_get_folio_gfp / filemap_fault, mm/memory.c, mm/shmem.c,
    /// mm/filemap.c), without the faults themselves.
    /// </remarks>
    public void Digest(ulong start, ulong pages, Span<PageContentState> states, Span<byte> hashes)
    {
        if (start % Kernel.PageSize != 0)
            throw new ArgumentException("start must be page aligned", nameof(start));
        if ((ulong)states.Length < pages || (ulong)hashes.Length / DigestSize < pages)
            throw new ArgumentException("the output spans are shorter than the range");
        var n = (int)pages;
        states = states[..n];
        hashes = hashes[..(n * DigestSize)];
        using var _ = Kernel.Enter();
        // Pages at or above TASK_SIZE (or past 2^64) have no VMA: cap the walk there.
        var room = (Kernel.TaskSize - Math.Min(start, Kernel.TaskSize)) / Kernel.PageSize;
        var walkPages = (int)Math.Min((ulong)n, room);
        var end = start + ((ulong)walkPages * Kernel.PageSize);
        var done = 0;
        for (var vi = IndexOfFirstEndAbove(start); vi < _vmas.Count && _vmas[vi].Start < end; vi++)
        {
            var vma = _vmas[vi];
            var from = Math.Max(start, vma.Start);
            var to = Math.Min(end, vma.End);
            var first = (int)((from - start) / Kernel.PageSize);
            Fill(states, hashes, done, first - done, PageContentState.Unmapped);
            DigestVma(vma, from, to, states, hashes, first);
            done = (int)((to - start) / Kernel.PageSize);
        }
        Fill(states, hashes, done, n - done, PageContentState.Unmapped);
    }

    /// <summary>
    /// Copies into <paramref name="dest"/> the bytes a read at <paramref name="addr"/> would
    /// observe, with the side-effect rules of <see cref="Digest"/>. Stops before the first
    /// page without contents (Unmapped, Poisoned, Guard, BeyondEof) and returns the number
    /// of bytes copied.
    /// </summary>
    public int PeekBytes(ulong addr, Span<byte> dest)
    {
        using var _ = Kernel.Enter();
        var done = 0;
        while (done < dest.Length)
        {
            var a = addr + (ulong)done;
            if (a < addr || a >= Kernel.TaskSize)
                break;
            var offset = (int)(a & (Kernel.PageSize - 1));
            var len = Math.Min(dest.Length - done, (int)Kernel.PageSize - offset);
            ReadOnlyMemory<byte> data = default;
            var vma = VmaLookup(a);
            var state = vma is null ? PageContentState.Unmapped : ObservePage(vma, a, out data);
            if (!HasContents(state))
                break;
            var chunk = dest.Slice(done, len);
            if (data.IsEmpty)
                chunk.Clear();
            else
                data.Span.Slice(offset, len).CopyTo(chunk);
            done += len;
        }
        return done;
    }

    private static bool HasContents(PageContentState s) =>
        s is PageContentState.NotPresent or PageContentState.Present or PageContentState.Swapped or PageContentState.PageCache;

    /// <summary>Digests [from, to) of <paramref name="vma"/> into the outputs from page <paramref name="first"/>, PMD slot by PMD slot.</summary>
    private void DigestVma(Vma vma, ulong from, ulong to, Span<PageContentState> states, Span<byte> hashes, int first)
    {
        var i = first;
        foreach (var st in PageTable.Walk(from, to))
        {
            var count = (int)((st.End - st.Addr) / Kernel.PageSize);
            var table = st.PteTable;
            if (!st.IsHuge && table is null && NoPteRangeIsEmpty(vma, st.Addr, st.End))
            {
                // No page table and nothing behind it: zero-fill (or a hole) in bulk.
                Fill(states, hashes, i, count, PageContentState.NotPresent);
                i += count;
                continue;
            }
            for (var a = st.Addr; a < st.End; a += Kernel.PageSize, i++)
            {
                ReadOnlyMemory<byte> data;
                if (st.IsHuge)
                    states[i] = ObserveHuge(st.Table!.Entries[st.Index], a, out data);
                else
                    states[i] = ObservePte(vma, table?.Entries[PageTable.PteIndex(a)] ?? Pte.None, a, out data);
                Hash(states[i], data, hashes.Slice(i * DigestSize, DigestSize));
            }
        }
    }

    /// <summary>
    /// True when no page in [from, to) of <paramref name="vma"/> can have contents without
    /// a PTE: an anonymous VMA, or a file with nothing cached, swapped or written back and
    /// the range inside its size.
    /// </summary>
    private static bool NoPteRangeIsEmpty(Vma vma, ulong from, ulong to)
    {
        if (vma.File is not { } file)
            return true;
        return file.Cache.Count == 0 && file.Swapped.Count == 0 && file.Disk.Count == 0
            && vma.LinearPageIndex(to - Kernel.PageSize) < file.SizePages;
    }

    /// <summary>What a read at <paramref name="addr"/> (inside <paramref name="vma"/>) would observe; null data reads as zeros.</summary>
    private PageContentState ObservePage(Vma vma, ulong addr, out ReadOnlyMemory<byte> data)
    {
        var pmdt = PageTable.PmdTableOf(addr, false);
        var pi = PageTable.PmdIndex(addr);
        if (pmdt is not null && pmdt.Entries[pi].TransHuge)
            return ObserveHuge(pmdt.Entries[pi], addr, out data);
        return ObservePte(vma, pmdt?.Tables[pi]?.Entries[PageTable.PteIndex(addr)] ?? Pte.None, addr, out data);
    }

    /// <summary>The subpage of a huge PMD (the huge zero page reads as zeros).</summary>
    private PageContentState ObserveHuge(Pmd pmd, ulong addr, out ReadOnlyMemory<byte> data)
    {
        data = Kernel.PageOf(pmd.Pfn)!.Folio!.Pages[PageTable.PteIndex(addr)].Data;
        return PageContentState.Present;
    }

    /// <summary>
    /// The entry's contents as handle_pte_fault would find them: a present page; a swap
    /// entry's swap-cache page or slot (do_swap_page); poison before guard
    /// (handle_pte_marker); a uffd-wp marker or none falls through to the VMA.
    /// </summary>
    private PageContentState ObservePte(Vma vma, Pte pte, ulong addr, out ReadOnlyMemory<byte> data)
    {
        data = default;
        if (pte.Present)
        {
            data = PteToPage(pte).Data;
            return PageContentState.Present;
        }
        if (pte.IsSwap)
        {
            var slot = Kernel.SwapSlotOf(pte.SwapSlot);
            data = slot.Cache is { } cached ? cached.Data : slot.Data;
            return PageContentState.Swapped;
        }
        if (pte.IsPoisonMarker || pte.IsHwpoison)
            return PageContentState.Poisoned;
        if (pte.IsGuardMarker)
            return PageContentState.Guard;
        if (vma.File is not { } file)
            return PageContentState.NotPresent;
        return file.PeekPage(vma.LinearPageIndex(addr), out data);
    }

    /// <summary>Writes one page's digest: SHA-256 of its contents, the shared zero hash, or zeros for a page without contents.</summary>
    private static void Hash(PageContentState state, ReadOnlyMemory<byte> data, Span<byte> dest)
    {
        if (!HasContents(state))
            dest.Clear();
        else if (!data.Span.ContainsAnyExcept((byte)0))
            s_zeroHash.CopyTo(dest);
        else
            SHA256.HashData(data.Span, dest);
    }

    /// <summary>Classifies <paramref name="count"/> pages from <paramref name="first"/> as <paramref name="state"/> (zeros or no contents).</summary>
    private static void Fill(Span<PageContentState> states, Span<byte> hashes, int first, int count, PageContentState state)
    {
        if (count <= 0)
            return;
        states.Slice(first, count).Fill(state);
        var dest = hashes.Slice(first * DigestSize, count * DigestSize);
        if (!HasContents(state))
        {
            dest.Clear();
            return;
        }
        // Doubling copies of the zero hash.
        s_zeroHash.CopyTo(dest);
        for (var filled = DigestSize; filled < dest.Length; filled *= 2)
            dest[..Math.Min(filled, dest.Length - filled)].CopyTo(dest[filled..]);
    }
}

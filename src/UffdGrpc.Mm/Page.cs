namespace UffdGrpc.Mm;

/// <summary>What a page frame belongs to.</summary>
public enum PageKind
{
    /// <summary>Anonymous memory (PageAnon).</summary>
    Anon,
    /// <summary>A page-cache page of a shmem or regular file.</summary>
    File,
    /// <summary>The shared zero page or a subpage of the huge zero page.</summary>
    Zero,
}

/// <summary>
/// A page frame (struct page / small folio). Contents are allocated on first write; a
/// frame with no contents reads as zeros.
/// </summary>
/// <remarks>Protected by the owning <see cref="Kernel"/>'s lock.</remarks>
public sealed class Page
{
    internal Page(ulong pfn, PageKind kind)
    {
        Pfn = pfn;
        Kind = kind;
    }

    /// <summary>The frame number (its identity; the trace's <c>pageid</c>).</summary>
    public ulong Pfn { get; }
    public PageKind Kind { get; internal set; }
    /// <summary>For page-cache pages: the file and page index.</summary>
    public MemFile? Mapping { get; internal set; }
    public ulong Index { get; internal set; }
    /// <summary>Number of PTEs mapping this page (_mapcount + 1).</summary>
    public int MapCount { get; internal set; }
    /// <summary>PageAnonExclusive.</summary>
    public bool AnonExclusive { get; internal set; }
    /// <summary>The THP folio this page is a subpage of, or null for a small folio.</summary>
    public Folio? Folio { get; internal set; }
    /// <summary>Long-term pins (GUP FOLL_PIN); never set by the scenario language.</summary>
    public int Pins { get; internal set; }
    /// <summary>PG_dirty: the page-cache or lazily freed anon page holds unsaved data.</summary>
    public bool Dirty { get; internal set; }
    /// <summary>PG_readahead: the page-cache folio that starts the next readahead when it is faulted (6.1 profile).</summary>
    internal bool Readahead;
    /// <summary>MADV_FREE marked this anon page lazily freeable (folio_mark_lazyfree).</summary>
    public bool LazyFree { get; internal set; }
    /// <summary>PG_hwpoison: memory_failure took the frame out of use for good (it is never freed or reused).</summary>
    public bool HwPoison { get; internal set; }
    /// <summary>The swap slot whose swap cache holds this page (0: not in the swap cache).</summary>
    internal ulong SwapCacheSlot;

    internal byte[]? Data;

    public bool IsZeroPage => Kind == PageKind.Zero;
    public bool IsAnon => Kind == PageKind.Anon;

    /// <summary>folio_precise_page_mapcount: PTE mappings plus PMD mappings of the folio.</summary>
    public int PreciseMapCount => MapCount + (Folio?.EntireMapCount ?? 0);

    /// <summary>folio_ref_count approximated as mappings, pins and the swap cache's reference.</summary>
    public int RefCount => Folio is null ? MapCount + Pins + (SwapCacheSlot != 0 ? 1 : 0) : Folio.RefCount;

    public byte ReadByte(int offset) => Data is null ? (byte)0 : Data[offset];

    /// <summary>Copies <paramref name="dst"/>.Length bytes of the contents from <paramref name="offset"/> (zeros when unallocated).</summary>
    internal void Read(int offset, Span<byte> dst)
    {
        if (Data is null)
            dst.Clear();
        else
            Data.AsSpan(offset, dst.Length).CopyTo(dst);
    }

    /// <summary>
    /// Stores <paramref name="src"/> at <paramref name="offset"/>. The contents are
    /// allocated on the first write of a non-zero byte (zeros into an unallocated frame
    /// change nothing a read can see).
    /// </summary>
    internal void Write(int offset, ReadOnlySpan<byte> src)
    {
        if (Data is null)
        {
            if (!src.ContainsAnyExcept((byte)0))
                return;
            Data = new byte[(int)Kernel.PageSize];
        }
        src.CopyTo(Data.AsSpan(offset));
    }

    internal void CopyFrom(Page src)
    {
        if (src.Data is null)
        {
            Data = null;
            return;
        }
        Data ??= new byte[(int)Kernel.PageSize];
        Buffer.BlockCopy(src.Data, 0, Data, 0, (int)Kernel.PageSize);
    }

    internal void Fill(byte value)
    {
        if (value == 0)
        {
            Data = null;
            return;
        }
        Data ??= new byte[(int)Kernel.PageSize];
        Array.Fill(Data, value);
    }

    internal void Fill(ReadOnlySpan<byte> contents)
    {
        Data ??= new byte[(int)Kernel.PageSize];
        contents.CopyTo(Data);
    }

    public ReadOnlySpan<byte> Contents => Data is null ? new byte[(int)Kernel.PageSize] : Data;
}

/// <summary>A PMD-sized (2 MiB) large folio: an anon THP or the huge zero page.</summary>
public sealed class Folio
{
    internal Folio(Page[] pages, bool hugeZero)
    {
        Pages = pages;
        IsHugeZero = hugeZero;
    }

    public Page[] Pages { get; }
    public Page Head => Pages[0];
    public bool IsHugeZero { get; }
    /// <summary>Number of PMDs mapping the whole folio (folio->_entire_mapcount + 1).</summary>
    public int EntireMapCount { get; internal set; }

    /// <summary>Mappings (PMD or PTE) per address space: the folio's MM ids (CONFIG_MM_ID).</summary>
    internal readonly Dictionary<Mm, int> MmMaps = [];

    /// <summary>folio_maybe_mapped_shared: more than one address space maps the folio.</summary>
    public bool MaybeMappedShared => MmMaps.Count > 1;

    /// <summary>folio_large_mapcount: every PTE mapping plus every PMD mapping.</summary>
    public int LargeMapCount => EntireMapCount + Pages.Sum(p => p.MapCount);

    internal void Track(Mm mm, int delta)
    {
        var n = MmMaps.GetValueOrDefault(mm) + delta;
        if (n <= 0)
            MmMaps.Remove(mm);
        else
            MmMaps[mm] = n;
    }

    internal int RefCount
    {
        get
        {
            var n = EntireMapCount;
            foreach (var p in Pages)
                n += p.MapCount + p.Pins;
            return n;
        }
    }

    /// <summary>True while any subpage is mapped.</summary>
    public bool Mapped => EntireMapCount > 0 || Array.Exists(Pages, p => p.MapCount > 0);
}

/// <summary>A slot of the simulated swap device.</summary>
internal sealed class SwapSlot
{
    public byte[]? Data;
    /// <summary>swap_map count: the number of swap entries referencing the slot.</summary>
    public int Count;
    /// <summary>The page in the swap cache for this slot, if any.</summary>
    public Page? Cache;
}

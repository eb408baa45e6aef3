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
/// A page frame (struct page / small folio). Contents are allocated on first write, in a
/// slot of the machine's <see cref="ContentPool"/>; a frame with no contents reads as zeros.
/// </summary>
/// <remarks>
/// <para>Protected by the owning <see cref="Kernel"/>'s lock.</para>
/// <para>
/// Laid out like struct page, which keeps what every frame needs in 64 bytes and overlays
/// the rest. The object holds one word and one reference (32 bytes with its header): the
/// word packs the PFN, the page flags (page->flags), the map count (page->_mapcount) and
/// the FOLL_PIN pins (folio->_pincount);
/// the reference is the <see cref="FrameChunk"/> of the frame table that holds the frame
/// (the model's mem_map section). The chunk keeps, per frame, the slot of its contents
/// and, for the frames that carry any, a side object with the fields only some frames
/// need: page->mapping and page->index of a page-cache page, the folio of a THP subpage,
/// the swap-cache entry, and a map count or pins too large for the word.
/// </para>
/// </remarks>
public sealed class Page
{
    private const int PfnBits = 40;
    private const ulong PfnMask = (1UL << PfnBits) - 1;
    private const int KindShift = PfnBits;
    private const ulong KindMask = 3UL << KindShift;
    private const ulong FlagAnonExclusive = 1UL << 42, FlagDirty = 1UL << 43, FlagReadahead = 1UL << 44,
        FlagLazyFree = 1UL << 45, FlagHwPoison = 1UL << 46, FlagCountsInExtra = 1UL << 47;
    private const int MapCountShift = 48, PinsShift = 61;
    private const ulong MapCountMax = (1UL << 13) - 1, PinsMax = 7;

    /// <summary>
    /// The frame number (bits 0-39, as wide as a PTE's PFN field), the kind and page flags
    /// (40-47), the map count (48-60) and the pins (61-63). Counts past those widths (or
    /// negative, which the invariant checker reports) move both to the side object.
    /// </summary>
    private ulong _word;
    /// <summary>The frame-table chunk that holds this frame, its contents slot and its side fields.</summary>
    private readonly FrameChunk _chunk;

    internal Page(ulong pfn, PageKind kind, FrameChunk chunk)
    {
        if (pfn > PfnMask)
            throw new InvalidOperationException($"frame number {pfn} does not fit in a PTE's {PfnBits}-bit PFN field");
        _word = pfn | ((ulong)kind << KindShift);
        _chunk = chunk;
    }

    private int ChunkIndex => (int)(Pfn % FrameChunk.Pages);

    private PageExtra? Extra => _chunk.Extras?[ChunkIndex];

    private PageExtra MutableExtra
    {
        get
        {
            var extras = _chunk.Extras ??= new PageExtra?[FrameChunk.Pages];
            if (extras[ChunkIndex] is { } e)
                return e;
            _chunk.ExtraCount++;
            return extras[ChunkIndex] = new PageExtra();
        }
    }

    /// <summary>Drops the side object once every field it holds is back to its default (a page leaving the page cache or the swap cache, a split folio).</summary>
    private void TrimExtra()
    {
        if (Extra is not { Mapping: null, Index: 0, Folio: null, SwapCacheSlot: 0 } || Flag(FlagCountsInExtra))
            return;
        _chunk.Extras![ChunkIndex] = null;
        if (--_chunk.ExtraCount == 0)
            _chunk.Extras = null;
    }

    private ContentPool Pool => _chunk.Pool;

    /// <summary>The contents' slot in the pool plus one (0: no contents, the frame reads as zeros).</summary>
    private int Slot => _chunk.ContentSlots is { } slots ? slots[ChunkIndex] : 0;

    private bool Flag(ulong f) => (_word & f) != 0;

    private void SetFlag(ulong f, bool on) => _word = on ? _word | f : _word & ~f;

    /// <summary>The frame number (its identity; the trace's <c>pageid</c>).</summary>
    public ulong Pfn => _word & PfnMask;
    public PageKind Kind
    {
        get => (PageKind)((_word & KindMask) >> KindShift);
        internal set => _word = (_word & ~KindMask) | ((ulong)value << KindShift);
    }
    /// <summary>For page-cache pages: the file (page->mapping).</summary>
    public MemFile? Mapping
    {
        get => Extra?.Mapping;
        internal set
        {
            if (value is not null || Extra is not null)
            {
                MutableExtra.Mapping = value;
                TrimExtra();
            }
        }
    }
    /// <summary>For page-cache pages: the page index in the file (page->index).</summary>
    public ulong Index
    {
        get => Extra?.Index ?? 0;
        internal set
        {
            if (value != 0 || Extra is not null)
            {
                MutableExtra.Index = value;
                TrimExtra();
            }
        }
    }
    /// <summary>Number of PTEs mapping this page (_mapcount + 1).</summary>
    public int MapCount
    {
        get => Flag(FlagCountsInExtra) ? Extra!.MapCount : (int)((_word >> MapCountShift) & MapCountMax);
        internal set => SetCounts(value, Pins);
    }

    /// <summary>Stores the map count and the pins in the word when both fit, else in the side object.</summary>
    private void SetCounts(int mapCount, int pins)
    {
        if ((uint)mapCount <= MapCountMax && (uint)pins <= PinsMax)
        {
            _word = (_word & ((1UL << MapCountShift) - 1)) | ((ulong)mapCount << MapCountShift) | ((ulong)pins << PinsShift);
            if (Flag(FlagCountsInExtra))
            {
                SetFlag(FlagCountsInExtra, false);
                Extra!.MapCount = Extra.Pins = 0;
                TrimExtra();
            }
        }
        else
        {
            var e = MutableExtra;
            e.MapCount = mapCount;
            e.Pins = pins;
            SetFlag(FlagCountsInExtra, true);
        }
    }

    /// <summary>PageAnonExclusive.</summary>
    public bool AnonExclusive { get => Flag(FlagAnonExclusive); internal set => SetFlag(FlagAnonExclusive, value); }
    /// <summary>The THP folio this page is a subpage of, or null for a small folio.</summary>
    public Folio? Folio
    {
        get => Extra?.Folio;
        internal set
        {
            if (value is not null || Extra is not null)
            {
                MutableExtra.Folio = value;
                TrimExtra();
            }
        }
    }
    /// <summary>Long-term pins (GUP FOLL_PIN); never set by the scenario language.</summary>
    public int Pins
    {
        get => Flag(FlagCountsInExtra) ? Extra!.Pins : (int)(_word >> PinsShift);
        internal set => SetCounts(MapCount, value);
    }
    /// <summary>PG_dirty: the page-cache or lazily freed anon page holds unsaved data.</summary>
    public bool Dirty { get => Flag(FlagDirty); internal set => SetFlag(FlagDirty, value); }
    /// <summary>PG_readahead: the page-cache folio that starts the next readahead when it is faulted (6.1 profile).</summary>
    internal bool Readahead { get => Flag(FlagReadahead); set => SetFlag(FlagReadahead, value); }
    /// <summary>MADV_FREE marked this anon page lazily freeable (folio_mark_lazyfree).</summary>
    public bool LazyFree { get => Flag(FlagLazyFree); internal set => SetFlag(FlagLazyFree, value); }
    /// <summary>PG_hwpoison: memory_failure took the frame out of use for good (it is never freed or reused).</summary>
    public bool HwPoison { get => Flag(FlagHwPoison); internal set => SetFlag(FlagHwPoison, value); }
    /// <summary>The swap slot whose swap cache holds this page (0: not in the swap cache).</summary>
    internal ulong SwapCacheSlot
    {
        get => Extra?.SwapCacheSlot ?? 0;
        set
        {
            if (value != 0 || Extra is not null)
            {
                MutableExtra.SwapCacheSlot = value;
                TrimExtra();
            }
        }
    }

    public bool IsZeroPage => Kind == PageKind.Zero;
    public bool IsAnon => Kind == PageKind.Anon;

    /// <summary>folio_precise_page_mapcount: PTE mappings plus PMD mappings of the folio.</summary>
    public int PreciseMapCount => MapCount + (Folio?.EntireMapCount ?? 0);

    /// <summary>folio_ref_count approximated as mappings, pins and the swap cache's reference.</summary>
    public int RefCount => Folio is null ? MapCount + Pins + (SwapCacheSlot != 0 ? 1 : 0) : Folio.RefCount;

    /// <summary>The contents have a slot (some byte was written non-zero since the frame was last cleared).</summary>
    internal bool HasContents => Slot != 0;

    /// <summary>The contents, or empty when the frame reads as zeros. Valid until the frame's contents change or it is freed.</summary>
    internal ReadOnlyMemory<byte> Data => Slot is var slot and not 0 ? Pool.Memory(slot - 1) : ReadOnlyMemory<byte>.Empty;

    /// <summary>The contents, allocating the slot (zeroed) if there is none.</summary>
    private Span<byte> Allocated()
    {
        var slots = _chunk.ContentSlots ??= new int[FrameChunk.Pages];
        ref var slot = ref slots[ChunkIndex];
        if (slot == 0)
            slot = Pool.Allocate() + 1;
        return Pool.Span(slot - 1);
    }

    /// <summary>Gives the contents' slot back to the pool: the frame reads as zeros.</summary>
    internal void ReleaseContents()
    {
        if (Slot == 0)
            return;
        ref var slot = ref _chunk.ContentSlots![ChunkIndex];
        Pool.Free(slot - 1);
        slot = 0;
    }

    /// <summary>A copy of the contents (for a swap slot or a file's disk blocks), or null when they are zeros.</summary>
    internal byte[]? CopyData() => Slot is var slot and not 0 ? Pool.Span(slot - 1).ToArray() : null;

    /// <summary>Sets the contents to <paramref name="data"/> (null: zeros), as a swap-in or a read from disk does.</summary>
    internal void SetData(byte[]? data)
    {
        if (data is null)
            ReleaseContents();
        else
            data.CopyTo(Allocated());
    }

    /// <summary>The contents, or empty when the frame reads as zeros.</summary>
    private ReadOnlySpan<byte> Span => Slot is var slot and not 0 ? Pool.Span(slot - 1) : default;

    public byte ReadByte(int offset) => Span is { IsEmpty: false } d ? d[offset] : (byte)0;

    /// <summary>Copies <paramref name="dst"/>.Length bytes of the contents from <paramref name="offset"/> (zeros when unallocated).</summary>
    internal void Read(int offset, Span<byte> dst)
    {
        var d = Span;
        if (d.IsEmpty)
            dst.Clear();
        else
            d.Slice(offset, dst.Length).CopyTo(dst);
    }

    /// <summary>
    /// Stores <paramref name="src"/> at <paramref name="offset"/>. The contents are
    /// allocated on the first write of a non-zero byte (zeros into an unallocated frame
    /// change nothing a read can see).
    /// </summary>
    internal void Write(int offset, ReadOnlySpan<byte> src)
    {
        if (Slot == 0 && !src.ContainsAnyExcept((byte)0))
            return;
        src.CopyTo(Allocated()[offset..]);
    }

    internal void CopyFrom(Page src)
    {
        var d = src.Span;
        if (d.IsEmpty)
        {
            ReleaseContents();
            return;
        }
        d.CopyTo(Allocated());
    }

    internal void Fill(byte value)
    {
        if (value == 0)
        {
            ReleaseContents();
            return;
        }
        Allocated().Fill(value);
    }

    internal void Fill(ReadOnlySpan<byte> contents) => contents.CopyTo(Allocated());

    private static readonly byte[] s_zeros = new byte[(int)Kernel.PageSize];

    public ReadOnlySpan<byte> Contents => Span is { IsEmpty: false } d ? d : s_zeros;
}

/// <summary>
/// The fields only some frames carry: page->mapping and page->index of a page-cache page,
/// the folio of a THP subpage, the swap-cache entry, and a map count or pins past what the
/// frame's word holds. Kept by the frame's <see cref="FrameChunk"/>, dropped when all are default again.
/// </summary>
internal sealed class PageExtra
{
    public MemFile? Mapping;
    public ulong Index;
    public Folio? Folio;
    public int Pins;
    public ulong SwapCacheSlot;
    public int MapCount;
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

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
/// the rest: the PFN and the page flags share one word (page->flags, with the PG_* bits
/// here above the 48-bit frame number), the map count and the contents slot share another,
/// and what only some frames carry (page->mapping and page->index of a page-cache page, the
/// folio of a THP subpage, pins, the swap-cache entry) lives in a side object the frame
/// points to once one of them is set. An anonymous frame is 40 bytes: object header, the
/// flags word, one reference (the pool, or the side object that holds it), map count and slot.
/// </para>
/// </remarks>
public sealed class Page
{
    private const int PfnBits = 48;
    private const ulong PfnMask = (1UL << PfnBits) - 1;
    private const int KindShift = PfnBits;
    private const ulong KindMask = 3UL << KindShift;
    private const ulong FlagAnonExclusive = 1UL << 50, FlagDirty = 1UL << 51, FlagReadahead = 1UL << 52,
        FlagLazyFree = 1UL << 53, FlagHwPoison = 1UL << 54;

    /// <summary>The frame number and the page flags (page->flags).</summary>
    private ulong _pfnFlags;
    /// <summary>The machine's <see cref="ContentPool"/>, or the <see cref="PageExtra"/> that holds it.</summary>
    private object _owner;
    /// <summary>The contents' slot in the pool plus one (0: no contents, the frame reads as zeros).</summary>
    private int _slot;

    internal Page(ulong pfn, PageKind kind, ContentPool pool)
    {
        if (pfn > PfnMask)
            throw new InvalidOperationException($"frame number {pfn} does not fit in {PfnBits} bits");
        _pfnFlags = pfn | ((ulong)kind << KindShift);
        _owner = pool;
    }

    /// <summary>The fields only some frames carry (page->mapping, page->index, the folio of a THP subpage, pins, the swap-cache entry).</summary>
    private sealed class PageExtra(ContentPool pool)
    {
        public readonly ContentPool Pool = pool;
        public MemFile? Mapping;
        public ulong Index;
        public Folio? Folio;
        public int Pins;
        public ulong SwapCacheSlot;
    }

    private PageExtra? Extra => _owner as PageExtra;

    /// <summary>Drops the side object once every field it holds is back to its default (a transient pin, a page leaving the page cache).</summary>
    private void TrimExtra()
    {
        if (_owner is PageExtra { Mapping: null, Index: 0, Folio: null, Pins: 0, SwapCacheSlot: 0 } e)
            _owner = e.Pool;
    }

    private PageExtra MutableExtra => _owner as PageExtra ?? (PageExtra)(_owner = new PageExtra((ContentPool)_owner));

    private ContentPool Pool => _owner as ContentPool ?? ((PageExtra)_owner).Pool;

    private bool Flag(ulong f) => (_pfnFlags & f) != 0;

    private void SetFlag(ulong f, bool on) => _pfnFlags = on ? _pfnFlags | f : _pfnFlags & ~f;

    /// <summary>The frame number (its identity; the trace's <c>pageid</c>).</summary>
    public ulong Pfn => _pfnFlags & PfnMask;
    public PageKind Kind
    {
        get => (PageKind)((_pfnFlags & KindMask) >> KindShift);
        internal set => _pfnFlags = (_pfnFlags & ~KindMask) | ((ulong)value << KindShift);
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
    public int MapCount { get; internal set; }
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
        get => Extra?.Pins ?? 0;
        internal set
        {
            if (value != 0 || Extra is not null)
            {
                MutableExtra.Pins = value;
                TrimExtra();
            }
        }
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
    internal bool HasContents => _slot != 0;

    /// <summary>The contents, or empty when the frame reads as zeros. Valid until the frame's contents change or it is freed.</summary>
    internal ReadOnlyMemory<byte> Data => _slot == 0 ? ReadOnlyMemory<byte>.Empty : Pool.Memory(_slot - 1);

    /// <summary>The contents, allocating the slot (zeroed) if there is none.</summary>
    private Span<byte> Allocated()
    {
        var pool = Pool;
        if (_slot == 0)
            _slot = pool.Allocate() + 1;
        return pool.Span(_slot - 1);
    }

    /// <summary>Gives the contents' slot back to the pool: the frame reads as zeros.</summary>
    internal void ReleaseContents()
    {
        if (_slot == 0)
            return;
        Pool.Free(_slot - 1);
        _slot = 0;
    }

    /// <summary>A copy of the contents (for a swap slot or a file's disk blocks), or null when they are zeros.</summary>
    internal byte[]? CopyData() => _slot == 0 ? null : Pool.Span(_slot - 1).ToArray();

    /// <summary>Sets the contents to <paramref name="data"/> (null: zeros), as a swap-in or a read from disk does.</summary>
    internal void SetData(byte[]? data)
    {
        if (data is null)
            ReleaseContents();
        else
            data.CopyTo(Allocated());
    }

    public byte ReadByte(int offset) => _slot == 0 ? (byte)0 : Pool.Span(_slot - 1)[offset];

    /// <summary>Copies <paramref name="dst"/>.Length bytes of the contents from <paramref name="offset"/> (zeros when unallocated).</summary>
    internal void Read(int offset, Span<byte> dst)
    {
        if (_slot == 0)
            dst.Clear();
        else
            Pool.Span(_slot - 1).Slice(offset, dst.Length).CopyTo(dst);
    }

    /// <summary>
    /// Stores <paramref name="src"/> at <paramref name="offset"/>. The contents are
    /// allocated on the first write of a non-zero byte (zeros into an unallocated frame
    /// change nothing a read can see).
    /// </summary>
    internal void Write(int offset, ReadOnlySpan<byte> src)
    {
        if (_slot == 0 && !src.ContainsAnyExcept((byte)0))
            return;
        src.CopyTo(Allocated()[offset..]);
    }

    internal void CopyFrom(Page src)
    {
        if (src._slot == 0)
        {
            ReleaseContents();
            return;
        }
        src.Pool.Span(src._slot - 1).CopyTo(Allocated());
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

    public ReadOnlySpan<byte> Contents => _slot == 0 ? new byte[(int)Kernel.PageSize] : Pool.Span(_slot - 1);
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

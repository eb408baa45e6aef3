namespace UffdGrpc.Mm;

/// <summary>
/// The machine's page frames by PFN (the model's mem_map). Frame numbers are handed out in
/// increasing order and never reused (a trace's <c>pageid</c> labels depend on that), so a
/// flat list indexed by PFN would keep an 8-byte slot for every allocation the machine ever
/// made: a long-lived machine that faults and frees pages would grow without bound (and a
/// 32-bit index would overflow after 2^31 allocations). Frames are kept in chunks of
/// <see cref="ChunkPages"/> slots instead, and a chunk is dropped when its last frame is
/// freed: the table holds at most one chunk per live frame, and usually far fewer.
/// </summary>
/// <remarks>Protected by the owning <see cref="Kernel"/>'s lock.</remarks>
internal sealed class FrameTable
{
    /// <summary>Slots per chunk: one PTE table's worth, so a THP folio fills exactly one chunk.</summary>
    public const int ChunkPages = Kernel.PtrsPerTable;

    private readonly Dictionary<ulong, FrameChunk> _chunks = [];
    // The chunk frames are being allocated in, and the last one looked up: most lookups hit one of them.
    private ulong _tailIndex = ulong.MaxValue;
    private FrameChunk? _tail;
    private ulong _lastIndex = ulong.MaxValue;
    private FrameChunk? _last;

    /// <summary>The next PFN <see cref="Add"/> hands out.</summary>
    public ulong NextPfn { get; private set; }

    public FrameTable(ulong firstPfn) => NextPfn = firstPfn;

    /// <summary>The frames' contents: a freed frame's slot goes back to it.</summary>
    public ContentPool Contents { get; } = new();

    /// <summary>Chunks currently held (for the memory figures and tests).</summary>
    public int ChunkCount => _chunks.Count;

    /// <summary>Leaves the slots up to the next multiple of <paramref name="alignment"/> empty (a naturally aligned THP).</summary>
    public void Align(ulong alignment) => NextPfn = (NextPfn + alignment - 1) / alignment * alignment;

    /// <summary>A new frame of <paramref name="kind"/> with the next PFN.</summary>
    public Page Add(PageKind kind)
    {
        var pfn = NextPfn++;
        var ci = pfn / ChunkPages;
        if (ci != _tailIndex)
        {
            if (!_chunks.TryGetValue(ci, out var c))
            {
                c = new FrameChunk(Contents);
                _chunks.Add(ci, c);
            }
            _tailIndex = ci;
            _tail = c;
        }
        var page = new Page(pfn, kind, _tail!);
        _tail!.Slots[pfn % ChunkPages] = page;
        _tail.Live++;
        return page;
    }

    /// <summary>The live frame <paramref name="pfn"/>, or null (never allocated, or freed).</summary>
    public Page? Get(ulong pfn)
    {
        var ci = pfn / ChunkPages;
        FrameChunk? c;
        if (ci == _tailIndex)
            c = _tail;
        else if (ci == _lastIndex)
            c = _last;
        else
        {
            if (!_chunks.TryGetValue(ci, out c))
                return null;
            _lastIndex = ci;
            _last = c;
        }
        return c!.Slots[pfn % ChunkPages];
    }

    /// <summary>Empties the slot of <paramref name="pfn"/> and frees its contents (the frame then reads as zeros); false when it was already empty.</summary>
    public bool Remove(ulong pfn)
    {
        var ci = pfn / ChunkPages;
        if (!_chunks.TryGetValue(ci, out var c) || c.Slots[pfn % ChunkPages] is not { } page)
            return false;
        page.ReleaseContents();
        c.Slots[pfn % ChunkPages] = null;
        if (--c.Live == 0)
        {
            _chunks.Remove(ci);
            if (ci == _tailIndex)
            {
                _tailIndex = ulong.MaxValue;
                _tail = null;
            }
            if (ci == _lastIndex)
            {
                _lastIndex = ulong.MaxValue;
                _last = null;
            }
        }
        return true;
    }

    /// <summary>Every live frame with the PFN of the slot that holds it, in PFN order.</summary>
    public IEnumerable<(ulong Pfn, Page Page)> Live()
    {
        foreach (var ci in _chunks.Keys.Order().ToArray())
        {
            var c = _chunks[ci];
            for (var i = 0; i < ChunkPages; i++)
            {
                if (c.Slots[i] is { } p)
                    yield return ((ci * ChunkPages) + (ulong)i, p);
            }
        }
    }
}

/// <summary>
/// <see cref="FrameTable.ChunkPages"/> consecutive frame slots (a section of mem_map) and,
/// per frame, what a <see cref="Page"/> does not hold itself: its contents slot (allocated
/// with the first contents in the chunk) and its side fields (with the first frame that has any).
/// </summary>
internal sealed class FrameChunk(ContentPool pool)
{
    public const int Pages = FrameTable.ChunkPages;
    public readonly Page?[] Slots = new Page?[Pages];
    public int Live;
    public readonly ContentPool Pool = pool;
    /// <summary>Per frame: its contents' slot in <see cref="Pool"/> plus one (0: none, the frame reads as zeros).</summary>
    public int[]? ContentSlots;
    /// <summary>Per frame: its <see cref="PageExtra"/>, if it carries one; dropped when none does.</summary>
    public PageExtra?[]? Extras;
    public int ExtraCount;
}

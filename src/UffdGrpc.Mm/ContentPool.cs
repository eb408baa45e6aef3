namespace UffdGrpc.Mm;

/// <summary>
/// The machine's physical memory for page contents: slabs of <see cref="SlabPages"/> 4 KiB
/// slots, so a resident page pays a slot index instead of an array of its own (whose header
/// alone would cost 24 bytes per page). A slab is dropped when its last slot is freed (but
/// the one slots are being handed out from), so a machine that faults and frees pages for
/// ever holds at most one slab per live page, plus one, and usually one per 16.
/// </summary>
/// <remarks>
/// Protected by the owning <see cref="Kernel"/>'s lock. Slabs are ordinary byte arrays
/// (64 KiB, below the large-object threshold, so the GC compacts them like any object);
/// pages address them by index, never by pointer.
/// </remarks>
internal sealed class ContentPool
{
    /// <summary>Slots per slab: one 16-bit occupancy mask each.</summary>
    public const int SlabPages = 16;
    private const int PageBytes = (int)Kernel.PageSize;
    private const int FullMask = (1 << SlabPages) - 1;

    private byte[]?[] _slabs = new byte[]?[4];
    /// <summary>Bit i: slot i of the slab is in use.</summary>
    private ushort[] _used = new ushort[4];
    /// <summary>The slab index is on <see cref="_partial"/>.</summary>
    private bool[] _queued = new bool[4];
    private int _indexes;
    /// <summary>Slabs with a free slot (or released, skipped when met), the last one handed out from first.</summary>
    private readonly Stack<int> _partial = new();
    /// <summary>Slab indexes whose slab was released and that no stack holds: reused before new ones.</summary>
    private readonly Stack<int> _freeIndexes = new();

    /// <summary>Slabs currently held (for the memory figures and tests).</summary>
    public int SlabCount { get; private set; }

    /// <summary>Slots in use.</summary>
    public long UsedSlots { get; private set; }

    /// <summary>A zeroed slot.</summary>
    public int Allocate()
    {
        while (_partial.TryPeek(out var top))
        {
            if (_slabs[top] is not null)
                break;
            // Released after it was queued: its index can be reused now that no stack holds it.
            _partial.Pop();
            _queued[top] = false;
            _freeIndexes.Push(top);
        }
        if (_partial.Count == 0)
            Queue(NewSlab());
        var s = _partial.Peek();
        var used = _used[s];
        var i = System.Numerics.BitOperations.TrailingZeroCount(~used & FullMask);
        used |= (ushort)(1 << i);
        _used[s] = used;
        if (used == FullMask)
        {
            _partial.Pop();
            _queued[s] = false;
        }
        UsedSlots++;
        return (s * SlabPages) + i;
    }

    /// <summary>Returns <paramref name="slot"/>, zeroing it for its next user; a slab left empty is released.</summary>
    public void Free(int slot)
    {
        var s = slot / SlabPages;
        var bit = (ushort)(1 << (slot % SlabPages));
        if ((_used[s] & bit) == 0)
            throw new InvalidOperationException($"content slot {slot} freed twice");
        Span(slot).Clear();
        _used[s] &= (ushort)~bit;
        UsedSlots--;
        if (!_queued[s])
            Queue(s);
        else if (_used[s] == 0 && _partial.Peek() != s)
        {
            // Empty and not the slab being handed out from: release it (its stack entry is skipped later).
            _slabs[s] = null;
            SlabCount--;
        }
    }

    public Span<byte> Span(int slot) => _slabs[slot / SlabPages].AsSpan((slot % SlabPages) * PageBytes, PageBytes);

    public ReadOnlyMemory<byte> Memory(int slot) => _slabs[slot / SlabPages].AsMemory((slot % SlabPages) * PageBytes, PageBytes);

    private void Queue(int s)
    {
        // The empty slab that was being handed out from no longer is: release it, so at most one empty slab is held.
        if (_partial.TryPeek(out var top) && _slabs[top] is not null && _used[top] == 0)
        {
            _slabs[top] = null;
            SlabCount--;
        }
        _partial.Push(s);
        _queued[s] = true;
    }

    private int NewSlab()
    {
        if (!_freeIndexes.TryPop(out var s))
        {
            if (_indexes == _slabs.Length)
            {
                Array.Resize(ref _slabs, _indexes * 2);
                Array.Resize(ref _used, _indexes * 2);
                Array.Resize(ref _queued, _indexes * 2);
            }
            s = _indexes++;
        }
        _slabs[s] = new byte[SlabPages * PageBytes];
        _used[s] = 0;
        SlabCount++;
        return s;
    }
}

namespace UffdGrpc.Mm;

/// <summary>
/// A file that can be mapped: a shmem (tmpfs/memfd) inode or a regular (ext4-like) file.
/// Its page cache maps page index to page; shmem pages reclaimed to swap live in
/// <see cref="Swapped"/>.
/// </summary>
/// <remarks>Protected by the owning <see cref="Kernel"/>'s lock.</remarks>
public sealed class MemFile
{
    internal MemFile(int id, string name, bool shmem, ulong size)
    {
        Id = id;
        Name = name;
        IsShmem = shmem;
        Size = size;
    }

    public int Id { get; }
    public string Name { get; }
    /// <summary>shmem (memfd, MAP_SHARED|MAP_ANONYMOUS) rather than a regular file.</summary>
    public bool IsShmem { get; }
    /// <summary>i_size in bytes.</summary>
    public ulong Size { get; internal set; }
    /// <summary>Contents of a regular file's blocks that were written back and evicted.</summary>
    internal readonly Dictionary<ulong, byte[]?> Disk = [];
    internal readonly Dictionary<ulong, Page> Cache = [];
    internal readonly Dictionary<ulong, SwapSlot> Swapped = [];

    /// <summary>file_ra_state of the open file (start, size, async_size), used by the 6.1 readahead path.</summary>
    internal ulong RaStart, RaSize, RaAsync;

    /// <summary>The shmem behind a MAP_SHARED|MAP_ANONYMOUS mapping (shmem_zero_setup): only its VMAs refer to it.</summary>
    public bool AnonymousShared { get; internal set; }

    public ulong SizePages => (Size + Kernel.PageSize - 1) / Kernel.PageSize;

    public Page? FindCachePage(ulong index) => Cache.GetValueOrDefault(index);

    /// <summary>
    /// What a read of page <paramref name="index"/> would find, without faulting: the page
    /// cache, then shmem's swap, then a regular file's written-back blocks — the lookup order
    /// of shmem_get_folio_gfp / filemap_fault. <paramref name="data"/> is empty for zeros; a
    /// page-cache page's contents stay valid while the machine's lock is held and the page is not written.
    /// </summary>
    public PageContentState PeekPage(ulong index, out ReadOnlyMemory<byte> data)
    {
        data = default;
        if (index >= SizePages)
            return PageContentState.BeyondEof;
        if (FindCachePage(index) is { } page)
        {
            data = page.Data;
            return PageContentState.PageCache;
        }
        if (Swapped.TryGetValue(index, out var swapped))
        {
            data = swapped.Data;
            return PageContentState.Swapped;
        }
        if (!IsShmem && Disk.TryGetValue(index, out var disk))
        {
            data = disk;
            return PageContentState.PageCache;
        }
        return PageContentState.NotPresent;
    }

    /// <summary>The page indexes that may hold data (cached, swapped or written back), in order.</summary>
    public IEnumerable<ulong> IndexesWithData() =>
        Cache.Keys.Concat(Swapped.Keys).Concat(IsShmem ? [] : Disk.Keys).Distinct().Order();
}

namespace UffdGrpc.Recipes.LazyRestore;

/// <summary>One run of pages still to restore: its run-time range (tracks remaps) and where it was at dump time (criu/uffd.c struct lazy_iov).</summary>
public readonly record struct LazyIov(ulong Start, ulong End, ulong ImgStart);

/// <summary>
/// A task's pages still to restore, sorted and non-overlapping, with the range arithmetic of
/// criu/uffd.c: drop_iovs (UNMAP, REMOVE, a completed copy), remap_iovs (REMAP: the run-time
/// range moves, the image address stays) and copy_iovs (a FORK child starts with its
/// parent's list).
/// </summary>
public sealed class LazyIovs
{
    private List<LazyIov> _iovs = [];

    public bool IsEmpty => _iovs.Count == 0;
    public long Pages => _iovs.Sum(i => (long)((i.End - i.Start) / 4096));
    public LazyIov? First => _iovs.Count == 0 ? null : _iovs[0];

    public void Add(ulong start, ulong end, ulong imgStart)
    {
        _iovs.Add(new LazyIov(start, end, imgStart));
        _iovs.Sort((a, b) => a.Start.CompareTo(b.Start));
    }

    /// <summary>find_iov.</summary>
    public LazyIov? Find(ulong addr)
    {
        foreach (var i in _iovs)
        {
            if (addr >= i.Start && addr < i.End)
                return i;
        }
        return null;
    }

    /// <summary>drop_iovs: [addr, addr+len) is no longer lazy.</summary>
    public void Drop(ulong addr, ulong len)
    {
        var end = addr + len;
        var next = new List<LazyIov>(_iovs.Count + 1);
        foreach (var i in _iovs)
        {
            if (end <= i.Start || addr >= i.End)
            {
                next.Add(i);
                continue;
            }
            if (i.Start < addr)
                next.Add(i with { End = addr });
            if (end < i.End)
                next.Add(new LazyIov(end, i.End, i.ImgStart + (end - i.Start)));
        }
        _iovs = next;
    }

    /// <summary>remap_iovs: the part of every run inside [from, from+len) moves to <paramref name="to"/>; its image address stays.</summary>
    public void Remap(ulong from, ulong to, ulong len)
    {
        var end = from + len;
        var next = new List<LazyIov>(_iovs.Count + 2);
        foreach (var i in _iovs)
        {
            if (end <= i.Start || from >= i.End)
            {
                next.Add(i);
                continue;
            }
            var s = Math.Max(i.Start, from);
            var e = Math.Min(i.End, end);
            if (i.Start < s)
                next.Add(i with { End = s });
            next.Add(new LazyIov(s - from + to, e - from + to, i.ImgStart + (s - i.Start)));
            if (e < i.End)
                next.Add(new LazyIov(e, i.End, i.ImgStart + (e - i.Start)));
        }
        next.Sort((a, b) => a.Start.CompareTo(b.Start));
        _iovs = next;
    }

    /// <summary>copy_iovs: a FORK child's list.</summary>
    public LazyIovs Clone() => new() { _iovs = [.. _iovs] };
}

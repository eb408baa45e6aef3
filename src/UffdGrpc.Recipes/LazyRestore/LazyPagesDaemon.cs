using System.Threading.Channels;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.LazyRestore;

/// <summary>Which lazy-pages daemon serves the restored tree.</summary>
public enum LazyDaemonKind
{
    /// <summary>criu/uffd.c: faults from the image, background push, FORK adopted, REMAP followed, UNMAP and REMOVE dropped, ESRCH retires the task.</summary>
    Criu,

    /// <summary>The deliberately wrong daemon: it reads REMAP and does nothing, so its lazy ranges stay at the old address (a fault at the new one finds no lazy page and gets a zero page; the push to the old one finds no VMA).</summary>
    IgnoresRemap,
}

/// <summary>What the daemon did.</summary>
public sealed class LazyDaemonStats
{
    public long Faults;
    public long FaultCopies;
    public long Zeropages;
    public long Pushes;
    public long PushedPages;
    public long Forks;
    public long Remaps;
    public long Unmaps;
    public long Removes;
    public long Retired;
    public long Eagain;
    /// <summary>The largest background chunk, bytes (criu grows it by 64 KiB per idle round up to 4 MiB).</summary>
    public long MaxChunk;

    /// <summary>Adds the figures to a recipe report.</summary>
    public void ReportTo(RoleReport r)
    {
        r.Add("faults-read", Faults);
        r.Add("fault-pages-copied", FaultCopies);
        r.Add("zeropages", Zeropages);
        r.Add("background-copies", Pushes);
        r.Add("background-pages-copied", PushedPages);
        r.Add("largest-background-chunk-bytes", MaxChunk);
        r.Add("fork-events", Forks);
        r.Add("remap-events", Remaps);
        r.Add("unmap-events", Unmaps);
        r.Add("remove-events", Removes);
        r.Add("tasks-retired-esrch", Retired);
        r.Add("eagain-retries", Eagain);
    }
}

/// <summary>One task's image: its pages that hold data, by dump-time address (shared with the children it forks).</summary>
public sealed class LazyImage(IReadOnlyDictionary<ulong, byte[]> pages)
{
    public IReadOnlyDictionary<ulong, byte[]> Pages { get; } = pages;

    public byte[] Read(ulong imgStart, ulong len)
    {
        var b = new byte[len];
        for (ulong off = 0; off < len; off += 4096)
            Pages[imgStart + off].CopyTo(b, (int)off);
        return b;
    }
}

/// <summary>
/// The lazy-pages daemon of a CRIU restore (criu/uffd.c): one <c>lazy_pages_info</c> per
/// task, each with the uffd the restorer handed over (registered MISSING with EVENT_FORK |
/// REMAP | UNMAP | REMOVE) and the runs of pages still to restore. Messages come first
/// (handle_uffd_event); when none is waiting and the restore is finished, the first task
/// with pages left gets a background chunk (xfer_pages), whose size starts at 64 KiB, grows
/// by 64 KiB per idle round up to 4 MiB, and drops back to 64 KiB at each fault
/// (update_xfer_len). A task with nothing left is done: its uffd is closed. The daemon ends
/// when every task is done.
/// </summary>
public sealed class LazyPagesDaemon(UffdClient client, LazyDaemonKind kind = LazyDaemonKind.Criu) : IDisposable
{
    public const ulong DefaultXferLen = 64 << 10;
    public const ulong MaxXferLen = 4 << 20;

    private readonly List<LazyTask> _lpis = [];
    private readonly Channel<LazyTask> _ready = Channel.CreateUnbounded<LazyTask>();
    private readonly CancellationTokenSource _stop = new();

    public LazyDaemonStats Stats { get; } = new();

    public void Dispose()
    {
        _stop.Dispose();
        foreach (var t in _lpis)
            t.Drained.Dispose();
    }

    private sealed class LazyTask(string name, long uffdId, LazyIovs iovs, LazyImage image)
    {
        public string Name { get; } = name;
        public long UffdId { get; } = uffdId;
        public LazyIovs Iovs { get; } = iovs;
        public LazyImage Image { get; } = image;
        public ulong XferLen { get; set; } = DefaultXferLen;
        public bool Exited { get; set; }
        public Task? Watch { get; set; }
        /// <summary>Released by the daemon once it has read the uffd empty (the edge its epoll waits for next).</summary>
        public SemaphoreSlim Drained { get; } = new(0, 1);
    }

    /// <summary>ud_open: a task's uffd and its lazy runs (every page of the image, split at VMA ends).</summary>
    public void AddTask(string name, long uffdId, LazyImage image, IEnumerable<(ulong Start, ulong End)> vmas)
    {
        var iovs = new LazyIovs();
        foreach (var (start, end) in vmas)
        {
            ulong? run = null;
            for (var a = start; a <= end; a += 4096)
            {
                var lazy = a < end && image.Pages.ContainsKey(a);
                if (lazy)
                    run ??= a;
                else if (run is { } s)
                {
                    iovs.Add(s, a, s);
                    run = null;
                }
            }
        }
        Adopt(new LazyTask(name, uffdId, iovs, image));
    }

    private void Adopt(LazyTask t)
    {
        _lpis.Add(t);
        t.Watch = WatchAsync(t);
    }

    /// <summary>
    /// The daemon's epoll on one uffd: poll(2) sleeps until a message is queued, then the task
    /// is reported ready and the watch waits until the daemon has read it empty. Messages are
    /// read (read(2)) only when the daemon handles them, never ahead: a FORK must be handled
    /// at the moment it is read, because the child's lazy runs are the parent's runs at that
    /// moment (a page pushed to the parent between the read and the handling would be missing
    /// from both the child's memory and its runs).
    /// </summary>
    private async Task WatchAsync(LazyTask t)
    {
        try
        {
            while (!_stop.IsCancellationRequested && !t.Exited)
            {
                var p = await client.PollAsync(t.UffdId, -1, _stop.Token).ConfigureAwait(false);
                if (p.Released || p.Pollerr)
                    return;
                if (!p.Pollin)
                    continue;
                _ready.Writer.TryWrite(t);
                await t.Drained.WaitAsync(_stop.Token).ConfigureAwait(false);
            }
        }
        catch (Exception) when (_stop.IsCancellationRequested || t.Exited)
        {
            // The daemon stopped or the task is done.
        }
    }

    /// <summary>Reads the task's uffd until EAGAIN, handling each message as it is read (handle_uffd_event).</summary>
    private async Task DrainAsync(LazyTask t, CancellationToken ct)
    {
        try
        {
            while (!t.Exited)
            {
                var (_, m) = await client.ReadMessageAsync(t.UffdId, ct).ConfigureAwait(false);
                if (m is null)
                    break;
                await HandleAsync(t, m, ct).ConfigureAwait(false);
            }
        }
        finally
        {
            t.Drained.Release();
        }
    }

    /// <summary>
    /// handle_requests: serves until every task is done. Background pushes start once
    /// <paramref name="restoreFinished"/> completes (the restorer's "restore finished").
    /// </summary>
    public async Task RunAsync(Task restoreFinished, CancellationToken ct)
    {
        try
        {
            while (_lpis.Count > 0)
            {
                while (_ready.Reader.TryRead(out var ready))
                    await DrainAsync(ready, ct).ConfigureAwait(false);
                if (restoreFinished.IsCompleted && await IdleRoundAsync(ct).ConfigureAwait(false))
                    continue;
                if (_lpis.Count == 0)
                    break;
                // Nothing to push (or not yet allowed to): sleep until a message or the restore finishes.
                var wait = _ready.Reader.WaitToReadAsync(ct).AsTask();
                await Task.WhenAny(wait, restoreFinished.IsCompleted ? wait : restoreFinished).ConfigureAwait(false);
                if (wait.IsCompleted)
                    await wait.ConfigureAwait(false);
            }
        }
        finally
        {
            await _stop.CancelAsync().ConfigureAwait(false);
        }
    }

    /// <summary>One pass over the tasks: the first with pages left gets a chunk; tasks with nothing left are closed. False when nothing was pushed.</summary>
    private async Task<bool> IdleRoundAsync(CancellationToken ct)
    {
        foreach (var t in _lpis.ToList())
        {
            if (!t.Iovs.IsEmpty)
            {
                await XferPagesAsync(t, ct).ConfigureAwait(false);
                return true;
            }
            _lpis.Remove(t);
            if (!t.Exited)
            {
                // Done: the task is fully restored and its uffd closed (messages still queued for it are moot).
                t.Exited = true;
                (await client.CloseUffdAsync(t.UffdId, ct).ConfigureAwait(false)).Expect("close of a finished task's uffd");
            }
        }
        return false;
    }

    private async Task HandleAsync(LazyTask t, UffdMsg m, CancellationToken ct)
    {
        if (t.Exited)
            return;
        switch (m.Event)
        {
            case UffdEvent.Pagefault:
                await HandlePageFaultAsync(t, m.Pagefault, ct).ConfigureAwait(false);
                break;
            case UffdEvent.Remove:
                await HandleRemoveAsync(t, m.Remove, remove: true, ct).ConfigureAwait(false);
                break;
            case UffdEvent.Unmap:
                await HandleRemoveAsync(t, m.Unmap, remove: false, ct).ConfigureAwait(false);
                break;
            case UffdEvent.Remap:
                Stats.Remaps++;
                if (kind != LazyDaemonKind.IgnoresRemap)
                    t.Iovs.Remap(m.Remap.From, m.Remap.To, m.Remap.Len);
                break;
            case UffdEvent.Fork:
                // handle_fork + complete_forks: the child starts with the parent's runs and image.
                Stats.Forks++;
                Adopt(new LazyTask(t.Name + "'", m.Fork.UffdId, t.Iovs.Clone(), t.Image));
                break;
        }
    }

    /// <summary>handle_page_fault: a page not in the lazy runs is a zero page; otherwise the page is copied from the image and the push shrinks back to 64 KiB.</summary>
    private async Task HandlePageFaultAsync(LazyTask t, Pagefault pf, CancellationToken ct)
    {
        Stats.Faults++;
        var page = pf.Address & ~4095UL;
        if (t.Iovs.Find(page) is not { } iov)
        {
            var z = await client.ZeropageAsync(t.UffdId, page, 4096, ct: ct).ConfigureAwait(false);
            if (await CheckOpErrorAsync(t, z.Errno, ct).ConfigureAwait(false) && z.Errno.IsOk())
                Stats.Zeropages++;
            return;
        }
        t.XferLen = DefaultXferLen;
        var done = await CopyAsync(t, page, iov.ImgStart + (page - iov.Start), 4096, ct).ConfigureAwait(false);
        Stats.FaultCopies += done / 4096;
    }

    /// <summary>xfer_pages: the next chunk of the first run, at most xfer_len; xfer_len then grows by 64 KiB (at most 4 MiB).</summary>
    private async Task XferPagesAsync(LazyTask t, CancellationToken ct)
    {
        var iov = t.Iovs.First!.Value;
        var len = Math.Min(iov.End - iov.Start, t.XferLen);
        t.XferLen = Math.Min(t.XferLen + DefaultXferLen, MaxXferLen);
        Stats.Pushes++;
        Stats.MaxChunk = Math.Max(Stats.MaxChunk, (long)len);
        Stats.PushedPages += await CopyAsync(t, iov.Start, iov.ImgStart, len, ct).ConfigureAwait(false) / 4096;
    }

    /// <summary>uffd_copy + uffd_io_complete: the pages copied leave the runs. Returns the bytes copied.</summary>
    private async Task<long> CopyAsync(LazyTask t, ulong dst, ulong imgStart, ulong len, CancellationToken ct)
    {
        var r = await client.CopyAsync(t.UffdId, dst, t.Image.Read(imgStart, len), ct: ct).ConfigureAwait(false);
        if (!await CheckOpErrorAsync(t, r.Errno, ct).ConfigureAwait(false))
            return 0;
        var done = r.Errno.IsOk() ? (long)len : Math.Max(r.Field ?? 0, 0);
        if (done > 0)
            t.Iovs.Drop(dst, (ulong)done);
        else if (r.Errno is Errno.Eexist)
            t.Iovs.Drop(dst, 4096); // the first page is already there
        else if (r.Errno is Errno.Enoent)
            t.Iovs.Drop(dst, len); // no VMA there any more: nothing to restore
        else if (r.Errno is Errno.Eagain)
            Stats.Eagain++; // an event is queued unread: it comes first, then the runs are retried
        return done;
    }

    /// <summary>uffd_check_op_error: ESRCH (or ENOSPC) means the task exited: retire it. False when the task was retired.</summary>
    private async Task<bool> CheckOpErrorAsync(LazyTask t, Errno e, CancellationToken ct)
    {
        if (e is Errno.Esrch or Errno.Enospc)
        {
            await HandleExitAsync(t, ct).ConfigureAwait(false);
            return false;
        }
        if (e is not (Errno.Unspecified or Errno.Eagain or Errno.Enoent or Errno.Eexist))
            throw new UffdErrnoException(e, $"lazy restore of {t.Name}");
        return true;
    }

    /// <summary>handle_exit: the task is gone; its runs are dropped and its uffd closed.</summary>
    private async Task HandleExitAsync(LazyTask t, CancellationToken ct)
    {
        Stats.Retired++;
        t.Exited = true;
        t.Iovs.Drop(0, ulong.MaxValue);
        await client.CloseUffdAsync(t.UffdId, ct).ConfigureAwait(false);
    }

    /// <summary>handle_remove: REMOVE leaves the VMA registered, so the range is unregistered (ENOMEM: the task exited); UNMAP has no VMA left. Either way the range is no longer lazy.</summary>
    private async Task HandleRemoveAsync(LazyTask t, RangeEvent r, bool remove, CancellationToken ct)
    {
        if (remove)
        {
            Stats.Removes++;
            var e = await client.UnregisterAsync(t.UffdId, r.Start, r.End - r.Start, ct).ConfigureAwait(false);
            if (e is Errno.Enomem)
            {
                await HandleExitAsync(t, ct).ConfigureAwait(false);
                return;
            }
            e.Expect("UFFDIO_UNREGISTER of a removed range");
        }
        else
        {
            Stats.Unmaps++;
        }
        t.Iovs.Drop(r.Start, r.End - r.Start);
    }
}

using System.Threading.Channels;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.SnapshotRestore;

/// <summary>Which snapshot-restore handler serves the guest.</summary>
public enum SnapshotHandlerKind
{
    /// <summary>Firecracker's handler after #4990/#5021: drain every queued message, apply the REMOVE events, then serve the faults (COPY from the snapshot, ZEROPAGE for removed pages).</summary>
    Firecracker,

    /// <summary>The same, but known-zero and removed ranges are unregistered so the kernel fills them itself (e2b-dev/infra#2974).</summary>
    Unregister,

    /// <summary>The deliberately wrong handler: messages in the order read, so a PAGEFAULT read before the REMOVE for its range (the kernel hands out faults first) is served from the snapshot.</summary>
    InOrder,
}

/// <summary>What a snapshot handler did.</summary>
public sealed class SnapshotHandlerStats
{
    public long Faults;
    public long Removes;
    public long Copies;
    public long Zeropages;
    public long Wakes;
    public long Unregisters;
    public long RoundTrips;
    public long Eagain;
    public long BytesCopied;
    /// <summary>Faults needing no resolution: their range was unregistered (which woke them) before they were served.</summary>
    public long LeftToKernel;

    /// <summary>Adds the figures to a recipe report, each name prefixed with <paramref name="prefix"/>.</summary>
    public void ReportTo(RoleReport r, string prefix = "")
    {
        r.Add(prefix + "faults-read", Faults);
        r.Add(prefix + "remove-events", Removes);
        r.Add(prefix + "pages-copied", Copies);
        r.Add(prefix + "bytes-copied", BytesCopied);
        r.Add(prefix + "zeropages", Zeropages);
        r.Add(prefix + "wakes", Wakes);
        r.Add(prefix + "unregisters", Unregisters);
        r.Add(prefix + "round-trips", RoundTrips);
        r.Add(prefix + "eagain-retries", Eagain);
        r.Add(prefix + "faults-left-to-kernel", LeftToKernel);
    }
}

/// <summary>
/// The handler role of a Firecracker snapshot restore: the guest's memory is one anonymous
/// region registered MISSING with UFFD_FEATURE_EVENT_REMOVE; each fault is answered with
/// UFFDIO_COPY of the page at the same offset of the snapshot memfd, or UFFDIO_ZEROPAGE when
/// a balloon released the page since (MADV_DONTNEED raised UFFD_EVENT_REMOVE). The handler
/// holds the snapshot as its mapping of the memfd would (read once through the mapping: the
/// memfd is sealed, so its bytes never change).
/// </summary>
public sealed class SnapshotHandler(UffdClient client, long uffdId, ulong guestBase, ReadOnlyMemory<byte> snapshot, SnapshotHandlerKind kind)
{
    private const ulong Page = 4096;
    private readonly HashSet<ulong> _removed = [];
    private readonly HashSet<ulong> _unregistered = [];

    public SnapshotHandlerStats Stats { get; } = new();

    private ulong GuestEnd => guestBase + (ulong)snapshot.Length;

    /// <summary>Serves the uffd until <paramref name="ct"/> is cancelled or the uffd is closed.</summary>
    public async Task RunAsync(CancellationToken ct)
    {
        if (kind == SnapshotHandlerKind.Unregister)
        {
            foreach (var (start, len) in ZeroRuns())
                await UnregisterAsync(start, len, ct).ConfigureAwait(false);
        }
        await using var session = await client.ServeAsync(uffdId, 1024, ct).ConfigureAwait(false);
        // Faults read and not yet resolved, with the answer the in-order handler chose when it read them.
        var pending = new List<(ulong Page, bool? Zero)>();
        try
        {
            await foreach (var first in session.Messages.ReadAllAsync(ct).ConfigureAwait(false))
            {
                var batch = first;
                do
                {
                    await TakeAsync(batch, pending, ct).ConfigureAwait(false);
                }
                while (session.Messages.TryRead(out batch));
                await ServeAsync(session, pending, ct).ConfigureAwait(false);
            }
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            // The restore is over.
        }
        catch (ChannelClosedException) when (ct.IsCancellationRequested)
        {
        }
    }

    /// <summary>Reads one batch: the correct handlers apply every event first (drain before serve); the in-order one decides each fault as it meets it.</summary>
    private async Task TakeAsync(IReadOnlyList<UffdMsg> batch, List<(ulong Page, bool? Zero)> pending, CancellationToken ct)
    {
        if (kind != SnapshotHandlerKind.InOrder)
        {
            foreach (var m in batch)
            {
                if (m.Remove is { } r)
                    await RemoveAsync(r, ct).ConfigureAwait(false);
            }
        }
        foreach (var m in batch)
        {
            if (m.Pagefault is { } pf)
            {
                Stats.Faults++;
                var page = pf.Address & ~(Page - 1);
                pending.Add((page, kind == SnapshotHandlerKind.InOrder ? _removed.Contains(page) : null));
            }
            else if (m.Remove is { } r && kind == SnapshotHandlerKind.InOrder)
            {
                await RemoveAsync(r, ct).ConfigureAwait(false);
            }
        }
    }

    private async Task RemoveAsync(RangeEvent r, CancellationToken ct)
    {
        Stats.Removes++;
        for (var p = r.Start; p < r.End; p += Page)
            _removed.Add(p);
        if (kind == SnapshotHandlerKind.Unregister)
            await UnregisterAsync(r.Start, r.End - r.Start, ct).ConfigureAwait(false);
    }

    /// <summary>UFFDIO_UNREGISTER: the range leaves the handler (faults there are the kernel's) and its MISSING waiters wake.</summary>
    private async Task UnregisterAsync(ulong start, ulong len, CancellationToken ct)
    {
        (await client.UnregisterAsync(uffdId, start, len, ct).ConfigureAwait(false)).Expect("UFFDIO_UNREGISTER");
        Stats.Unregisters++;
        for (var p = start; p < start + len; p += Page)
            _unregistered.Add(p);
    }

    /// <summary>One request of resolutions for every pending fault; EAGAIN (an event is queued unread) keeps the fault for after the next drain.</summary>
    private async Task ServeAsync(ServeSession session, List<(ulong Page, bool? Zero)> pending, CancellationToken ct)
    {
        var batch = new List<Resolution>();
        var asked = new List<(ulong Page, bool? Zero)>();
        foreach (var f in pending)
        {
            if (_unregistered.Contains(f.Page))
            {
                Stats.LeftToKernel++;
                continue;
            }
            var zero = f.Zero ?? _removed.Contains(f.Page);
            batch.Add(zero ? ServeSession.Zeropage(f.Page) : ServeSession.Copy(f.Page, snapshot.Span.Slice((int)(f.Page - guestBase), (int)Page)));
            asked.Add(f);
        }
        pending.Clear();
        if (batch.Count == 0)
            return;
        Stats.RoundTrips++;
        var results = await session.ResolveAsync(batch, ct).ConfigureAwait(false);
        var wakes = new List<Resolution>();
        for (var i = 0; i < results.Count; i++)
        {
            var (page, _) = asked[i];
            var zero = batch[i].UffdioZeropage is not null;
            switch (results[i].Errno)
            {
                case Errno.Unspecified:
                    if (zero)
                        Stats.Zeropages++;
                    else
                    {
                        Stats.Copies++;
                        Stats.BytesCopied += (long)Page;
                    }
                    break;
                case Errno.Eagain:
                    Stats.Eagain++;
                    pending.Add(asked[i]);
                    break;
                case Errno.Eexist:
                    // Another fault on the page was served first: the fill woke nobody.
                    wakes.Add(ServeSession.Wake(page));
                    break;
                case Errno.Enoent:
                    break;
                default:
                    throw new UffdErrnoException(results[i].Errno, $"resolving the fault at 0x{page:x}");
            }
        }
        if (wakes.Count > 0)
        {
            Stats.RoundTrips++;
            Stats.Wakes += wakes.Count;
            await session.ResolveAsync(wakes, ct).ConfigureAwait(false);
        }
    }

    /// <summary>Runs of all-zero pages in the snapshot, as guest ranges.</summary>
    public IEnumerable<(ulong Start, ulong Len)> ZeroRuns()
    {
        ulong? start = null;
        for (var at = guestBase; at <= GuestEnd; at += Page)
        {
            var zero = at < GuestEnd && !snapshot.Span.Slice((int)(at - guestBase), (int)Page).ContainsAnyExcept((byte)0);
            if (zero)
                start ??= at;
            else if (start is { } s)
            {
                yield return (s, at - s);
                start = null;
            }
        }
    }
}

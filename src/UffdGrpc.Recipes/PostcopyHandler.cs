using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>
/// The destination side of postcopy: a precopy pass reads every source page into a cache;
/// from switch-over on, one loop serves the uffd's page faults first and pushes the next
/// unsent page when none is waiting (QEMU's postcopy_ram_fault_thread and the source's
/// background send). Each page is sent once: a page asked for is marked sent.
/// <para>The correct handler checks a cached page against the source's page digest before
/// using it (the digest-checked page read) and reads the page again when it changed; a page
/// of zeros goes in with UFFDIO_ZEROPAGE, any other with UFFDIO_COPY.</para>
/// </summary>
internal sealed class PostcopyHandler(RoleContext ctx)
{
    private readonly UffdClient _c = ctx.Client;
    private readonly ulong _base = ctx.U64("base");
    private readonly int _pages = (int)ctx.Id("pages");
    private readonly long _src = ctx.Id("src");
    private byte[]?[] _cache = [];
    private bool[] _sent = [];
    private long _srcThread;

    public async Task RunAsync(CancellationToken ct)
    {
        _sent = new bool[_pages];
        _srcThread = (await _c.CreateThreadAsync(_src, ct).ConfigureAwait(false)).ThreadId;
        await ctx.WaitAsync("precopy", ct).ConfigureAwait(false);
        // Precopy: the bulk stage reads every page while the source still runs.
        _cache = new byte[]?[_pages];
        for (var p = 0; p < _pages; p++)
            _cache[p] = await ReadSourceAsync(p, ct).ConfigureAwait(false);
        ctx.Report.Add("precopy-pages", _pages);
        await ctx.SignalAsync("precopy-done").ConfigureAwait(false);
        await ctx.WaitAsync("switchover", ct).ConfigureAwait(false);

        await using var session = await _c.ServeAsync(ctx.Id("uffd"), ct: ct).ConfigureAwait(false);
        var guestDone = ctx.WaitAsync("guest-done", ct);
        var next = 0;
        // The push's bandwidth (QEMU's max-postcopy-bandwidth), in pages per second: --set push-rate=N (0: unlimited).
        var rate = double.Parse(ctx.Options.Setting("push-rate", "200"), System.Globalization.CultureInfo.InvariantCulture);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var pushed = 0;
        // Until the guest ended and every page was sent (the migration completes).
        while (!guestDone.IsCompleted || next < _pages)
        {
            if (session.Messages.TryRead(out var batch))
            {
                await ServeAsync(session, batch, ct).ConfigureAwait(false);
                continue;
            }
            while (next < _pages && _sent[next])
                next++;
            var due = rate > 0 ? TimeSpan.FromSeconds(pushed / rate) - clock.Elapsed : TimeSpan.Zero;
            if (next < _pages && due > TimeSpan.Zero)
            {
                // The push is ahead of its bandwidth: wait for it, or for a fault.
                await Task.WhenAny(session.Messages.WaitToReadAsync(ct).AsTask(), Task.Delay(due, ct)).ConfigureAwait(false);
                continue;
            }
            if (next < _pages)
            {
                // The background push: the next page nobody asked for.
                pushed++;
                _sent[next] = true;
                ctx.Report.Add("pushed");
                await ResolveAsync(session, [await PlaceAsync(next, ct).ConfigureAwait(false)], ct).ConfigureAwait(false);
                continue;
            }
            // Everything sent: wait for a fault or the end of the guest.
            var more = session.Messages.WaitToReadAsync(ct).AsTask();
            if (await Task.WhenAny(more, guestDone).ConfigureAwait(false) == guestDone || !await more.ConfigureAwait(false))
                break;
        }
    }

    private async Task ServeAsync(ServeSession session, IReadOnlyList<UffdMsg> batch, CancellationToken ct)
    {
        var res = new List<Resolution>();
        foreach (var m in batch)
        {
            if (m.Pagefault is not { } pf)
                continue;
            ctx.Report.Add("faults");
            var page = (int)(((pf.Address & ~0xfffUL) - _base) / PageCheck.PageSize);
            if (ctx.WrongHandler == "wake-without-copy")
            {
                // WRONG: the page counts as sent, but nothing was placed.
                _sent[page] = true;
                res.Add(ServeSession.Wake(_base + ((ulong)page * PageCheck.PageSize)));
                continue;
            }
            if (_sent[page])
            {
                // Already placed (by the push, after this fault was raised, which woke it) or in this batch.
                ctx.Report.Add("faults-on-sent-pages");
                continue;
            }
            _sent[page] = true;
            res.Add(await PlaceAsync(page, ct).ConfigureAwait(false));
        }
        await ResolveAsync(session, res, ct).ConfigureAwait(false);
    }

    private async Task ResolveAsync(ServeSession session, List<Resolution> res, CancellationToken ct)
    {
        if (res.Count == 0)
            return;
        ctx.Report.Add("round-trips");
        var results = await session.ResolveAsync(res, ct).ConfigureAwait(false);
        var wakes = new List<Resolution>();
        for (var i = 0; i < results.Count; i++)
        {
            var r = results[i];
            var op = res[i];
            if (r.Errno == Errno.Eexist)
            {
                // Placed meanwhile: wake whoever waits on it, as QEMU does on EEXIST.
                ctx.Report.Add("eexist");
                wakes.Add(ServeSession.Wake(op.UffdioCopy?.Dst ?? op.UffdioZeropage.Start));
            }
            else if (r.Errno != Errno.Unspecified)
            {
                throw new UffdErrnoException(r.Errno, "postcopy placement");
            }
            else if (op.UffdioCopy is { } cp)
            {
                ctx.Report.Add("pages-copied");
                ctx.Report.Add("bytes-copied", (long)cp.Len);
            }
            else if (op.UffdioZeropage is not null)
            {
                ctx.Report.Add("pages-zeroed");
            }
            else
            {
                ctx.Report.Add("wakes");
            }
        }
        if (wakes.Count > 0)
        {
            ctx.Report.Add("round-trips");
            await session.ResolveAsync(wakes, ct).ConfigureAwait(false);
        }
    }

    // The page's placement: from the cache when the source's digest still matches it (the
    // stale-page handler skips that check), else read from the source again.
    private async Task<Resolution> PlaceAsync(int page, CancellationToken ct)
    {
        var addr = _base + ((ulong)page * PageCheck.PageSize);
        var bytes = _cache[page];
        if (ctx.WrongHandler != "stale-page")
        {
            var d = await _c.DigestAsync(_src, addr, 1, ct).ConfigureAwait(false);
            ctx.Report.Add("digest-checks");
            if (bytes is null || !PageCheck.Sha(bytes).AsSpan().SequenceEqual(d[0].Sha256.Span))
            {
                bytes = await ReadSourceAsync(page, ct).ConfigureAwait(false);
                ctx.Report.Add("pages-reread");
            }
        }
        bytes ??= await ReadSourceAsync(page, ct).ConfigureAwait(false);
        return bytes.AsSpan().ContainsAnyExcept((byte)0) ? ServeSession.Copy(addr, bytes) : ServeSession.Zeropage(addr);
    }

    // A read of the page on a thread of the source process (the source's migration thread).
    private async Task<byte[]> ReadSourceAsync(int page, CancellationToken ct)
    {
        var r = await _c.ReadBytesAsync(_srcThread, _base + ((ulong)page * PageCheck.PageSize), PageCheck.PageSize, ct: ct).ConfigureAwait(false);
        if (r.Signal != SignalCode.Unspecified || r.Errno != Errno.Unspecified)
            throw new InvalidOperationException($"reading source page {page}: {r.Signal} {r.Errno.Name()}");
        ctx.Report.Add("bytes-read-from-source", (long)PageCheck.PageSize);
        return r.Values.ToByteArray();
    }
}

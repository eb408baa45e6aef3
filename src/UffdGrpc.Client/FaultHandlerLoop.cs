using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>
/// A remote userfaultfd handler on the batched <c>Serve</c> stream: the batches of messages
/// the server read for it since its last request become one request of resolutions, built
/// by a callback per page fault (default: un-protect a WP fault, zero-fill a missing one,
/// continue a minor one).
/// </summary>
/// <example>
/// <code>
/// var loop = new FaultHandlerLoop(client, uffdId)
/// {
///     OnPagefault = pf => ServeSession.Copy(pf.Address &amp; ~0xfffUL, pageBytes),
/// };
/// await loop.RunAsync(ct);
/// </code>
/// </example>
public sealed class FaultHandlerLoop(UffdClient client, long uffdId)
{
    /// <summary>The resolution of one page fault (null: leave it blocked).</summary>
    public Func<Pagefault, Resolution?>? OnPagefault { get; init; }

    /// <summary>Sees every message (events included) before it is handled.</summary>
    public Action<UffdMsg>? OnMessage { get; init; }

    /// <summary>Sees every resolution's result (an EEXIST from a racing fill, say).</summary>
    public Action<ResolutionResult>? OnResult { get; init; }

    /// <summary>Most messages per batch the server sends (0: its default, 64).</summary>
    public uint MaxMessages { get; init; }

    /// <summary>The most resolutions sent in one request (batches already received are merged up to this).</summary>
    public const int MaxResolutions = 1024;

    /// <summary>Page faults resolved so far.</summary>
    public long Handled => Interlocked.Read(ref _handled);

    private long _handled;

    /// <summary>Serves the uffd until <paramref name="ct"/> is cancelled or the uffd is closed.</summary>
    public async Task RunAsync(CancellationToken ct)
    {
        await using var session = await client.ServeAsync(uffdId, MaxMessages, ct).ConfigureAwait(false);
        var batch = new List<Resolution>();
        await foreach (var first in session.Messages.ReadAllAsync(ct).ConfigureAwait(false))
        {
            batch.Clear();
            // Every batch that arrived while the last request was out joins this one: the
            // server sends messages as they are queued, so without this a busy stream
            // settles at one fault per request (each resolution wakes one thread, whose
            // next fault is sent alone) and one round trip per fault.
            var msgs = first;
            do
            {
                foreach (var msg in msgs)
                {
                    OnMessage?.Invoke(msg);
                    if (msg.Pagefault is { } pf && (OnPagefault ?? Default)(pf) is { } r)
                        batch.Add(r);
                }
            }
            while (batch.Count < MaxResolutions && session.Messages.TryRead(out msgs));
            if (batch.Count == 0)
                continue;
            foreach (var res in await session.ResolveAsync(batch, ct).ConfigureAwait(false))
                OnResult?.Invoke(res);
            Interlocked.Add(ref _handled, batch.Count);
        }
    }

    /// <summary>Un-protect a WP fault, CONTINUE a minor fault, zero-fill a missing one.</summary>
    public static Resolution Default(Pagefault pf)
    {
        var page = pf.Address & ~0xfffUL;
        if (pf.Wp)
            return ServeSession.Unprotect(page);
        if (pf.Minor)
            return new Resolution { UffdioContinue = new UffdioContinueRequest { Start = page, Len = 4096 } };
        return ServeSession.Zeropage(page);
    }
}

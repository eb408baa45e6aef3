using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>
/// A remote userfaultfd handler: reads a uffd's messages from the event stream and resolves
/// each page fault with a callback (UFFDIO_COPY, UFFDIO_WRITEPROTECT, UFFDIO_WAKE...).
/// </summary>
/// <example>
/// <code>
/// var loop = new FaultHandlerLoop(client, uffdId)
/// {
///     OnPagefault = (pf, ct) => client.WriteprotectAsync(uffdId, pf.Address &amp; ~0xfffUL, 4096, 0, ct),
/// };
/// await loop.RunAsync(ct);
/// </code>
/// </example>
public sealed class FaultHandlerLoop(UffdClient client, long uffdId)
{
    /// <summary>Resolves one page fault. Default: un-protect a WP fault, zero-fill a missing one.</summary>
    public Func<Pagefault, CancellationToken, Task>? OnPagefault { get; init; }

    /// <summary>Sees every message (events included) before it is handled.</summary>
    public Action<UffdMsg>? OnMessage { get; init; }

    /// <summary>Page faults handled so far.</summary>
    public long Handled => Interlocked.Read(ref _handled);

    private long _handled;

    /// <summary>Serves the uffd until <paramref name="ct"/> is cancelled or the uffd is closed.</summary>
    public async Task RunAsync(CancellationToken ct)
    {
        await foreach (var msg in client.ReadEventsAsync(uffdId, ct).ConfigureAwait(false))
        {
            OnMessage?.Invoke(msg);
            if (msg.Pagefault is not { } pf)
                continue;
            await (OnPagefault ?? DefaultAsync)(pf, ct).ConfigureAwait(false);
            Interlocked.Increment(ref _handled);
        }
    }

    private async Task DefaultAsync(Pagefault pf, CancellationToken ct)
    {
        var page = pf.Address & ~0xfffUL;
        if (pf.Wp)
            await client.WriteprotectAsync(uffdId, page, 4096, 0, ct).ConfigureAwait(false);
        else
            await client.ZeropageAsync(uffdId, page, 4096, 0, ct).ConfigureAwait(false);
    }
}

using Grpc.Core;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>How a guest picks the page of each access.</summary>
public enum AccessPattern
{
    /// <summary>Page after page, wrapping.</summary>
    Sequential,
    /// <summary>Uniformly random pages.</summary>
    Uniform,
    /// <summary>90 % of accesses to the first 10 % of the range (a 90/10 hot set).</summary>
    HotSet,
}

/// <summary>What a guest runs: its threads, accesses and bound.</summary>
public sealed record GuestPlan(long MmId, ulong Start, int Pages)
{
    public int Threads { get; init; } = 1;
    /// <summary>Accesses per thread.</summary>
    public int Ops { get; init; } = 64;
    public double WriteRatio { get; init; } = 0.5;
    public AccessPattern Pattern { get; init; } = AccessPattern.Uniform;
    public ulong Seed { get; init; } = 1;
    /// <summary>The generation of the first write of each page (later writes of it count up).</summary>
    public int FirstGeneration { get; init; } = 1;
    /// <summary>An access still incomplete after this long ends the run as stalled.</summary>
    public TimeSpan Stall { get; init; } = TimeSpan.FromSeconds(2);
    /// <summary>Only these pages are written (null: any); reads go anywhere.</summary>
    public IReadOnlyList<int>? WritablePages { get; init; }
    /// <summary>Seeded interleaving: each access waits for its turn (null: free-running).</summary>
    public SeededInterleaver? Gate { get; init; }
    /// <summary>The guest stops early once this is cancelled (the source is stopped at switch-over).</summary>
    public CancellationToken Stop { get; init; }
}

/// <summary>One completed guest write; <c>Order</c> is the interleaver's turn when the guest runs under one (comparable with the other actors' turns), else the order the guest's calls returned.</summary>
public readonly record struct GuestWrite(int Page, int Generation, int Thread, long Order);

/// <summary>What a guest did: accesses done of those planned, a stall (null: none), its writes, and (server-side guests) its blocktime.</summary>
public sealed record GuestRun(long Planned, long Done, string? Stalled, IReadOnlyList<GuestWrite> Writes)
{
    /// <summary>The guest's blocktime with QEMU's overlap rule (-1: not measured).</summary>
    public long BlocktimeNs { get; init; } = -1;

    /// <summary>Userfaults the guest's threads slept in (-1: not counted).</summary>
    public long Userfaults { get; init; } = -1;
}

/// <summary>
/// The guest of a recipe: simulated threads accessing an address space. One interface so
/// the recipes do not care whether the guest is driven from the client, access by access
/// (<see cref="ThreadGuest"/>), or runs server-side.
/// </summary>
public interface IGuest
{
    Task<GuestRun> RunAsync(GuestPlan plan, CancellationToken ct);
}

/// <summary>
/// A guest driven from the client: each access is one Access RPC on a simulated thread,
/// whole-page writes in the workload page layout (<see cref="WorkloadPages"/>: address and
/// generation, so a checker tells stale from fresh) and whole-page reads. It can run under a
/// <see cref="SeededInterleaver"/>, which a server-side workload cannot.
/// </summary>
public sealed class ThreadGuest(UffdClient client) : IGuest
{
    public async Task<GuestRun> RunAsync(GuestPlan plan, CancellationToken ct)
    {
        var writes = new List<GuestWrite>();
        var gens = new int[plan.Pages];
        long done = 0;
        string? stalled = null;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct, plan.Stop);
        var order = 0L;
        async Task ThreadAsync(int t)
        {
            var tid = (await client.CreateThreadAsync(plan.MmId, ct).ConfigureAwait(false)).ThreadId;
            var rng = new Random(unchecked((int)(plan.Seed * 7919) + t));
            var actor = $"guest{t}";
            plan.Gate?.Join(actor);
            try
            {
                for (var k = 0; k < plan.Ops && !stop.IsCancellationRequested; k++)
                {
                    var write = rng.NextDouble() < plan.WriteRatio;
                    var page = write ? Own(plan, Pick(plan, rng, k, write), t) : Pick(plan, rng, k, write);
                    var turn = -1L;
                    if (plan.Gate is { } g)
                    {
                        try
                        {
                            turn = await g.StepAsync(actor, stop.Token).ConfigureAwait(false);
                        }
                        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
                        {
                            break;
                        }
                    }
                    if (stop.IsCancellationRequested)
                        break;
                    var addr = plan.Start + ((ulong)page * PageCheck.PageSize);
                    int gen;
                    lock (gens)
                        gen = write ? plan.FirstGeneration + gens[page]++ : 0;
                    using var bound = CancellationTokenSource.CreateLinkedTokenSource(ct);
                    bound.CancelAfter(plan.Stall);
                    try
                    {
                        var op = write
                            ? new AccessOp { Addr = addr, Write = true, Span = new ByteSpan { Data = Google.Protobuf.ByteString.CopyFrom(WorkloadPages.Expected(addr, (ulong)gen)) } }
                            : new AccessOp { Addr = addr, Span = new ByteSpan { Length = PageCheck.PageSize } };
                        var r = await client.AccessAsync(tid, op, bound.Token).ConfigureAwait(false);
                        if (r.Signal != SignalCode.Unspecified || r.Errno != Errno.Unspecified)
                            throw new InvalidOperationException($"guest thread {t}: {(write ? "write" : "read")} of page {page}: {r.Signal} {r.Errno.Name()}");
                    }
                    catch (Exception e) when (bound.IsCancellationRequested && !ct.IsCancellationRequested && e is OperationCanceledException or RpcException)
                    {
                        lock (writes)
                            stalled ??= $"guest thread {t}: its {(write ? "write" : "read")} of page {page} (op {k + 1} of {plan.Ops}) did not complete within {plan.Stall.TotalMilliseconds:0} ms";
                        await stop.CancelAsync().ConfigureAwait(false);
                        return;
                    }
                    lock (writes)
                    {
                        done++;
                        if (write)
                            writes.Add(new GuestWrite(page, gen, t, turn >= 0 ? turn : order++));
                    }
                }
            }
            finally
            {
                plan.Gate?.Leave(actor);
            }
        }
        await Task.WhenAll(Enumerable.Range(0, plan.Threads).Select(ThreadAsync)).ConfigureAwait(false);
        return new GuestRun((long)plan.Threads * plan.Ops, done, stalled, writes);
    }

    private static int Pick(GuestPlan plan, Random rng, int k, bool write)
    {
        if (write && plan.WritablePages is { Count: > 0 } w)
            return w[plan.Pattern == AccessPattern.Sequential ? k % w.Count : Skewed(plan.Pattern, rng, w.Count)];
        return plan.Pattern == AccessPattern.Sequential ? k % plan.Pages : Skewed(plan.Pattern, rng, plan.Pages);
    }

    // With several threads, thread t writes only pages p with p % threads == t, so the last
    // write of every page is known without a server-side record.
    private static int Own(GuestPlan plan, int page, int t)
    {
        if (plan.Threads == 1)
            return page;
        var p = page - (page % plan.Threads) + t;
        return p < plan.Pages ? p : p - plan.Threads;
    }

    private static int Skewed(AccessPattern p, Random rng, int n)
    {
        if (p == AccessPattern.HotSet && n >= 10)
        {
            var hot = Math.Max(1, n / 10);
            return rng.NextDouble() < 0.9 ? rng.Next(hot) : hot + rng.Next(n - hot);
        }
        return rng.Next(n);
    }
}

/// <summary>
/// A seeded interleaving of the calls of several actors in one process: each actor asks for
/// its turn before each call; once every actor still running waits, the seed picks which
/// one goes, so the same seed gives the same order of calls on the server.
/// </summary>
public sealed class SeededInterleaver(ulong seed)
{
    private readonly Random _rng = new(unchecked((int)seed ^ (int)(seed >> 32)));
    private readonly Lock _lock = new();
    private readonly HashSet<string> _live = new(StringComparer.Ordinal);
    private readonly SortedDictionary<string, TaskCompletionSource<long>> _waiting = new(StringComparer.Ordinal);

    /// <summary>Adds an actor (before its first step).</summary>
    public void Join(string actor)
    {
        lock (_lock)
            _live.Add(actor);
    }

    /// <summary>Removes an actor (it makes no more calls).</summary>
    public void Leave(string actor)
    {
        lock (_lock)
        {
            _live.Remove(actor);
            _waiting.Remove(actor);
            Pick();
        }
    }

    /// <summary>Turns handed out so far.</summary>
    public long Turns
    {
        get
        {
            lock (_lock)
                return _turn;
        }
    }

    private long _turn;

    /// <summary>Waits for <paramref name="actor"/>'s turn to make one call; returns the turn's number (the order of calls across actors).</summary>
    public Task<long> StepAsync(string actor, CancellationToken ct)
    {
        var tcs = new TaskCompletionSource<long>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_lock)
        {
            _waiting[actor] = tcs;
            Pick();
        }
        return tcs.Task.WaitAsync(ct);
    }

    // Runs under _lock: once every live actor waits, one of them (by the seed) goes.
    private void Pick()
    {
        if (_waiting.Count == 0 || _waiting.Count < _live.Count)
            return;
        var i = _rng.Next(_waiting.Count);
        var (actor, tcs) = _waiting.ElementAt(i);
        _waiting.Remove(actor);
        tcs.SetResult(++_turn);
    }
}

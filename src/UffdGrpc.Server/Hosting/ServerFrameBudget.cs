using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The server's memory budget across machines (<c>Limits:ServerMemoryBytes</c>): each
/// machine's frames are charged here as well as against its own size, and a machine whose
/// next frames would pass the budget behaves as if out of memory (reclaim, then its OOM
/// killer), so no request can make the server itself run out of memory. Called under each
/// machine's lock; thread-safe and lock-free.
/// </summary>
public sealed class ServerFrameBudget(long maxPages) : Model.IFrameBudget
{
    private readonly ConcurrentDictionary<Model.Kernel, StrongBox<long>> _perMachine = new();
    private long _total;

    public long MaxPages { get; } = maxPages;
    public long ChargedPages => Interlocked.Read(ref _total);

    private StrongBox<long> Of(Model.Kernel m) => _perMachine.GetOrAdd(m, _ => new StrongBox<long>());

    public bool TryCharge(Model.Kernel machine, long pages)
    {
        while (true)
        {
            var t = Interlocked.Read(ref _total);
            if (t + pages > MaxPages)
                return false;
            if (Interlocked.CompareExchange(ref _total, t + pages, t) == t)
                break;
        }
        Interlocked.Add(ref Of(machine).Value, pages);
        return true;
    }

    public void ForceCharge(Model.Kernel machine, long pages)
    {
        Interlocked.Add(ref _total, pages);
        Interlocked.Add(ref Of(machine).Value, pages);
    }

    public void Uncharge(Model.Kernel machine, long pages)
    {
        Interlocked.Add(ref _total, -pages);
        Interlocked.Add(ref Of(machine).Value, -pages);
    }

    /// <summary>A destroyed machine gives back whatever it still held (its files' page cache, say).</summary>
    public void Release(Model.Kernel machine)
    {
        if (_perMachine.TryRemove(machine, out var held))
            Interlocked.Add(ref _total, -Interlocked.Read(ref held.Value));
    }
}

using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>
/// Blocktime, as QEMU's postcopy-blocktime counts it (migration/postcopy-ram.c,
/// mark_postcopy_blocktime_begin/end): each thread's time asleep in userfaults, and a
/// process's (a guest's) time during which all of its live threads were asleep in userfaults
/// at once (the overlap counts once). An observation only: nothing in the model depends on
/// it. Time of <see cref="Clock"/>; protected by <see cref="Lock"/>.
/// </summary>
public sealed partial class Kernel
{
    /// <summary>
    /// The clock of the observations (blocktime, the userfault stamps), in
    /// <see cref="Stopwatch"/> ticks: the real one, or a test's model time.
    /// </summary>
    public Func<long> Clock { get; set; } = Stopwatch.GetTimestamp;

    internal long Now => Clock();

    /// <summary>A thread goes to sleep in a userfault (handle_userfault).</summary>
    internal static void BlocktimeBegin(SimThread t)
    {
        var now = t.Kernel.Now;
        t.BlockedSince = now;
        t.Userfaults++;
        var mm = t.Mm;
        mm.UserfaultSleepers++;
        BlocktimeCheckAll(mm, now);
        if (t.Group is { } g)
        {
            g.Sleepers++;
            g.CheckAll(now);
        }
    }

    /// <summary>A thread's sleep in a userfault ends (woken, signalled, killed, its uffd closed).</summary>
    internal static void BlocktimeEnd(SimThread t)
    {
        if (t.BlockedSince == 0)
            return;
        var now = t.Kernel.Now;
        t.BlocktimeTicks += now - t.BlockedSince;
        t.BlockedSince = 0;
        var mm = t.Mm;
        mm.UserfaultSleepers--;
        BlocktimeEndAll(mm, now);
        if (t.Group is { } g)
        {
            g.Sleepers--;
            g.EndAll(now);
        }
    }

    /// <summary>The number of live threads of <paramref name="mm"/> changed: the all-asleep interval may start or end.</summary>
    internal static void BlocktimeThreadsChanged(Mm mm)
    {
        var now = mm.Kernel.Now;
        BlocktimeEndAll(mm, now);
        BlocktimeCheckAll(mm, now);
    }

    private static void BlocktimeCheckAll(Mm mm, long now)
    {
        if (mm.AllBlockedSince == 0 && mm.UserfaultSleepers > 0 && mm.UserfaultSleepers == mm.LiveThreads)
            mm.AllBlockedSince = now;
    }

    private static void BlocktimeEndAll(Mm mm, long now)
    {
        if (mm.AllBlockedSince == 0)
            return;
        mm.BlocktimeTicks += now - mm.AllBlockedSince;
        mm.AllBlockedSince = 0;
    }
}

public sealed partial class Mm
{
    internal int UserfaultSleepers;
    /// <summary>Threads of <see cref="Threads"/> that have not exited (kept by CreateThread and SimThread.Exit; the invariant checker recounts it), so a fault's all-asleep check is O(1).</summary>
    internal int LiveThreads;
    internal long AllBlockedSince;
    internal long BlocktimeTicks;

    /// <summary>The process's blocktime: time during which all its live threads were asleep in userfaults at once (an interval still open counts up to now).</summary>
    public TimeSpan Blocktime
    {
        get
        {
            using var _ = Kernel.Enter();
            var ticks = BlocktimeTicks + (AllBlockedSince == 0 ? 0 : Kernel.Now - AllBlockedSince);
            return TimeSpan.FromSeconds(ticks / (double)Stopwatch.Frequency);
        }
    }
}

/// <summary>
/// A set of threads whose blocktime is counted together with QEMU's overlap rule, as QEMU
/// counts its vCPU threads and no others (postcopy_blocktime_ctx->smp_cpus_down against
/// smp_cpus): the time during which all of its live threads were asleep in userfaults at
/// once. A guest workload's threads form one. Protected by <see cref="Kernel.Lock"/>.
/// </summary>
public sealed class BlocktimeGroup(Kernel kernel)
{
    internal int Live;
    internal int Sleepers;
    private long _allBlockedSince;
    private long _ticks;

    /// <summary>Time during which all live threads of the group were asleep in userfaults at once (an interval still open counts up to now).</summary>
    public TimeSpan Blocktime
    {
        get
        {
            using var _ = kernel.Enter();
            var ticks = _ticks + (_allBlockedSince == 0 ? 0 : kernel.Now - _allBlockedSince);
            return TimeSpan.FromSeconds(ticks / (double)Stopwatch.Frequency);
        }
    }

    internal void CheckAll(long now)
    {
        if (_allBlockedSince == 0 && Sleepers > 0 && Sleepers == Live)
            _allBlockedSince = now;
    }

    internal void EndAll(long now)
    {
        if (_allBlockedSince == 0)
            return;
        _ticks += now - _allBlockedSince;
        _allBlockedSince = 0;
    }

    /// <summary>A thread of the group exited: the all-asleep interval may start or end.</summary>
    internal void ThreadExited()
    {
        var now = kernel.Now;
        Live--;
        EndAll(now);
        CheckAll(now);
    }
}

public sealed partial class SimThread
{
    internal long BlockedSince;
    internal long BlocktimeTicks;

    /// <summary>The blocktime group the thread belongs to (a guest workload's threads), if any.</summary>
    public BlocktimeGroup? Group { get; internal set; }

    /// <summary>Userfaults the thread has slept in (each sleep counts once).</summary>
    public long Userfaults { get; internal set; }

    /// <summary>The thread's blocktime: its time asleep in userfaults (a sleep still going on counts up to now).</summary>
    public TimeSpan Blocktime
    {
        get
        {
            using var _ = Mm.Kernel.Enter();
            var ticks = BlocktimeTicks + (BlockedSince == 0 ? 0 : Mm.Kernel.Now - BlockedSince);
            return TimeSpan.FromSeconds(ticks / (double)Stopwatch.Frequency);
        }
    }
}

using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>
/// Blocktime, as QEMU's postcopy-blocktime counts it (migration/postcopy-ram.c,
/// mark_postcopy_blocktime_begin/end): each thread's time asleep in userfaults, and a
/// process's (a guest's) time during which all of its live threads were asleep in userfaults
/// at once (the overlap counts once). An observation only: nothing in the model depends on
/// it. Stopwatch time; protected by <see cref="Lock"/>.
/// </summary>
public sealed partial class Kernel
{
    /// <summary>A thread goes to sleep in a userfault (handle_userfault).</summary>
    internal static void BlocktimeBegin(SimThread t)
    {
        var now = Stopwatch.GetTimestamp();
        t.BlockedSince = now;
        var mm = t.Mm;
        mm.UserfaultSleepers++;
        BlocktimeCheckAll(mm, now);
    }

    /// <summary>A thread's sleep in a userfault ends (woken, signalled, killed, its uffd closed).</summary>
    internal static void BlocktimeEnd(SimThread t)
    {
        if (t.BlockedSince == 0)
            return;
        var now = Stopwatch.GetTimestamp();
        t.BlocktimeTicks += now - t.BlockedSince;
        t.BlockedSince = 0;
        var mm = t.Mm;
        mm.UserfaultSleepers--;
        BlocktimeEndAll(mm, now);
    }

    /// <summary>The number of live threads of <paramref name="mm"/> changed: the all-asleep interval may start or end.</summary>
    internal static void BlocktimeThreadsChanged(Mm mm)
    {
        var now = Stopwatch.GetTimestamp();
        BlocktimeEndAll(mm, now);
        BlocktimeCheckAll(mm, now);
    }

    private static void BlocktimeCheckAll(Mm mm, long now)
    {
        if (mm.AllBlockedSince == 0 && mm.UserfaultSleepers > 0 && mm.UserfaultSleepers == mm.Threads.Count(x => x.State != ThreadState.Exited))
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
    internal long AllBlockedSince;
    internal long BlocktimeTicks;

    /// <summary>The process's blocktime: time during which all its live threads were asleep in userfaults at once (an interval still open counts up to now).</summary>
    public TimeSpan Blocktime
    {
        get
        {
            using var _ = Kernel.Enter();
            var ticks = BlocktimeTicks + (AllBlockedSince == 0 ? 0 : Stopwatch.GetTimestamp() - AllBlockedSince);
            return TimeSpan.FromSeconds(ticks / (double)Stopwatch.Frequency);
        }
    }
}

public sealed partial class SimThread
{
    internal long BlockedSince;
    internal long BlocktimeTicks;

    /// <summary>The thread's blocktime: its time asleep in userfaults (a sleep still going on counts up to now).</summary>
    public TimeSpan Blocktime
    {
        get
        {
            using var _ = Mm.Kernel.Enter();
            var ticks = BlocktimeTicks + (BlockedSince == 0 ? 0 : Stopwatch.GetTimestamp() - BlockedSince);
            return TimeSpan.FromSeconds(ticks / (double)Stopwatch.Frequency);
        }
    }
}

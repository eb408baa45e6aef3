using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>
/// Seeded scheduling (deterministic simulation): when several simulated threads are
/// runnable at once, the order they run in, and the points at which one yields to another
/// (each page of a multi-page access or populate), come from the machine's schedule seed.
/// The same seed and the same sequence of calls give the same interleaving, events and
/// final state. Without a seed (the default) runnable threads run in wake order and an
/// operation runs to completion or to its next sleep.
/// </summary>
/// <remarks>Protected by <see cref="Lock"/>.</remarks>
public sealed partial class Kernel
{
    private ulong _schedState;
    private readonly List<SimThread> _preempted = [];

    /// <summary>The schedule seed, or null for the default order.</summary>
    public ulong? ScheduleSeed { get; private set; }

    /// <summary>
    /// With a seed, whether a yielded operation stays preempted across calls: it continues,
    /// a seeded number of pages at a time, at the start of later model steps (so a guest's
    /// writes interleave with a handler's calls), or when <see cref="RunPreempted"/> runs.
    /// Without it, yields only interleave the threads runnable within one call.
    /// </summary>
    public bool Preempt { get; private set; }

    /// <summary>Sets (or with null clears) the schedule seed.</summary>
    public void SetSchedule(ulong? seed, bool preempt = false)
    {
        using var _ = Enter();
        ScheduleSeed = seed;
        Preempt = seed is not null && preempt;
        _schedState = seed ?? 0;
    }

    /// <summary>SplitMix64 over the schedule seed.</summary>
    private ulong SchedNext() => SplitMix64.Next(ref _schedState);

    private int SchedBelow(int n) => n <= 1 ? 0 : (int)(SchedNext() % (ulong)n);

    /// <summary>
    /// A preemption point of <paramref name="t"/>'s operation (after a page of a multi-page
    /// access): with a seed, a coin decides whether it yields here. True: the operation
    /// returns false from its step and continues later from where it stopped.
    /// </summary>
    internal bool SchedYield(SimThread t)
    {
        if (ScheduleSeed is null || (SchedNext() & 1) == 0)
            return false;
        Debug.Assert(Monitor.IsEntered(Lock));
        if (Preempt)
            _preempted.Add(t);
        else
            MakeRunnableYielded(t);
        return true;
    }

    /// <summary>A thread that yielded is runnable again (it goes behind the others).</summary>
    private void MakeRunnableYielded(SimThread t)
    {
        if (t.Queued)
            return;
        t.Queued = true;
        _runnable.Enqueue(t);
    }

    /// <summary>The next runnable thread: the oldest, or with a seed one picked by it.</summary>
    private SimThread NextRunnable()
    {
        if (ScheduleSeed is not null)
        {
            for (var k = SchedBelow(_runnable.Count); k > 0; k--)
                _runnable.Enqueue(_runnable.Dequeue());
        }
        return _runnable.Dequeue();
    }

    /// <summary>At the start of a model step, preempted operations run a seeded number of chunks.</summary>
    private void RunSomePreempted()
    {
        if (_preempted.Count == 0)
            return;
        for (var n = SchedBelow(_preempted.Count + 2); n > 0 && _preempted.Count > 0; n--)
        {
            var i = SchedBelow(_preempted.Count);
            var t = _preempted[i];
            _preempted.RemoveAt(i);
            t.RunOp();
        }
    }

    /// <summary>Operations preempted and not yet continued.</summary>
    public int PreemptedCount
    {
        get
        {
            using var _ = Enter();
            return _preempted.Count;
        }
    }

    /// <summary>Runs every preempted operation to completion or to its next sleep (the rest of a workload, at its end).</summary>
    public void RunPreempted()
    {
        using var _ = Enter();
        while (_preempted.Count > 0)
        {
            var i = SchedBelow(_preempted.Count);
            var t = _preempted[i];
            _preempted.RemoveAt(i);
            t.RunOp();
        }
    }
}

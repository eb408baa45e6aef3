using System.Diagnostics;
using UffdGrpc.Contracts.V1;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>One thread of a guest workload and its progress (protected by the kernel lock).</summary>
internal sealed class WorkloadThread(ThreadEntry entry, int index)
{
    public ThreadEntry Entry { get; } = entry;
    public int Index { get; } = index;
    public ulong Ops;
    public ulong Reads;
    public ulong Writes;
    public Model.SigCode Signal;
}

/// <summary>
/// A guest workload (uffd.v1.WorkloadService): its threads run as async loops on the thread
/// pool, each making one <see cref="Model.GuestAccessOp"/> at a time through the model, as
/// the Access RPC does; a thread asleep in a userfault awaits its operation's completion (no
/// polling), pacing waits on timers. Progress, the write record and the state are protected
/// by the kernel lock.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "A CancellationTokenSource without a timer holds nothing to release; deferred cancels may run after the workload ended, so it is never disposed.")]
public sealed class WorkloadEntry : Entry
{
    private readonly CancellationTokenSource _cancel = new();
    private readonly List<WorkloadWrite> _writes = [];
    private readonly int _maxWrites;
    private long _startedAt;
    private long _endedAt;

    internal WorkloadEntry(long id, MachineHost host, MmEntry mm, Model.GuestWorkloadSpec spec, WorkloadSpec wire, int maxWrites)
        : base(id, host)
    {
        Mm = mm;
        Spec = spec;
        Wire = wire;
        _maxWrites = maxWrites;
        Group = new Model.BlocktimeGroup(host.Kernel);
    }

    public MmEntry Mm { get; }
    public Model.GuestWorkloadSpec Spec { get; }
    /// <summary>The spec as it was asked for.</summary>
    public WorkloadSpec Wire { get; }
    public Model.BlocktimeGroup Group { get; }
    internal List<WorkloadThread> Threads { get; } = [];
    /// <summary>The workload's threads, in index order.</summary>
    public IReadOnlyList<ThreadEntry> ThreadEntries => [.. Threads.Select(t => t.Entry)];
    public WorkloadState State { get; private set; } = WorkloadState.Running;
    public string EndReason { get; private set; } = "";
    /// <summary>Writes made past the record's capacity.</summary>
    public bool Truncated { get; private set; }
    public ulong Recorded => (ulong)_writes.Count;
    /// <summary>Completes (without the lock held) once the workload has ended.</summary>
    public TaskCompletionSource Ended { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _stopRequested;
    private string? _abortReason;

    /// <summary>Starts the thread loops (after the threads were created under the lock).</summary>
    internal void Run()
    {
        _startedAt = Stopwatch.GetTimestamp();
        var plan = new Model.GuestWorkloadPlan(Spec);
        Task[] loops;
        // The loops are not part of the call that started them (its activity, its caller).
        using (ExecutionContext.SuppressFlow())
            loops = [.. Threads.Select(t => Task.Run(() => ThreadLoopAsync(t, plan.Stream(t.Index))))];
        _ = Task.WhenAll(loops).ContinueWith(_ => Finish(), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
    }

    private async Task ThreadLoopAsync(WorkloadThread wt, Model.GuestAccessStream stream)
    {
        var token = _cancel.Token;
        var buffer = new byte[Model.Kernel.PageSize];
        var t = wt.Entry.Thread;
        var ops = Spec.OpsOfThread(wt.Index);
        var duration = Spec.Duration > TimeSpan.Zero ? (long)(Spec.Duration.TotalSeconds * Stopwatch.Frequency) : long.MaxValue;
        try
        {
            for (ulong n = 0; n < ops && !token.IsCancellationRequested; n++)
            {
                var now = Stopwatch.GetTimestamp();
                if (now - _startedAt >= duration)
                    break;
                var due = Spec.DueTicks(n);
                if (due > 0)
                {
                    var ahead = _startedAt + due - now;
                    if (ahead > Stopwatch.Frequency / 1000)
                        await Task.Delay(TimeSpan.FromSeconds(ahead / (double)Stopwatch.Frequency), token).ConfigureAwait(false);
                }
                else if ((n & 255) == 255)
                {
                    // Unpaced: let other calls on the pool in now and then.
                    await Task.Yield();
                }
                var (address, kind) = stream.Next();
                var op = new Model.GuestAccessOp(address, kind, buffer);
                var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                op.Completed = o => OnCompleted(wt, (Model.GuestAccessOp)o, done);
                if (!Host.Run(() => StartOn(t, op)))
                    return;
                if (!op.IsCompleted)
                    await done.Task.WaitAsync(token).ConfigureAwait(false);
                if (op.Aborted)
                    return;
                if (op.Signal != Model.SigCode.None)
                    break;
            }
            // Its accesses done, the thread exits (the process lives on).
            Host.Run(() => Host.Kernel.ExitThread(t));
        }
        catch (OperationCanceledException) when (token.IsCancellationRequested)
        {
            // Stopped, or the machine or the server ended.
        }
        catch (Grpc.Core.RpcException ex)
        {
            // The machine broke under a model error (Run marked it): the workload ends with it.
            Host.Kernel.Locked(() => _abortReason ??= ex.Status.Detail);
        }
    }

    /// <summary>Starts <paramref name="op"/> unless the thread or the machine has ended. Caller holds the kernel lock.</summary>
    private bool StartOn(Model.SimThread t, Model.GuestAccessOp op)
    {
        if (Host.Destroyed || _stopRequested || t.State == Model.ThreadState.Exited || t.Op is not null)
            return false;
        Host.Kernel.Start(t, op);
        return true;
    }

    /// <summary>An access ended (under the kernel lock): count it, record a write.</summary>
    private void OnCompleted(WorkloadThread wt, Model.GuestAccessOp op, TaskCompletionSource done)
    {
        if (!op.Aborted && op.Signal == Model.SigCode.None)
        {
            wt.Ops++;
            if (op.Kind == Model.GuestAccessKind.Read)
            {
                wt.Reads++;
            }
            else
            {
                wt.Writes++;
                if (_writes.Count < _maxWrites)
                    _writes.Add(new WorkloadWrite { Page = op.Address, Generation = op.Generation, Seq = op.Seq, ThreadId = wt.Entry.Id });
                else
                    Truncated = true;
            }
        }
        else if (op.Signal != Model.SigCode.None)
        {
            wt.Signal = op.Signal;
        }
        Host.Kernel.DeferUntilUnlocked(() => done.TrySetResult());
    }

    /// <summary>
    /// StopWorkload: no more accesses; each thread exits (one asleep in a userfault leaves it,
    /// its unread message withdrawn). Caller holds the kernel lock.
    /// </summary>
    internal void Stop()
    {
        if (State != WorkloadState.Running || _stopRequested)
            return;
        _stopRequested = true;
        foreach (var t in Threads)
            Host.Kernel.ExitThread(t.Entry.Thread);
        Host.Kernel.DeferUntilUnlocked(_cancel.Cancel);
    }

    /// <summary>The machine is destroyed, broken or the server stops: the loops end at once. Caller holds the kernel lock.</summary>
    internal void EndWithMachine(string reason)
    {
        if (State != WorkloadState.Running)
            return;
        _abortReason ??= reason;
        Host.Kernel.DeferUntilUnlocked(_cancel.Cancel);
    }

    private void Finish()
    {
        Host.LockedEvenIfBroken(() =>
        {
            _endedAt = Stopwatch.GetTimestamp();
            var failed = Threads.FirstOrDefault(t => t.Signal != Model.SigCode.None);
            (State, EndReason) = _stopRequested ? (WorkloadState.Stopped, "stopped by StopWorkload")
                : _abortReason is not null ? (WorkloadState.Aborted, _abortReason)
                : Mm.Mm.Exited ? (WorkloadState.Aborted, $"process {Mm.Id} exited")
                : failed is not null ? (WorkloadState.Failed, $"thread {failed.Entry.Id}: {failed.Signal}")
                : (WorkloadState.Finished, Spec.OpCount > 0 && Threads.All(t => t.Ops == Spec.OpsOfThread(t.Index)) ? "op_count reached" : "duration reached");
            foreach (var t in Threads)
                t.Entry.WorkloadId = 0;
        });
        Ended.TrySetResult();
    }

    /// <summary>The workload as the API reports it. Caller holds the kernel lock.</summary>
    internal WorkloadInfo Info(Func<Model.SimThread, Contracts.V1.ThreadState> stateOf)
    {
        var end = State == WorkloadState.Running ? Stopwatch.GetTimestamp() : _endedAt;
        var info = new WorkloadInfo
        {
            WorkloadId = Id,
            MachineId = Host.Id,
            MmId = Mm.Id,
            Spec = Wire,
            State = State,
            EndReason = EndReason,
            BlocktimeNs = Group.Blocktime.Ticks * 100,
            ElapsedNs = _startedAt == 0 ? 0 : (long)(Stopwatch.GetElapsedTime(_startedAt, end).Ticks * 100),
            WritesRecorded = Recorded,
            WritesTruncated = Truncated,
        };
        foreach (var t in Threads)
        {
            var th = t.Entry.Thread;
            info.Threads.Add(new Contracts.V1.WorkloadThread
            {
                ThreadId = t.Entry.Id,
                Tid = th.Tid,
                State = stateOf(th),
                Ops = t.Ops,
                Reads = t.Reads,
                Writes = t.Writes,
                Userfaults = (ulong)th.Userfaults,
                BlocktimeNs = th.Blocktime.Ticks * 100,
                Signal = Mapping.ProtoMapping.ToProto(t.Signal),
            });
            info.Ops += t.Ops;
            info.Reads += t.Reads;
            info.Writes += t.Writes;
            info.Userfaults += (ulong)th.Userfaults;
        }
        return info;
    }

    /// <summary>Writes [from, from + max) of the record. Caller holds the kernel lock.</summary>
    internal List<WorkloadWrite> WritesFrom(ulong from, int max) =>
        from >= (ulong)_writes.Count ? [] : _writes.GetRange((int)from, (int)Math.Min((ulong)max, (ulong)_writes.Count - from));
}

using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// One simulated machine served over the API: its <see cref="Kernel"/>, the ids of its
/// objects, the operations in flight and the log of completed ones.
/// </summary>
/// <remarks>
/// Lock order: <see cref="Model.Kernel.Lock"/> is the machine's lock; the only lock taken
/// while holding it is the grantee set's own (a leaf: nothing is taken under it), and the
/// registry's id map is lock-free. The id maps, the pending
/// operations, the completion log and every uffd's wait queue (<see cref="UffdEntry"/>) are
/// protected by it, because the model fills them from callbacks that run under it
/// (completions, <see cref="Model.UserfaultfdCtx.FdWqhWake"/>). Waiters never sleep under
/// it: they take their wait-queue task under the lock and await it after releasing it, so a
/// wake that happens in between completes the task they are about to await.
/// </remarks>
public sealed class MachineHost(long id, Model.Kernel kernel, string owner)
{
    private readonly HashSet<string> _grantees = [];

    public long Id { get; } = id;
    public Model.Kernel Kernel { get; } = kernel;
    /// <summary>The principal that created the machine: it alone grants, revokes and destroys.</summary>
    public string Owner { get; } = owner;

    /// <summary>Principals the owner granted access to (a snapshot).</summary>
    public IReadOnlyList<string> Grantees
    {
        get
        {
            lock (_grantees)
                return [.. _grantees.Order(StringComparer.Ordinal)];
        }
    }

    /// <summary>Whether <paramref name="principal"/> may see and use the machine (null: an in-process caller, which sees all).</summary>
    public bool VisibleTo(string? principal)
    {
        if (principal is null || principal == Owner)
            return true;
        lock (_grantees)
            return _grantees.Contains(principal);
    }

    internal void Grant(string principal)
    {
        lock (_grantees)
            _grantees.Add(principal);
    }

    internal void Revoke(string principal)
    {
        lock (_grantees)
            _grantees.Remove(principal);
    }
    public bool Destroyed { get; internal set; }
    /// <summary>Why the machine's state can no longer be trusted (null while it can).</summary>
    public string? Broken { get; private set; }

    /// <summary>The hung-userfault watchdog (null when Watchdog:UserfaultSeconds is 0).</summary>
    internal UserfaultWatchdog? Watchdog { get; set; }

    /// <summary>The session journal (null unless the machine was created with settings.journal).</summary>
    internal MachineJournal? Journal { get; init; }

    /// <summary>Wakes injection-log watchers at each firing and when the machine ends.</summary>
    internal Pulse InjectionPulse { get; } = Pulse.On(kernel);

    /// <summary>The model object → id maps (fork children and FORK uffds get ids when they appear).</summary>
    internal Dictionary<Model.Mm, long> MmIds { get; } = [];
    internal Dictionary<Model.SimThread, long> ThreadIds { get; } = [];
    internal Dictionary<Model.UserfaultfdCtx, long> UffdIds { get; } = [];
    internal Dictionary<Model.MemFile, long> FileIds { get; } = [];
    internal List<UffdEntry> Uffds { get; } = [];
    /// <summary>Entries registered since the registry last forgot retired ones (<see cref="MachineRegistry"/>). Caller holds the kernel lock.</summary>
    internal int RegisteredSinceSweep { get; set; }
    /// <summary>Operations started and not yet completed (their callers may be waiting).</summary>
    internal HashSet<OpEntry> PendingOps { get; } = [];
    /// <summary>Threads of the machine that have not exited. Caller holds the kernel lock.</summary>
    internal int LiveThreads => Kernel.Mms.Sum(m => m.Threads.Count(t => t.State != Model.ThreadState.Exited));

    /// <summary>The machine's guest workloads, running and ended, in start order (protected by the kernel lock).</summary>
    internal List<WorkloadEntry> Workloads { get; } = [];

    /// <summary>Results of operations started with StartOp, in completion order.</summary>
    internal List<ThreadOpResult> CompletionLog { get; } = [];

    /// <summary>The status of a call on a machine that is gone, broken or shutting down; null while it serves.</summary>
    internal RpcException? Unusable(bool shuttingDown)
    {
        if (Destroyed)
            return new RpcException(new Status(StatusCode.Unavailable, $"machine {Id} was destroyed"));
        if (Broken is not null)
            return RequestErrors.Precondition("MACHINE_BROKEN", $"machine {Id} is broken: {Broken}");
        if (shuttingDown)
            return new RpcException(new Status(StatusCode.Unavailable, "the server is shutting down"));
        return null;
    }

    /// <summary>
    /// Runs <paramref name="fn"/> under the machine lock; woken threads run before it is
    /// released. On a journaled machine the current call (<see cref="JournalCall.Current"/>)
    /// gets its step here, before it changes anything. An exception from the model (not a
    /// request error) leaves the lock released but the state untrustworthy: the machine is
    /// marked broken, every waiter is failed, and the call fails with INTERNAL.
    /// </summary>
    public T Run<T>(Func<T> fn) => RunCore(fn, static f => f());

    /// <summary>Runs <paramref name="fn"/> under the machine lock (see <see cref="Run{T}"/>).</summary>
    public void Run(Action fn) => RunCore(fn, static f =>
    {
        f();
        return 0;
    });

    /// <summary>
    /// <see cref="Run{T}"/> for a function of <paramref name="state"/>: the lock, the journal
    /// step and the call clock go through one state value, so a call allocates no closure of
    /// its own around the caller's (one per call on the fault path, with the Action form's).
    /// </summary>
    private T RunCore<TState, T>(TState state, Func<TState, T> fn)
    {
        try
        {
            var journaled = Journal is { } journal && JournalCall.Current is { } call ? (journal, call) : default;
            return Kernel.Locked((Host: this, Received: CallClock.ReceivedAt, Journaled: journaled, State: state, Fn: fn), static s =>
            {
                s.Journaled.journal?.Stamp(s.Host, s.Journaled.call!);
                var kernel = s.Host.Kernel;
                var previous = kernel.CallReceivedAt;
                kernel.CallReceivedAt = s.Received;
                try
                {
                    return s.Fn(s.State);
                }
                finally
                {
                    kernel.CallReceivedAt = previous;
                }
            });
        }
        catch (Exception ex) when (ex is not RpcException)
        {
            MarkBroken(ex);
            throw new RpcException(new Status(StatusCode.Internal, $"model error on machine {Id}: {ex.GetType().Name}: {ex.Message}"));
        }
    }

    /// <summary>Runs the next chunk of the operations that yielded (a model error breaks the machine, as in any call).</summary>
    internal void ContinueYielded()
    {
        if (Destroyed || Broken is not null)
            return;
        // On a journaled machine the continuation is a step of its own (a replay waits for it).
        var previous = JournalCall.Current;
        JournalCall.Current = Journal is null ? null : new JournalCall(JournalCall.ContinueYieldedMethod, new Google.Protobuf.WellKnownTypes.Empty());
        try
        {
            Run(Kernel.RunYielded);
        }
        catch (RpcException)
        {
            // Run marked the machine broken and failed its waiters.
        }
        finally
        {
            JournalCall.Current?.Answer(null, 0, "");
            JournalCall.Current = previous;
        }
    }

    private void MarkBroken(Exception ex)
    {
        LockedEvenIfBroken(() =>
        {
            Broken ??= $"{ex.GetType().Name}: {ex.Message}";
            EndWaiters(RequestErrors.Precondition("MACHINE_BROKEN", $"machine {Id} is broken: {Broken}"));
        });
    }

    /// <summary>
    /// Runs <paramref name="fn"/> in a kernel scope (so the wakeups it defers run once the lock
    /// is released) on a machine whose model may already have failed: a second failure while
    /// woken threads run is ignored, the machine being broken or going away anyway.
    /// </summary>
    internal void LockedEvenIfBroken(Action fn)
    {
        try
        {
            Kernel.Locked(fn);
        }
        catch (Exception) when (Broken is not null)
        {
            // Already broken: nothing more to learn from it.
        }
    }

    /// <summary>
    /// Fails every pending operation with <paramref name="status"/> and wakes every uffd
    /// sleeper (they then see why), once the lock is released. Caller holds the kernel lock
    /// inside a kernel scope.
    /// </summary>
    internal void EndWaiters(RpcException status)
    {
        InjectionPulse.Fire();
        Journal?.Appended.Fire();
        Watchdog?.Stop();
        foreach (var op in PendingOps)
            Kernel.DeferUntilUnlocked(() => op.Result.TrySetException(status));
        PendingOps.Clear();
        foreach (var u in Uffds)
            u.WakeAll();
        foreach (var w in Workloads)
            w.EndWithMachine(status.Status.Detail);
    }
}

/// <summary>
/// When the current call was received (<see cref="System.Diagnostics.Stopwatch"/> ticks; 0
/// outside a call): stamped by the outermost interceptor for each RPC and by the Serve
/// stream for each request message, so the migration metrics split the handling and waking
/// phases at the call's arrival, not at the moment it got the machine lock.
/// </summary>
internal static class CallClock
{
    private static readonly AsyncLocal<long> s_received = new();

    public static long ReceivedAt
    {
        get => s_received.Value;
        set => s_received.Value = value;
    }
}

/// <summary>A wake-up for every sleeper at once: take <see cref="Next"/>, check, then await it (no wake is lost).</summary>
internal sealed class Pulse
{
    private TaskCompletionSource _tcs = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>A pulse fired on each of <paramref name="kernel"/>'s injection firings (after its lock is released).</summary>
    public static Pulse On(Model.Kernel kernel)
    {
        var p = new Pulse();
        kernel.InjectionFired += _ => p.Fire();
        return p;
    }

    public Task Next => Volatile.Read(ref _tcs).Task;

    public void Fire() => Interlocked.Exchange(ref _tcs, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).TrySetResult();
}

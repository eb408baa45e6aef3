using UffdGrpc.Contracts.V1;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>An object the API names by id; every object belongs to one machine.</summary>
public abstract class Entry(long id, MachineHost host)
{
    private static long s_born;

    public long Id { get; } = id;
    public MachineHost Host { get; } = host;
    /// <summary>Creation order across the server (ids are random): which retired entries are the oldest.</summary>
    internal long Born { get; } = Interlocked.Increment(ref s_born);

    /// <summary>Whether the object is gone for the kernel (a closed uffd, an exited thread or process), so its id may be forgotten. Caller holds the kernel lock.</summary>
    internal virtual bool Retired => false;
}

/// <summary>An address space (a process).</summary>
public sealed class MmEntry(long id, MachineHost host, Model.Mm mm) : Entry(id, host)
{
    public Model.Mm Mm { get; } = mm;

    internal override bool Retired => Mm.Exited;
}

/// <summary>A simulated thread.</summary>
public sealed class ThreadEntry(long id, MachineHost host, Model.SimThread thread, long mmId) : Entry(id, host)
{
    public Model.SimThread Thread { get; } = thread;
    public long MmId { get; } = mmId;
    /// <summary>The operation in progress (protected by the kernel lock).</summary>
    public long OpId { get; set; }
    /// <summary>The guest workload that runs this thread (0: none); only it starts operations on it.</summary>
    public long WorkloadId { get; set; }

    internal override bool Retired => Thread.State == Model.ThreadState.Exited && OpId == 0;
}

/// <summary>A memfd or regular file.</summary>
public sealed class FileEntry(long id, MachineHost host, Model.MemFile file) : Entry(id, host)
{
    public Model.MemFile File { get; } = file;
}

/// <summary>
/// A userfaultfd and its fd wait queue (ctx->fd_wqh): readers (Read on a blocking uffd,
/// Poll with a timeout, ReadEvents and Serve streams) sleep on <see cref="WaitTask"/> and
/// are woken only by this uffd's <see cref="Model.UserfaultfdCtx.FdWqhWake"/> (a message
/// queued, the context released) or by the machine ending. A closed one stays known: its
/// ioctls give EBADF, as on a stale fd.
/// </summary>
/// <remarks>Everything but <see cref="Readers"/> is protected by the kernel lock.</remarks>
public sealed class UffdEntry : Entry
{
    private int _readers;
    private TaskCompletionSource? _wait;

    public UffdEntry(long id, MachineHost host, Model.UserfaultfdCtx ctx)
        : base(id, host)
    {
        Ctx = ctx;
        ctx.FdWqhWake = WakeAll;
    }

    internal override bool Retired => Ctx.Released;

    public Model.UserfaultfdCtx Ctx { get; }
    /// <summary>Event and Serve streams currently reading this uffd.</summary>
    public int Readers => Volatile.Read(ref _readers);
    /// <summary>Someone sleeps on this uffd's wait queue (for tests of who is woken).</summary>
    public bool Sleeping => Volatile.Read(ref _wait) is not null;
    /// <summary>Wake-ups of this uffd's wait queue so far (for tests of who is woken).</summary>
    public long Wakeups { get; private set; }

    internal void AddReader() => Interlocked.Increment(ref _readers);

    internal void RemoveReader() => Interlocked.Decrement(ref _readers);

    /// <summary>A task that completes at the next wake of this uffd's queue. Caller holds the kernel lock.</summary>
    internal Task WaitTask() => (_wait ??= new TaskCompletionSource()).Task;

    /// <summary>
    /// wake_up_poll(&amp;ctx->fd_wqh): completes the current wait task, if anyone sleeps on it,
    /// once the lock is released (its continuation — a reader's loop — then runs on the
    /// releasing thread, without a thread-pool hop). Caller holds the kernel lock.
    /// </summary>
    internal void WakeAll()
    {
        var w = _wait;
        if (w is null)
            return;
        _wait = null;
        Wakeups++;
        Host.Kernel.DeferUntilUnlocked(() => w.TrySetResult());
    }
}

/// <summary>A thread operation in progress (StartOp or Access) and the promise of its result.</summary>
public sealed class OpEntry(long id, MachineHost host, ThreadEntry thread, bool logged) : Entry(id, host)
{
    public ThreadEntry Thread { get; } = thread;
    /// <summary>The result also goes to the machine's completion log (StartOp).</summary>
    public bool Logged { get; } = logged;
    /// <summary>Completed after the machine lock is released (see <see cref="Model.Kernel.DeferUntilUnlocked"/>), so its continuation may run inline.</summary>
    public TaskCompletionSource<ThreadOpResult> Result { get; } = new();
}

using UffdGrpc.Contracts.V1;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>An object the API names by id; every object belongs to one machine.</summary>
public abstract class Entry(long id, MachineHost host)
{
    public long Id { get; } = id;
    public MachineHost Host { get; } = host;
}

/// <summary>An address space (a process).</summary>
public sealed class MmEntry(long id, MachineHost host, Model.Mm mm) : Entry(id, host)
{
    public Model.Mm Mm { get; } = mm;
}

/// <summary>A simulated thread.</summary>
public sealed class ThreadEntry(long id, MachineHost host, Model.SimThread thread, long mmId) : Entry(id, host)
{
    public Model.SimThread Thread { get; } = thread;
    public long MmId { get; } = mmId;
    /// <summary>The operation in progress (protected by the kernel lock).</summary>
    public long OpId { get; set; }
}

/// <summary>A memfd or regular file.</summary>
public sealed class FileEntry(long id, MachineHost host, Model.MemFile file) : Entry(id, host)
{
    public Model.MemFile File { get; } = file;
}

/// <summary>A userfaultfd. A closed one stays known: its ioctls give EBADF, as on a stale fd.</summary>
public sealed class UffdEntry(long id, MachineHost host, Model.UserfaultfdCtx ctx) : Entry(id, host)
{
    private int _readers;

    public Model.UserfaultfdCtx Ctx { get; } = ctx;
    public bool Closed { get; set; }
    /// <summary>Event streams currently reading this uffd.</summary>
    public int Readers => Volatile.Read(ref _readers);

    internal void AddReader() => Interlocked.Increment(ref _readers);

    internal void RemoveReader() => Interlocked.Decrement(ref _readers);
}

/// <summary>A thread operation in progress (StartOp or Access) and the promise of its result.</summary>
public sealed class OpEntry(long id, MachineHost host, ThreadEntry thread, bool logged) : Entry(id, host)
{
    public ThreadEntry Thread { get; } = thread;
    /// <summary>The result also goes to the machine's completion log (StartOp).</summary>
    public bool Logged { get; } = logged;
    public TaskCompletionSource<ThreadOpResult> Result { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
}

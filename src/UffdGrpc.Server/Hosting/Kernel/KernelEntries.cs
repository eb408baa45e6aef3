using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>An object of a kernel-backed address space (its id is a server id like any other).</summary>
public abstract class KernelEntry(long id, MachineHost host, KernelMmEntry? mm) : Entry(id, host)
{
    /// <summary>The address space it belongs to (itself for the address space).</summary>
    public KernelMmEntry Mm => mm ?? (KernelMmEntry)this;
}

/// <summary>
/// A kernel-backed address space: real memory in one helper process. Its state here is what
/// the server must know to serve it (its threads and uffds, the bytes it maps); the memory
/// itself is only in the helper. Everything mutable is protected by <see cref="Gate"/>.
/// </summary>
public sealed class KernelMmEntry : KernelEntry
{
    private readonly List<(ulong Start, ulong End)> _mapped = [];

    internal KernelMmEntry(long id, MachineHost host, KernelHelper helper)
        : base(id, host, null)
    {
        Helper = helper;
    }

    internal KernelHelper Helper { get; }
    internal object Gate { get; } = new();
    /// <summary>Serializes Mmap and Munmap, so the mapped-bytes check and the count stay together.</summary>
    internal SemaphoreSlim MapGate { get; } = new(1, 1);
    internal List<KernelThreadEntry> Threads { get; } = [];
    internal Dictionary<ulong, KernelUffdEntry> Uffds { get; } = [];

    /// <summary>DestroyMm or the machine's end ran: the helper was killed.</summary>
    public bool Exited { get; internal set; }

    /// <summary>Why the helper is gone when it crashed (null while it serves or after a destroy).</summary>
    public string? Broken { get; internal set; }

    /// <summary>Bytes mapped by successful Mmaps and not unmapped since (the Limits:KernelMmBytes count).</summary>
    public ulong MappedBytes
    {
        get
        {
            lock (Gate)
                return _mapped.Aggregate(0UL, (s, r) => s + (r.End - r.Start));
        }
    }

    /// <summary>Records a successful mmap of [start, end) or munmap of it (the helper's own bookkeeping of what it maps). Caller holds <see cref="Gate"/>.</summary>
    internal void Track(ulong start, ulong end, bool mapped)
    {
        var keep = new List<(ulong, ulong)>();
        foreach (var (s, e) in _mapped)
        {
            if (e <= start || s >= end)
            {
                keep.Add((s, e));
                continue;
            }
            if (s < start)
                keep.Add((s, start));
            if (e > end)
                keep.Add((end, e));
        }
        if (mapped)
            keep.Add((start, end));
        _mapped.Clear();
        _mapped.AddRange(keep);
    }
}

/// <summary>A thread of a kernel-backed address space: a pthread of the helper that runs the accesses.</summary>
public sealed class KernelThreadEntry(long id, MachineHost host, KernelMmEntry mm, ulong handle, int tid) : KernelEntry(id, host, mm)
{
    internal ulong Handle { get; } = handle;
    public int Tid { get; } = tid;

    /// <summary>The access in progress (0: none), and the uffd whose fault it sleeps in, as far as the server saw. Protected by the mm's gate.</summary>
    internal long OpId { get; set; }
}

/// <summary>
/// A real userfaultfd of a helper. The helper reads each uffd_msg as the kernel queues it;
/// the messages wait here until Read, ReadEvents or Serve takes them, and the readers sleep
/// on <see cref="WaitTask"/> (woken by a message, the uffd's close, the helper's end).
/// Protected by the mm's gate.
/// </summary>
public sealed class KernelUffdEntry(long id, MachineHost host, KernelMmEntry mm, ulong handle, bool nonBlocking) : KernelEntry(id, host, mm)
{
    private TaskCompletionSource? _wait;

    internal ulong Handle { get; } = handle;
    /// <summary>Opened with O_NONBLOCK (Read gives EAGAIN with nothing queued).</summary>
    public bool NonBlocking { get; } = nonBlocking;
    internal Queue<UffdMsg> Messages { get; } = new();
    public bool Closed { get; internal set; }
    /// <summary>UFFDIO_API succeeded (userfaultfd_is_initialized): before it, read gives EINVAL.</summary>
    public bool ApiDone { get; internal set; }

    /// <summary>A task that completes at the next wake. Caller holds the mm's gate.</summary>
    internal Task WaitTask() => (_wait ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;

    /// <summary>Wakes every reader. Caller holds the mm's gate.</summary>
    internal void WakeAll()
    {
        var w = _wait;
        _wait = null;
        w?.TrySetResult();
    }
}

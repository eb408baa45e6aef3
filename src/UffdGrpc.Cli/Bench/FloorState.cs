using Grpc.Core;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// The transport floor's state: the least a server needs to give the fault RPCs their
/// meaning with no model behind them — per uffd a set of write-protected page addresses, a
/// message queue, its readers' wake and the accesses parked on a page. One lock per
/// machine, as the product has. An access touches its pages in order and parks on the first
/// protected one, queueing a WP page-fault message; un-protecting the page (without
/// DONTWAKE) continues it inline, as the model runs a woken thread when the lock is released.
/// </summary>
internal sealed class FloorState
{
    private long _next;
    private readonly System.Collections.Concurrent.ConcurrentDictionary<long, object> _objects = new();

    public long Add(object o)
    {
        var id = Interlocked.Increment(ref _next);
        _objects[id] = o;
        return id;
    }

    public T Get<T>(long id)
        where T : class =>
        _objects.TryGetValue(id, out var o) && o is T t ? t : throw new RpcException(new Status(StatusCode.NotFound, $"no {typeof(T).Name} {id}"));

    public void Remove(long id) => _objects.TryRemove(id, out _);
}

internal sealed class FloorMachine
{
    public readonly object Lock = new();
    public readonly List<FloorUffd> Uffds = [];
    public bool Destroyed;
}

internal sealed class FloorMm(FloorMachine m)
{
    public FloorMachine Machine { get; } = m;
    public FloorUffd? Uffd { get; set; }
}

internal sealed class FloorThread(FloorMm mm, int tid)
{
    public FloorMm Mm { get; } = mm;
    public long Id { get; set; }
    public int Tid { get; } = tid;
}

/// <summary>A touch of <see cref="Count"/> pages from <see cref="Addr"/> by one thread.</summary>
internal sealed class FloorOp(FloorThread t, ulong addr, int count, byte value)
{
    public FloorThread Thread { get; } = t;
    public ulong Addr { get; } = addr;
    public int Count { get; } = count;
    public byte Value { get; } = value;
    public int Done;
    public long Id;
    public readonly TaskCompletionSource<ThreadOpResult> Result = new(TaskCreationOptions.RunContinuationsAsynchronously);
}

internal sealed class FloorUffd(FloorMachine m)
{
    public FloorMachine Machine { get; } = m;
    public long Id { get; set; }
    public readonly HashSet<ulong> Protected = [];
    public readonly Dictionary<ulong, List<FloorOp>> Parked = [];
    public readonly Queue<UffdMsg> Queue = new();
    public TaskCompletionSource? ReadWait;
    public bool Closed;

    /// <summary>Runs <paramref name="op"/> until it completes or parks on a protected page (lock held).</summary>
    public void Step(FloorOp op, List<TaskCompletionSource> wakes)
    {
        while (op.Done < op.Count)
        {
            var page = op.Addr + ((ulong)op.Done * 4096);
            if (!Closed && Protected.Contains(page))
            {
                Queue.Enqueue(new UffdMsg
                {
                    Event = UffdEvent.Pagefault,
                    UffdId = Id,
                    Pagefault = new Pagefault { Flags = 3, Address = page, Write = true, Wp = true, Ptid = (uint)op.Thread.Tid },
                });
                if (!Parked.TryGetValue(page, out var list))
                    Parked[page] = list = [];
                list.Add(op);
                if (ReadWait is { } w)
                {
                    wakes.Add(w);
                    ReadWait = null;
                }
                return;
            }
            op.Done++;
        }
        var values = new byte[op.Count];
        Array.Fill(values, op.Value);
        op.Result.TrySetResult(new ThreadOpResult { OpId = op.Id, ThreadId = op.Thread.Id, Errno = Errno.Unspecified, Done = (uint)op.Done, Values = Google.Protobuf.ByteString.CopyFrom(values) });
    }

    /// <summary>UFFDIO_WRITEPROTECT on the floor: mark or clear pages; clearing wakes what is parked there unless DONTWAKE (lock held).</summary>
    public void Writeprotect(ulong start, ulong len, ulong mode, List<TaskCompletionSource> wakes)
    {
        for (var p = start; p < start + len; p += 4096)
        {
            if ((mode & 1) != 0)
            {
                Protected.Add(p);
                continue;
            }
            Protected.Remove(p);
            if ((mode & 2) == 0 && Parked.Remove(p, out var ops))
            {
                foreach (var op in ops)
                    Step(op, wakes);
            }
        }
    }

    /// <summary>Ends the uffd: parked accesses complete, readers see the end.</summary>
    public void Close(List<TaskCompletionSource> wakes)
    {
        Closed = true;
        foreach (var ops in Parked.Values)
        {
            foreach (var op in ops)
                Step(op, wakes);
        }
        Parked.Clear();
        if (ReadWait is { } w)
        {
            wakes.Add(w);
            ReadWait = null;
        }
    }
}

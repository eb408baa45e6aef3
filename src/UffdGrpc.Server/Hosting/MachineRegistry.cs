using System.Collections.Concurrent;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// Every machine the server holds and every object in them, by id. Ids are positive, unique
/// across the server and never reused. The registry itself is thread-safe; the model objects
/// it names are protected by their machine's lock.
/// </summary>
public sealed class MachineRegistry
{
    private readonly ConcurrentDictionary<long, object> _objects = new();
    private long _next;

    private long NextId() => Interlocked.Increment(ref _next);

    public IEnumerable<MachineHost> Machines => _objects.Values.OfType<MachineHost>().OrderBy(m => m.Id);

    public MachineHost CreateMachine(Model.KernelProfile profile, Model.MachineConfig config)
    {
        var host = new MachineHost(NextId(), new Model.Kernel(profile, config));
        _objects[host.Id] = host;
        return host;
    }

    /// <summary>The object <paramref name="id"/> of type <typeparamref name="T"/>, or NOT_FOUND / INVALID_ARGUMENT.</summary>
    public T Get<T>(long id, string field)
        where T : class
    {
        if (id <= 0)
            throw RequestErrors.Invalid(field, "required (a positive id)");
        if (!_objects.TryGetValue(id, out var o) || o is not T t || (t is MachineHost { Destroyed: true }) || (t is Entry { Host.Destroyed: true }))
            throw RequestErrors.UnknownId(field, id, typeof(T).Name.Replace("Entry", "", StringComparison.Ordinal).Replace("Host", "", StringComparison.Ordinal).ToLowerInvariant());
        return t;
    }

    public MachineHost Machine(long id) => Get<MachineHost>(id, "machine_id");

    public MmEntry Mm(long id, string field = "mm_id") => Get<MmEntry>(id, field);

    public ThreadEntry Thread(long id, string field = "thread_id") => Get<ThreadEntry>(id, field);

    public UffdEntry Uffd(long id) => Get<UffdEntry>(id, "uffd_id");

    public FileEntry File(long id, string field = "file_id") => Get<FileEntry>(id, field);

    /// <summary>The id of <paramref name="mm"/>, registering it (a fork child) when new. Caller holds the kernel lock.</summary>
    internal long IdOf(MachineHost host, Model.Mm mm) => IdOf(host.MmIds, mm, id => new MmEntry(id, host, mm));

    /// <summary>The id of <paramref name="t"/>, registering it when new. Caller holds the kernel lock.</summary>
    internal long IdOf(MachineHost host, Model.SimThread t) => IdOf(host.ThreadIds, t, id => new ThreadEntry(id, host, t, IdOf(host, t.Mm)));

    /// <summary>The id of <paramref name="ctx"/>, registering it (a FORK child context) when new. Caller holds the kernel lock.</summary>
    internal long IdOf(MachineHost host, Model.UserfaultfdCtx ctx) => IdOf(host.UffdIds, ctx, id => new UffdEntry(id, host, ctx));

    internal long IdOf(MachineHost host, Model.MemFile f) => IdOf(host.FileIds, f, id => new FileEntry(id, host, f));

    /// <summary>The server-wide id of a model object, registering a new entry for it the first time it is seen.</summary>
    private long IdOf<TModel>(Dictionary<TModel, long> ids, TModel obj, Func<long, Entry> make)
        where TModel : notnull
    {
        if (ids.TryGetValue(obj, out var id))
            return id;
        var e = make(NextId());
        ids[obj] = e.Id;
        _objects[e.Id] = e;
        return e.Id;
    }

    /// <summary>
    /// Starts <paramref name="op"/> on <paramref name="thread"/>. The model runs it until it
    /// completes or parks before this returns; the result is delivered through the entry (and
    /// the completion log when <paramref name="logged"/>) from the completion callback, which
    /// runs under the kernel lock whenever the operation ends.
    /// </summary>
    public OpEntry Start(ThreadEntry thread, Model.SyscallOp op, bool logged)
    {
        var host = thread.Host;
        var entry = new OpEntry(NextId(), host, thread, logged);
        op.Completed = o => OnCompleted(entry, o);
        host.Run(() =>
        {
            if (thread.Thread.State == Model.ThreadState.Exited)
                throw RequestErrors.Precondition("THREAD_EXITED", $"thread {thread.Id} has exited");
            if (thread.Thread.Op is not null)
                throw RequestErrors.Precondition("THREAD_BUSY", $"thread {thread.Id} is running operation {thread.OpId}");
            _objects[entry.Id] = entry;
            thread.OpId = entry.Id;
            host.Kernel.Start(thread.Thread, op);
        });
        return entry;
    }

    private void OnCompleted(OpEntry entry, Model.SyscallOp o)
    {
        var host = entry.Host;
        if (entry.Thread.OpId == entry.Id)
            entry.Thread.OpId = 0;
        var r = ProtoMapping.ToResult(entry.Id, entry.Thread.Id, o);
        if (o is Model.ForkOp { Child: { } child, ChildThread: { } ct } && !o.Aborted)
        {
            r.ChildMmId = IdOf(host, child);
            r.ChildThreadId = IdOf(host, ct);
            r.ChildTid = ct.Tid;
        }
        if (entry.Logged)
        {
            host.CompletionLog.Add(r);
        }
        else
        {
            _objects.TryRemove(entry.Id, out _);
        }
        entry.Result.TrySetResult(r);
    }

    /// <summary>Drains the completion log; the drained operations are forgotten.</summary>
    public List<ThreadOpResult> TakeCompletions(MachineHost host) => host.Kernel.Locked(() =>
    {
        var list = host.CompletionLog.ToList();
        host.CompletionLog.Clear();
        foreach (var r in list)
            _objects.TryRemove(r.OpId, out _);
        return list;
    });

    /// <summary>Forgets a waited-for operation (its result was delivered by WaitOp).</summary>
    public void Forget(OpEntry op) => op.Host.Kernel.Locked(() =>
    {
        _objects.TryRemove(op.Id, out _);
        op.Host.CompletionLog.RemoveAll(r => r.OpId == op.Id);
    });

    /// <summary>Destroys a machine: every process exits, every id of the machine becomes unknown.</summary>
    public void Destroy(MachineHost host)
    {
        host.Run(() =>
        {
            foreach (var mm in host.Kernel.Mms.ToList())
                mm.Exit();
            host.Destroyed = true;
        });
        foreach (var (id, o) in _objects)
        {
            if (o == host || (o is Entry e && e.Host == host))
                _objects.TryRemove(id, out _);
        }
    }
}

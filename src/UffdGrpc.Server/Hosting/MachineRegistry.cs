using System.Collections.Concurrent;
using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// Every machine the server holds and every object in them, by id. Ids are positive, unique
/// across the server and never reused. The registry itself is thread-safe; the model objects
/// it names are protected by their machine's lock.
/// </summary>
public sealed class MachineRegistry(Security.Quotas quotas, Microsoft.Extensions.Options.IOptions<WatchdogOptions> watchdog, ILogger<MachineRegistry> logger)
{
    /// <summary>The limits every creation checks.</summary>
    public Security.Quotas Quotas { get; } = quotas;

    /// <summary>The memory budget all machines share.</summary>
    public ServerFrameBudget Budget { get; } = new(quotas.Limits.ServerMemoryBytes / (long)Model.Kernel.PageSize);

    private readonly ConcurrentDictionary<long, object> _objects = new();
    private readonly ConcurrentDictionary<long, MachineHost> _machines = new();
    private volatile bool _shuttingDown;
    private int _journaled;

    /// <summary>Some live machine keeps a session journal (the journal interceptor looks nothing up otherwise).</summary>
    internal bool AnyJournal => Volatile.Read(ref _journaled) > 0;

    /// <summary>Set once the host begins to stop: every call and wait then ends with UNAVAILABLE.</summary>
    public bool ShuttingDown => _shuttingDown;

    /// <summary>
    /// A fresh id: a random positive 63-bit value, so ids name objects without telling a
    /// caller which other ids exist. It differs from every live id; that it differs from every
    /// id ever used holds with the odds of a 63-bit collision (no history is kept, so the
    /// registry does not grow with the server's age).
    /// </summary>
    /// <remarks>
    /// The random values are drawn <see cref="IdBlock"/> at a time per thread (one getrandom
    /// call per block, not per operation); drawn ahead they are as unguessable as drawn late.
    /// </remarks>
    private long NextId()
    {
        while (true)
        {
            var block = s_randomIds ??= new ulong[IdBlock];
            if (s_randomIdsLeft == 0)
            {
                System.Security.Cryptography.RandomNumberGenerator.Fill(System.Runtime.InteropServices.MemoryMarshal.AsBytes(block.AsSpan()));
                s_randomIdsLeft = block.Length;
            }
            var id = (long)(block[--s_randomIdsLeft] >> 1);
            if (id != 0 && !_objects.ContainsKey(id))
                return id;
        }
    }

    private const int IdBlock = 64;
    [ThreadStatic]
    private static ulong[]? s_randomIds;
    [ThreadStatic]
    private static int s_randomIdsLeft;

    /// <summary>Every live machine, whoever owns it (persistence, shutdown).</summary>
    internal IEnumerable<MachineHost> AllMachines() => _machines.Values.OrderBy(m => m.Id);

    /// <summary>Raised for each machine created (before any call can reach it): the metrics subscribe to its kernel's events here.</summary>
    public event Action<MachineHost>? MachineCreated;

    /// <summary>Raised for each machine destroyed, after its ids became unknown (the kernel backend kills its helpers here).</summary>
    public event Action<MachineHost>? MachineDestroyed;

    /// <summary>Raised once when the host begins to stop, after every waiter was failed.</summary>
    public event Action? ShutdownStarted;

    /// <summary>The live machines the current caller may see, in id order.</summary>
    public IEnumerable<MachineHost> Machines => _machines.Values.Where(m => m.VisibleTo(Security.Caller.Principal)).OrderBy(m => m.Id);

    public MachineHost CreateMachine(Model.KernelProfile profile, Model.MachineConfig config, string owner = Security.AuthOptions.AnonymousPrincipal, JournalHeader? journal = null)
    {
        if (_shuttingDown)
            throw new RpcException(new Status(StatusCode.Unavailable, "the server is shutting down"));
        Security.Quotas.Check(_machines.Values.Count(m => m.Owner == owner), Quotas.Limits.MachinesPerPrincipal, nameof(Security.LimitOptions.MachinesPerPrincipal), "principal " + owner);
        var kernel = new Model.Kernel(profile, config) { FrameBudget = Budget };
        var host = new MachineHost(NextId(), kernel, owner)
        {
            Journal = journal is null ? null : new MachineJournal(journal, Quotas.Limits.JournalEntriesPerMachine, Quotas.Limits.JournalBytesPerMachine),
        };
        // A long populate or access yields the lock every Kernel.ReschedPages pages; the rest
        // runs from the thread pool, so other calls on the machine get in between.
        if (journal is not null)
            Interlocked.Increment(ref _journaled);
        if (watchdog.Value.UserfaultSeconds > 0)
            host.Watchdog = new UserfaultWatchdog(host, TimeSpan.FromSeconds(watchdog.Value.UserfaultSeconds), logger);
        kernel.ScheduleYielded = () => ThreadPool.UnsafeQueueUserWorkItem(static h => h.ContinueYielded(), host, preferLocal: false);
        MachineCreated?.Invoke(host);
        _objects[host.Id] = host;
        _machines[host.Id] = host;
        return host;
    }

    /// <summary>The object <paramref name="id"/> of type <typeparamref name="T"/>, or NOT_FOUND / INVALID_ARGUMENT.</summary>
    public T Get<T>(long id, string field)
        where T : class => Get<T>(id, field, allowBroken: false);

    /// <summary>As <see cref="Get{T}(long, string)"/>; <paramref name="allowBroken"/> lets a broken machine be inspected and destroyed.</summary>
    private T Get<T>(long id, string field, bool allowBroken)
        where T : class
    {
        if (id <= 0)
            throw RequestErrors.Invalid(field, "required (a positive id)");
        // Another principal's object is as unknown as one that never existed.
        if (!_objects.TryGetValue(id, out var o) || o is not T t || (t is MachineHost { Destroyed: true }) || (t is Entry { Host.Destroyed: true })
            || !(t as MachineHost ?? ((Entry)(object)t).Host).VisibleTo(Security.Caller.Principal))
            throw RequestErrors.UnknownId(field, id, typeof(T).Name.Replace("Entry", "", StringComparison.Ordinal).Replace("Host", "", StringComparison.Ordinal).ToLowerInvariant());
        var host = t as MachineHost ?? ((Entry)(object)t).Host;
        if (host.Unusable(_shuttingDown) is { } status && !(allowBroken && host.Broken is not null && !_shuttingDown))
            throw status;
        return t;
    }

    /// <summary>The live object <paramref name="id"/> of type <typeparamref name="T"/>, if there is one.</summary>
    public bool TryGet<T>(long id, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T? value)
        where T : Entry
    {
        value = _objects.TryGetValue(id, out var o) && o is T t && !t.Host.Destroyed && t.Host.VisibleTo(Security.Caller.Principal) ? t : null;
        return value is not null;
    }

    public MachineHost Machine(long id) => Get<MachineHost>(id, "machine_id");

    private static readonly string[] s_idFields = ["machine_id", "mm_id", "uffd_id", "thread_id", "file_id", "op_id", "workload_id"];

    /// <summary>
    /// The live machine a request names by its first id field (machine_id, mm_id, uffd_id,
    /// thread_id, file_id or op_id), if the caller may see it, and the model id of the uffd it
    /// names (0 when none). No status: the service reports unknown ids itself.
    /// </summary>
    internal MachineHost? HostNamedBy(Google.Protobuf.IMessage m, out int uffdId)
    {
        uffdId = 0;
        foreach (var name in s_idFields)
        {
            if (m.Descriptor.FindFieldByName(name) is not { FieldType: Google.Protobuf.Reflection.FieldType.Int64 } f || f.Accessor.GetValue(m) is not long id || id == 0)
                continue;
            if (name == "machine_id")
                return TryGetMachine(id);
            if (TryGet<Entry>(id, out var e))
            {
                if (e is UffdEntry u)
                    uffdId = u.Ctx.Id;
                return e.Host;
            }
            return null;
        }
        return null;
    }

    /// <summary>The live machine <paramref name="id"/> the caller may see, or null (no status).</summary>
    public MachineHost? TryGetMachine(long id) =>
        _objects.TryGetValue(id, out var o) && o is MachineHost { Destroyed: false } h && h.VisibleTo(Security.Caller.Principal) ? h : null;

    /// <summary>The machine <paramref name="id"/>, broken or not (GetMachine reports why; DestroyMachine frees it).</summary>
    public MachineHost MachineEvenIfBroken(long id) => Get<MachineHost>(id, "machine_id", allowBroken: true);

    public MmEntry Mm(long id, string field = "mm_id") => Get<MmEntry>(id, field);

    public ThreadEntry Thread(long id, string field = "thread_id") => Get<ThreadEntry>(id, field);

    public UffdEntry Uffd(long id) => Get<UffdEntry>(id, "uffd_id");

    public FileEntry File(long id, string field = "file_id") => Get<FileEntry>(id, field);

    /// <summary>Registers an object made by <paramref name="make"/> under a fresh id (a guest workload).</summary>
    internal T Add<T>(Func<long, T> make)
        where T : Entry
    {
        var e = make(NextId());
        _objects[e.Id] = e;
        return e;
    }

    /// <summary>Forgets an object: its id becomes unknown.</summary>
    internal void Remove(Entry e) => _objects.TryRemove(e.Id, out _);

    /// <summary>The id of <paramref name="mm"/>, registering it (a fork child) when new. Caller holds the kernel lock.</summary>
    internal long IdOf(MachineHost host, Model.Mm mm) => IdOf(host.MmIds, mm, id => new MmEntry(id, host, mm));

    /// <summary>The id of <paramref name="t"/>, registering it when new. Caller holds the kernel lock.</summary>
    internal long IdOf(MachineHost host, Model.SimThread t) => IdOf(host.ThreadIds, t, id => new ThreadEntry(id, host, t, IdOf(host, t.Mm)));

    /// <summary>The id of <paramref name="ctx"/>, registering it (a FORK child context) when new. Caller holds the kernel lock.</summary>
    internal long IdOf(MachineHost host, Model.UserfaultfdCtx ctx) => IdOf(host.UffdIds, ctx, id =>
    {
        var u = new UffdEntry(id, host, ctx);
        host.Uffds.Add(u);
        return u;
    });

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
        // Once per RetiredIdsPerMachine registrations (amortised O(1) each), forget what
        // retired longest ago: the machine holds its live objects plus at most twice that many.
        if (++e.Host.RegisteredSinceSweep >= Quotas.Limits.RetiredIdsPerMachine)
        {
            e.Host.RegisteredSinceSweep = 0;
            ForgetRetired(e.Host, Quotas.Limits.RetiredIdsPerMachine);
        }
        return e.Id;
    }

    /// <summary>
    /// Forgets the retired entries of <paramref name="host"/> (closed uffds, exited threads and
    /// processes) but the newest <paramref name="keep"/>: their ids become unknown (NOT_FOUND),
    /// and a forgotten uffd's context is freed in the model (the last userfaultfd_ctx_put).
    /// Caller holds the kernel lock.
    /// </summary>
    internal void ForgetRetired(MachineHost host, int keep)
    {
        var retired = new List<Entry>();
        foreach (var id in host.MmIds.Values.Concat(host.ThreadIds.Values).Concat(host.UffdIds.Values))
        {
            if (_objects.TryGetValue(id, out var o) && o is Entry { Retired: true } e)
                retired.Add(e);
        }
        if (retired.Count <= keep)
            return;
        retired.Sort((a, b) => a.Born.CompareTo(b.Born));
        foreach (var e in retired.Take(retired.Count - keep))
        {
            _objects.TryRemove(e.Id, out _);
            switch (e)
            {
                case MmEntry m:
                    host.MmIds.Remove(m.Mm);
                    break;
                case ThreadEntry t:
                    host.ThreadIds.Remove(t.Thread);
                    break;
                case UffdEntry u:
                    host.UffdIds.Remove(u.Ctx);
                    host.Uffds.Remove(u);
                    host.Kernel.UserfaultfdCtxPut(u.Ctx);
                    break;
            }
        }
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
            if (thread.WorkloadId != 0)
                throw RequestErrors.Precondition("WORKLOAD_THREAD", $"thread {thread.Id} runs guest workload {thread.WorkloadId}");
            if (thread.Thread.Op is not null)
                throw RequestErrors.Precondition("THREAD_BUSY", $"thread {thread.Id} is running operation {thread.OpId}");
            if (logged)
                Security.Quotas.Check(host.CompletionLog.Count + host.PendingOps.Count(p => p.Logged), Quotas.Limits.CompletionLogPerMachine, nameof(Security.LimitOptions.CompletionLogPerMachine), $"machine {host.Id}");
            if (op is Model.ForkOp)
            {
                Security.Quotas.Check(host.Kernel.Mms.Count, Quotas.Limits.MmsPerMachine, nameof(Security.LimitOptions.MmsPerMachine), $"machine {host.Id}");
                Security.Quotas.Check(host.LiveThreads, Quotas.Limits.ThreadsPerMachine, nameof(Security.LimitOptions.ThreadsPerMachine), $"machine {host.Id}");
            }
            _objects[entry.Id] = entry;
            thread.OpId = entry.Id;
            host.PendingOps.Add(entry);
            host.Kernel.Start(thread.Thread, op);
        });
        return entry;
    }

    private void OnCompleted(OpEntry entry, Model.SyscallOp o)
    {
        var host = entry.Host;
        host.PendingOps.Remove(entry);
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
        host.Kernel.DeferUntilUnlocked(() => entry.Result.TrySetResult(r));
    }

    /// <summary>Drains the completion log; the drained operations are forgotten.</summary>
    public List<ThreadOpResult> TakeCompletions(MachineHost host) => host.Run(() =>
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
        var gone = new RpcException(new Status(StatusCode.Unavailable, $"machine {host.Id} was destroyed"));
        if (host.Broken is not null)
        {
            // Its state cannot be trusted to tear down: drop it whole.
            host.LockedEvenIfBroken(() =>
            {
                host.Destroyed = true;
                host.EndWaiters(gone);
            });
        }
        else
        {
            host.Run(() =>
            {
                foreach (var mm in host.Kernel.Mms.ToList())
                    mm.Exit();
                host.Destroyed = true;
                host.EndWaiters(gone);
            });
        }
        var removed = _machines.TryRemove(host.Id, out _);
        Budget.Release(host.Kernel);
        if (removed && host.Journal is not null)
            Interlocked.Decrement(ref _journaled);
        foreach (var (id, o) in _objects)
        {
            if (o == host || (o is Entry e && e.Host == host))
                _objects.TryRemove(id, out _);
        }
        MachineDestroyed?.Invoke(host);
    }

    /// <summary>
    /// The host is stopping: new calls get UNAVAILABLE, every pending access and wait fails
    /// with UNAVAILABLE and every stream wakes and ends with UNAVAILABLE.
    /// </summary>
    public void Shutdown()
    {
        _shuttingDown = true;
        var status = new RpcException(new Status(StatusCode.Unavailable, "the server is shutting down"));
        foreach (var host in _machines.Values)
        {
            host.LockedEvenIfBroken(() => host.EndWaiters(status));
        }
        ShutdownStarted?.Invoke();
    }

    /// <summary>The status that ends a wait or a stream on <paramref name="host"/> now, or null while it serves.</summary>
    internal RpcException? Unusable(MachineHost host) => host.Unusable(_shuttingDown);
}

using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios;

/// <summary>The scenario backend over an in-process <see cref="Kernel"/>.</summary>
public sealed class InProcessBackend(Kernel kernel) : IKernelBackend
{
    private readonly Dictionary<int, Mm.Mm> _procs = [];
    private readonly Dictionary<int, SimThread> _threads = [];
    private readonly Dictionary<int, MemFile> _files = [];
    private readonly Dictionary<int, UserfaultfdCtx> _uffds = [];
    private readonly Dictionary<UserfaultfdCtx, int> _uffdIds = [];
    private readonly List<ThreadOpResult> _done = [];
    private int _next = 1;
    private long _nextOp = 1;

    public InProcessBackend()
        : this(new Kernel())
    {
    }

    public Kernel Kernel { get; } = kernel;

    private static Task<T> Done<T>(T v) => Task.FromResult(v);

    /// <summary>A `require` line's settings; on a profile with soft-dirty built in (6.1) the soft-dirty request only checks.</summary>
    public Task ConfigureAsync(bool? swap, bool? softDirty)
    {
        if (Kernel.ConfigIsBuiltIn(Kernel.Profile))
            softDirty = null;
        Kernel.Configure(c => c with { Swap = swap ?? c.Swap, SoftDirty = softDirty ?? c.SoftDirty });
        return Task.CompletedTask;
    }

    public Task<bool> AvailableAsync(string capability, ulong featureBit) => capability switch
    {
        "thp" => Done(Kernel.Config.Thp != ThpMode.Never),
        "pagemap_scan" => Done(Kernel.HasPagemapScan),
        "swap" => Done(Kernel.Config.Swap),
        "softdirty" => Done(Kernel.Config.SoftDirty),
        _ => Done(((ulong)UserfaultfdCtx.AvailableFeatures(Kernel.Profile) & featureBit) != 0),
    };

    public Task<int> CreateProcessAsync()
    {
        var id = _next++;
        _procs[id] = Kernel.CreateMm();
        return Done(id);
    }

    public Task<(int Thread, int Tid)> CreateThreadAsync(int process)
    {
        var t = Kernel.CreateThread(_procs[process]);
        var id = _next++;
        _threads[id] = t;
        return Done((id, t.Tid));
    }

    public Task<int> ThreadTidAsync(int thread) => Done(_threads[thread].Tid);

    public Task<int> CreateFileAsync(string name, bool shmem, ulong size)
    {
        var id = _next++;
        _files[id] = Kernel.CreateFile(name, shmem, size);
        return Done(id);
    }

    public Task<Errno> MmapAsync(int process, ulong addr, ulong len, Prot prot, bool shared, int file, ulong offset, bool readOnlyFd, bool populate) =>
        Done(_procs[process].Mmap(addr, len, prot, shared, file == 0 ? null : _files[file], offset, readOnlyFd, populate));

    public Task<Errno> MprotectAsync(int process, ulong start, ulong len, Prot prot) => Done(_procs[process].Mprotect(start, len, prot));

    public Task<Errno> ClearRefsAsync(int process, string value) => Done(_procs[process].ClearRefs(value));

    public Task<long> StartAsync(int thread, ThreadOpRequest request)
    {
        var t = _threads[thread];
        var id = _nextOp++;
        SyscallOp op = request.Kind switch
        {
            ThreadOpKind.Access => new AccessOp(request.Addr, request.Write, request.Value, request.Count, request.KernelOrigin ? AccessOrigin.Kernel : AccessOrigin.User),
            ThreadOpKind.Populate => new PopulateOp(request.Addr, request.Len, request.Write),
            ThreadOpKind.Madvise => MadviseOp.Create(request.Addr, request.Len, request.Advice),
            ThreadOpKind.Munmap => new MunmapOp(request.Addr, request.Len),
            ThreadOpKind.Mremap => new MremapOp(request.Addr, request.Len, request.Addr2),
            ThreadOpKind.Fork => new ForkOp(),
            ThreadOpKind.ProcessVm => new ProcessVmOp(_procs.GetValueOrDefault(request.RemoteProcess), request.Write, request.LocalIov, request.RemoteIov, request.Flags),
            _ => throw new ArgumentOutOfRangeException(nameof(request)),
        };
        op.Completed = o => _done.Add(ToResult(id, thread, o));
        Kernel.Start(t, op);
        return Done(id);
    }

    private ThreadOpResult ToResult(long id, int thread, SyscallOp o)
    {
        switch (o)
        {
            case AccessOp a:
                return new(id, thread, o.Aborted, a.Result, a.Signal, a.Done, a.Values);
            case ProcessVmOp p:
                return new(id, thread, o.Aborted, p.Result, SigCode.None, 0, []) { Transferred = p.Transferred };
            case ForkOp f:
                var cp = _next++;
                _procs[cp] = f.Child!;
                var ct = _next++;
                _threads[ct] = f.ChildThread!;
                return new(id, thread, o.Aborted, Errno.OK, SigCode.None, 0, []) { ChildProcess = cp, ChildThread = ct };
            default:
                return new(id, thread, o.Aborted, o.Result, SigCode.None, 0, []);
        }
    }

    public Task<IReadOnlyList<ThreadOpResult>> TakeCompletionsAsync()
    {
        var list = _done.ToList();
        _done.Clear();
        return Done<IReadOnlyList<ThreadOpResult>>(list);
    }

    public Task EndProcessAsync(int process, bool kill)
    {
        _procs[process].Exit();
        return Task.CompletedTask;
    }

    private int UffdId(UserfaultfdCtx ctx)
    {
        if (_uffdIds.TryGetValue(ctx, out var id))
            return id;
        id = _next++;
        _uffds[id] = ctx;
        _uffdIds[ctx] = id;
        return id;
    }

    public Task<(Errno Errno, int Uffd)> UffdCreateAsync(int process, int flags)
    {
        var e = Kernel.Userfaultfd(_procs[process], flags, out var ctx);
        return Done((e, ctx is null ? 0 : UffdId(ctx)));
    }

    public Task<(Errno Errno, ulong Features, ulong Ioctls)> UffdApiAsync(int uffd, ulong api, ulong features)
    {
        var e = _uffds[uffd].Api(api, features, out var f, out var io);
        return Done((e, f, io));
    }

    public Task<(Errno Errno, ulong Ioctls)> RegisterAsync(int uffd, ulong start, ulong len, ulong mode)
    {
        var e = _uffds[uffd].Register(start, len, mode, out var io);
        return Done((e, io));
    }

    public Task<Errno> UnregisterAsync(int uffd, ulong start, ulong len) => Done(_uffds[uffd].Unregister(start, len));

    public Task<Errno> WakeAsync(int uffd, ulong start, ulong len) => Done(_uffds[uffd].Wake(start, len));

    public Task<Errno> WriteprotectAsync(int uffd, ulong start, ulong len, ulong mode) => Done(_uffds[uffd].Writeprotect(start, len, mode));

    public Task<FillResult> CopyAsync(int uffd, ulong dst, ulong srcAddr, byte fill, ulong len, ulong mode)
    {
        // The harness's source buffer holds len bytes of fill (the server keeps at most 64 MiB).
        return Done(_uffds[uffd].CopyFill(dst, fill, Math.Min(len, 64UL << 20), srcAddr, len, mode));
    }

    public Task<FillResult> ZeropageAsync(int uffd, ulong start, ulong len, ulong mode) => Done(_uffds[uffd].Zeropage(start, len, mode));

    public Task<FillResult> ContinueAsync(int uffd, ulong start, ulong len, ulong mode) => Done(_uffds[uffd].Continue(start, len, mode));

    public Task<FillResult> PoisonAsync(int uffd, ulong start, ulong len, ulong mode) => Done(_uffds[uffd].Poison(start, len, mode));

    public Task<FillResult> MoveAsync(int uffd, int callerProcess, ulong dst, ulong src, ulong len, ulong mode) =>
        Done(_uffds[uffd].Move(_procs[callerProcess], dst, src, len, mode));

    public Task<(bool PollIn, bool PollErr)> PollAsync(int uffd) => Done(_uffds[uffd].Poll());

    public Task<(Errno Errno, UffdMessage? Message)> ReadAsync(int uffd)
    {
        var e = _uffds[uffd].Read(out var m);
        if (m is null)
            return Done<(Errno, UffdMessage?)>((e, null));
        var fork = m.ForkCtx is { } c ? UffdId(c) : 0;
        return Done<(Errno, UffdMessage?)>((e, new UffdMessage(m.Event, m.Flags, m.Address, m.Ptid, fork, m.From, m.To, m.Len)));
    }

    public Task CloseAsync(int uffd)
    {
        _uffds[uffd].Release();
        return Task.CompletedTask;
    }

    public Task<ulong[]> PagemapAsync(int process, ulong start, int pages)
    {
        var mm = _procs[process];
        var v = new ulong[pages];
        for (var i = 0; i < pages; i++)
            v[i] = mm.PagemapEntry(start + ((ulong)i * Mm.Kernel.PageSize));
        return Done(v);
    }

    public Task<ulong> KpageflagsAsync(ulong pfn) => Done(Kernel.Locked(() => _procs.Values.First().KpageFlags(pfn)));

    public Task<IReadOnlyList<SmapsEntry>> SmapsAsync(int process, ulong start, ulong end) =>
        Done<IReadOnlyList<SmapsEntry>>(_procs[process].Smaps(start, end));

    public Task<PmScanResult> PagemapScanAsync(int process, PmScanArg arg) => Done(_procs[process].PagemapScan(arg));

    public ValueTask DisposeAsync() => ValueTask.CompletedTask;

    public Task<(int RuleId, string? Error)> AddInjectRuleAsync(InjectRule rule)
    {
        rule = rule with
        {
            MmId = rule.MmId is { } p ? _procs[p].Id : null,
            UffdId = rule.UffdId is { } u ? _uffds[u].Id : null,
        };
        var a = Kernel.AddInjectRule(rule, out var error);
        return Done((a?.Id ?? 0, error));
    }

    public Task<bool> RemoveInjectRuleAsync(int ruleId) => Done(Kernel.RemoveInjectRule(ruleId));

    public Task<(IReadOnlyList<InjectionRecord> Records, string? Error)> FireInjectRuleAsync(int ruleId)
    {
        var records = Kernel.FireNow(ruleId, out var error);
        return Done((records, error));
    }

    public Task<IReadOnlyList<InjectionRecord>> InjectionLogAsync(long afterSeq) => Done(Kernel.InjectionLog(afterSeq));
}

using UffdGrpc.Client;
using UffdGrpc.Mm;
using Errno = UffdGrpc.Mm.Errno;
using V1 = UffdGrpc.Contracts.V1;

namespace UffdGrpc.Scenarios;

/// <summary>
/// The scenario backend over a UffdGrpc server: one machine per replay, created on first
/// use with the requested profile and destroyed on dispose. Handles are the server's ids.
/// Every RPC returns after the model ran woken threads to completion or to their next
/// park, so draining <c>TakeCompletions</c> after each step sees exactly what the
/// in-process backend sees; the scripted handler reads with the non-blocking single-message
/// <c>Read</c>.
/// </summary>
public sealed class GrpcBackend(UffdClient client, KernelProfile profile = KernelProfile.V6_18) : IKernelBackend
{
    private long _machine;

    private async Task<long> MachineAsync()
    {
        if (_machine == 0)
        {
            var p = profile switch
            {
                KernelProfile.V5_7 => V1.KernelProfile.V57,
                KernelProfile.V6_1 => V1.KernelProfile.V61,
                _ => V1.KernelProfile.V618,
            };
            _machine = (await client.CreateMachineAsync(p).ConfigureAwait(false)).MachineId;
        }
        return _machine;
    }

    private readonly Dictionary<long, int> _handles = [];
    private readonly List<long> _ids = [];

    /// <summary>The interpreter's small handle for a server id (ids are random 64-bit values); 0 stays 0.</summary>
    private int Handle(long id)
    {
        if (id == 0)
            return 0;
        if (!_handles.TryGetValue(id, out var h))
        {
            _ids.Add(id);
            h = _ids.Count;
            _handles[id] = h;
        }
        return h;
    }

    /// <summary>The server id of a handle; 0 and negative handles (no such process) pass through.</summary>
    private long Id(int handle) => handle > 0 && handle <= _ids.Count ? _ids[handle - 1] : handle;

    private static Errno E(V1.Errno e) => (Errno)(int)e;

    /// <summary>A `require` line's settings; on a profile with soft-dirty built in (6.1) the soft-dirty request only checks.</summary>
    public async Task ConfigureAsync(bool? swap, bool? softDirty) =>
        await client.ConfigureMachineAsync(await MachineAsync().ConfigureAwait(false), swap, Kernel.ConfigIsBuiltIn(profile) ? null : softDirty).ConfigureAwait(false);

    public async Task<bool> AvailableAsync(string capability, ulong featureBit)
    {
        var m = await client.GetMachineAsync(await MachineAsync().ConfigureAwait(false)).ConfigureAwait(false);
        return capability switch
        {
            "thp" => m.Thp != V1.ThpMode.Never,
            "pagemap_scan" => m.PagemapScan,
            "swap" => m.Swap,
            "softdirty" => m.SoftDirty,
            _ => (m.UffdFeatures & featureBit) != 0,
        };
    }

    public async Task<int> CreateProcessAsync() => Handle(await client.CreateMmAsync(await MachineAsync().ConfigureAwait(false)).ConfigureAwait(false));

    public async Task<(int Thread, int Tid)> CreateThreadAsync(int process)
    {
        var t = await client.CreateThreadAsync(Id(process)).ConfigureAwait(false);
        return (Handle(t.ThreadId), t.Tid);
    }

    public async Task<int> ThreadTidAsync(int thread) => (await client.GetThreadAsync(Id(thread)).ConfigureAwait(false)).Tid;

    public async Task<int> CreateFileAsync(string name, bool shmem, ulong size) =>
        Handle((await client.CreateFileAsync(await MachineAsync().ConfigureAwait(false), name, shmem, size).ConfigureAwait(false)).FileId);

    public async Task<Errno> MmapAsync(int process, ulong addr, ulong len, Prot prot, bool shared, int file, ulong offset, bool readOnlyFd, bool populate) =>
        E(await client.MmapAsync(Id(process), addr, len, (uint)prot, shared, Id(file), offset, readOnlyFd, populate).ConfigureAwait(false));

    public async Task<Errno> MprotectAsync(int process, ulong start, ulong len, Prot prot) =>
        E(await client.MprotectAsync(Id(process), start, len, (uint)prot).ConfigureAwait(false));

    public async Task<Errno> ClearRefsAsync(int process, string value) => E(await client.ClearRefsAsync(Id(process), value).ConfigureAwait(false));

    public async Task<long> StartAsync(int thread, ThreadOpRequest request)
    {
        var op = request.Kind switch
        {
            ThreadOpKind.Access => new V1.ThreadOp
            {
                Access = UffdClient.Touch(request.Addr, request.Write, request.Value, (uint)request.Count, request.KernelOrigin),
            },
            ThreadOpKind.Populate => new V1.ThreadOp { Populate = new V1.PopulateOp { Start = request.Addr, Len = request.Len, Write = request.Write } },
            ThreadOpKind.Madvise => new V1.ThreadOp { Madvise = new V1.MadviseOp { Start = request.Addr, Len = request.Len, Advice = (int)request.Advice } },
            ThreadOpKind.Munmap => new V1.ThreadOp { Munmap = new V1.MunmapOp { Start = request.Addr, Len = request.Len } },
            ThreadOpKind.Mremap => new V1.ThreadOp { Mremap = new V1.MremapOp { OldAddr = request.Addr, Len = request.Len, NewAddr = request.Addr2 } },
            ThreadOpKind.Fork => new V1.ThreadOp { Fork = new V1.ForkOp() },
            ThreadOpKind.ProcessVm => new V1.ThreadOp
            {
                ProcessVm = new V1.ProcessVmOp
                {
                    RemoteMmId = Id(request.RemoteProcess),
                    Write = request.Write,
                    Flags = request.Flags,
                    LocalIov = { request.LocalIov.Select(v => new V1.Iovec { Base = v.Base, Len = v.Len }) },
                    RemoteIov = { request.RemoteIov.Select(v => new V1.Iovec { Base = v.Base, Len = v.Len }) },
                },
            },
            _ => throw new ArgumentOutOfRangeException(nameof(request)),
        };
        return (await client.StartOpAsync(Id(thread), op).ConfigureAwait(false)).OpId;
    }

    private static SigCode ToSig(V1.SignalCode s) => s switch
    {
        V1.SignalCode.SegvMaperr => SigCode.SegvMaperr,
        V1.SignalCode.SegvAccerr => SigCode.SegvAccerr,
        V1.SignalCode.BusAdrerr => SigCode.BusAdrerr,
        V1.SignalCode.BusMceerrAr => SigCode.BusMceerrAr,
        _ => SigCode.None,
    };

    public async Task<IReadOnlyList<ThreadOpResult>> TakeCompletionsAsync()
    {
        var list = await client.TakeCompletionsAsync(await MachineAsync().ConfigureAwait(false)).ConfigureAwait(false);
        return list.Select(r => new ThreadOpResult(r.OpId, Handle(r.ThreadId), r.Aborted, E(r.Errno), ToSig(r.Signal), (int)r.Done, r.Values.ToByteArray())
        {
            ChildProcess = Handle(r.ChildMmId),
            ChildThread = Handle(r.ChildThreadId),
            Transferred = (ulong)r.Transferred,
        }).ToList();
    }

    /// <summary>exit and SIGKILL end a process the same way in the model (the trace line differs, and the interpreter prints it).</summary>
    public async Task EndProcessAsync(int process, bool kill) => await client.DestroyMmAsync(Id(process)).ConfigureAwait(false);

    public async Task<(Errno Errno, int Uffd)> UffdCreateAsync(int process, int flags)
    {
        var (e, id) = await client.CreateUffdAsync(Id(process), (uint)flags).ConfigureAwait(false);
        return (E(e), Handle(id));
    }

    public async Task<(Errno Errno, ulong Features, ulong Ioctls)> UffdApiAsync(int uffd, ulong api, ulong features)
    {
        var (e, f, io) = await client.ApiAsync(Id(uffd), features, api).ConfigureAwait(false);
        return (E(e), f, io);
    }

    public async Task<(Errno Errno, ulong Ioctls)> RegisterAsync(int uffd, ulong start, ulong len, ulong mode)
    {
        var (e, io) = await client.RegisterAsync(Id(uffd), start, len, mode).ConfigureAwait(false);
        return (E(e), io);
    }

    public async Task<Errno> UnregisterAsync(int uffd, ulong start, ulong len) => E(await client.UnregisterAsync(Id(uffd), start, len).ConfigureAwait(false));

    public async Task<Errno> WakeAsync(int uffd, ulong start, ulong len) => E(await client.WakeAsync(Id(uffd), start, len).ConfigureAwait(false));

    public async Task<Errno> WriteprotectAsync(int uffd, ulong start, ulong len, ulong mode) =>
        E(await client.WriteprotectAsync(Id(uffd), start, len, mode).ConfigureAwait(false));

    private static FillResult Fill(FillOutcome o) => new(E(o.Errno), o.Field);

    public async Task<FillResult> CopyAsync(int uffd, ulong dst, ulong srcAddr, byte fill, ulong len, ulong mode) =>
        Fill(await client.CopyFillAsync(Id(uffd), dst, srcAddr, fill, len, mode).ConfigureAwait(false));

    public async Task<FillResult> ZeropageAsync(int uffd, ulong start, ulong len, ulong mode) =>
        Fill(await client.ZeropageAsync(Id(uffd), start, len, mode).ConfigureAwait(false));

    public async Task<FillResult> ContinueAsync(int uffd, ulong start, ulong len, ulong mode) =>
        Fill(await client.ContinueAsync(Id(uffd), start, len, mode).ConfigureAwait(false));

    public async Task<FillResult> PoisonAsync(int uffd, ulong start, ulong len, ulong mode) =>
        Fill(await client.PoisonAsync(Id(uffd), start, len, mode).ConfigureAwait(false));

    public async Task<FillResult> MoveAsync(int uffd, int callerProcess, ulong dst, ulong src, ulong len, ulong mode) =>
        Fill(await client.MoveAsync(Id(uffd), dst, src, len, mode, Id(callerProcess)).ConfigureAwait(false));

    public async Task<(bool PollIn, bool PollErr)> PollAsync(int uffd)
    {
        var p = await client.PollAsync(Id(uffd)).ConfigureAwait(false);
        return (p.Pollin, p.Pollerr);
    }

    /// <summary>
    /// The interpreter's read: one message, or EAGAIN when none is queued — also on a
    /// blocking uffd, where the model's read would sleep (the interpreter decides what an
    /// empty blocking read means, as it does in-process), so an empty queue is found with
    /// Poll first.
    /// </summary>
    public async Task<(Errno Errno, UffdMessage? Message)> ReadAsync(int uffd)
    {
        var p = await client.PollAsync(Id(uffd)).ConfigureAwait(false);
        if (!p.NonBlocking && p.ApiDone && !p.Released && p.Unread == 0)
            return (Errno.EAGAIN, null);
        var (e, m) = await client.ReadMessageAsync(Id(uffd)).ConfigureAwait(false);
        if (m is null)
            return (E(e), null);
        var msg = m.ArgCase switch
        {
            V1.UffdMsg.ArgOneofCase.Pagefault => new UffdMessage(UffdEvent.Pagefault, (PagefaultFlags)m.Pagefault.Flags, m.Pagefault.Address, m.Pagefault.Ptid, 0, 0, 0, 0),
            V1.UffdMsg.ArgOneofCase.Fork => new UffdMessage(UffdEvent.Fork, 0, 0, 0, Handle(m.Fork.UffdId), 0, 0, 0),
            V1.UffdMsg.ArgOneofCase.Remap => new UffdMessage(UffdEvent.Remap, 0, 0, 0, 0, m.Remap.From, m.Remap.To, m.Remap.Len),
            V1.UffdMsg.ArgOneofCase.Remove => new UffdMessage(UffdEvent.Remove, 0, 0, 0, 0, m.Remove.Start, m.Remove.End, 0),
            V1.UffdMsg.ArgOneofCase.Unmap => new UffdMessage(UffdEvent.Unmap, 0, 0, 0, 0, m.Unmap.Start, m.Unmap.End, 0),
            _ => new UffdMessage((UffdEvent)(byte)m.Event, 0, 0, 0, 0, 0, 0, 0),
        };
        return (E(e), msg);
    }

    public async Task CloseAsync(int uffd) => await client.CloseUffdAsync(Id(uffd)).ConfigureAwait(false);

    public async Task<ulong[]> PagemapAsync(int process, ulong start, int pages) =>
        (await client.PagemapAsync(Id(process), start, (uint)pages).ConfigureAwait(false)).Select(e => e.Raw).ToArray();

    public async Task<ulong> KpageflagsAsync(ulong pfn) =>
        (await client.KpageflagsAsync(await MachineAsync().ConfigureAwait(false), [pfn]).ConfigureAwait(false)).Flags[0];

    public async Task<IReadOnlyList<SmapsEntry>> SmapsAsync(int process, ulong start, ulong end) =>
        (await client.SmapsAsync(Id(process), start, end).ConfigureAwait(false))
            .Select(s => new SmapsEntry(s.Start, s.End, s.Perms, (VmFlags)s.VmFlags, s.RssPages, s.SwapPages, s.PmdMapped)).ToList();

    public async Task<PmScanResult> PagemapScanAsync(int process, PmScanArg arg)
    {
        var req = new V1.PagemapScanRequest
        {
            MmId = Id(process),
            Flags = arg.Flags,
            Start = arg.Start,
            End = arg.End,
            VecLen = arg.VecLen,
            MaxPages = arg.MaxPages,
            CategoryInverted = arg.CategoryInverted,
            CategoryMask = arg.CategoryMask,
            CategoryAnyofMask = arg.CategoryAnyofMask,
            ReturnMask = arg.ReturnMask,
        };
        var r = await client.PagemapScanAsync(req).ConfigureAwait(false);
        return new PmScanResult(E(r.Errno), r.WalkEnd, r.Regions.Select(g => new PageRegion(g.Start, g.End, g.Categories)).ToList());
    }

    public async ValueTask DisposeAsync()
    {
        if (_machine != 0)
            await client.DestroyMachineAsync(_machine).ConfigureAwait(false);
        _machine = 0;
    }

    public async Task<(int RuleId, string? Error)> AddInjectRuleAsync(InjectRule rule)
    {
        var machine = await MachineAsync().ConfigureAwait(false);
        var r = new V1.InjectRule
        {
            Site = (V1.InjectSite)(int)rule.Site,
            Name = rule.Name,
            MmId = rule.MmId is { } p ? Id(p) : 0,
            UffdId = rule.UffdId is { } u ? Id(u) : 0,
            Tid = rule.Tid ?? 0,
            Start = rule.Start,
            End = rule.End,
            Every = rule.Every,
            Probability = rule.Probability,
            MaxFirings = rule.MaxFirings,
            After = rule.After,
            Until = rule.Until,
            Seed = rule.Seed,
            Pages = rule.Pages,
            Wake = rule.Wake,
        };
        try
        {
            var resp = await client.Injection.AddRuleAsync(new V1.AddRuleRequest { MachineId = machine, Rule = r }).ConfigureAwait(false);
            return ((int)resp.RuleId, null);
        }
        catch (Grpc.Core.RpcException ex) when (ex.StatusCode == Grpc.Core.StatusCode.InvalidArgument)
        {
            var d = ex.Status.Detail;
            return (0, d.StartsWith("rule: ", StringComparison.Ordinal) ? d[6..] : d);
        }
    }

    public async Task<bool> RemoveInjectRuleAsync(int ruleId)
    {
        try
        {
            await client.Injection.RemoveRuleAsync(new V1.RemoveRuleRequest { MachineId = await MachineAsync().ConfigureAwait(false), RuleId = ruleId }).ConfigureAwait(false);
            return true;
        }
        catch (Grpc.Core.RpcException ex) when (ex.StatusCode == Grpc.Core.StatusCode.NotFound)
        {
            return false;
        }
    }

    public async Task<(IReadOnlyList<InjectionRecord> Records, string? Error)> FireInjectRuleAsync(int ruleId)
    {
        try
        {
            var resp = await client.Injection.FireRuleAsync(new V1.FireRuleRequest { MachineId = await MachineAsync().ConfigureAwait(false), RuleId = ruleId }).ConfigureAwait(false);
            return ([.. resp.Records.Select(ToModel)], null);
        }
        catch (Grpc.Core.RpcException ex) when (ex.StatusCode == Grpc.Core.StatusCode.FailedPrecondition)
        {
            return ([], ex.Status.Detail);
        }
    }

    public async Task<IReadOnlyList<InjectionRecord>> InjectionLogAsync(long afterSeq)
    {
        var resp = await client.Injection.ReadLogAsync(new V1.ReadLogRequest { MachineId = await MachineAsync().ConfigureAwait(false), AfterSeq = afterSeq }).ConfigureAwait(false);
        return [.. resp.Records.Select(ToModel)];
    }

    private static InjectionRecord ToModel(V1.InjectionRecord r) =>
        new(r.Seq, r.ModelStep, (InjectSite)(int)r.Site, (int)r.RuleId, r.RuleName, 0, 0, r.Tid, r.Address, r.Detail);
}

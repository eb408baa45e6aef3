using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;

namespace UffdGrpc.Server.Services;

/// <summary>Simulated threads: accesses and parked syscalls, waited for or started and observed.</summary>
public sealed class ThreadsService(MachineRegistry registry) : Threads.ThreadsBase
{
    private ThreadInfo Info(ThreadEntry t) => t.Host.Kernel.Locked(() => new ThreadInfo
    {
        ThreadId = t.Id,
        Tid = t.Thread.Tid,
        MmId = registry.IdOf(t.Host, t.Thread.Mm),
        State = ProtoMapping.StateOf(t.Thread),
        OpId = t.Thread.Op is null ? 0 : t.OpId,
        BlockedOnUffdId = t.Thread.BlockedOn is { } ctx ? registry.IdOf(t.Host, ctx) : 0,
    });

    public override Task<ThreadInfo> CreateThread(CreateThreadRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        if (e.Host.Kernel.Locked(() => e.Mm.Exited))
            throw RequestErrors.Precondition("PROCESS_EXITED", $"process {e.Id} has exited");
        var id = e.Host.Run(() => registry.IdOf(e.Host, e.Host.Kernel.CreateThread(e.Mm)));
        return Task.FromResult(Info(registry.Thread(id)));
    }

    public override Task<ThreadInfo> GetThread(ThreadRef request, ServerCallContext context) =>
        Task.FromResult(Info(registry.Thread(request.ThreadId)));

    public override Task<ListThreadsResponse> ListThreads(ListThreadsRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var ids = e.Host.Kernel.Locked(() => e.Host.ThreadIds.Where(p => p.Key.Mm == e.Mm).Select(p => p.Value).Order().ToList());
        var r = new ListThreadsResponse();
        r.Threads.AddRange(ids.Select(id => Info(registry.Thread(id))));
        return Task.FromResult(r);
    }

    public override async Task<ThreadOpResult> Access(AccessRequest request, ServerCallContext context)
    {
        var t = registry.Thread(request.ThreadId);
        var op = ProtoMapping.ToModel(request.Access);
        var entry = registry.Start(t, op, logged: false);
        return await entry.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
    }

    public override Task<StartOpResponse> StartOp(StartOpRequest request, ServerCallContext context)
    {
        var t = registry.Thread(request.ThreadId);
        if (request.Op is null)
            throw RequestErrors.Invalid("op", "required");
        var op = ProtoMapping.ToModel(request.Op);
        var entry = registry.Start(t, op, logged: true);
        return Task.FromResult(new StartOpResponse { OpId = entry.Id, State = Info(t).State });
    }

    public override async Task<ThreadOpResult> WaitOp(WaitOpRequest request, ServerCallContext context)
    {
        var op = registry.Get<OpEntry>(request.OpId, "op_id");
        var r = await op.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        registry.Forget(op);
        return r;
    }

    public override Task<TakeCompletionsResponse> TakeCompletions(TakeCompletionsRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var r = new TakeCompletionsResponse();
        r.Results.AddRange(registry.TakeCompletions(h));
        return Task.FromResult(r);
    }
}

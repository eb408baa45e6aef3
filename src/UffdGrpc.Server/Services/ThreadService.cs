using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;

namespace UffdGrpc.Server.Services;

/// <summary>Simulated threads: accesses and parked syscalls, waited for or started and observed.</summary>
public sealed class ThreadService(MachineRegistry registry) : Contracts.V1.ThreadService.ThreadServiceBase
{
    private ThreadInfo Info(ThreadEntry t) => t.Host.Kernel.Locked(() => new ThreadInfo
    {
        ThreadId = t.Id,
        Tid = t.Thread.Tid,
        MmId = registry.IdOf(t.Host, t.Thread.Mm),
        State = ProtoMapping.StateOf(t.Thread),
        OpId = t.Thread.Op is null ? 0 : t.OpId,
        BlockedOnUffdId = t.Thread.BlockedOn is { } ctx ? registry.IdOf(t.Host, ctx) : 0,
        BlocktimeNs = t.Thread.Blocktime.Ticks * 100,
    });

    public override Task<CreateThreadResponse> CreateThread(CreateThreadRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var id = e.Host.Run(() =>
        {
            if (e.Mm.Exited)
                throw RequestErrors.Precondition("PROCESS_EXITED", $"process {e.Id} has exited");
            Security.Quotas.Check(e.Host.LiveThreads, registry.Quotas.Limits.ThreadsPerMachine, nameof(Security.LimitOptions.ThreadsPerMachine), $"machine {e.Host.Id}");
            return registry.IdOf(e.Host, e.Host.Kernel.CreateThread(e.Mm));
        });
        return Task.FromResult(new CreateThreadResponse { Thread = Info(registry.Thread(id)) });
    }

    public override Task<GetThreadResponse> GetThread(GetThreadRequest request, ServerCallContext context) =>
        Task.FromResult(new GetThreadResponse { Thread = Info(registry.Thread(request.ThreadId)) });

    public override Task<ListThreadsResponse> ListThreads(ListThreadsRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var ids = e.Host.Kernel.Locked(() => e.Host.ThreadIds.Where(p => p.Key.Mm == e.Mm).Select(p => p.Value).Order().ToList());
        var (page, next) = Paging.Take(ids, id => id, request.PageSize, request.PageToken);
        var r = new ListThreadsResponse { NextPageToken = next };
        r.Threads.AddRange(page.Select(id => Info(registry.Thread(id))));
        return Task.FromResult(r);
    }

    public override async Task<AccessResponse> Access(AccessRequest request, ServerCallContext context)
    {
        var t = registry.Thread(request.ThreadId);
        var op = ProtoMapping.ToModel(request.Access);
        var entry = registry.Start(t, op, logged: false);
        return new AccessResponse { Result = await entry.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false) };
    }

    public override Task<StartOpResponse> StartOp(StartOpRequest request, ServerCallContext context)
    {
        var t = registry.Thread(request.ThreadId);
        if (request.Op is null)
            throw RequestErrors.Invalid("op", "required");
        var op = ProtoMapping.ToModel(request.Op, registry, t);
        var entry = registry.Start(t, op, logged: true);
        return Task.FromResult(new StartOpResponse { OpId = entry.Id, State = Info(t).State });
    }

    public override async Task<WaitOpResponse> WaitOp(WaitOpRequest request, ServerCallContext context)
    {
        var op = registry.Get<OpEntry>(request.OpId, "op_id");
        // The wait begins under the machine lock: on a journaled machine that is its step.
        op.Host.Run(() => { });
        var r = await op.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        registry.Forget(op);
        return new WaitOpResponse { Result = r };
    }

    public override Task<TakeCompletionsResponse> TakeCompletions(TakeCompletionsRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var r = new TakeCompletionsResponse();
        r.Results.AddRange(registry.TakeCompletions(h));
        return Task.FromResult(r);
    }
}

using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using UffdGrpc.Contracts.V1;
using V1 = UffdGrpc.Contracts.V1;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// The transport floor: a bare gRPC server (Kestrel, h2c) serving the same RPCs the bench
/// drives — CreateMachine/Mm/Thread, Mmap, Userfaultfd, UFFDIO_API/REGISTER as
/// acknowledgements; Access and StartOp/WaitOp that wait; UFFDIO_WRITEPROTECT that resolves;
/// ReadEvents and Serve streams — over <see cref="FloorState"/> and no model. Run as its own
/// process (<c>bench-floor --urls URL</c>), so the layout matches the product server's.
/// </summary>
internal static class FloorServer
{
    public static async Task RunAsync(string urls, CancellationToken ct)
    {
        var builder = Microsoft.AspNetCore.Builder.WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.UseUrls(urls);
        builder.WebHost.ConfigureKestrel(o => o.ConfigureEndpointDefaults(l => l.Protocols = Microsoft.AspNetCore.Server.Kestrel.Core.HttpProtocols.Http2));
        builder.Services.AddGrpc(o => o.MaxReceiveMessageSize = Microsoft.Extensions.DependencyInjection.UffdServerServiceCollectionExtensions.MaxReceiveMessageSize);
        builder.Services.AddSingleton<FloorState>();
        var app = builder.Build();
        app.MapGrpcService<FloorMachines>();
        app.MapGrpcService<FloorMms>();
        app.MapGrpcService<FloorThreads>();
        app.MapGrpcService<FloorUffds>();
        await app.StartAsync(ct).ConfigureAwait(false);
        await app.WaitForShutdownAsync(ct).ConfigureAwait(false);
    }

    /// <summary>Runs <paramref name="fn"/> under the machine lock, then completes the wakes it collected.</summary>
    internal static T Locked<T>(FloorMachine m, Func<List<TaskCompletionSource>, T> fn)
    {
        var wakes = new List<TaskCompletionSource>();
        T r;
        lock (m.Lock)
        {
            if (m.Destroyed)
                throw new RpcException(new Status(StatusCode.NotFound, "machine destroyed"));
            r = fn(wakes);
        }
        foreach (var w in wakes)
            w.TrySetResult();
        return r;
    }
}

internal sealed class FloorMachines(FloorState s) : V1.MachineService.MachineServiceBase
{
    public override Task<CreateMachineResponse> CreateMachine(CreateMachineRequest request, ServerCallContext context) =>
        Task.FromResult(new CreateMachineResponse { Machine = new MachineInfo { MachineId = s.Add(new FloorMachine()) } });

    public override Task<DestroyMachineResponse> DestroyMachine(DestroyMachineRequest request, ServerCallContext context)
    {
        var m = s.Get<FloorMachine>(request.MachineId);
        FloorServer.Locked(m, wakes =>
        {
            foreach (var u in m.Uffds)
                u.Close(wakes);
            m.Destroyed = true;
            return 0;
        });
        s.Remove(request.MachineId);
        return Task.FromResult(new DestroyMachineResponse());
    }
}

internal sealed class FloorMms(FloorState s) : V1.MmService.MmServiceBase
{
    public override Task<CreateMmResponse> CreateMm(CreateMmRequest request, ServerCallContext context) =>
        Task.FromResult(new CreateMmResponse { Mm = new MmInfo { MmId = s.Add(new FloorMm(s.Get<FloorMachine>(request.MachineId))) } });

    public override Task<MmapResponse> Mmap(MmapRequest request, ServerCallContext context)
    {
        s.Get<FloorMm>(request.MmId);
        return Task.FromResult(new MmapResponse { Errno = Errno.Unspecified, Addr = request.Addr });
    }
}

internal sealed class FloorThreads(FloorState s) : V1.ThreadService.ThreadServiceBase
{
    private int _tid = 1000;

    public override Task<CreateThreadResponse> CreateThread(CreateThreadRequest request, ServerCallContext context)
    {
        var mm = s.Get<FloorMm>(request.MmId);
        var tid = Interlocked.Increment(ref _tid);
        var t = new FloorThread(mm, tid);
        var id = t.Id = s.Add(t);
        return Task.FromResult(new CreateThreadResponse { Thread = new ThreadInfo { ThreadId = id, Tid = tid, MmId = request.MmId } });
    }

    private FloorOp Start(long threadId, V1.AccessOp a)
    {
        var t = s.Get<FloorThread>(threadId);
        var op = new FloorOp(t, a.Addr & ~0xfffUL, (int)Math.Max(1, a.Touch?.Pages ?? 1), (byte)(a.Touch?.Value ?? 0));
        op.Id = s.Add(op);
        FloorServer.Locked(t.Mm.Machine, wakes =>
        {
            if (t.Mm.Uffd is { } u)
                u.Step(op, wakes);
            else
                op.Result.TrySetResult(new ThreadOpResult { OpId = op.Id, ThreadId = t.Id, Errno = Errno.Unspecified, Done = (uint)op.Count });
            return 0;
        });
        return op;
    }

    public override async Task<AccessResponse> Access(AccessRequest request, ServerCallContext context)
    {
        var op = Start(request.ThreadId, request.Access);
        var r = await op.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        s.Remove(op.Id);
        return new AccessResponse { Result = r };
    }

    public override Task<StartOpResponse> StartOp(StartOpRequest request, ServerCallContext context)
    {
        var op = Start(request.ThreadId, request.Op.Access);
        return Task.FromResult(new StartOpResponse { OpId = op.Id, State = op.Result.Task.IsCompleted ? V1.ThreadState.Idle : V1.ThreadState.BlockedInUserfault });
    }

    public override async Task<WaitOpResponse> WaitOp(WaitOpRequest request, ServerCallContext context)
    {
        var op = s.Get<FloorOp>(request.OpId);
        var r = await op.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        s.Remove(op.Id);
        return new WaitOpResponse { Result = r };
    }
}

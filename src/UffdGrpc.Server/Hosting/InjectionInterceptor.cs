using Google.Protobuf;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The RPC wire sites (gRPC xDS fault injection's delay and abort): before a unary or
/// server-streaming call of a machine that holds such rules runs, a firing RPC_DELAY rule
/// delays it and a firing RPC_ABORT rule fails it with the rule's status (nothing changes).
/// The machine is the one the request names (machine_id, mm_id, uffd_id, thread_id or
/// file_id). The FaultInjectionService itself is never delayed or aborted.
/// </summary>
public sealed class InjectionInterceptor(MachineRegistry registry) : Interceptor
{
    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        // No wire rule anywhere (the usual case): the call goes straight on, with no async frame.
        if (!Model.Kernel.WireRulesAnywhere)
            return continuation(request, context);
        return Delayed(request, context, continuation);

        async Task<TResponse> Delayed(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
        {
            await BeforeAsync(request, context).ConfigureAwait(false);
            return await continuation(request, context).ConfigureAwait(false);
        }
    }

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        if (!Model.Kernel.WireRulesAnywhere)
            return continuation(request, responseStream, context);
        return Delayed(request, responseStream, context, continuation);

        async Task Delayed(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
        {
            await BeforeAsync(request, context).ConfigureAwait(false);
            await continuation(request, responseStream, context).ConfigureAwait(false);
        }
    }

    private async Task BeforeAsync(object request, ServerCallContext context)
    {
        if (!Model.Kernel.WireRulesAnywhere || request is not IMessage m || context.Method.StartsWith("/uffd.v1.FaultInjectionService/", StringComparison.Ordinal))
            return;
        if (registry.HostNamedBy(m, out var uffdId) is not { } host || !host.Kernel.HasWireRules)
            return;
        var method = context.Method.TrimStart('/');
        // Through Run: on a journaled machine the decision (it draws from the rule's PRNG) is
        // the call's first step, so a replay makes it at the same point.
        if (host.Run(() => host.Kernel.DecideWire(Model.InjectSite.RpcDelay, method, uffdId)) is { } delay)
            await Task.Delay(delay.DelayMs, context.CancellationToken).ConfigureAwait(false);
        if (host.Run(() => host.Kernel.DecideWire(Model.InjectSite.RpcAbort, method, uffdId)) is { } abort)
            throw new RpcException(new Status((StatusCode)abort.Rule.Status, $"aborted by injection rule {abort.RuleId}"));
    }
}

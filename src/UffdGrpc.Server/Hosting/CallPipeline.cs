using System.Runtime.CompilerServices;
using Grpc.Core;
using Grpc.Core.Interceptors;
using UffdGrpc.Server.Hosting.Kernel;
using UffdGrpc.Server.Security;
using UffdGrpc.Server.Telemetry;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The server's interceptors as the one interceptor grpc-dotnet runs. grpc-dotnet wraps each
/// registered interceptor in an async frame of its own and resolves it from the request's
/// services on every call: with six of them that was about 1.5 KB allocated per fault round
/// trip (11.7 KB against 10.1 KB after, the floor's 5.9 KB; measured with a temporary
/// allocation probe). Here a call passes through the same stages, in the same order, each
/// calling the next directly:
/// <list type="number">
/// <item><see cref="TelemetryInterceptor"/>: the activity and the RPC counters, seeing the final status;</item>
/// <item><see cref="ServerErrorInterceptor"/>: what a handler threw, as the status the client gets;</item>
/// <item><see cref="AuthInterceptor"/>: the caller's principal, or UNAUTHENTICATED;</item>
/// <item><see cref="KernelBackendInterceptor"/>: calls on kernel-backed address spaces go to their backend;</item>
/// <item><see cref="JournalInterceptor"/>: a journaled machine's step (outside the injection stage, so a wire rule's decision is a step);</item>
/// <item><see cref="InjectionInterceptor"/>: wire fault-injection rules;</item>
/// </list>
/// then the service method. The chain for a method is built once, on its first call (grpc-dotnet
/// passes each method's invoker as the same delegate on every call), and dies with it.
/// </summary>
public sealed class CallPipeline : Interceptor
{
    private readonly Interceptor[] _stages;
    // Per service-method continuation: the composed chain (a delegate of the same type).
    private readonly ConditionalWeakTable<Delegate, Delegate> _chains = [];

    public CallPipeline(TelemetryInterceptor telemetry, ServerErrorInterceptor errors, AuthInterceptor auth, KernelBackendInterceptor kernel, JournalInterceptor journal, InjectionInterceptor injection) =>
        _stages = [telemetry, errors, auth, kernel, journal, injection];

    private TChain Chain<TChain>(TChain continuation, Func<Interceptor, TChain, TChain> wrap)
        where TChain : Delegate =>
        _chains.TryGetValue(continuation, out var built) ? (TChain)built : Build(continuation, wrap);

    /// <summary>The first call of a method: its chain, kept for the method's later calls (a racing first call may build one more, unused).</summary>
    private TChain Build<TChain>(TChain continuation, Func<Interceptor, TChain, TChain> wrap)
        where TChain : Delegate
    {
        var next = continuation;
        for (var i = _stages.Length - 1; i >= 0; i--)
            next = wrap(_stages[i], next);
        _chains.TryAdd(continuation, next);
        return _chains.TryGetValue(continuation, out var built) ? (TChain)built : next;
    }

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation) =>
        Chain(continuation, static (stage, inner) => (r, c) => stage.UnaryServerHandler(r, c, inner))(request, context);

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation) =>
        Chain(continuation, static (stage, inner) => (r, s, c) => stage.ServerStreamingServerHandler(r, s, c, inner))(request, responseStream, context);

    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation) =>
        Chain(continuation, static (stage, inner) => (s, c) => stage.ClientStreamingServerHandler(s, c, inner))(requestStream, context);

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation) =>
        Chain(continuation, static (stage, inner) => (s, w, c) => stage.DuplexStreamingServerHandler(s, w, c, inner))(requestStream, responseStream, context);
}

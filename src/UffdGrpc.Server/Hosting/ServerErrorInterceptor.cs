using Grpc.Core;
using Grpc.Core.Interceptors;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The last line of defence: an exception that is not a status (a bug in the server or the
/// model) becomes INTERNAL with a log line, never an UNKNOWN with a stack trace, and the
/// server keeps serving. A call the client cancelled (or whose deadline passed) ends CANCELLED,
/// not UNKNOWN, whichever host answers it.
/// </summary>
public sealed partial class ServerErrorInterceptor(ILogger<ServerErrorInterceptor> logger) : Interceptor
{
    [LoggerMessage(EventId = 20, EventName = "InternalError", Level = LogLevel.Error, Message = "{Method} failed with an internal error")]
    private static partial void InternalError(ILogger logger, string method, Exception exception);

    private RpcException Internal(ServerCallContext context, Exception ex)
    {
        InternalError(logger, context.Method, ex);
        return new RpcException(new Status(StatusCode.Internal, $"internal error: {ex.GetType().Name}: {ex.Message}"));
    }

    private static bool IsBug(Exception ex, ServerCallContext context) =>
        ex is not RpcException and not IOException && !(ex is OperationCanceledException && context.CancellationToken.IsCancellationRequested);

    /// <summary>
    /// The model does no I/O: an IOException is the call's own transport (the client reset a
    /// Serve stream while it was being read, which Kestrel reports before the call's token is
    /// cancelled). The client is gone; it is not an internal error.
    /// </summary>
    private static RpcException Broken(IOException ex) => new(new Status(StatusCode.Unavailable, "the call's stream broke: " + ex.Message));

    /// <summary>The client cancelled the call, or its deadline passed, while the handler waited.</summary>
    private static bool IsCancellation(Exception ex, ServerCallContext context) =>
        ex is OperationCanceledException && context.CancellationToken.IsCancellationRequested;

    /// <summary>
    /// Whether the interceptor turns <paramref name="ex"/> into a status. A status passes
    /// through; a cancellation becomes CANCELLED (Kestrel would end the call that way itself,
    /// but an in-memory test host reports an unmapped exception as UNKNOWN).
    /// </summary>
    private static bool Converts(Exception ex, ServerCallContext context) => ex is IOException || IsCancellation(ex, context) || IsBug(ex, context);

    /// <summary>The one mapping of what a handler threw to the status the client sees.</summary>
    private RpcException StatusOf(Exception ex, ServerCallContext context) => ex switch
    {
        IOException io => Broken(io),
        OperationCanceledException when IsCancellation(ex, context) => new RpcException(new Status(StatusCode.Cancelled, "the call was cancelled by the client or its deadline passed")),
        _ => Internal(context, ex),
    };

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        // Most unary calls finish before they return (the model call is synchronous): those
        // need no async frame here, only a check of what they threw.
        Task<TResponse> task;
        try
        {
            task = continuation(request, context);
        }
        catch (Exception ex) when (Converts(ex, context))
        {
            throw StatusOf(ex, context);
        }
        return task.IsCompletedSuccessfully ? task : AwaitedAsync(task, context);
    }

    private async Task<TResponse> AwaitedAsync<TResponse>(Task<TResponse> task, ServerCallContext context)
    {
        try
        {
            return await task.ConfigureAwait(false);
        }
        catch (Exception ex) when (Converts(ex, context))
        {
            throw StatusOf(ex, context);
        }
    }

    public override async Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            await continuation(request, responseStream, context).ConfigureAwait(false);
        }
        catch (Exception ex) when (Converts(ex, context))
        {
            throw StatusOf(ex, context);
        }
    }

    public override async Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            return await continuation(requestStream, context).ConfigureAwait(false);
        }
        catch (Exception ex) when (Converts(ex, context))
        {
            throw StatusOf(ex, context);
        }
    }

    public override async Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        try
        {
            await continuation(requestStream, responseStream, context).ConfigureAwait(false);
        }
        catch (Exception ex) when (Converts(ex, context))
        {
            throw StatusOf(ex, context);
        }
    }
}

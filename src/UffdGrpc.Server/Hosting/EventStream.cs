using Grpc.Core;

namespace UffdGrpc.Server.Hosting;

/// <summary>How the event streams (ReadEvents, Serve) open and write, for model and kernel-backed uffds alike.</summary>
internal static class EventStream
{
    /// <summary>
    /// Sends the headers, so a handler knows its stream is open before any message. A call
    /// whose deadline passed (or that was cancelled) before this ran has already been answered
    /// by grpc-dotnet, headers included: it ends as a cancellation, not as an internal error.
    /// </summary>
    public static async Task SendHeadersAsync(ServerCallContext context)
    {
        var ct = context.CancellationToken;
        ct.ThrowIfCancellationRequested();
        try
        {
            await context.WriteResponseHeadersAsync([]).ConfigureAwait(false);
        }
        catch (InvalidOperationException) when (ct.IsCancellationRequested)
        {
            throw new OperationCanceledException("the call ended before its stream opened", ct);
        }
    }

    /// <summary>
    /// Writes one response, or ends the stream with the call. Once the call has ended (the
    /// client left, its deadline passed) the framework may already have completed the
    /// response — sometimes before the call's token shows it — and the writer throws an
    /// InvalidOperationException ("the request is complete", "writing is not allowed after
    /// writer was completed") or the transport's IOException. A stream's writes are
    /// serialized by its caller, so those mean only that: the stream ends CANCELLED (a status
    /// nobody reads any more), not as a server bug.
    /// </summary>
    public static async Task WriteOrEndAsync<T>(IServerStreamWriter<T> stream, T message, CancellationToken ct)
    {
        try
        {
            await stream.WriteAsync(message, ct).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is InvalidOperationException or IOException || (ct.IsCancellationRequested && ex is not OperationCanceledException))
        {
            throw new RpcException(new Status(StatusCode.Cancelled, "the call ended while a message was being written", ex));
        }
    }
}

using Grpc.Core;

namespace UffdGrpc.Server.Hosting;

/// <summary>The response headers an event stream sends before its first message.</summary>
internal static class StreamHeaders
{
    /// <summary>
    /// Sends the headers, so a handler knows its stream is open before any message. A call
    /// whose deadline passed (or that was cancelled) before this ran has already been answered
    /// by grpc-dotnet, headers included: it ends as a cancellation, not as an internal error.
    /// </summary>
    public static async Task SendAsync(ServerCallContext context)
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
}

using Grpc.Core;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The shape of a Serve call, the same for a model uffd and a kernel-backed one: a reader
/// loop delivers the uffd's messages while the request loop resolves each request in order;
/// the call ends when the client half-closes and the reader ends, or when the reader ends
/// first (the uffd was closed, the machine destroyed, the server is stopping).
/// </summary>
internal static class ServeStream
{
    /// <summary>
    /// Resolves <paramref name="first"/> and every later request with <paramref name="resolve"/>
    /// while <paramref name="readLoop"/> (given a token cancelled when the call ends) delivers
    /// messages. No read of the request stream is left pending when this returns.
    /// </summary>
    public static async Task RunAsync(ServeRequest first, IAsyncStreamReader<ServeRequest> requestStream, Func<ServeRequest, Task> resolve, Func<CancellationToken, Task> readLoop, CancellationToken ct)
    {
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var reader = readLoop(stop.Token);
        using var requests = CancellationTokenSource.CreateLinkedTokenSource(ct);
        try
        {
            await resolve(first).ConfigureAwait(false);
            while (true)
            {
                var next = requestStream.MoveNext(requests.Token);
                var done = await Task.WhenAny(next, reader).ConfigureAwait(false);
                if (done == reader)
                {
                    await requests.CancelAsync().ConfigureAwait(false);
                    try
                    {
                        await next.ConfigureAwait(false);
                    }
                    catch (OperationCanceledException)
                    {
                        // The pending read ended with the call.
                    }
                    await reader.ConfigureAwait(false);
                    return;
                }
                if (!await next.ConfigureAwait(false))
                    break;
                await resolve(requestStream.Current).ConfigureAwait(false);
            }
            // Half-closed: keep delivering messages until the uffd closes or the call ends.
            await reader.ConfigureAwait(false);
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            try
            {
                await reader.ConfigureAwait(false);
            }
            catch (Exception) when (stop.IsCancellationRequested)
            {
                // The reader ended with the call.
            }
        }
    }
}

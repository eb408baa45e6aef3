using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The shape of a Serve call, the same for a model uffd and a kernel-backed one: a reader
/// loop delivers the uffd's messages while the request loop resolves each request in order,
/// one response per request (responses are written one at a time: the stream writer is not
/// concurrent); the call ends when the client half-closes and the reader ends, or when the
/// reader ends first (the uffd was closed, the machine destroyed, the server is stopping).
/// </summary>
internal static class ServeStream
{
    /// <summary>Messages per response when the first request asks for 0.</summary>
    public const int DefaultBatch = 64;

    /// <summary>The most messages per response, and resolutions per request, a handler may ask for.</summary>
    public const int MaxBatch = 1024;

    /// <summary>The first request's max_messages, checked (INVALID_ARGUMENT above <see cref="MaxBatch"/>), 0 meaning <see cref="DefaultBatch"/>.</summary>
    public static int MaxMessages(ServeRequest first)
    {
        RequestErrors.Require(first.MaxMessages <= MaxBatch, "max_messages", $"0 (the default, {DefaultBatch}) to {MaxBatch}");
        return first.MaxMessages == 0 ? DefaultBatch : (int)first.MaxMessages;
    }

    /// <summary>
    /// Resolves <paramref name="first"/> and every later request with <paramref name="resolve"/>
    /// (a request naming another uffd than <paramref name="uffdId"/> is INVALID_ARGUMENT, one
    /// with no resolution gets no response) while <paramref name="readLoop"/>, given the
    /// stream's writer and a token cancelled when the call ends, delivers messages. No read of
    /// the request stream is left pending when this returns.
    /// </summary>
    public static async Task RunAsync(
        ServeRequest first,
        long uffdId,
        IAsyncStreamReader<ServeRequest> requestStream,
        IServerStreamWriter<ServeResponse> responseStream,
        Func<ServeRequest, Task<IEnumerable<ResolutionResult>>> resolve,
        Func<Func<ServeResponse, Task>, CancellationToken, Task> readLoop,
        CancellationToken ct)
    {
        using var writeGate = new SemaphoreSlim(1, 1);

        async Task WriteAsync(ServeResponse r)
        {
            await writeGate.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                await EventStream.WriteOrEndAsync(responseStream, r, ct).ConfigureAwait(false);
            }
            finally
            {
                writeGate.Release();
            }
        }

        async Task ResolveAsync(ServeRequest req)
        {
            if (req.UffdId != 0 && req.UffdId != uffdId)
                throw RequestErrors.Invalid("uffd_id", "0 or the stream's uffd after the first message");
            if (req.Resolutions.Count == 0)
                return;
            var response = new ServeResponse();
            response.Results.AddRange(await resolve(req).ConfigureAwait(false));
            await WriteAsync(response).ConfigureAwait(false);
        }

        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var reader = readLoop(WriteAsync, stop.Token);
        using var requests = CancellationTokenSource.CreateLinkedTokenSource(ct);
        try
        {
            await ResolveAsync(first).ConfigureAwait(false);
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
                await ResolveAsync(requestStream.Current).ConfigureAwait(false);
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

using System.Threading.Channels;
using Grpc.Core;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>
/// A batched handler on one uffd (the <c>Serve</c> stream): <see cref="Messages"/> yields
/// batches of messages as the server reads them for this handler; <see cref="ResolveAsync"/>
/// sends many resolutions in one request and returns their results, in order. One caller
/// may resolve at a time (results come back in request order).
/// </summary>
public sealed class ServeSession : IAsyncDisposable
{
    private readonly AsyncDuplexStreamingCall<ServeRequest, ServeResponse> _call;
    private readonly Channel<IReadOnlyList<UffdMsg>> _messages = Channel.CreateUnbounded<IReadOnlyList<UffdMsg>>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
    private readonly Channel<IReadOnlyList<ResolutionResult>> _results = Channel.CreateUnbounded<IReadOnlyList<ResolutionResult>>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
    private readonly SemaphoreSlim _resolveGate = new(1, 1);
    private readonly Task _pump;

    private ServeSession(AsyncDuplexStreamingCall<ServeRequest, ServeResponse> call, long uffdId)
    {
        _call = call;
        UffdId = uffdId;
        _pump = PumpAsync();
    }

    public long UffdId { get; }

    internal static async Task<ServeSession> OpenAsync(UffdClient client, long uffdId, uint maxMessages, CancellationToken ct)
    {
        var call = client.Uffd.Serve(cancellationToken: ct);
        await call.RequestStream.WriteAsync(new ServeRequest { UffdId = uffdId, MaxMessages = maxMessages }, ct).ConfigureAwait(false);
        return new ServeSession(call, uffdId);
    }

    /// <summary>Batches of messages read for this handler, in queue order. Completes when the stream ends (the uffd was closed); a failed stream rethrows its status.</summary>
    public ChannelReader<IReadOnlyList<UffdMsg>> Messages => _messages.Reader;

    private async Task PumpAsync()
    {
        try
        {
            await foreach (var r in _call.ResponseStream.ReadAllAsync().ConfigureAwait(false))
            {
                if (r.Messages.Count > 0)
                    _messages.Writer.TryWrite(r.Messages);
                if (r.Results.Count > 0)
                    _results.Writer.TryWrite(r.Results);
            }
            _messages.Writer.TryComplete();
            _results.Writer.TryComplete();
        }
        catch (Exception ex)
        {
            _messages.Writer.TryComplete(ex);
            _results.Writer.TryComplete(ex);
        }
    }

    /// <summary>Runs <paramref name="resolutions"/> (in order, on this stream's uffd unless one names another) and returns their results.</summary>
    public async Task<IReadOnlyList<ResolutionResult>> ResolveAsync(IEnumerable<Resolution> resolutions, CancellationToken ct = default)
    {
        var req = new ServeRequest { Resolutions = { resolutions } };
        if (req.Resolutions.Count == 0)
            return [];
        await _resolveGate.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            await _call.RequestStream.WriteAsync(req, ct).ConfigureAwait(false);
            return await _results.Reader.ReadAsync(ct).ConfigureAwait(false);
        }
        catch (ChannelClosedException ex) when (ex.InnerException is RpcException rpc)
        {
            // The call ended (a malformed batch, the uffd closed): its status is the answer.
            throw rpc;
        }
        finally
        {
            _resolveGate.Release();
        }
    }

    /// <summary>Half-closes the request side and ends the call.</summary>
    public async ValueTask DisposeAsync()
    {
        try
        {
            await _call.RequestStream.CompleteAsync().ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is RpcException or InvalidOperationException)
        {
            // The call already ended.
        }
        _call.Dispose();
        try
        {
            await _pump.ConfigureAwait(false);
        }
        catch (RpcException)
        {
            // Disposing cancels the call.
        }
        _resolveGate.Dispose();
    }

    // ------------------------------------------------------------------ resolution builders

    /// <summary>UFFDIO_WRITEPROTECT(mode 0) of one page: un-protect and wake.</summary>
    public static Resolution Unprotect(ulong page, ulong tag = 0) =>
        new() { Tag = tag, UffdioWriteprotect = new UffdioWriteprotectRequest { Start = page, Len = 4096, Mode = 0 } };

    /// <summary>UFFDIO_ZEROPAGE of one page.</summary>
    public static Resolution Zeropage(ulong page, ulong tag = 0) =>
        new() { Tag = tag, UffdioZeropage = new UffdioZeropageRequest { Start = page, Len = 4096 } };

    /// <summary>UFFDIO_COPY of <paramref name="data"/> to <paramref name="dst"/>.</summary>
    public static Resolution Copy(ulong dst, ReadOnlySpan<byte> data, ulong mode = 0, ulong tag = 0) =>
        new() { Tag = tag, UffdioCopy = new UffdioCopyRequest { Dst = dst, Src = 0x7f00_0000_0000, Len = (ulong)data.Length, Mode = mode, Data = Google.Protobuf.ByteString.CopyFrom(data) } };

    /// <summary>UFFDIO_WAKE of one page.</summary>
    public static Resolution Wake(ulong page, ulong tag = 0) =>
        new() { Tag = tag, UffdioWake = new UffdioWakeRequest { Start = page, Len = 4096 } };
}

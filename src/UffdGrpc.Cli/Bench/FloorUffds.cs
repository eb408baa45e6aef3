using Grpc.Core;
using UffdGrpc.Contracts.V1;
using V1 = UffdGrpc.Contracts.V1;

namespace UffdGrpc.Cli.Bench;

/// <summary>The floor's userfaultfd RPCs: the unary ones acknowledge or resolve, ReadEvents and Serve stream messages as the product's do (a write gate, a read loop, one response per request).</summary>
internal sealed class FloorUffds(FloorState s) : V1.UserfaultfdService.UserfaultfdServiceBase
{
    public override Task<UserfaultfdResponse> Userfaultfd(UserfaultfdRequest request, ServerCallContext context)
    {
        var mm = s.Get<FloorMm>(request.MmId);
        var id = FloorServer.Locked(mm.Machine, _ =>
        {
            var u = new FloorUffd(mm.Machine);
            var uid = u.Id = s.Add(u);
            mm.Uffd = u;
            mm.Machine.Uffds.Add(u);
            return uid;
        });
        return Task.FromResult(new UserfaultfdResponse { Errno = Errno.Unspecified, UffdId = id });
    }

    public override Task<UffdioApiResponse> UffdioApi(UffdioApiRequest request, ServerCallContext context)
    {
        s.Get<FloorUffd>(request.UffdId);
        return Task.FromResult(new UffdioApiResponse { Errno = Errno.Unspecified, Features = request.Features });
    }

    public override Task<UffdioRegisterResponse> UffdioRegister(UffdioRegisterRequest request, ServerCallContext context)
    {
        s.Get<FloorUffd>(request.UffdId);
        return Task.FromResult(new UffdioRegisterResponse { Errno = Errno.Unspecified });
    }

    public override Task<UffdioWriteprotectResponse> UffdioWriteprotect(UffdioWriteprotectRequest request, ServerCallContext context)
    {
        var u = s.Get<FloorUffd>(request.UffdId);
        FloorServer.Locked(u.Machine, wakes =>
        {
            u.Writeprotect(request.Start, request.Len, request.Mode, wakes);
            return 0;
        });
        return Task.FromResult(new UffdioWriteprotectResponse { Errno = Errno.Unspecified });
    }

    /// <summary>Up to <paramref name="max"/> queued messages, or the task to wait on (null, null: the uffd is gone).</summary>
    private static (List<UffdMsg>? Msgs, Task? Wait) ReadBatch(FloorUffd u, int max) => FloorServer.Locked(u.Machine, _ =>
    {
        if (u.Closed)
            return ((List<UffdMsg>?)null, (Task?)null);
        if (u.Queue.Count == 0)
            return ((List<UffdMsg>?)null, (u.ReadWait ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task);
        var msgs = new List<UffdMsg>(Math.Min(max, u.Queue.Count));
        while (msgs.Count < max && u.Queue.TryDequeue(out var m))
            msgs.Add(m);
        return ((List<UffdMsg>?)msgs, (Task?)null);
    });

    public override async Task ReadEvents(ReadEventsRequest request, IServerStreamWriter<ReadEventsResponse> responseStream, ServerCallContext context)
    {
        var u = s.Get<FloorUffd>(request.UffdId);
        var ct = context.CancellationToken;
        await context.WriteResponseHeadersAsync([]).ConfigureAwait(false);
        while (!ct.IsCancellationRequested)
        {
            var (msgs, wait) = ReadBatch(u, 1);
            if (msgs is not null)
            {
                await responseStream.WriteAsync(new ReadEventsResponse { Msg = msgs[0] }, ct).ConfigureAwait(false);
                continue;
            }
            if (wait is null)
                return;
            await wait.WaitAsync(ct).ConfigureAwait(false);
        }
    }

    public override async Task Serve(IAsyncStreamReader<ServeRequest> requestStream, IServerStreamWriter<ServeResponse> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        if (!await requestStream.MoveNext(ct).ConfigureAwait(false))
            return;
        var u = s.Get<FloorUffd>(requestStream.Current.UffdId);
        var max = requestStream.Current.MaxMessages == 0 ? 64 : (int)requestStream.Current.MaxMessages;
        using var writeGate = new SemaphoreSlim(1, 1);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);

        async Task WriteAsync(ServeResponse r)
        {
            await writeGate.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                await responseStream.WriteAsync(r, ct).ConfigureAwait(false);
            }
            finally
            {
                writeGate.Release();
            }
        }

        async Task ReadLoopAsync()
        {
            while (!stop.IsCancellationRequested)
            {
                var (msgs, wait) = ReadBatch(u, max);
                if (msgs is not null)
                {
                    var r = new ServeResponse();
                    r.Messages.AddRange(msgs);
                    await WriteAsync(r).ConfigureAwait(false);
                    continue;
                }
                if (wait is null)
                    return;
                await wait.WaitAsync(stop.Token).ConfigureAwait(false);
            }
        }

        var reader = ReadLoopAsync();
        try
        {
            while (await requestStream.MoveNext(ct).ConfigureAwait(false))
            {
                var req = requestStream.Current;
                if (req.Resolutions.Count == 0)
                    continue;
                var response = new ServeResponse();
                FloorServer.Locked(u.Machine, wakes =>
                {
                    foreach (var res in req.Resolutions)
                    {
                        if (res.UffdioWriteprotect is { } wp)
                            u.Writeprotect(wp.Start, wp.Len, wp.Mode, wakes);
                        response.Results.Add(new ResolutionResult { Tag = res.Tag, Errno = Errno.Unspecified });
                    }
                    return 0;
                });
                await WriteAsync(response).ConfigureAwait(false);
            }
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

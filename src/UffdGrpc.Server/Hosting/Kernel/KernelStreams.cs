using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>The handler streams on a kernel-backed uffd: ReadEvents and Serve carry the real uffd_msgs the helper read.</summary>
public sealed partial class KernelBackend
{
    /// <summary>One message per response, as the kernel queued them; the stream ends when the uffd is closed or its address space destroyed.</summary>
    internal async Task ReadEvents(ReadEventsRequest request, IServerStreamWriter<ReadEventsResponse> responseStream, ServerCallContext context)
    {
        var u = Get<KernelUffdEntry>(request.UffdId, "uffd_id");
        using var lease = _registry.Quotas.OpenStream();
        var ct = context.CancellationToken;
        await EventStream.SendHeadersAsync(context).ConfigureAwait(false);
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            var (msgs, wait) = Take(u, 1);
            if (msgs is not null)
            {
                await EventStream.WriteOrEndAsync(responseStream, new ReadEventsResponse { Msg = msgs[0] }, ct).ConfigureAwait(false);
                continue;
            }
            if (wait is null)
                return;
            await wait.WaitAsync(ct).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// The batched handler stream: one loop sends the messages (many per response); the
    /// requests' resolutions run in order and are answered one response per request.
    /// </summary>
    internal async Task Serve(ServeRequest first, IAsyncStreamReader<ServeRequest> requestStream, IServerStreamWriter<ServeResponse> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        var u = Get<KernelUffdEntry>(first.UffdId, "uffd_id");
        using var lease = _registry.Quotas.OpenStream();
        var max = ServeStream.MaxMessages(first);

        async Task<IEnumerable<ResolutionResult>> ResolveAsync(ServeRequest req) => (await RunBatchAsync(u, req.Resolutions).ConfigureAwait(false)).Results;

        async Task ReadLoopAsync(Func<ServeResponse, Task> write, CancellationToken token)
        {
            while (!token.IsCancellationRequested)
            {
                var (msgs, wait) = Take(u, max);
                if (msgs is not null)
                {
                    var r = new ServeResponse();
                    r.Messages.AddRange(msgs);
                    await write(r).ConfigureAwait(false);
                    continue;
                }
                if (wait is null)
                    return;
                await wait.WaitAsync(token).ConfigureAwait(false);
            }
        }

        await ServeStream.RunAsync(first, u.Id, requestStream, responseStream, ResolveAsync, ReadLoopAsync, ct).ConfigureAwait(false);
    }

    /// <summary>ListMms of a machine that holds kernel-backed address spaces: the model's and the kernel's, in id order.</summary>
    internal ListMmsResponse ListMms(ListMmsRequest request, Func<long, MmInfo> modelInfo)
    {
        var h = _registry.Machine(request.MachineId);
        var kernel = MmsOf(h).ToDictionary(m => m.Id);
        var ids = h.Kernel.Locked(() => h.MmIds.Values.ToList()).Concat(kernel.Keys).Order().ToList();
        var (page, next) = Paging.Take(ids, id => id, request.PageSize, request.PageToken);
        var r = new ListMmsResponse { NextPageToken = next };
        r.Mms.AddRange(page.Select(id => kernel.TryGetValue(id, out var k) ? Info(k) : modelInfo(id)));
        return r;
    }
}

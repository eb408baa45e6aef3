using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;

using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>The handler streams: ReadEvents (messages out) and Serve (messages out, resolutions in).</summary>
public sealed partial class UserfaultfdService
{
    /// <summary>
    /// Reads up to <paramref name="max"/> messages under the machine lock (they leave the
    /// queue now: a read FORK installs the child uffd, a read event completes and its syscall
    /// resumes), or returns the wait-queue task to sleep on when none is queued. Null wait
    /// and no message: the uffd is gone and the stream ends. On a journaled machine each
    /// message is read in a step of its own, journaled as the unary Read it equals.
    /// </summary>
    private (List<UffdMsg>? Msgs, Task? Wait) ReadBatch(UffdEntry u, int max)
    {
        var journal = u.Host.Journal;
        var call = journal is null ? null : new JournalCall("uffd.v1.UserfaultfdService/Read", new ReadRequest { UffdId = u.Id });
        var previous = JournalCall.Current;
        JournalCall.Current = call;
        try
        {
            var r = u.Host.Run(() =>
            {
                if (u.Ctx.Released)
                {
                    journal?.Retract(call!);
                    return (null, (Task?)null);
                }
                List<UffdMsg>? msgs = null;
                while (msgs is null || msgs.Count < (journal is null ? max : 1))
                {
                    var errno = u.Ctx.Read(out var m);
                    if (m is null)
                    {
                        if (errno != Mm.Errno.EAGAIN)
                            throw RequestErrors.Precondition("UFFD_NOT_READY", $"uffd {u.Id}: read gives {errno} (UFFDIO_API first)");
                        break;
                    }
                    (msgs ??= []).Add(UffdIoctls.ToProto(registry, u, m));
                }
                if (msgs is null)
                    journal?.Retract(call!);
                return (msgs, msgs is null ? u.WaitTask() : null);
            });
            if (r.msgs is { } read)
                call?.Answer(new ReadResponse { Msg = read[0] }, 0, "");
            return r;
        }
        finally
        {
            JournalCall.Current = previous;
        }
    }

    /// <summary>
    /// The stream wire sites before the next message is read (so a cut or a stall leaves it
    /// unread, and its thread asleep, as a handler that stopped reading does): STREAM_CUT
    /// ends the stream (UNAVAILABLE) once it delivered the rule's count; STREAM_STALL
    /// delivers nothing for the rule's delay, or until the rule is removed.
    /// </summary>
    private static async Task BeforeReadAsync(UffdEntry u, string method, long delivered, CancellationToken ct)
    {
        var k = u.Host.Kernel;
        if (!k.HasWireRules)
            return;
        if (k.DecideWire(Model.InjectSite.StreamCut, method, u.Ctx.Id, r => delivered >= r.Count) is { } cut)
            throw new RpcException(new Status(StatusCode.Unavailable, $"stream cut by injection rule {cut.RuleId} after {delivered} messages"));
        if (k.DecideWire(Model.InjectSite.StreamStall, method, u.Ctx.Id) is not { } stall)
            return;
        if (stall.Rule.DelayMs > 0)
        {
            await Task.Delay(stall.DelayMs, ct).ConfigureAwait(false);
            return;
        }
        while (true)
        {
            var wake = u.Host.InjectionPulse.Next;
            if (!k.WireRuleActive(stall.RuleId) || u.Host.Destroyed)
                return;
            await wake.WaitAsync(ct).ConfigureAwait(false);
        }
    }

    /// <summary>STREAM_DELAY: a message already read is delivered the rule's delay late.</summary>
    private static async Task BeforeDeliverAsync(UffdEntry u, string method, CancellationToken ct)
    {
        if (u.Host.Kernel.HasWireRules && u.Host.Kernel.DecideWire(Model.InjectSite.StreamDelay, method, u.Ctx.Id) is { DelayMs: > 0 } d)
            await Task.Delay(d.DelayMs, ct).ConfigureAwait(false);
    }

    /// <summary>Sleeps on <paramref name="u"/>'s wait queue; a wake by the machine ending (destroyed, broken, shutdown) ends the sleeper with that status.</summary>
    private async Task SleepAsync(UffdEntry u, Task wait, CancellationToken ct)
    {
        await wait.WaitAsync(ct).ConfigureAwait(false);
        if (registry.Unusable(u.Host) is { } status)
            throw status;
    }

    public override async Task ReadEvents(ReadEventsRequest request, IServerStreamWriter<ReadEventsResponse> responseStream, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        using var lease = registry.Quotas.OpenStream();
        var ct = context.CancellationToken;
        long sent = 0;
        // Headers first: the handler knows its stream is open before any message, and a
        // deadline or cancellation then ends the call with a status rather than a reset.
        await EventStream.SendHeadersAsync(context).ConfigureAwait(false);
        u.AddReader();
        Log.EventStreamOpened(logger, u.Id);
        try
        {
            while (true)
            {
                // A cancelled call reads nothing more: a message read now would be lost with it.
                ct.ThrowIfCancellationRequested();
                await BeforeReadAsync(u, "uffd.v1.UserfaultfdService/ReadEvents", sent, ct).ConfigureAwait(false);
                var (msgs, wait) = ReadBatch(u, 1);
                if (msgs is not null)
                {
                    var msg = msgs[0];
                    await BeforeDeliverAsync(u, "uffd.v1.UserfaultfdService/ReadEvents", ct).ConfigureAwait(false);
                    try
                    {
                        await EventStream.WriteOrEndAsync(responseStream, new ReadEventsResponse { Msg = msg }, ct).ConfigureAwait(false);
                    }
                    catch (Exception ex) when (ex is OperationCanceledException or RpcException { StatusCode: StatusCode.Cancelled })
                    {
                        Log.MessageLostWithStream(logger, u.Id, msg.Event.ToString());
                        throw;
                    }
                    sent++;
                    continue;
                }
                if (wait is null)
                    return;
                await SleepAsync(u, wait, ct).ConfigureAwait(false);
            }
        }
        finally
        {
            u.RemoveReader();
            Log.EventStreamClosed(logger, u.Id, sent);
        }
    }

    /// <summary>
    /// The batched handler stream (<see cref="ServeStream"/>). One loop reads messages for
    /// this stream (as ReadEvents does, many per response); each request's resolutions run in
    /// order under one machine lock and are answered in one response.
    /// </summary>
    public override async Task Serve(IAsyncStreamReader<ServeRequest> requestStream, IServerStreamWriter<ServeResponse> responseStream, ServerCallContext context)
    {
        var ct = context.CancellationToken;
        if (!await requestStream.MoveNext(ct).ConfigureAwait(false))
            return;
        var first = requestStream.Current;
        var u = registry.Uffd(first.UffdId);
        using var lease = registry.Quotas.OpenStream();
        var max = ServeStream.MaxMessages(first);

        Task<IEnumerable<ResolutionResult>> ResolveAsync(ServeRequest req)
        {
            // This message is the resolving call: the metrics' handling phase ends here.
            CallClock.ReceivedAt = System.Diagnostics.Stopwatch.GetTimestamp();
            return Task.FromResult<IEnumerable<ResolutionResult>>(RunResolutions(u, req.Resolutions, journaledAsResolve: true).Results);
        }

        async Task ReadLoopAsync(Func<ServeResponse, Task> write, CancellationToken token)
        {
            long delivered = 0;
            while (!token.IsCancellationRequested && !ct.IsCancellationRequested)
            {
                await BeforeReadAsync(u, "uffd.v1.UserfaultfdService/Serve", delivered, token).ConfigureAwait(false);
                var (msgs, wait) = ReadBatch(u, max);
                if (msgs is not null)
                {
                    await BeforeDeliverAsync(u, "uffd.v1.UserfaultfdService/Serve", token).ConfigureAwait(false);
                    var r = new ServeResponse();
                    r.Messages.AddRange(msgs);
                    await write(r).ConfigureAwait(false);
                    delivered += msgs.Count;
                    continue;
                }
                if (wait is null)
                    return;
                await SleepAsync(u, wait, token).ConfigureAwait(false);
            }
        }

        u.AddReader();
        Log.EventStreamOpened(logger, u.Id);
        try
        {
            await ServeStream.RunAsync(first, u.Id, requestStream, responseStream, ResolveAsync, ReadLoopAsync, ct).ConfigureAwait(false);
        }
        finally
        {
            u.RemoveReader();
            Log.EventStreamClosed(logger, u.Id, 0);
        }
    }
}

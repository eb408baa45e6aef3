using System.Diagnostics;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Core.Interceptors;
using UffdGrpc.Server.Hosting;

namespace UffdGrpc.Server.Telemetry;

/// <summary>
/// The outermost interceptor: one <see cref="Activity"/> per RPC (source
/// <see cref="ServerMetrics.MeterName"/>, named by the method, tagged with the machine, mm,
/// uffd and thread ids the request names) and the RPC counters of <see cref="ServerMetrics"/>
/// (every call by its final status; streams while they are open). It sees the status the
/// client gets, after <see cref="ServerErrorInterceptor"/> has mapped what a handler threw.
/// </summary>
public sealed class TelemetryInterceptor(ServerMetrics metrics, MachineRegistry registry) : Interceptor
{
    internal static readonly ActivitySource Source = new(ServerMetrics.MeterName);
    private static readonly (string Field, string Tag)[] s_ids =
        [("machine_id", "uffd.machine_id"), ("mm_id", "uffd.mm_id"), ("uffd_id", "uffd.uffd_id"), ("thread_id", "uffd.thread_id"), ("file_id", "uffd.file_id")];

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        var call = Begin(context, request, stream: false);
        Task<TResponse> task;
        try
        {
            task = continuation(request, context);
        }
        catch (Exception ex)
        {
            call.End(StatusOf(ex));
            throw;
        }
        // Most unary calls finish before they return: those need no async frame here.
        if (!task.IsCompletedSuccessfully)
            return AwaitedAsync(task, call);
        call.End(StatusCode.OK);
        return task;
    }

    private static async Task<TResponse> AwaitedAsync<TResponse>(Task<TResponse> task, Call call)
    {
        try
        {
            var r = await task.ConfigureAwait(false);
            call.End(StatusCode.OK);
            return r;
        }
        catch (Exception ex)
        {
            call.End(StatusOf(ex));
            throw;
        }
    }

    public override async Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        using var call = Begin(context, request, stream: true);
        try
        {
            await continuation(request, responseStream, context).ConfigureAwait(false);
            call.Status = StatusCode.OK;
        }
        catch (Exception ex)
        {
            call.Status = StatusOf(ex);
            throw;
        }
    }

    public override async Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        using var call = Begin(context, null, stream: true);
        try
        {
            var r = await continuation(requestStream, context).ConfigureAwait(false);
            call.Status = StatusCode.OK;
            return r;
        }
        catch (Exception ex)
        {
            call.Status = StatusOf(ex);
            throw;
        }
    }

    public override async Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        using var call = Begin(context, null, stream: true);
        try
        {
            await continuation(requestStream, responseStream, context).ConfigureAwait(false);
            call.Status = StatusCode.OK;
        }
        catch (Exception ex)
        {
            call.Status = StatusOf(ex);
            throw;
        }
    }

    /// <summary>The status a client sees for what the handler threw (a cancelled call is CANCELLED, anything else not a status is INTERNAL).</summary>
    private static StatusCode StatusOf(Exception ex) => ex switch
    {
        RpcException r => r.StatusCode,
        OperationCanceledException => StatusCode.Cancelled,
        _ => StatusCode.Internal,
    };

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<string, (string Name, string Service, string Method)> s_names = new(StringComparer.Ordinal);

    /// <summary>"/uffd.v1.MmService/Mmap" → ("uffd.v1.MmService/Mmap", "uffd.v1.MmService", "Mmap"), once per method.</summary>
    private static (string, string, string) Split(string full)
    {
        var slash = full.LastIndexOf('/');
        return (full.TrimStart('/'), full[1..slash], full[(slash + 1)..]);
    }

    private Call Begin(ServerCallContext context, object? request, bool stream)
    {
        // The call's arrival: the migration metrics split handling from waking here.
        CallClock.ReceivedAt = Stopwatch.GetTimestamp();
        var (name, service, method) = s_names.GetOrAdd(context.Method, Split);
        var activity = Source.HasListeners() ? StartActivity(context, name) : null;
        if (activity is { IsAllDataRequested: true })
        {
            activity.SetTag("rpc.system", "grpc");
            activity.SetTag("rpc.service", service);
            activity.SetTag("rpc.method", method);
            if (request is IMessage m)
                TagIds(activity, m);
        }
        if (stream)
            metrics.OpenStreams.Add(1, new KeyValuePair<string, object?>("rpc.service", service), new KeyValuePair<string, object?>("rpc.method", method));
        return new Call(metrics, activity, service, method, stream);
    }

    /// <summary>
    /// The RPC's activity, a child of the caller's trace. ASP.NET Core makes a request
    /// activity (which would carry that trace) only while its Hosting.Diagnostics logger is
    /// on, and the server's configuration turns it off: the request activity, its log scope
    /// and the tags grpc-dotnet adds to it were about a quarter of what the server allocated
    /// per fault round trip. So with no current activity the trace context comes from the
    /// request's traceparent and tracestate headers here, read by the same propagator.
    /// </summary>
    private static Activity? StartActivity(ServerCallContext context, string name)
    {
        if (Activity.Current is not null)
            return Source.StartActivity(name, ActivityKind.Server);
        DistributedContextPropagator.Current.ExtractTraceIdAndState(context.GetHttpContext().Request.Headers, static (object? carrier, string field, out string? value, out IEnumerable<string>? values) =>
        {
            values = null;
            var v = ((Microsoft.AspNetCore.Http.IHeaderDictionary)carrier!)[field];
            value = v.Count == 0 ? null : v[0];
        }, out var traceParent, out var traceState);
        return ActivityContext.TryParse(traceParent, traceState, isRemote: true, out var parent)
            ? Source.StartActivity(name, ActivityKind.Server, parent)
            : Source.StartActivity(name, ActivityKind.Server);
    }

    /// <summary>Tags the ids the request names, and the machine of the first object it names.</summary>
    private void TagIds(Activity activity, IMessage m)
    {
        var machineTagged = false;
        foreach (var (field, tag) in s_ids)
        {
            if (m.Descriptor.FindFieldByName(field) is not { FieldType: Google.Protobuf.Reflection.FieldType.Int64 } f || f.Accessor.GetValue(m) is not long id || id == 0)
                continue;
            activity.SetTag(tag, id);
            if (field == "machine_id")
                machineTagged = true;
            else if (!machineTagged && registry.TryGet<Entry>(id, out var e))
            {
                activity.SetTag("uffd.machine_id", e.Host.Id);
                machineTagged = true;
            }
        }
    }

    /// <summary>One call in progress: what its end records (the tags are made then, not kept: a TagList is 150 bytes).</summary>
    private sealed class Call(ServerMetrics metrics, Activity? activity, string service, string method, bool stream) : IDisposable
    {
        public StatusCode Status { get; set; } = StatusCode.Unknown;

        /// <summary>Records the call's final status and ends it.</summary>
        public void End(StatusCode status)
        {
            Status = status;
            Dispose();
        }

        public void Dispose()
        {
            var rpcService = new KeyValuePair<string, object?>("rpc.service", service);
            var rpcMethod = new KeyValuePair<string, object?>("rpc.method", method);
            if (stream)
                metrics.OpenStreams.Add(-1, rpcService, rpcMethod);
            metrics.Rpcs.Add(1, rpcService, rpcMethod, new KeyValuePair<string, object?>("rpc.grpc.status", Status.ToString()));
            if (activity is not null)
            {
                activity.SetTag("rpc.grpc.status_code", (int)Status);
                if (Status != StatusCode.OK)
                    activity.SetStatus(ActivityStatusCode.Error, Status.ToString());
                activity.Dispose();
            }
        }
    }
}

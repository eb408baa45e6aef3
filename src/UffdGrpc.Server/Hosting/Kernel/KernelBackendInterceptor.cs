using Google.Protobuf;
using Google.Protobuf.Reflection;
using Grpc.Core;
using Grpc.Core.Interceptors;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>
/// The one place that decides which backend serves a call: CreateMm with MM_BACKEND_KERNEL,
/// and every call whose request names an object of a kernel-backed address space (any
/// *_id field but machine_id), go to <see cref="KernelBackend"/>; a call it does not serve
/// fails with FAILED_PRECONDITION (reason KERNEL_BACKED) and changes nothing. ListMms of a
/// machine holding kernel-backed address spaces lists both kinds. Everything else goes on
/// to the model's services unchanged.
/// </summary>
public sealed class KernelBackendInterceptor(MachineRegistry registry, KernelBackend backend) : Interceptor
{
    private delegate Task<IMessage> Handler(KernelBackend b, IMessage request, ServerCallContext context);

    private static Handler Sync<T>(Func<KernelBackend, T, IMessage> f) => (b, r, _) => Task.FromResult(f(b, (T)r));

    private static Handler Async<T>(Func<KernelBackend, T, Task<IMessage>> f) => (b, r, _) => f(b, (T)r);

    private static async Task<IMessage> Up<T>(Task<T> t)
        where T : IMessage => await t.ConfigureAwait(false);

    /// <summary>The unary calls served on a kernel-backed address space, by method.</summary>
    private static readonly Dictionary<string, Handler> s_unary = new(StringComparer.Ordinal)
    {
        ["/uffd.v1.MmService/GetMm"] = Sync<GetMmRequest>((b, r) => b.GetMm(r)),
        ["/uffd.v1.MmService/DestroyMm"] = Sync<DestroyMmRequest>((b, r) => b.DestroyMm(r)),
        ["/uffd.v1.MmService/Mmap"] = Async<MmapRequest>((b, r) => Up(b.Mmap(r))),
        ["/uffd.v1.MmService/Munmap"] = Async<MunmapRequest>((b, r) => Up(b.Munmap(r))),
        ["/uffd.v1.MmService/Mprotect"] = Async<MprotectRequest>((b, r) => Up(b.Mprotect(r))),
        ["/uffd.v1.MmService/Madvise"] = Async<MadviseRequest>((b, r) => Up(b.Madvise(r))),
        ["/uffd.v1.MmService/Pagemap"] = Async<PagemapRequest>((b, r) => Up(b.Pagemap(r))),
        ["/uffd.v1.ThreadService/CreateThread"] = Async<CreateThreadRequest>((b, r) => Up(b.CreateThread(r))),
        ["/uffd.v1.ThreadService/GetThread"] = Sync<GetThreadRequest>((b, r) => b.GetThread(r)),
        ["/uffd.v1.ThreadService/ListThreads"] = Sync<ListThreadsRequest>((b, r) => b.ListThreads(r)),
        ["/uffd.v1.ThreadService/Access"] = (b, r, c) => Up(b.Access((AccessRequest)r, c)),
        ["/uffd.v1.ThreadService/StartOp"] = Sync<StartOpRequest>((b, r) => b.StartOp(r)),
        ["/uffd.v1.ThreadService/WaitOp"] = (b, r, c) => Up(b.WaitOp((WaitOpRequest)r, c)),
        ["/uffd.v1.UserfaultfdService/Userfaultfd"] = Async<UserfaultfdRequest>((b, r) => Up(b.Userfaultfd(r))),
        ["/uffd.v1.UserfaultfdService/UffdioApi"] = Async<UffdioApiRequest>((b, r) => Up(b.UffdioApi(r))),
        ["/uffd.v1.UserfaultfdService/UffdioRegister"] = Async<UffdioRegisterRequest>((b, r) => Up(b.UffdioRegister(r))),
        ["/uffd.v1.UserfaultfdService/UffdioUnregister"] = Async<UffdioUnregisterRequest>((b, r) => Up(b.UffdioUnregister(r))),
        ["/uffd.v1.UserfaultfdService/UffdioWake"] = Async<UffdioWakeRequest>((b, r) => Up(b.UffdioWake(r))),
        ["/uffd.v1.UserfaultfdService/UffdioWriteprotect"] = Async<UffdioWriteprotectRequest>((b, r) => Up(b.UffdioWriteprotect(r))),
        ["/uffd.v1.UserfaultfdService/UffdioCopy"] = Async<UffdioCopyRequest>((b, r) => Up(b.UffdioCopy(r))),
        ["/uffd.v1.UserfaultfdService/UffdioZeropage"] = Async<UffdioZeropageRequest>((b, r) => Up(b.UffdioZeropage(r))),
        ["/uffd.v1.UserfaultfdService/UffdioContinue"] = Async<UffdioContinueRequest>((b, r) => Up(b.UffdioContinue(r))),
        ["/uffd.v1.UserfaultfdService/UffdioPoison"] = Async<UffdioPoisonRequest>((b, r) => Up(b.UffdioPoison(r))),
        ["/uffd.v1.UserfaultfdService/UffdioMove"] = Async<UffdioMoveRequest>((b, r) => Up(b.UffdioMove(r))),
        ["/uffd.v1.UserfaultfdService/Read"] = (b, r, c) => Up(b.Read((ReadRequest)r, c)),
        ["/uffd.v1.UserfaultfdService/Resolve"] = Async<ResolveRequest>((b, r) => Up(b.Resolve(r))),
        ["/uffd.v1.UserfaultfdService/Close"] = Async<CloseRequest>((b, r) => Up(b.Close(r))),
    };

    /// <summary>The object of a kernel-backed address space the request names by a top-level *_id field (machine_id aside), if any.</summary>
    private KernelEntry? KernelNamedBy(object request)
    {
        if (!backend.Any || request is not IMessage m)
            return null;
        foreach (var f in m.Descriptor.Fields.InFieldNumberOrder())
        {
            if (f.FieldType != FieldType.Int64 || f.IsRepeated || !f.Name.EndsWith("_id", StringComparison.Ordinal) || f.Name == "machine_id")
                continue;
            if (f.Accessor.GetValue(m) is long id && id > 0 && registry.TryGet<KernelEntry>(id, out var e))
                return e;
        }
        return null;
    }

    private static RpcException Refused(string method, KernelEntry e) => RequestErrors.Precondition(
        "KERNEL_BACKED",
        $"{method.TrimStart('/')} is not served on a kernel-backed address space (id {e.Id} belongs to kernel-backed address space {e.Mm.Id}); see MmBackend in mm.proto for the calls it serves");

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation) =>
        // No kernel-backed address space: nothing to route but the creation of one.
        !backend.Any && request is not CreateMmRequest ? continuation(request, context) : RouteAsync(request, context, continuation);

    private async Task<TResponse> RouteAsync<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
        where TRequest : class
        where TResponse : class
    {
        switch (request)
        {
            case CreateMmRequest cm:
                if (!Enum.IsDefined(cm.Backend))
                    throw RequestErrors.Invalid("backend", "MM_BACKEND_UNSPECIFIED, MM_BACKEND_MODEL or MM_BACKEND_KERNEL");
                if (cm.Backend == MmBackend.Kernel)
                    return (TResponse)(object)await backend.CreateMm(cm, context).ConfigureAwait(false);
                break;
            case ListMmsRequest lm when registry.TryGetMachine(lm.MachineId) is { } h && backend.MmsOf(h).Any():
                return (TResponse)(object)backend.ListMms(lm, id => Services.MmService.Info(registry.Mm(id)));
            case TakeCompletionsRequest tc when backend.Any && registry.TryGetMachine(tc.MachineId) is { } h:
                // The model's results, then the kernel-backed threads' (each in completion order).
                var taken = (TakeCompletionsResponse)(object)(await continuation(request, context).ConfigureAwait(false))!;
                taken.Results.AddRange(backend.TakeCompletions(h));
                return (TResponse)(object)taken;
        }
        if (KernelNamedBy(request) is not { } e)
            return await continuation(request, context).ConfigureAwait(false);
        if (!s_unary.TryGetValue(context.Method, out var handler))
            throw Refused(context.Method, e);
        return (TResponse)await handler(backend, (IMessage)request, context).ConfigureAwait(false);
    }

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        if (KernelNamedBy(request) is not { } e)
            return continuation(request, responseStream, context);
        if (request is not ReadEventsRequest r)
            return Task.FromException(Refused(context.Method, e));
        return backend.ReadEvents(r, (IServerStreamWriter<ReadEventsResponse>)responseStream, context);
    }

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation) =>
        backend.Any ? RouteDuplexAsync(requestStream, responseStream, context, continuation) : continuation(requestStream, responseStream, context);

    private async Task RouteDuplexAsync<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
        where TRequest : class
        where TResponse : class
    {
        // The first message names the uffd: read it here, then hand the whole stream on.
        if (!await requestStream.MoveNext(context.CancellationToken).ConfigureAwait(false))
        {
            await continuation(requestStream, responseStream, context).ConfigureAwait(false);
            return;
        }
        var first = requestStream.Current;
        if (KernelNamedBy(first) is not { } e)
        {
            await continuation(new Replayed<TRequest>(first, requestStream), responseStream, context).ConfigureAwait(false);
            return;
        }
        if (first is not ServeRequest serve)
            throw Refused(context.Method, e);
        await backend.Serve(serve, (IAsyncStreamReader<ServeRequest>)requestStream, (IServerStreamWriter<ServeResponse>)responseStream, context).ConfigureAwait(false);
    }

    /// <summary>A request stream whose first message was already read: it is delivered again first.</summary>
    private sealed class Replayed<T>(T first, IAsyncStreamReader<T> rest) : IAsyncStreamReader<T>
    {
        private int _state; // 0: before the first message, 1: at it, 2: the rest of the stream

        public T Current => _state == 1 ? first : rest.Current;

        public Task<bool> MoveNext(CancellationToken cancellationToken)
        {
            if (_state == 0)
            {
                _state = 1;
                return Task.FromResult(true);
            }
            _state = 2;
            return rest.MoveNext(cancellationToken);
        }
    }
}

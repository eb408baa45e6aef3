using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>userfaultfd: the context and its ioctls, poll, read and close. Every kernel outcome is in-band.</summary>
public sealed partial class UserfaultfdService(MachineRegistry registry, ILogger<UserfaultfdService> logger) : Contracts.V1.UserfaultfdService.UserfaultfdServiceBase
{
    private static Errno E(Model.Errno e) => ProtoMapping.ToProto(e);

    public override Task<UserfaultfdResponse> Userfaultfd(UserfaultfdRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var (errno, id) = e.Host.Run(() =>
        {
            Security.Quotas.Check(e.Host.Kernel.Contexts.Count(c => !c.Released), registry.Quotas.Limits.UffdsPerMachine, nameof(Security.LimitOptions.UffdsPerMachine), $"machine {e.Host.Id}");
            var r = e.Host.Kernel.Userfaultfd(e.Mm, (int)request.Flags, out var ctx);
            return (r, ctx is null ? 0 : registry.IdOf(e.Host, ctx));
        });
        return Task.FromResult(new UserfaultfdResponse { Errno = E(errno), UffdId = id });
    }

    public override Task<UffdioApiResponse> UffdioApi(UffdioApiRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        ulong features = 0, ioctls = 0;
        var errno = u.Host.Run(() => u.Ctx.Api(request.Api, request.Features, out features, out ioctls));
        return Task.FromResult(new UffdioApiResponse { Errno = E(errno), Features = features, Ioctls = ioctls });
    }

    public override Task<UffdioRegisterResponse> UffdioRegister(UffdioRegisterRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        ulong ioctls = 0;
        var errno = u.Host.Run(() => u.Ctx.Register(request.Start, request.Len, request.Mode, out ioctls));
        return Task.FromResult(new UffdioRegisterResponse { Errno = E(errno), Ioctls = ioctls });
    }

    public override Task<UffdioUnregisterResponse> UffdioUnregister(UffdioUnregisterRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() => u.Ctx.Unregister(request.Start, request.Len));
        return Task.FromResult(new UffdioUnregisterResponse { Errno = E(errno) });
    }

    public override Task<UffdioWakeResponse> UffdioWake(UffdioWakeRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() => u.Ctx.Wake(request.Start, request.Len));
        return Task.FromResult(new UffdioWakeResponse { Errno = E(errno) });
    }

    public override Task<UffdioWriteprotectResponse> UffdioWriteprotect(UffdioWriteprotectRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() => u.Ctx.Writeprotect(request.Start, request.Len, request.Mode));
        return Task.FromResult(new UffdioWriteprotectResponse { Errno = E(errno) });
    }

    public override Task<UffdioCopyResponse> UffdioCopy(UffdioCopyRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        UffdIoctls.ValidateCopy(request, u.Host.Kernel.Config.MaxCopyBytes, "");
        var r = u.Host.Run(() => UffdIoctls.Copy(u.Ctx, request));
        return Task.FromResult(new UffdioCopyResponse { Errno = E(r.Errno), Copy = r.Field });
    }

    public override Task<UffdioZeropageResponse> UffdioZeropage(UffdioZeropageRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var r = u.Host.Run(() => u.Ctx.Zeropage(request.Start, request.Len, request.Mode));
        return Task.FromResult(new UffdioZeropageResponse { Errno = E(r.Errno), Zeropage = r.Field });
    }

    public override Task<UffdioContinueResponse> UffdioContinue(UffdioContinueRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var r = u.Host.Run(() => u.Ctx.Continue(request.Start, request.Len, request.Mode));
        return Task.FromResult(new UffdioContinueResponse { Errno = E(r.Errno), Mapped = r.Field });
    }

    public override Task<UffdioPoisonResponse> UffdioPoison(UffdioPoisonRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var r = u.Host.Run(() => u.Ctx.Poison(request.Start, request.Len, request.Mode));
        return Task.FromResult(new UffdioPoisonResponse { Errno = E(r.Errno), Updated = r.Field });
    }

    public override Task<UffdioMoveResponse> UffdioMove(UffdioMoveRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var caller = UffdIoctls.MoveCaller(registry, u, request.CallerMmId, "caller_mm_id");
        var r = u.Host.Run(() => UffdIoctls.Move(u.Ctx, caller, request));
        return Task.FromResult(new UffdioMoveResponse { Errno = E(r.Errno), Move = r.Field });
    }

    /// <summary>The poll result and the queue state. Caller holds the lock.</summary>
    private static PollResponse PollState(UffdEntry u)
    {
        var (pin, perr) = u.Ctx.Poll();
        return new PollResponse
        {
            Pollin = pin,
            Pollerr = perr,
            Unread = (uint)u.Ctx.UnreadCount,
            BlockedFaults = (uint)u.Ctx.BlockedFaults,
            MmapChanging = u.Ctx.MmapChanging,
            ApiDone = u.Ctx.State == Model.UffdState.Running,
            NonBlocking = u.Ctx.NonBlocking,
            Released = u.Ctx.Released,
            Features = (ulong)u.Ctx.Features,
            Readers = (uint)u.Readers,
        };
    }

    /// <summary>
    /// Models userfaultfd_poll under poll(2): with a timeout, the caller sleeps on the uffd's
    /// wait queue until a wake reports POLLIN or POLLERR, or the timeout passes.
    /// </summary>
    public override async Task<PollResponse> Poll(PollRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        using var timeout = request.TimeoutMs > 0 ? new CancellationTokenSource(request.TimeoutMs) : null;
        using var linked = timeout is null ? null : CancellationTokenSource.CreateLinkedTokenSource(timeout.Token, context.CancellationToken);
        var ct = linked?.Token ?? context.CancellationToken;
        while (true)
        {
            var (state, wait) = u.Host.Run(() =>
            {
                var s = PollState(u);
                return (s, s.Pollin || s.Pollerr || u.Ctx.Released || request.TimeoutMs == 0 ? null : u.WaitTask());
            });
            if (wait is null)
                return state;
            try
            {
                await wait.WaitAsync(ct).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (timeout?.IsCancellationRequested == true && !context.CancellationToken.IsCancellationRequested)
            {
                return u.Host.Run(() => PollState(u));
            }
            if (registry.Unusable(u.Host) is { } status)
                throw status;
        }
    }

    /// <summary>
    /// Models userfaultfd_read → userfaultfd_ctx_read: one message, read (it leaves the
    /// queue) at the moment it is taken. EAGAIN on an O_NONBLOCK uffd with nothing queued;
    /// a blocking uffd sleeps on its wait queue until something is.
    /// </summary>
    public override async Task<ReadResponse> Read(ReadRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        while (true)
        {
            var (errno, msg, wait) = u.Host.Run(() =>
            {
                if (u.Ctx.Released)
                    return (Model.Errno.EBADF, (UffdMsg?)null, (Task?)null);
                var e = u.Ctx.Read(out var m);
                if (m is not null)
                    return (e, UffdIoctls.ToProto(registry, u, m), (Task?)null);
                var sleep = e == Model.Errno.EAGAIN && !u.Ctx.NonBlocking && !u.Ctx.Released;
                return (e, (UffdMsg?)null, sleep ? u.WaitTask() : null);
            });
            if (wait is null)
                return new ReadResponse { Errno = E(errno), Msg = msg };
            await SleepAsync(u, wait, context.CancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>One Serve request's resolutions as a unary call: in order, under one machine lock.</summary>
    public override Task<ResolveResponse> Resolve(ResolveRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        RequestErrors.Require(request.Resolutions.Count <= ServeStream.MaxBatch, "resolutions", $"at most {ServeStream.MaxBatch}");
        return Task.FromResult(RunResolutions(u, request.Resolutions, journaledAsResolve: false));
    }

    /// <summary>
    /// Runs <paramref name="resolutions"/> in order under one machine lock (threads they wake
    /// run after the last). A Serve request's batch is journaled here as the Resolve call it
    /// equals (<paramref name="journaledAsResolve"/>); a unary Resolve is journaled by the interceptor.
    /// </summary>
    private ResolveResponse RunResolutions(UffdEntry u, IList<Resolution> resolutions, bool journaledAsResolve)
    {
        var prepared = new UffdIoctls.Prepared[resolutions.Count];
        for (var i = 0; i < prepared.Length; i++)
            prepared[i] = UffdIoctls.Prepare(registry, u, resolutions[i], i);
        var response = new ResolveResponse();
        JournalCall? call = null;
        var previous = JournalCall.Current;
        if (journaledAsResolve && u.Host.Journal is not null)
        {
            var req = new ResolveRequest { UffdId = u.Id };
            req.Resolutions.AddRange(resolutions);
            JournalCall.Current = call = new JournalCall("uffd.v1.UserfaultfdService/Resolve", req);
        }
        try
        {
            u.Host.Run(() =>
            {
                foreach (var p in prepared)
                    response.Results.Add(UffdIoctls.Run(p));
            });
            call?.Answer(response, 0, "");
        }
        catch (RpcException ex)
        {
            call?.Answer(null, (int)ex.StatusCode, ex.Status.Detail);
            throw;
        }
        finally
        {
            JournalCall.Current = previous;
        }
        return response;
    }

    /// <summary>close(2): userfaultfd_release on the last reference; EBADF when it was already closed.</summary>
    public override Task<CloseResponse> Close(CloseRequest request, ServerCallContext context)
    {
        var u = registry.Uffd(request.UffdId);
        var errno = u.Host.Run(() =>
        {
            if (u.Ctx.Released)
                return Model.Errno.EBADF;
            u.Ctx.Release();
            return Model.Errno.OK;
        });
        return Task.FromResult(new CloseResponse { Errno = E(errno) });
    }
}

using System.Runtime.CompilerServices;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>A fill ioctl's outcome: the errno and its result field (null when the kernel left it untouched).</summary>
public readonly record struct FillOutcome(Errno Errno, long? Field);

/// <summary>
/// Typed access to a UffdGrpc server. Calls that model a syscall or ioctl return the errno
/// (and the partial result the status carried) instead of throwing; requests the server
/// rejects (unknown ids, malformed fields) and transport failures still throw
/// <see cref="RpcException"/>.
/// </summary>
public sealed class UffdClient : IDisposable
{
    private readonly GrpcChannel? _owned;

    /// <summary>Connects to <paramref name="address"/> (h2c for http://).</summary>
    public UffdClient(string address)
        : this(GrpcChannel.ForAddress(address, new GrpcChannelOptions { MaxReceiveMessageSize = 64 << 20 }))
    {
        _owned = (GrpcChannel)Channel;
    }

    /// <summary>Uses an existing channel (not disposed by this client).</summary>
    public UffdClient(ChannelBase channel)
    {
        Channel = channel;
        Machines = new Machines.MachinesClient(channel);
        Mm = new Mm.MmClient(channel);
        Threads = new Threads.ThreadsClient(channel);
        Uffd = new Userfaultfd.UserfaultfdClient(channel);
    }

    public ChannelBase Channel { get; }
    /// <summary>The generated stubs, for anything the wrappers do not cover.</summary>
    public Machines.MachinesClient Machines { get; }
    public Mm.MmClient Mm { get; }
    public Threads.ThreadsClient Threads { get; }
    public Userfaultfd.UserfaultfdClient Uffd { get; }

    public void Dispose() => _owned?.Dispose();

    /// <summary>Awaits a unary call, turning a kernel errno status into (errno, partial result).</summary>
    public static async Task<(Errno Errno, T? Response)> Syscall<T>(AsyncUnaryCall<T> call)
        where T : class, IMessage<T>, new()
    {
        using (call)
        {
            try
            {
                return (Errno.OK, await call.ResponseAsync.ConfigureAwait(false));
            }
            catch (RpcException ex) when (UffdErrors.TryGetErrno(ex, out var errno))
            {
                return (errno, UffdErrors.PartialResult<T>(ex));
            }
        }
    }

    private static async Task<Errno> ErrnoOf<T>(AsyncUnaryCall<T> call)
        where T : class, IMessage<T>, new() => (await Syscall(call).ConfigureAwait(false)).Errno;

    // ------------------------------------------------------------------ machines

    public async Task<MachineInfo> CreateMachineAsync(KernelProfile profile = KernelProfile.Unspecified, bool? swap = null, bool? softDirty = null, CancellationToken ct = default) =>
        await Machines.CreateMachineAsync(new CreateMachineRequest { Profile = profile, Settings = new MachineSettings { Swap = swap, SoftDirty = softDirty } }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<MachineInfo> ConfigureMachineAsync(long machineId, bool? swap, bool? softDirty, CancellationToken ct = default) =>
        await Machines.ConfigureMachineAsync(new ConfigureMachineRequest { MachineId = machineId, Settings = new MachineSettings { Swap = swap, SoftDirty = softDirty } }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<MachineInfo> GetMachineAsync(long machineId, CancellationToken ct = default) =>
        await Machines.GetMachineAsync(new MachineRef { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false);

    public async Task DestroyMachineAsync(long machineId, CancellationToken ct = default) =>
        await Machines.DestroyMachineAsync(new MachineRef { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<KpageflagsResponse> KpageflagsAsync(long machineId, IEnumerable<ulong> pfns, CancellationToken ct = default) =>
        await Machines.KpageflagsAsync(new KpageflagsRequest { MachineId = machineId, Pfns = { pfns } }, cancellationToken: ct).ConfigureAwait(false);

    // ------------------------------------------------------------------ address spaces

    public async Task<long> CreateMmAsync(long machineId, CancellationToken ct = default) =>
        (await Mm.CreateMmAsync(new CreateMmRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false)).MmId;

    public async Task DestroyMmAsync(long mmId, bool kill = false, CancellationToken ct = default) =>
        await Mm.DestroyMmAsync(new DestroyMmRequest { MmId = mmId, Kill = kill }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<Contracts.V1.FileInfo> CreateFileAsync(long machineId, string name, bool shmem, ulong size, CancellationToken ct = default) =>
        await Mm.CreateFileAsync(new CreateFileRequest { MachineId = machineId, Name = name, Shmem = shmem, Size = size }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>mmap(2) at <paramref name="addr"/> (prot: 1 read, 2 write, 4 exec).</summary>
    public Task<Errno> MmapAsync(long mmId, ulong addr, ulong len, uint prot, bool shared = false, long fileId = 0, ulong offset = 0, bool readOnlyFd = false, bool populate = false, CancellationToken ct = default) =>
        ErrnoOf(Mm.MmapAsync(new MmapRequest { MmId = mmId, Addr = addr, Len = len, Prot = prot, Shared = shared, FileId = fileId, Offset = offset, ReadOnlyFd = readOnlyFd, Populate = populate }, cancellationToken: ct));

    public Task<Errno> MprotectAsync(long mmId, ulong start, ulong len, uint prot, CancellationToken ct = default) =>
        ErrnoOf(Mm.MprotectAsync(new MprotectRequest { MmId = mmId, Start = start, Len = len, Prot = prot }, cancellationToken: ct));

    public Task<Errno> ClearRefsAsync(long mmId, string value, CancellationToken ct = default) =>
        ErrnoOf(Mm.ClearRefsAsync(new ClearRefsRequest { MmId = mmId, Value = value }, cancellationToken: ct));

    public Task<Errno> MunmapAsync(long mmId, ulong start, ulong len, long threadId = 0, CancellationToken ct = default) =>
        ErrnoOf(Mm.MunmapAsync(new MunmapRequest { MmId = mmId, ThreadId = threadId, Start = start, Len = len }, cancellationToken: ct));

    public Task<Errno> MremapAsync(long mmId, ulong oldAddr, ulong len, ulong newAddr, long threadId = 0, CancellationToken ct = default) =>
        ErrnoOf(Mm.MremapAsync(new MremapRequest { MmId = mmId, ThreadId = threadId, OldAddr = oldAddr, Len = len, NewAddr = newAddr }, cancellationToken: ct));

    public Task<Errno> MadviseAsync(long mmId, ulong start, ulong len, int advice, long threadId = 0, CancellationToken ct = default) =>
        ErrnoOf(Mm.MadviseAsync(new MadviseRequest { MmId = mmId, ThreadId = threadId, Start = start, Len = len, Advice = advice }, cancellationToken: ct));

    /// <summary>fork(2): returns when the FORK events it raised were read.</summary>
    public Task<(Errno Errno, ForkResponse? Response)> ForkAsync(long mmId, long threadId = 0, CancellationToken ct = default) =>
        Syscall(Mm.ForkAsync(new ForkRequest { MmId = mmId, ThreadId = threadId }, cancellationToken: ct));

    public async Task<IReadOnlyList<VmaView>> ListVmasAsync(long mmId, CancellationToken ct = default) =>
        (await Mm.ListVmasAsync(new ListVmasRequest { MmId = mmId }, cancellationToken: ct).ConfigureAwait(false)).Vmas;

    public async Task<IReadOnlyList<PageTableEntry>> DumpPageTableAsync(long mmId, ulong start, ulong len, CancellationToken ct = default) =>
        (await Mm.DumpPageTableAsync(new DumpPageTableRequest { MmId = mmId, Start = start, Len = len }, cancellationToken: ct).ConfigureAwait(false)).Entries;

    public async Task<IReadOnlyList<PagemapEntry>> PagemapAsync(long mmId, ulong start, uint pages, CancellationToken ct = default) =>
        (await Mm.PagemapAsync(new PagemapRequest { MmId = mmId, Start = start, Pages = pages }, cancellationToken: ct).ConfigureAwait(false)).Entries;

    public async Task<IReadOnlyList<SmapsEntry>> SmapsAsync(long mmId, ulong start, ulong end, CancellationToken ct = default) =>
        (await Mm.SmapsAsync(new SmapsRequest { MmId = mmId, Start = start, End = end }, cancellationToken: ct).ConfigureAwait(false)).Entries;

    public Task<(Errno Errno, PagemapScanResponse? Response)> PagemapScanAsync(PagemapScanRequest request, CancellationToken ct = default) =>
        Syscall(Mm.PagemapScanAsync(request, cancellationToken: ct));

    // ------------------------------------------------------------------ threads

    public async Task<ThreadInfo> CreateThreadAsync(long mmId, CancellationToken ct = default) =>
        await Threads.CreateThreadAsync(new CreateThreadRequest { MmId = mmId }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<ThreadInfo> GetThreadAsync(long threadId, CancellationToken ct = default) =>
        await Threads.GetThreadAsync(new ThreadRef { ThreadId = threadId }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>Writes <paramref name="value"/> at <paramref name="addr"/>; returns when the write completes (after any userfault is resolved).</summary>
    public Task<ThreadOpResult> WriteAsync(long threadId, ulong addr, byte value, uint count = 1, bool kernel = false, CancellationToken ct = default) =>
        AccessAsync(threadId, new AccessOp { Addr = addr, Write = true, Value = value, Count = count, Origin = kernel ? AccessOrigin.Kernel : AccessOrigin.User }, ct);

    /// <summary>Reads byte 0 of <paramref name="count"/> pages from <paramref name="addr"/>.</summary>
    public Task<ThreadOpResult> ReadAsync(long threadId, ulong addr, uint count = 1, bool kernel = false, CancellationToken ct = default) =>
        AccessAsync(threadId, new AccessOp { Addr = addr, Count = count, Origin = kernel ? AccessOrigin.Kernel : AccessOrigin.User }, ct);

    public async Task<ThreadOpResult> AccessAsync(long threadId, AccessOp access, CancellationToken ct = default) =>
        await Threads.AccessAsync(new AccessRequest { ThreadId = threadId, Access = access }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>Starts an operation without waiting for it; returns its id.</summary>
    public async Task<StartOpResponse> StartOpAsync(long threadId, ThreadOp op, CancellationToken ct = default) =>
        await Threads.StartOpAsync(new StartOpRequest { ThreadId = threadId, Op = op }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<ThreadOpResult> WaitOpAsync(long opId, CancellationToken ct = default) =>
        await Threads.WaitOpAsync(new WaitOpRequest { OpId = opId }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<IReadOnlyList<ThreadOpResult>> TakeCompletionsAsync(long machineId, CancellationToken ct = default) =>
        (await Threads.TakeCompletionsAsync(new TakeCompletionsRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false)).Results;

    // ------------------------------------------------------------------ userfaultfd

    /// <summary>userfaultfd(2) with <paramref name="flags"/> (O_NONBLOCK 0x800, O_CLOEXEC 0x80000, UFFD_USER_MODE_ONLY 1).</summary>
    public async Task<(Errno Errno, long UffdId)> CreateUffdAsync(long mmId, uint flags = 0x80800, bool dev = false, CancellationToken ct = default)
    {
        var (e, r) = await Syscall(Uffd.CreateAsync(new UffdCreateRequest { MmId = mmId, Flags = flags, Dev = dev }, cancellationToken: ct)).ConfigureAwait(false);
        return (e, r?.UffdId ?? 0);
    }

    public async Task<(Errno Errno, ulong Features, ulong Ioctls)> ApiAsync(long uffdId, ulong features = 0, ulong api = 0xAA, CancellationToken ct = default)
    {
        var (e, r) = await Syscall(Uffd.UffdioApiAsync(new UffdioApiRequest { UffdId = uffdId, Api = api, Features = features }, cancellationToken: ct)).ConfigureAwait(false);
        return (e, r?.Features ?? 0, r?.Ioctls ?? 0);
    }

    /// <summary>UFFDIO_REGISTER (mode: 1 missing, 2 wp, 4 minor).</summary>
    public async Task<(Errno Errno, ulong Ioctls)> RegisterAsync(long uffdId, ulong start, ulong len, ulong mode, CancellationToken ct = default)
    {
        var (e, r) = await Syscall(Uffd.UffdioRegisterAsync(new UffdioRegisterRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct)).ConfigureAwait(false);
        return (e, r?.Ioctls ?? 0);
    }

    public Task<Errno> UnregisterAsync(long uffdId, ulong start, ulong len, CancellationToken ct = default) =>
        ErrnoOf(Uffd.UffdioUnregisterAsync(new UffdioRangeRequest { UffdId = uffdId, Start = start, Len = len }, cancellationToken: ct));

    public Task<Errno> WakeAsync(long uffdId, ulong start, ulong len, CancellationToken ct = default) =>
        ErrnoOf(Uffd.UffdioWakeAsync(new UffdioRangeRequest { UffdId = uffdId, Start = start, Len = len }, cancellationToken: ct));

    /// <summary>UFFDIO_WRITEPROTECT (mode: 1 WP, 2 DONTWAKE; 0 un-protects and wakes).</summary>
    public Task<Errno> WriteprotectAsync(long uffdId, ulong start, ulong len, ulong mode, CancellationToken ct = default) =>
        ErrnoOf(Uffd.UffdioWriteprotectAsync(new UffdioWriteprotectRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct));

    /// <summary>UFFDIO_COPY of <paramref name="data"/> (resume a partial copy from the returned field).</summary>
    public async Task<FillOutcome> CopyAsync(long uffdId, ulong dst, ReadOnlyMemory<byte> data, ulong mode = 0, ulong src = 0x7f00_0000_0000, CancellationToken ct = default)
    {
        var req = new UffdioCopyRequest { UffdId = uffdId, Dst = dst, Src = src, Len = (ulong)data.Length, Mode = mode, Data = ByteString.CopyFrom(data.Span) };
        var (e, r) = await Syscall(Uffd.UffdioCopyAsync(req, cancellationToken: ct)).ConfigureAwait(false);
        return new(e, r?.Copy);
    }

    /// <summary>UFFDIO_COPY of <paramref name="len"/> bytes of <paramref name="fill"/> from source address <paramref name="src"/>.</summary>
    public async Task<FillOutcome> CopyFillAsync(long uffdId, ulong dst, ulong src, byte fill, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var req = new UffdioCopyRequest { UffdId = uffdId, Dst = dst, Src = src, Len = len, Mode = mode, Fill = fill };
        var (e, r) = await Syscall(Uffd.UffdioCopyAsync(req, cancellationToken: ct)).ConfigureAwait(false);
        return new(e, r?.Copy);
    }

    public async Task<FillOutcome> ZeropageAsync(long uffdId, ulong start, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var (e, r) = await Syscall(Uffd.UffdioZeropageAsync(new UffdioModeRangeRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct)).ConfigureAwait(false);
        return new(e, r?.Zeropage);
    }

    public async Task<FillOutcome> ContinueAsync(long uffdId, ulong start, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var (e, r) = await Syscall(Uffd.UffdioContinueAsync(new UffdioModeRangeRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct)).ConfigureAwait(false);
        return new(e, r?.Mapped);
    }

    public async Task<FillOutcome> PoisonAsync(long uffdId, ulong start, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var (e, r) = await Syscall(Uffd.UffdioPoisonAsync(new UffdioModeRangeRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct)).ConfigureAwait(false);
        return new(e, r?.Updated);
    }

    public async Task<FillOutcome> MoveAsync(long uffdId, ulong dst, ulong src, ulong len, ulong mode = 0, long callerMmId = 0, CancellationToken ct = default)
    {
        var req = new UffdioMoveRequest { UffdId = uffdId, Dst = dst, Src = src, Len = len, Mode = mode, CallerMmId = callerMmId };
        var (e, r) = await Syscall(Uffd.UffdioMoveAsync(req, cancellationToken: ct)).ConfigureAwait(false);
        return new(e, r?.Move);
    }

    public async Task<PollResponse> PollAsync(long uffdId, CancellationToken ct = default) =>
        await Uffd.PollAsync(new UffdRef { UffdId = uffdId }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>read(2) of one message, non-blocking: (EAGAIN, null) when nothing is queued.</summary>
    public async Task<(Errno Errno, UffdMsg? Message)> ReadMessageAsync(long uffdId, CancellationToken ct = default)
    {
        var (e, m) = await Syscall(Uffd.ReadAsync(new UffdRef { UffdId = uffdId }, cancellationToken: ct)).ConfigureAwait(false);
        return (e, e == Errno.OK ? m : null);
    }

    public async Task CloseUffdAsync(long uffdId, CancellationToken ct = default) =>
        await Uffd.CloseAsync(new UffdRef { UffdId = uffdId }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>
    /// The uffd's messages as they are read: each one leaves the uffd's queue when the server
    /// hands it to this stream. Ends when the uffd is closed or <paramref name="ct"/> is cancelled.
    /// </summary>
    public async IAsyncEnumerable<UffdMsg> ReadEventsAsync(long uffdId, [EnumeratorCancellation] CancellationToken ct = default)
    {
        using var call = Uffd.ReadEvents(new UffdRef { UffdId = uffdId }, cancellationToken: ct);
        await foreach (var m in call.ResponseStream.ReadAllAsync(ct).ConfigureAwait(false))
            yield return m;
    }
}

using System.Runtime.CompilerServices;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>A fill ioctl's outcome: the errno and its result field (null when the kernel left it untouched).</summary>
public readonly record struct FillOutcome(Errno Errno, long? Field);

/// <summary>
/// Typed access to a UffdGrpc server. Calls that model a syscall or ioctl return the
/// kernel's errno and result fields as values (the server answers them in-band, with status
/// OK); requests the server rejects (unknown ids, malformed fields, limits) and transport
/// failures throw <see cref="RpcException"/>.
/// </summary>
public sealed class UffdClient : IDisposable
{
    /// <summary>The server address every CLI command uses unless told otherwise: where the server listens by default.</summary>
    public const string DefaultAddress = UffdDefaults.Address;

    private readonly GrpcChannel? _owned;

    /// <summary>Connects to <paramref name="address"/> (h2c for http://), with a bearer token when the server requires one.</summary>
    public UffdClient(string address, string? bearerToken = null)
        : this(GrpcChannel.ForAddress(address, ChannelOptions(bearerToken)))
    {
        _owned = (GrpcChannel)Channel;
    }

    /// <summary>
    /// Channel options for a UffdGrpc server: message limits that fit a 64 MiB COPY, and the
    /// bearer token (when given) on every call — also over h2c, where gRPC otherwise refuses
    /// call credentials (use TLS, or a loopback or private network, for real secrets).
    /// </summary>
    public static GrpcChannelOptions ChannelOptions(string? bearerToken = null)
    {
        var o = new GrpcChannelOptions { MaxReceiveMessageSize = 80 << 20, MaxSendMessageSize = 80 << 20 };
        if (bearerToken is not null)
        {
            var token = bearerToken;
            o.Credentials = ChannelCredentials.Create(ChannelCredentials.Insecure, CallCredentials.FromInterceptor((_, metadata) =>
            {
                metadata.Add("authorization", "Bearer " + token);
                return Task.CompletedTask;
            }));
            o.UnsafeUseInsecureChannelCallCredentials = true;
        }
        return o;
    }

    /// <summary>Uses an existing channel (not disposed by this client).</summary>
    public UffdClient(ChannelBase channel)
    {
        Channel = channel;
        Machines = new MachineService.MachineServiceClient(channel);
        Mm = new MmService.MmServiceClient(channel);
        Threads = new ThreadService.ThreadServiceClient(channel);
        Uffd = new UserfaultfdService.UserfaultfdServiceClient(channel);
        Injection = new FaultInjectionService.FaultInjectionServiceClient(channel);
        Workloads = new WorkloadService.WorkloadServiceClient(channel);
        Metrics = new MigrationMetricsService.MigrationMetricsServiceClient(channel);
    }

    public ChannelBase Channel { get; }
    /// <summary>The generated stubs, for anything the wrappers do not cover.</summary>
    public MachineService.MachineServiceClient Machines { get; }
    public MmService.MmServiceClient Mm { get; }
    public ThreadService.ThreadServiceClient Threads { get; }
    /// <summary>Fault injection: rules, firing on demand, the injection log.</summary>
    public FaultInjectionService.FaultInjectionServiceClient Injection { get; }
    public UserfaultfdService.UserfaultfdServiceClient Uffd { get; }
    /// <summary>Guest workloads: simulated threads running seeded access patterns server-side.</summary>
    public WorkloadService.WorkloadServiceClient Workloads { get; }
    /// <summary>Migration metrics: latency histograms by class, outcome and phase; counters; blocktime.</summary>
    public MigrationMetricsService.MigrationMetricsServiceClient Metrics { get; }

    public void Dispose() => _owned?.Dispose();

    // ------------------------------------------------------------------ machines

    public async Task<MachineInfo> CreateMachineAsync(KernelProfile profile = KernelProfile.Unspecified, bool? swap = null, bool? softDirty = null, CancellationToken ct = default) =>
        (await Machines.CreateMachineAsync(new CreateMachineRequest { Profile = profile, Settings = new MachineSettings { Swap = swap, SoftDirty = softDirty } }, cancellationToken: ct).ConfigureAwait(false)).Machine;

    public async Task<MachineInfo> ConfigureMachineAsync(long machineId, bool? swap, bool? softDirty, CancellationToken ct = default) =>
        (await Machines.ConfigureMachineAsync(new ConfigureMachineRequest { MachineId = machineId, Settings = new MachineSettings { Swap = swap, SoftDirty = softDirty } }, cancellationToken: ct).ConfigureAwait(false)).Machine;

    public async Task<MachineInfo> GetMachineAsync(long machineId, CancellationToken ct = default) =>
        (await Machines.GetMachineAsync(new GetMachineRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false)).Machine;

    public async Task DestroyMachineAsync(long machineId, CancellationToken ct = default) =>
        await Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<KpageflagsResponse> KpageflagsAsync(long machineId, IEnumerable<ulong> pfns, CancellationToken ct = default) =>
        await Machines.KpageflagsAsync(new KpageflagsRequest { MachineId = machineId, Pfns = { pfns } }, cancellationToken: ct).ConfigureAwait(false);

    // ------------------------------------------------------------------ address spaces

    public async Task<long> CreateMmAsync(long machineId, CancellationToken ct = default) =>
        (await Mm.CreateMmAsync(new CreateMmRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false)).Mm.MmId;

    /// <summary>A new address space on <paramref name="backend"/> (MM_BACKEND_KERNEL: real memory in a helper process, when the server enables it).</summary>
    public async Task<long> CreateMmAsync(long machineId, MmBackend backend, CancellationToken ct = default) =>
        (await Mm.CreateMmAsync(new CreateMmRequest { MachineId = machineId, Backend = backend }, cancellationToken: ct).ConfigureAwait(false)).Mm.MmId;

    public async Task DestroyMmAsync(long mmId, CancellationToken ct = default) =>
        await Mm.DestroyMmAsync(new DestroyMmRequest { MmId = mmId }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<Contracts.V1.FileInfo> CreateFileAsync(long machineId, string name, bool shmem, ulong size, CancellationToken ct = default) =>
        (await Mm.CreateFileAsync(new CreateFileRequest { MachineId = machineId, Name = name, Shmem = shmem, Size = size }, cancellationToken: ct).ConfigureAwait(false)).File;

    /// <summary>mmap(2) at <paramref name="addr"/> (prot: 1 read, 2 write, 4 exec).</summary>
    public async Task<Errno> MmapAsync(long mmId, ulong addr, ulong len, uint prot, bool shared = false, long fileId = 0, ulong offset = 0, bool readOnlyFd = false, bool populate = false, CancellationToken ct = default) =>
        (await Mm.MmapAsync(new MmapRequest { MmId = mmId, Addr = addr, Len = len, Prot = prot, Shared = shared, FileId = fileId, Offset = offset, ReadOnlyFd = readOnlyFd, Populate = populate }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    public async Task<Errno> MprotectAsync(long mmId, ulong start, ulong len, uint prot, CancellationToken ct = default) =>
        (await Mm.MprotectAsync(new MprotectRequest { MmId = mmId, Start = start, Len = len, Prot = prot }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    public async Task<Errno> ClearRefsAsync(long mmId, string value, CancellationToken ct = default) =>
        (await Mm.ClearRefsAsync(new ClearRefsRequest { MmId = mmId, Value = value }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    public async Task<Errno> MunmapAsync(long mmId, ulong start, ulong len, long threadId = 0, CancellationToken ct = default) =>
        (await Mm.MunmapAsync(new MunmapRequest { MmId = mmId, ThreadId = threadId, Start = start, Len = len }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    public async Task<Errno> MremapAsync(long mmId, ulong oldAddr, ulong len, ulong newAddr, long threadId = 0, CancellationToken ct = default) =>
        (await Mm.MremapAsync(new MremapRequest { MmId = mmId, ThreadId = threadId, OldAddr = oldAddr, Len = len, NewAddr = newAddr }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    public async Task<Errno> MadviseAsync(long mmId, ulong start, ulong len, int advice, long threadId = 0, CancellationToken ct = default) =>
        (await Mm.MadviseAsync(new MadviseRequest { MmId = mmId, ThreadId = threadId, Start = start, Len = len, Advice = advice }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    /// <summary>fork(2): returns when the FORK events it raised were read.</summary>
    public async Task<ForkResponse> ForkAsync(long mmId, long threadId = 0, CancellationToken ct = default) =>
        await Mm.ForkAsync(new ForkRequest { MmId = mmId, ThreadId = threadId }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>process_vm_readv(2) by a thread of <paramref name="mmId"/> (0: a fresh one) from <paramref name="remoteMmId"/>.</summary>
    public async Task<ProcessVmReadvResponse> ProcessVmReadvAsync(long mmId, long remoteMmId, IEnumerable<Iovec> local, IEnumerable<Iovec> remote, long threadId = 0, CancellationToken ct = default) =>
        await Mm.ProcessVmReadvAsync(new ProcessVmReadvRequest { MmId = mmId, ThreadId = threadId, RemoteMmId = remoteMmId, LocalIov = { local }, RemoteIov = { remote } }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>process_vm_writev(2) by a thread of <paramref name="mmId"/> (0: a fresh one) into <paramref name="remoteMmId"/>.</summary>
    public async Task<ProcessVmWritevResponse> ProcessVmWritevAsync(long mmId, long remoteMmId, IEnumerable<Iovec> local, IEnumerable<Iovec> remote, long threadId = 0, CancellationToken ct = default) =>
        await Mm.ProcessVmWritevAsync(new ProcessVmWritevRequest { MmId = mmId, ThreadId = threadId, RemoteMmId = remoteMmId, LocalIov = { local }, RemoteIov = { remote } }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>Every VMA of the process, page by page.</summary>
    public async Task<IReadOnlyList<VmaInfo>> ListVmasAsync(long mmId, CancellationToken ct = default)
    {
        var all = new List<VmaInfo>();
        var token = "";
        do
        {
            var r = await Mm.ListVmasAsync(new ListVmasRequest { MmId = mmId, PageSize = Paging, PageToken = token }, cancellationToken: ct).ConfigureAwait(false);
            all.AddRange(r.Vmas);
            token = r.NextPageToken;
        }
        while (token.Length > 0);
        return all;
    }

    private const int Paging = 1000;

    public async Task<IReadOnlyList<PageTableEntry>> DumpPageTableAsync(long mmId, ulong start, ulong len, CancellationToken ct = default) =>
        (await Mm.DumpPageTableAsync(new DumpPageTableRequest { MmId = mmId, Start = start, Len = len }, cancellationToken: ct).ConfigureAwait(false)).Entries;

    public async Task<IReadOnlyList<PagemapEntry>> PagemapAsync(long mmId, ulong start, uint pages, CancellationToken ct = default) =>
        (await Mm.PagemapAsync(new PagemapRequest { MmId = mmId, Start = start, Pages = pages }, cancellationToken: ct).ConfigureAwait(false)).Entries;

    public async Task<IReadOnlyList<SmapsEntry>> SmapsAsync(long mmId, ulong start, ulong end, CancellationToken ct = default) =>
        (await Mm.SmapsAsync(new SmapsRequest { MmId = mmId, Start = start, End = end }, cancellationToken: ct).ConfigureAwait(false)).Entries;

    public async Task<PagemapScanResponse> PagemapScanAsync(PagemapScanRequest request, CancellationToken ct = default) =>
        await Mm.PagemapScanAsync(request, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>Per-page SHA-256 digests of <paramref name="pages"/> pages from <paramref name="start"/> (no side effects).</summary>
    public async Task<IReadOnlyList<PageDigest>> DigestAsync(long mmId, ulong start, uint pages, CancellationToken ct = default) =>
        (await Mm.DigestAsync(new DigestRequest { MmId = mmId, Start = start, Pages = pages }, cancellationToken: ct).ConfigureAwait(false)).Pages;

    /// <summary>The image of an address space (a serialized <c>MmImage</c>; write it to a file as it is).</summary>
    public async Task<byte[]> ExportMmAsync(long mmId, CancellationToken ct = default)
    {
        using var call = Mm.ExportMm(new ExportMmRequest { MmId = mmId }, cancellationToken: ct);
        using var image = new MemoryStream();
        await foreach (var chunk in call.ResponseStream.ReadAllAsync(ct).ConfigureAwait(false))
            chunk.Chunk.WriteTo(image);
        return image.ToArray();
    }

    /// <summary>Restores an image from <see cref="ExportMmAsync"/> into a new process of <paramref name="machineId"/>.</summary>
    public async Task<ImportMmResponse> ImportMmAsync(long machineId, ReadOnlyMemory<byte> image, CancellationToken ct = default)
    {
        using var call = Mm.ImportMm(cancellationToken: ct);
        const int chunk = 1 << 20;
        var off = 0;
        do
        {
            var n = Math.Min(chunk, image.Length - off);
            await call.RequestStream.WriteAsync(new ImportMmRequest { MachineId = off == 0 ? machineId : 0, Chunk = ByteString.CopyFrom(image.Span.Slice(off, n)) }, ct).ConfigureAwait(false);
            off += n;
        }
        while (off < image.Length);
        await call.RequestStream.CompleteAsync().ConfigureAwait(false);
        return await call.ResponseAsync.ConfigureAwait(false);
    }

    // ------------------------------------------------------------------ threads

    public async Task<ThreadInfo> CreateThreadAsync(long mmId, CancellationToken ct = default) =>
        (await Threads.CreateThreadAsync(new CreateThreadRequest { MmId = mmId }, cancellationToken: ct).ConfigureAwait(false)).Thread;

    public async Task<ThreadInfo> GetThreadAsync(long threadId, CancellationToken ct = default) =>
        (await Threads.GetThreadAsync(new GetThreadRequest { ThreadId = threadId }, cancellationToken: ct).ConfigureAwait(false)).Thread;

    /// <summary>Writes <paramref name="value"/> at byte <c>addr &amp; 0xfff</c> of <paramref name="count"/> pages; returns when the write completes (after any userfault is resolved).</summary>
    public Task<ThreadOpResult> WriteAsync(long threadId, ulong addr, byte value, uint count = 1, bool kernel = false, CancellationToken ct = default) =>
        AccessAsync(threadId, Touch(addr, true, value, count, kernel), ct);

    /// <summary>Reads byte <c>addr &amp; 0xfff</c> of <paramref name="count"/> pages from <paramref name="addr"/>.</summary>
    public Task<ThreadOpResult> ReadAsync(long threadId, ulong addr, uint count = 1, bool kernel = false, CancellationToken ct = default) =>
        AccessAsync(threadId, Touch(addr, false, 0, count, kernel), ct);

    /// <summary>Writes <paramref name="data"/> at <paramref name="addr"/> (any alignment, across pages and VMAs).</summary>
    public Task<ThreadOpResult> WriteBytesAsync(long threadId, ulong addr, ReadOnlyMemory<byte> data, bool kernel = false, CancellationToken ct = default) =>
        AccessAsync(threadId, new AccessOp { Addr = addr, Write = true, Origin = Origin(kernel), Span = new ByteSpan { Data = ByteString.CopyFrom(data.Span) } }, ct);

    /// <summary>Reads <paramref name="length"/> bytes at <paramref name="addr"/>; the result's <c>values</c> hold the bytes read before any signal.</summary>
    public Task<ThreadOpResult> ReadBytesAsync(long threadId, ulong addr, ulong length, bool kernel = false, CancellationToken ct = default) =>
        AccessAsync(threadId, new AccessOp { Addr = addr, Origin = Origin(kernel), Span = new ByteSpan { Length = length } }, ct);

    /// <summary>The touch-pattern access: byte <c>addr &amp; 0xfff</c> of each of <paramref name="pages"/> pages.</summary>
    public static AccessOp Touch(ulong addr, bool write, byte value = 0, uint pages = 1, bool kernel = false) =>
        new() { Addr = addr, Write = write, Origin = Origin(kernel), Touch = new TouchPattern { Pages = pages, Value = value } };

    private static AccessOrigin Origin(bool kernel) => kernel ? AccessOrigin.Kernel : AccessOrigin.User;

    public async Task<ThreadOpResult> AccessAsync(long threadId, AccessOp access, CancellationToken ct = default) =>
        (await Threads.AccessAsync(new AccessRequest { ThreadId = threadId, Access = access }, cancellationToken: ct).ConfigureAwait(false)).Result;

    /// <summary>Starts an operation without waiting for it; returns its id.</summary>
    public async Task<StartOpResponse> StartOpAsync(long threadId, ThreadOp op, CancellationToken ct = default) =>
        await Threads.StartOpAsync(new StartOpRequest { ThreadId = threadId, Op = op }, cancellationToken: ct).ConfigureAwait(false);

    public async Task<ThreadOpResult> WaitOpAsync(long opId, CancellationToken ct = default) =>
        (await Threads.WaitOpAsync(new WaitOpRequest { OpId = opId }, cancellationToken: ct).ConfigureAwait(false)).Result;

    public async Task<IReadOnlyList<ThreadOpResult>> TakeCompletionsAsync(long machineId, CancellationToken ct = default) =>
        (await Threads.TakeCompletionsAsync(new TakeCompletionsRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false)).Results;

    // ------------------------------------------------------------------ userfaultfd

    /// <summary>userfaultfd(2) with <paramref name="flags"/> (O_NONBLOCK 0x800, O_CLOEXEC 0x80000, UFFD_USER_MODE_ONLY 1).</summary>
    public async Task<(Errno Errno, long UffdId)> CreateUffdAsync(long mmId, uint flags = 0x80800, CancellationToken ct = default)
    {
        var r = await Uffd.UserfaultfdAsync(new UserfaultfdRequest { MmId = mmId, Flags = flags }, cancellationToken: ct).ConfigureAwait(false);
        return (r.Errno, r.UffdId);
    }

    public async Task<(Errno Errno, ulong Features, ulong Ioctls)> ApiAsync(long uffdId, ulong features = 0, ulong api = 0xAA, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioApiAsync(new UffdioApiRequest { UffdId = uffdId, Api = api, Features = features }, cancellationToken: ct).ConfigureAwait(false);
        return (r.Errno, r.Features, r.Ioctls);
    }

    /// <summary>UFFDIO_REGISTER (mode: 1 missing, 2 wp, 4 minor).</summary>
    public async Task<(Errno Errno, ulong Ioctls)> RegisterAsync(long uffdId, ulong start, ulong len, ulong mode, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioRegisterAsync(new UffdioRegisterRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct).ConfigureAwait(false);
        return (r.Errno, r.Ioctls);
    }

    public async Task<Errno> UnregisterAsync(long uffdId, ulong start, ulong len, CancellationToken ct = default) =>
        (await Uffd.UffdioUnregisterAsync(new UffdioUnregisterRequest { UffdId = uffdId, Start = start, Len = len }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    public async Task<Errno> WakeAsync(long uffdId, ulong start, ulong len, CancellationToken ct = default) =>
        (await Uffd.UffdioWakeAsync(new UffdioWakeRequest { UffdId = uffdId, Start = start, Len = len }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    /// <summary>UFFDIO_WRITEPROTECT (mode: 1 WP, 2 DONTWAKE; 0 un-protects and wakes).</summary>
    public async Task<Errno> WriteprotectAsync(long uffdId, ulong start, ulong len, ulong mode, CancellationToken ct = default) =>
        (await Uffd.UffdioWriteprotectAsync(new UffdioWriteprotectRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    /// <summary>UFFDIO_COPY of <paramref name="data"/> (resume a partial copy from the returned field).</summary>
    public async Task<FillOutcome> CopyAsync(long uffdId, ulong dst, ReadOnlyMemory<byte> data, ulong mode = 0, ulong src = 0x7f00_0000_0000, CancellationToken ct = default)
    {
        var req = new UffdioCopyRequest { UffdId = uffdId, Dst = dst, Src = src, Len = (ulong)data.Length, Mode = mode, Data = ByteString.CopyFrom(data.Span) };
        var r = await Uffd.UffdioCopyAsync(req, cancellationToken: ct).ConfigureAwait(false);
        return new(r.Errno, r.Copy);
    }

    /// <summary>UFFDIO_COPY of <paramref name="len"/> bytes of <paramref name="fill"/> from source address <paramref name="src"/>.</summary>
    public async Task<FillOutcome> CopyFillAsync(long uffdId, ulong dst, ulong src, byte fill, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = uffdId, Dst = dst, Src = src, Len = len, Mode = mode, Fill = fill }, cancellationToken: ct).ConfigureAwait(false);
        return new(r.Errno, r.Copy);
    }

    public async Task<FillOutcome> ZeropageAsync(long uffdId, ulong start, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct).ConfigureAwait(false);
        return new(r.Errno, r.Zeropage);
    }

    public async Task<FillOutcome> ContinueAsync(long uffdId, ulong start, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioContinueAsync(new UffdioContinueRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct).ConfigureAwait(false);
        return new(r.Errno, r.Mapped);
    }

    public async Task<FillOutcome> PoisonAsync(long uffdId, ulong start, ulong len, ulong mode = 0, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioPoisonAsync(new UffdioPoisonRequest { UffdId = uffdId, Start = start, Len = len, Mode = mode }, cancellationToken: ct).ConfigureAwait(false);
        return new(r.Errno, r.Updated);
    }

    public async Task<FillOutcome> MoveAsync(long uffdId, ulong dst, ulong src, ulong len, ulong mode = 0, long callerMmId = 0, CancellationToken ct = default)
    {
        var r = await Uffd.UffdioMoveAsync(new UffdioMoveRequest { UffdId = uffdId, Dst = dst, Src = src, Len = len, Mode = mode, CallerMmId = callerMmId }, cancellationToken: ct).ConfigureAwait(false);
        return new(r.Errno, r.Move);
    }

    /// <summary>poll(2) with <paramref name="timeoutMs"/> (0: at once; negative: until readable).</summary>
    public async Task<PollResponse> PollAsync(long uffdId, int timeoutMs = 0, CancellationToken ct = default) =>
        await Uffd.PollAsync(new PollRequest { UffdId = uffdId, TimeoutMs = timeoutMs }, cancellationToken: ct).ConfigureAwait(false);

    /// <summary>read(2) of one message: (EAGAIN, null) on an O_NONBLOCK uffd with nothing queued.</summary>
    public async Task<(Errno Errno, UffdMsg? Message)> ReadMessageAsync(long uffdId, CancellationToken ct = default)
    {
        var r = await Uffd.ReadAsync(new ReadRequest { UffdId = uffdId }, cancellationToken: ct).ConfigureAwait(false);
        return (r.Errno, r.Errno == Errno.Unspecified ? r.Msg : null);
    }

    public async Task<Errno> CloseUffdAsync(long uffdId, CancellationToken ct = default) =>
        (await Uffd.CloseAsync(new CloseRequest { UffdId = uffdId }, cancellationToken: ct).ConfigureAwait(false)).Errno;

    /// <summary>
    /// The uffd's messages as they are read: each one leaves the uffd's queue when the server
    /// hands it to this stream. Ends when the uffd is closed or <paramref name="ct"/> is cancelled.
    /// </summary>
    public async IAsyncEnumerable<UffdMsg> ReadEventsAsync(long uffdId, [EnumeratorCancellation] CancellationToken ct = default)
    {
        using var call = Uffd.ReadEvents(new ReadEventsRequest { UffdId = uffdId }, cancellationToken: ct);
        await foreach (var m in call.ResponseStream.ReadAllAsync(ct).ConfigureAwait(false))
            yield return m.Msg;
    }

    /// <summary>Opens a batched handler stream (<see cref="ServeSession"/>) on <paramref name="uffdId"/>.</summary>
    public Task<ServeSession> ServeAsync(long uffdId, uint maxMessages = 0, CancellationToken ct = default) =>
        ServeSession.OpenAsync(this, uffdId, maxMessages, ct);
}

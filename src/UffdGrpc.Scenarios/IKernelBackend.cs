using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios;

/// <summary>What a simulated thread is asked to do (a call that may sleep in a userfault or an event wait).</summary>
public enum ThreadOpKind
{
    Access,
    Populate,
    Madvise,
    Munmap,
    Mremap,
    Fork,
    /// <summary>process_vm_readv/writev: <see cref="ThreadOpRequest.Write"/>, the remote process and both iovec arrays.</summary>
    ProcessVm,
}

/// <summary>A thread operation request.</summary>
public sealed record ThreadOpRequest(ThreadOpKind Kind)
{
    public ulong Addr { get; init; }
    public ulong Len { get; init; }
    /// <summary>mremap: the new address.</summary>
    public ulong Addr2 { get; init; }
    public bool Write { get; init; }
    public byte Value { get; init; }
    public int Count { get; init; } = 1;
    public bool KernelOrigin { get; init; }
    public Madv Advice { get; init; }
    /// <summary>process_vm: the target process handle (0: no such process, ESRCH).</summary>
    public int RemoteProcess { get; init; }
    /// <summary>process_vm: the caller's iovecs.</summary>
    public IoVec[] LocalIov { get; init; } = [];
    /// <summary>process_vm: the target's iovecs.</summary>
    public IoVec[] RemoteIov { get; init; } = [];
    /// <summary>process_vm: the flags argument (must be 0).</summary>
    public ulong Flags { get; init; }
}

/// <summary>The end of a thread operation.</summary>
public sealed record ThreadOpResult(long OpId, int Thread, bool Aborted, Errno Errno, SigCode Signal, int Done, byte[] Values)
{
    /// <summary>fork: the child's process and first thread.</summary>
    public int ChildProcess { get; init; }
    public int ChildThread { get; init; }
    /// <summary>process_vm: bytes transferred (the return value when <see cref="Errno"/> is OK).</summary>
    public ulong Transferred { get; init; }
}

/// <summary>A uffd_msg as a handler reads it. For FORK, <see cref="ForkUffd"/> is the new uffd's handle.</summary>
public sealed record UffdMessage(UffdEvent Event, PagefaultFlags Flags, ulong Address, uint Ptid, int ForkUffd, ulong From, ulong To, ulong Len);

/// <summary>
/// The kernel operations the scenario interpreter needs. Objects are named by integer
/// handles (processes, threads, files, uffds). Implemented in-process over the model and
/// remotely over gRPC; both must behave identically.
/// </summary>
public interface IKernelBackend : IAsyncDisposable
{
    Task ConfigureAsync(bool? swap, bool? softDirty);
    /// <summary>Whether a capability is available: thp, pagemap_scan, or a UFFD feature bit.</summary>
    Task<bool> AvailableAsync(string capability, ulong featureBit);
    Task<int> CreateProcessAsync();
    /// <summary>Creates a thread; returns its handle and its tid (what THREAD_ID reports).</summary>
    Task<(int Thread, int Tid)> CreateThreadAsync(int process);
    Task<int> ThreadTidAsync(int thread);
    Task<int> CreateFileAsync(string name, bool shmem, ulong size);
    Task<Errno> MmapAsync(int process, ulong addr, ulong len, Prot prot, bool shared, int file, ulong offset, bool readOnlyFd, bool populate);
    Task<Errno> MprotectAsync(int process, ulong start, ulong len, Prot prot);
    Task<Errno> ClearRefsAsync(int process, string value);
    Task<long> StartAsync(int thread, ThreadOpRequest request);
    /// <summary>Operations that completed since the last call, in completion order.</summary>
    Task<IReadOnlyList<ThreadOpResult>> TakeCompletionsAsync();
    /// <summary>Kills a process (SIGKILL) or lets it exit.</summary>
    Task EndProcessAsync(int process, bool kill);

    /// <summary>userfaultfd(2); `uffd create dev` (/dev/userfaultfd) behaves the same for a privileged caller, so it takes the same path.</summary>
    Task<(Errno Errno, int Uffd)> UffdCreateAsync(int process, int flags);
    Task<(Errno Errno, ulong Features, ulong Ioctls)> UffdApiAsync(int uffd, ulong api, ulong features);
    Task<(Errno Errno, ulong Ioctls)> RegisterAsync(int uffd, ulong start, ulong len, ulong mode);
    Task<Errno> UnregisterAsync(int uffd, ulong start, ulong len);
    Task<Errno> WakeAsync(int uffd, ulong start, ulong len);
    Task<Errno> WriteprotectAsync(int uffd, ulong start, ulong len, ulong mode);
    /// <summary>UFFDIO_COPY from a source at <paramref name="srcAddr"/> holding <paramref name="len"/> bytes of <paramref name="fill"/>.</summary>
    Task<FillResult> CopyAsync(int uffd, ulong dst, ulong srcAddr, byte fill, ulong len, ulong mode);
    Task<FillResult> ZeropageAsync(int uffd, ulong start, ulong len, ulong mode);
    Task<FillResult> ContinueAsync(int uffd, ulong start, ulong len, ulong mode);
    Task<FillResult> PoisonAsync(int uffd, ulong start, ulong len, ulong mode);
    Task<FillResult> MoveAsync(int uffd, int callerProcess, ulong dst, ulong src, ulong len, ulong mode);
    Task<(bool PollIn, bool PollErr)> PollAsync(int uffd);
    Task<(Errno Errno, UffdMessage? Message)> ReadAsync(int uffd);
    Task CloseAsync(int uffd);

    Task<ulong[]> PagemapAsync(int process, ulong start, int pages);
    Task<ulong> KpageflagsAsync(ulong pfn);
    Task<IReadOnlyList<SmapsEntry>> SmapsAsync(int process, ulong start, ulong end);
    Task<PmScanResult> PagemapScanAsync(int process, PmScanArg arg);

    /// <summary>Adds a fault-injection rule whose MmId and UffdId are backend handles (a process, a uffd); the rule id, or the reason it was refused.</summary>
    Task<(int RuleId, string? Error)> AddInjectRuleAsync(InjectRule rule);
    Task<bool> RemoveInjectRuleAsync(int ruleId);
    /// <summary>Fires an event or signal rule now: what it logged, or why it did nothing.</summary>
    Task<(IReadOnlyList<InjectionRecord> Records, string? Error)> FireInjectRuleAsync(int ruleId);
    /// <summary>The injection log after <paramref name="afterSeq"/>.</summary>
    Task<IReadOnlyList<InjectionRecord>> InjectionLogAsync(long afterSeq);
}

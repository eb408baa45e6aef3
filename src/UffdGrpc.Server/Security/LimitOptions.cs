namespace UffdGrpc.Server.Security;

/// <summary>
/// The <c>Limits</c> configuration section: what one principal may hold. A machine belongs to
/// one principal, so the per-machine counts bound a principal at <c>MachinesPerPrincipal</c>
/// times each. Over a limit a call fails with RESOURCE_EXHAUSTED and a
/// <c>google.rpc.QuotaFailure</c> naming it; nothing changes.
/// </summary>
public sealed class LimitOptions
{
    public const string Section = "Limits";

    public int MachinesPerPrincipal { get; set; } = 64;
    /// <summary>Frames (page contents and page tables) all machines together may hold, in bytes.</summary>
    public long ServerMemoryBytes { get; set; } = 8L << 30;
    /// <summary>The largest machine a CreateMachine may ask for, in bytes.</summary>
    public long MaxMachineMemoryBytes { get; set; } = 8L << 30;
    /// <summary>Open ReadEvents and Serve streams of one principal.</summary>
    public int StreamsPerPrincipal { get; set; } = 1024;
    /// <summary>Processes (mm) of one machine, fork children included.</summary>
    public int MmsPerMachine { get; set; } = 1024;
    /// <summary>Threads of one machine, fork children included (each blocked thread holds at most one queued uffd message, so this also bounds the queued events).</summary>
    public int ThreadsPerMachine { get; set; } = 4096;
    public int UffdsPerMachine { get; set; } = 1024;
    public int FilesPerMachine { get; set; } = 1024;
    /// <summary>Undrained StartOp results of one machine (TakeCompletions drains them).</summary>
    public int CompletionLogPerMachine { get; set; } = 65536;
    /// <summary>Steps a machine's session journal holds (MachineSettings.journal).</summary>
    public int JournalEntriesPerMachine { get; set; } = 1_000_000;
    /// <summary>Bytes of requests and answers a machine's session journal holds (a call past it is refused before it runs).</summary>
    public long JournalBytesPerMachine { get; set; } = 256L << 20;
    /// <summary>Running guest workloads of one machine (as many ended ones are kept for GetWorkload, the oldest forgotten first).</summary>
    public int WorkloadsPerMachine { get; set; } = 64;
    /// <summary>
    /// Ids of retired objects (closed uffds, exited threads, exited processes) one machine
    /// keeps answering for: a call naming one of the newest this many gets what the kernel
    /// says of a stale object (EBADF for a closed uffd, an exited thread or process); an older
    /// one is forgotten and is NOT_FOUND, so a machine that opens and closes uffds or forks and
    /// reaps processes for ever holds what is live plus this many.
    /// </summary>
    public int RetiredIdsPerMachine { get; set; } = 4096;
    /// <summary>Threads one guest workload may start.</summary>
    public int ThreadsPerWorkload { get; set; } = 64;
    /// <summary>Writes one guest workload's write record holds (24 bytes each); later writes are counted, not recorded.</summary>
    public int WorkloadWritesRecorded { get; set; } = 1 << 18;
    /// <summary>Helper processes (kernel-backed address spaces, KernelBackend:Enabled) the whole server runs at once.</summary>
    public int KernelHelpersPerServer { get; set; } = 16;
    /// <summary>Bytes one kernel-backed address space may map (real memory of the host: each Mmap past it is refused).</summary>
    public long KernelMmBytes { get; set; } = 1L << 30;
}

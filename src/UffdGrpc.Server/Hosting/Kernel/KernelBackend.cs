using System.Collections.Concurrent;
using Grpc.Core;
using Microsoft.Extensions.Options;
using UffdGrpc.Server.Mapping;
using UffdGrpc.Server.Security;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>The <c>KernelBackend</c> configuration section: kernel-backed address spaces (off by default).</summary>
public sealed class KernelBackendOptions
{
    public const string Section = "KernelBackend";

    /// <summary>Whether CreateMm may ask for MM_BACKEND_KERNEL: each such address space is a helper process running real syscalls as the server's user.</summary>
    public bool Enabled { get; set; }

    /// <summary>A prebuilt helper binary (else UFFDGRPC_KERNEL_HELPER, else the embedded source compiled once with gcc).</summary>
    public string HelperPath { get; set; } = "";
}

/// <summary>
/// The kernel backend: kernel-backed address spaces, each a helper process
/// (<see cref="KernelHelper"/>), created on demand when enabled, bounded by
/// Limits:KernelHelpersPerServer and Limits:KernelMmBytes, and killed (and reaped) with their
/// address space, their machine or the server. A helper that dies on its own marks its
/// address space broken and fails its waiters. The calls themselves are in
/// KernelCalls.cs; <see cref="KernelBackendInterceptor"/> routes to them.
/// </summary>
public sealed partial class KernelBackend : IDisposable
{
    private readonly MachineRegistry _registry;
    private readonly KernelBackendOptions _options;
    private readonly ILogger<KernelBackend> _logger;
    private readonly ConcurrentDictionary<long, KernelMmEntry> _live = new();
    /// <summary>Every kernel-backed address space whose id is known (live, exited or broken), until its machine goes.</summary>
    private readonly ConcurrentDictionary<long, KernelMmEntry> _known = new();
    private int _helpers;

    public KernelBackend(MachineRegistry registry, IOptions<KernelBackendOptions> options, ILogger<KernelBackend> logger)
    {
        _registry = registry;
        _options = options.Value;
        _logger = logger;
        registry.MachineDestroyed += host =>
        {
            foreach (var mm in _known.Values.Where(m => m.Host == host))
            {
                Destroy(mm);
                _known.TryRemove(mm.Id, out _);
            }
            _completions.TryRemove(host.Id, out _);
        };
        registry.ShutdownStarted += Dispose;
    }

    private LimitOptions Limits => _registry.Quotas.Limits;

    /// <summary>Why this host cannot run kernel-backed address spaces (no userfaultfd, no gcc and no prebuilt helper, not Linux x86-64), or null when it can.</summary>
    public static string? HostUnavailable(string? helperPath = null) => KernelHelperBinary.Unavailable(helperPath);

    /// <summary>Helper processes running now.</summary>
    public int Helpers => Volatile.Read(ref _helpers);

    /// <summary>Whether any kernel-backed address space has an id (else no call can name one: the router lets every call through untouched).</summary>
    internal bool Any => !_known.IsEmpty;

    /// <summary>The kernel-backed address spaces of <paramref name="host"/> (live, exited or broken), in id order.</summary>
    internal IEnumerable<KernelMmEntry> MmsOf(MachineHost host) => _known.Values.Where(m => m.Host == host).OrderBy(m => m.Id);

    /// <summary>
    /// CreateMm with MM_BACKEND_KERNEL: starts a helper. FAILED_PRECONDITION when the backend
    /// is off or the host cannot run it; RESOURCE_EXHAUSTED past Limits:KernelHelpersPerServer
    /// or Limits:MmsPerMachine.
    /// </summary>
    public async Task<KernelMmEntry> CreateAsync(MachineHost host, CancellationToken ct)
    {
        if (!_options.Enabled)
            throw RequestErrors.Precondition("KERNEL_BACKEND_DISABLED", "the kernel backend is off on this server: start it with KernelBackend:Enabled=true (environment KernelBackend__Enabled=true) on a Linux host with userfaultfd");
        if (KernelHelperBinary.Unavailable(_options.HelperPath) is { } why)
            throw RequestErrors.Precondition("KERNEL_BACKEND_UNAVAILABLE", "this host cannot run the kernel backend: " + why);
        if (host.Journal is not null)
            throw RequestErrors.Precondition("KERNEL_BACKEND_JOURNALED", $"machine {host.Id} keeps a session journal: a kernel-backed address space cannot be replayed");
        var count = host.Kernel.Locked(() => host.Kernel.Mms.Count) + MmsOf(host).Count();
        Quotas.Check(count, Limits.MmsPerMachine, nameof(LimitOptions.MmsPerMachine), $"machine {host.Id}");
        if (Interlocked.Increment(ref _helpers) > Limits.KernelHelpersPerServer)
        {
            var n = Interlocked.Decrement(ref _helpers);
            Quotas.Check(n, Limits.KernelHelpersPerServer, nameof(LimitOptions.KernelHelpersPerServer), "the server");
        }
        KernelHelper helper;
        try
        {
            var path = await KernelHelperBinary.PathAsync(_options.HelperPath, ct).ConfigureAwait(false);
            helper = await KernelHelper.StartAsync(path, ct).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is InvalidOperationException or HelperGoneException or System.ComponentModel.Win32Exception or IOException or TimeoutException)
        {
            Interlocked.Decrement(ref _helpers);
            throw RequestErrors.Precondition("KERNEL_BACKEND_UNAVAILABLE", "the kernel helper did not start: " + ex.Message);
        }
        var mm = _registry.Add(id => new KernelMmEntry(id, host, helper));
        helper.OnEvent = (handle, bytes) => OnEvent(mm, handle, bytes);
        helper.OnGone = (killed, reason) => OnGone(mm, killed, reason);
        _live[mm.Id] = mm;
        _known[mm.Id] = mm;
        Log.HelperStarted(_logger, mm.Id, helper.Pid);
        if (host.Destroyed || _registry.ShuttingDown)
        {
            Destroy(mm);
            throw new RpcException(new Status(StatusCode.Unavailable, $"machine {host.Id} went away while the address space was created"));
        }
        return mm;
    }

    /// <summary>DestroyMm (or its machine's or the server's end): the helper gets SIGKILL and is reaped; accesses in flight end aborted, readers of its uffds end.</summary>
    public void Destroy(KernelMmEntry mm)
    {
        lock (mm.Gate)
        {
            if (mm.Exited)
                return;
            mm.Exited = true;
            foreach (var u in mm.Uffds.Values)
            {
                u.Closed = true;
                u.WakeAll();
            }
        }
        if (_live.TryRemove(mm.Id, out _))
            Interlocked.Decrement(ref _helpers);
        mm.Helper.Dispose();
        Log.HelperStopped(_logger, mm.Id, mm.Helper.Pid);
    }

    private void OnGone(KernelMmEntry mm, bool killed, string reason)
    {
        if (killed)
            return;
        lock (mm.Gate)
        {
            mm.Broken ??= reason;
            foreach (var u in mm.Uffds.Values)
                u.WakeAll();
        }
        if (_live.TryRemove(mm.Id, out _))
            Interlocked.Decrement(ref _helpers);
        mm.Helper.Dispose();
        Log.HelperCrashed(_logger, mm.Id, reason);
    }

    /// <summary>The status of a call on <paramref name="e"/>'s address space when it can no longer serve (null while it can).</summary>
    internal static RpcException? Unusable(KernelEntry e)
    {
        var mm = e.Mm;
        if (mm.Broken is { } why)
            return RequestErrors.Precondition("MM_BROKEN", $"kernel-backed address space {mm.Id} is broken: {why}");
        if (mm.Exited)
            return RequestErrors.Precondition("PROCESS_EXITED", $"kernel-backed address space {mm.Id} was destroyed");
        return null;
    }

    /// <summary>The <typeparamref name="T"/> named by <paramref name="id"/>, on an address space that still serves.</summary>
    internal T Get<T>(long id, string field)
        where T : KernelEntry
    {
        var e = _registry.Get<T>(id, field);
        if (Unusable(e) is { } status)
            throw status;
        return e;
    }

    /// <summary>Kills every helper (the server is stopping, or the host disposes the backend).</summary>
    public void Dispose()
    {
        foreach (var mm in _live.Values)
            Destroy(mm);
    }

    private static partial class Log
    {
        [LoggerMessage(EventId = 900, Level = LogLevel.Information, Message = "Kernel-backed address space {MmId}: helper pid {Pid} started")]
        public static partial void HelperStarted(ILogger logger, long mmId, int pid);

        [LoggerMessage(EventId = 901, Level = LogLevel.Information, Message = "Kernel-backed address space {MmId}: helper pid {Pid} killed and reaped")]
        public static partial void HelperStopped(ILogger logger, long mmId, int pid);

        [LoggerMessage(EventId = 902, Level = LogLevel.Warning, Message = "Kernel-backed address space {MmId} is broken: {Reason}")]
        public static partial void HelperCrashed(ILogger logger, long mmId, string reason);
    }
}

using Google.Protobuf;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// One state-changing call on a journaled machine: its method and request, the step it got
/// when the model first ran it (under the machine lock), and its answer once it has one.
/// </summary>
internal sealed class JournalCall(string method, IMessage request)
{
    private static readonly AsyncLocal<JournalCall?> s_current = new();

    /// <summary>The call the current RPC (or stream section) is running, if it is journaled.</summary>
    public static JournalCall? Current
    {
        get => s_current.Value;
        set => s_current.Value = value;
    }

    /// <summary>The journal method of a long operation's continuation after it yielded (not an RPC).</summary>
    public const string ContinueYieldedMethod = "uffd.v1.internal/ContinueYielded";

    /// <summary>The journal method of the hung-userfault watchdog's SIGKILL (not an RPC).</summary>
    public const string WatchdogKillMethod = "uffd.v1.internal/WatchdogKill";

    public string Method { get; } = method;
    public IMessage Request { get; } = request;

    /// <summary>The step (from 1) once stamped; 0 before. Written under the machine lock.</summary>
    public long Step { get; set; }

    /// <summary>Completes with the step when the model first runs the call (after the lock is released).</summary>
    public TaskCompletionSource<long> Stamped { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    private volatile Outcome? _outcome;

    private sealed record Outcome(ByteString Response, int StatusCode, string Detail);

    /// <summary>The journal that gave the call its step (set under the machine lock).</summary>
    public MachineJournal? Journal { get; set; }

    /// <summary>Records the call's answer (once; later answers are ignored); its bytes count against the journal's limit.</summary>
    public void Answer(IMessage? response, int statusCode, string detail)
    {
        var outcome = new Outcome(response?.ToByteString() ?? ByteString.Empty, statusCode, detail);
        if (Interlocked.CompareExchange(ref _outcome, outcome, null) is null)
            Journal?.Account(outcome.Response.Length + detail.Length);
    }

    public JournalEntry ToEntry()
    {
        var e = new JournalEntry { Step = Step, Method = Method, Request = Request.ToByteString() };
        if (_outcome is { } o)
        {
            e.Completed = true;
            e.Response = o.Response;
            e.StatusCode = o.StatusCode;
            e.StatusDetail = o.Detail;
        }
        return e;
    }
}

/// <summary>
/// A machine's session journal (MachineSettings.journal): every state-changing call in the
/// order the model ran it. Calls are appended under the machine's lock when the model first
/// runs them (<see cref="MachineHost.Run{T}"/>), so the order is the lock order; each call
/// records its own answer when it has one. Bounded by Limits:JournalEntriesPerMachine and
/// Limits:JournalBytesPerMachine (requests and answers: a call past either is refused
/// before it runs, so the journal holds at most the limit plus one answer).
/// </summary>
/// <remarks>Protected by the machine's kernel lock (the answers are published by each call on its own).</remarks>
internal sealed class MachineJournal(JournalHeader header, int maxEntries, long maxBytes)
{
    private readonly List<JournalCall> _calls = [];
    private long _bytes;

    public JournalHeader Header { get; } = header;

    /// <summary>Steps recorded. Caller holds the kernel lock.</summary>
    public int Steps => _calls.Count;

    /// <summary>Wakes ReadJournal waiters at each step and when the machine ends.</summary>
    public Pulse Appended { get; } = new();

    /// <summary>
    /// Gives <paramref name="call"/> the next step (once), or RESOURCE_EXHAUSTED when the
    /// journal is full, before the call changes anything. Caller holds the kernel lock inside
    /// a kernel scope.
    /// </summary>
    public void Stamp(MachineHost host, JournalCall call)
    {
        if (call.Step != 0)
            return;
        var size = call.Request.CalculateSize();
        Security.Quotas.Check(_calls.Count, maxEntries, nameof(Security.LimitOptions.JournalEntriesPerMachine), $"machine {host.Id}'s journal");
        var bytes = Interlocked.Read(ref _bytes);
        if (bytes + size > maxBytes)
        {
            throw Security.Quotas.Exhausted(nameof(Security.LimitOptions.JournalBytesPerMachine), maxBytes, $"machine {host.Id}'s journal",
                $"JournalBytesPerMachine: machine {host.Id}'s journal holds {bytes} bytes and this request has {size} (the limit is {maxBytes})");
        }
        Account(size);
        call.Journal = this;
        _calls.Add(call);
        var step = call.Step = _calls.Count;
        host.Kernel.DeferUntilUnlocked(() =>
        {
            call.Stamped.TrySetResult(step);
            Appended.Fire();
        });
    }

    /// <summary>
    /// Takes back the last step when it is <paramref name="call"/>'s and the call changed
    /// nothing after all (a stream read that found no message). Caller holds the kernel lock.
    /// </summary>
    public void Retract(JournalCall call)
    {
        if (call.Step == _calls.Count && call.Step > 0 && _calls[^1] == call)
        {
            _calls.RemoveAt(_calls.Count - 1);
            Account(-call.Request.CalculateSize());
            call.Step = 0;
            call.Journal = null;
        }
    }

    /// <summary>Counts <paramref name="n"/> bytes (requests under the lock, answers from their calls).</summary>
    public void Account(long n) => Interlocked.Add(ref _bytes, n);

    /// <summary>Entries from step <paramref name="from"/> on, at most <paramref name="max"/>. Caller holds the kernel lock.</summary>
    public List<JournalEntry> Read(long from, int max)
    {
        var first = (int)Math.Min(_calls.Count, Math.Max(0, from - 1));
        var list = new List<JournalEntry>();
        for (var i = first; i < _calls.Count && list.Count < max; i++)
            list.Add(_calls[i].ToEntry());
        return list;
    }

    /// <summary>The gRPC methods that only look (not journaled): everything else that names a journaled machine is.</summary>
    public static bool IsReadOnly(string method) => s_readOnly.Contains(method);

    private static readonly HashSet<string> s_readOnly = new(StringComparer.Ordinal)
    {
        "uffd.v1.MachineService/CreateMachine", // the journal's header
        "uffd.v1.MachineService/GetMachine",
        "uffd.v1.MachineService/ListMachines",
        "uffd.v1.MachineService/Kpageflags",
        "uffd.v1.MachineService/ReadJournal",
        "uffd.v1.MachineService/GrantMachineAccess", // who may call, not machine state
        "uffd.v1.MachineService/RevokeMachineAccess",
        "uffd.v1.MachineService/DestroyMachine", // the journal ends with the machine
        "uffd.v1.MmService/GetMm",
        "uffd.v1.MmService/ListMms",
        "uffd.v1.MmService/ListVmas",
        "uffd.v1.MmService/DumpPageTable",
        "uffd.v1.MmService/Pagemap",
        "uffd.v1.MmService/Smaps",
        "uffd.v1.MmService/Digest",
        "uffd.v1.ThreadService/GetThread",
        "uffd.v1.ThreadService/ListThreads",
        "uffd.v1.UserfaultfdService/Poll",
        "uffd.v1.FaultInjectionService/ListRules",
        "uffd.v1.FaultInjectionService/ReadLog",
        "uffd.v1.WorkloadService/GetWorkload", // a journaled machine has no workloads
        "uffd.v1.WorkloadService/ListWorkloads",
        "uffd.v1.WorkloadService/WaitWorkload",
        "uffd.v1.WorkloadService/ReadWrites",
        "uffd.v1.MigrationMetricsService/GetMigrationMetrics",
    };
}

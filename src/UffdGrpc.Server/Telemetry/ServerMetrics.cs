using System.Diagnostics.Metrics;
using UffdGrpc.Server.Hosting;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Telemetry;

/// <summary>
/// The server's meter (<see cref="MeterName"/>). Counters come from the model's own events
/// (<see cref="Model.Kernel.UserfaultRaised"/>, <see cref="Model.Kernel.UserfaultEnded"/>,
/// <see cref="Model.Kernel.InjectionFired"/>, <see cref="Model.Kernel.OomKilled"/>) and from
/// <see cref="TelemetryInterceptor"/> (RPCs, open streams); the gauges are read at collection
/// time: resident pages without a lock, address spaces and VMAs under each machine's lock
/// for the time it takes to count them (and not at all while a machine is busy: its last
/// counts are reported).
/// </summary>
/// <remarks>
/// The per-fault path is the hot one (a batched handler resolves hundreds of thousands of
/// faults a second), and an OpenTelemetry measurement with tags costs a tag-set lookup each.
/// So a fault adds to plain totals (one interlocked add when raised, one when it ends) that
/// the raised, ended and sleeping instruments observe at collection time, and records its
/// phases into the one latency histogram: at most four measurements per fault, not twelve.
/// </remarks>
public sealed class ServerMetrics : IDisposable
{
    /// <summary>The meter and activity source name.</summary>
    public const string MeterName = "UffdGrpc.Server";

    /// <summary>Bucket bounds of the latency histograms, in seconds: 2^N microseconds (N = 0..24, 1 µs to ~16.8 s), as QEMU's postcopy-latency-dist.</summary>
    public static readonly double[] LatencyBuckets = [.. Enumerable.Range(0, 25).Select(n => Math.ScaleB(1e-6, n))];

    private readonly Meter _meter = new(MeterName);
    private readonly MachineRegistry _registry;
    private static readonly int s_classCount = Enum.GetValues<Model.UserfaultClass>().Length;
    private static readonly int s_outcomeCount = Enum.GetValues<Model.UserfaultOutcome>().Length;
    // Faults raised by class, and sleeps ended by class × outcome, since the process started.
    // Process-wide, as the meter is: a meter provider listens to every meter of this name in
    // the process (several servers in one test host), and keeps the last value each
    // observable instrument reports, so every instance must report the same totals.
    private static readonly long[] s_raisedTotals = new long[s_classCount];
    private static readonly long[] s_endedTotals = new long[s_classCount * s_outcomeCount];
    private readonly Histogram<double> _latency;
    private readonly Counter<long> _injections;
    private readonly Counter<long> _oomKills;
    private readonly System.Runtime.CompilerServices.ConditionalWeakTable<MachineHost, LastCounts> _lastCounts = [];

    public ServerMetrics(MachineRegistry registry)
    {
        _registry = registry;
        _meter.CreateObservableCounter("uffdgrpc.userfaults.raised", ObserveRaised, "{fault}", "Page faults queued on a userfaultfd (handle_userfault), by class (missing, wp, minor)");
        _meter.CreateObservableCounter("uffdgrpc.userfaults.ended", ObserveEnded, "{fault}", "Userfault sleeps that ended, by class and outcome (the ioctl that woke it: copy, zeropage, continue, poison, move, writeprotect, wake, unregister; or close, signal, exit)");
        _meter.CreateObservableUpDownCounter("uffdgrpc.userfaults.sleeping", ObserveSleeping, "{thread}", "Threads asleep in handle_userfault now");
        _latency = _meter.CreateHistogram<double>("uffdgrpc.userfault.latency", "s", "Fault-resolution latency by phase (queued: raised → read; handling: read → resolving call received; waking: call received → woken; total), class and outcome, as GetMigrationMetrics serves it",
            advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = LatencyBuckets });
        _injections = _meter.CreateCounter<long>("uffdgrpc.injections.fired", "{firing}", "Fault-injection rule firings, by site");
        _oomKills = _meter.CreateCounter<long>("uffdgrpc.oom_kills", "{process}", "Processes killed by a machine's OOM killer");
        Rpcs = _meter.CreateCounter<long>("uffdgrpc.rpc.calls", "{call}", "RPCs that ended, by service, method and gRPC status");
        OpenStreams = _meter.CreateUpDownCounter<long>("uffdgrpc.rpc.open_streams", "{stream}", "Streaming RPCs in progress, by service and method");
        _meter.CreateObservableGauge("uffdgrpc.machines", () => _registry.AllMachines().Count(), "{machine}", "Live machines");
        _meter.CreateObservableGauge("uffdgrpc.address_spaces", () => (long)Sum(c => c.Mms), "{mm}", "Address spaces (processes) that have not exited, over all machines");
        _meter.CreateObservableGauge("uffdgrpc.vmas", () => (long)Sum(c => c.Vmas), "{vma}", "VMAs of those address spaces");
        _meter.CreateObservableGauge("uffdgrpc.blocktime.guest", () => Sum(c => c.GuestBlocktime), "s",
            "Blocktime as QEMU's postcopy-blocktime counts it: time during which all live threads of a process were asleep in userfaults at once (counted once), summed over the processes of all machines");
        _meter.CreateObservableGauge("uffdgrpc.blocktime.threads", () => Sum(c => c.ThreadBlocktime), "s",
            "Per-thread blocktime: each thread's time asleep in userfaults, summed over the threads of all machines");
        _meter.CreateObservableGauge("uffdgrpc.resident_pages", () => _registry.AllMachines().Sum(h => h.Kernel.LiveFrames), "{page}", "Page frames allocated (page contents, not page tables or the zero pages), over all machines");
        registry.MachineCreated += Observe;
    }

    /// <summary>RPCs that ended (tags rpc.service, rpc.method, rpc.grpc.status).</summary>
    internal Counter<long> Rpcs { get; }

    /// <summary>Streaming RPCs in progress (tags rpc.service, rpc.method).</summary>
    internal UpDownCounter<long> OpenStreams { get; }

    private static readonly string[] s_classes = [.. Enum.GetNames<Model.UserfaultClass>().Select(n => n.ToLowerInvariant())];
    private static readonly string[] s_outcomes = [.. Enum.GetNames<Model.UserfaultOutcome>().Select(n => n.ToLowerInvariant())];

    private void Observe(MachineHost host)
    {
        var k = host.Kernel;
        k.UserfaultRaised += c => Interlocked.Increment(ref s_raisedTotals[(int)c]);
        k.UserfaultEnded += e =>
        {
            Interlocked.Increment(ref s_endedTotals[((int)e.Class * s_outcomeCount) + (int)e.Outcome]);
            var cls = new KeyValuePair<string, object?>("class", s_classes[(int)e.Class]);
            var outcome = new KeyValuePair<string, object?>("outcome", s_outcomes[(int)e.Outcome]);
            if (e.Queued is { } q)
                _latency.Record(q.TotalSeconds, cls, outcome, new KeyValuePair<string, object?>("phase", "queued"));
            if (e.Handling is { } handling)
                _latency.Record(handling.TotalSeconds, cls, outcome, new KeyValuePair<string, object?>("phase", "handling"));
            _latency.Record(e.Waking.TotalSeconds, cls, outcome, new KeyValuePair<string, object?>("phase", "waking"));
            _latency.Record(e.Total.TotalSeconds, cls, outcome, new KeyValuePair<string, object?>("phase", "total"));
        };
        k.InjectionFired += r => _injections.Add(1, new KeyValuePair<string, object?>("site", SnakeCase(r.Site.ToString())));
        k.OomKilled += _ => _oomKills.Add(1);
    }

    /// <summary>Faults raised so far, per class that has had one (as a counter with that tag would report them).</summary>
    private static IEnumerable<Measurement<long>> ObserveRaised()
    {
        for (var c = 0; c < s_classCount; c++)
        {
            var n = Volatile.Read(ref s_raisedTotals[c]);
            if (n > 0)
                yield return new Measurement<long>(n, new KeyValuePair<string, object?>("class", s_classes[c]));
        }
    }

    /// <summary>Sleeps ended so far, per class × outcome that has had one.</summary>
    private static IEnumerable<Measurement<long>> ObserveEnded()
    {
        for (var i = 0; i < s_endedTotals.Length; i++)
        {
            var n = Volatile.Read(ref s_endedTotals[i]);
            if (n > 0)
                yield return new Measurement<long>(n, new KeyValuePair<string, object?>("class", s_classes[i / s_outcomeCount]), new KeyValuePair<string, object?>("outcome", s_outcomes[i % s_outcomeCount]));
        }
    }

    /// <summary>
    /// Threads asleep in a userfault: raised minus ended. The ended totals are read first, so a
    /// fault that ends meanwhile can only make the figure briefly high, never negative.
    /// </summary>
    private static long ObserveSleeping()
    {
        long ended = 0, raised = 0;
        for (var i = 0; i < s_endedTotals.Length; i++)
            ended += Volatile.Read(ref s_endedTotals[i]);
        for (var c = 0; c < s_classCount; c++)
            raised += Volatile.Read(ref s_raisedTotals[c]);
        return raised - ended;
    }

    /// <summary>An injection site as the proto names it, lower case (MmapChanging → mmap_changing).</summary>
    internal static string SnakeCase(string pascal) =>
        string.Concat(pascal.Select((ch, i) => i > 0 && char.IsUpper(ch) ? "_" + char.ToLowerInvariant(ch) : char.ToLowerInvariant(ch).ToString()));

    private readonly record struct Counts(int Mms, int Vmas, double GuestBlocktime, double ThreadBlocktime);

    private sealed class LastCounts
    {
        public Counts Value;
    }

    /// <summary>Sums a count over the machines, each read under its lock (at most 50 ms wait; a busy machine reports its last counts).</summary>
    private T Sum<T>(Func<Counts, T> pick)
        where T : System.Numerics.INumber<T>
    {
        var total = T.Zero;
        foreach (var h in _registry.AllMachines())
        {
            var last = _lastCounts.GetOrCreateValue(h);
            if (!h.Destroyed && Monitor.TryEnter(h.Kernel.Lock, 50))
            {
                try
                {
                    int mms = 0, vmas = 0;
                    double guest = 0, threads = 0;
                    foreach (var mm in h.Kernel.Mms)
                    {
                        guest += mm.Blocktime.TotalSeconds;
                        threads += mm.Threads.Sum(t => t.Blocktime.TotalSeconds);
                        if (mm.Exited)
                            continue;
                        mms++;
                        vmas += mm.Vmas.Count;
                    }
                    last.Value = new Counts(mms, vmas, guest, threads);
                }
                finally
                {
                    Monitor.Exit(h.Kernel.Lock);
                }
            }
            total += pick(last.Value);
        }
        return total;
    }

    public void Dispose() => _meter.Dispose();
}

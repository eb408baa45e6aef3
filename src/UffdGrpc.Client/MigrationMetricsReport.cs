using System.Globalization;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>
/// The migration metrics as text (what every recipe prints): the counters, blocktime, and one
/// row per fault class × outcome × phase with its count, mean and bucket percentiles.
/// Deterministic for given metrics (invariant culture, fixed order).
/// </summary>
public static class MigrationMetricsReport
{
    private static readonly CultureInfo s_inv = CultureInfo.InvariantCulture;

    /// <summary>The phases in the order they happen (the total last).</summary>
    public static readonly FaultPhase[] Phases = [FaultPhase.Queued, FaultPhase.Handling, FaultPhase.Waking, FaultPhase.Total];

    /// <summary>The lower-case name the API uses (FAULT_OUTCOME_EEXIST → eexist).</summary>
    public static string Name(FaultClass c) => c.ToString().ToLowerInvariant();

    public static string Name(FaultOutcome o) => o.ToString().ToLowerInvariant();

    public static string Name(FaultPhase p) => p.ToString().ToLowerInvariant();

    /// <summary>A duration in µs, as 850 µs, 12.3 ms or 1.25 s.</summary>
    public static string Micros(double us) =>
        us < 1000 ? us.ToString("0.#", s_inv) + " µs"
        : us < 1_000_000 ? (us / 1000).ToString("0.##", s_inv) + " ms"
        : (us / 1_000_000).ToString("0.###", s_inv) + " s";

    /// <summary>A bucket's label by its lower bound: 1 µs, 2 µs … 4 ms (bucket 0 is "&lt;2 µs").</summary>
    public static string BucketLabel(int n) => n == 0 ? "<2µs" : Micros(Math.ScaleB(1.0, n)).Replace(" ", "", StringComparison.Ordinal);

    /// <summary>The upper bound (µs) of the bucket holding the <paramref name="q"/>-quantile sample; for the open last bucket its lower bound.</summary>
    public static double QuantileUpperBound(LatencyHistogram h, double q)
    {
        ArgumentNullException.ThrowIfNull(h);
        if (h.Count == 0)
            return 0;
        var rank = Math.Max(1UL, (ulong)Math.Ceiling(q * h.Count));
        ulong seen = 0;
        for (var n = 0; n < h.Counts.Count; n++)
        {
            seen += h.Counts[n];
            if (seen >= rank)
                return n == h.Counts.Count - 1 ? Math.ScaleB(1.0, n) : Math.ScaleB(1.0, n + 1);
        }
        return Math.ScaleB(1.0, h.Counts.Count - 1);
    }

    /// <summary>Writes the report of <paramref name="metrics"/> (with an optional heading line).</summary>
    public static void Print(TextWriter w, GetMigrationMetricsResponse metrics, string? title = null)
    {
        ArgumentNullException.ThrowIfNull(w);
        ArgumentNullException.ThrowIfNull(metrics);
        var c = metrics.Counters ?? new MigrationCounters();
        w.WriteLine(title ?? (metrics.MmId != 0 ? $"migration metrics: process {metrics.MmId} of machine {metrics.MachineId}" : $"migration metrics: machine {metrics.MachineId}"));
        w.WriteLine(string.Create(s_inv, $"  faults raised {c.FaultsRaised}, resolved {c.FaultsEnded}; round trips {c.RoundTrips}; pages moved {c.PagesMoved}; bytes moved {c.BytesMoved}; resident pages {c.ResidentPages}"));
        if (c.FillsEexist + c.FillsEagain + c.FillsEsrch > 0)
            w.WriteLine(string.Create(s_inv, $"  fills failed: eexist {c.FillsEexist}, eagain {c.FillsEagain}, esrch {c.FillsEsrch}"));
        foreach (var p in metrics.Processes)
        {
            var threads = string.Join(", ", p.Threads.Where(t => t.BlocktimeNs > 0).Select(t => string.Create(s_inv, $"{t.ThreadId}: {Micros(t.BlocktimeNs / 1000.0)}")));
            w.WriteLine(string.Create(s_inv, $"  blocktime of process {p.MmId}: {Micros(p.BlocktimeNs / 1000.0)} with every thread asleep at once; per thread: {(threads.Length == 0 ? "none" : threads)}"));
        }
        if (metrics.Histograms.Count == 0)
        {
            w.WriteLine("  no userfault has ended");
            return;
        }
        w.WriteLine(string.Create(s_inv, $"  {"class",-8} {"outcome",-10} {"phase",-9} {"count",8} {"mean",10} {"p50 ≤",10} {"p99 ≤",10} {"max ≤",10}"));
        foreach (var h in metrics.Histograms.OrderBy(h => h.FaultClass).ThenBy(h => h.Outcome).ThenBy(h => Array.IndexOf(Phases, h.Phase)))
        {
            var mean = h.Count == 0 ? 0 : h.SumUs / h.Count;
            w.WriteLine(string.Create(s_inv,
                $"  {Name(h.FaultClass),-8} {Name(h.Outcome),-10} {Name(h.Phase),-9} {h.Count,8} {Micros(mean),10} {Micros(QuantileUpperBound(h, 0.5)),10} {Micros(QuantileUpperBound(h, 0.99)),10} {Micros(QuantileUpperBound(h, 1)),10}"));
        }
    }
}

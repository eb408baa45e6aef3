using System.Xml.Linq;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.UnitTests;

/// <summary>The client's renderings of the migration metrics: the SVG histogram's structure and determinism, the text report's rows.</summary>
public class MigrationMetricsRenderingTests
{
    private static LatencyHistogram H(FaultPhase phase, params (int Bucket, ulong Count)[] samples)
    {
        var h = new LatencyHistogram { FaultClass = FaultClass.Missing, Outcome = FaultOutcome.Copy, Phase = phase };
        var counts = new ulong[33];
        foreach (var (b, c) in samples)
        {
            counts[b] += c;
            h.Count += c;
            h.SumUs += c * Math.ScaleB(1.5, b);
        }
        h.Counts.AddRange(counts);
        return h;
    }

    private static GetMigrationMetricsResponse Sample()
    {
        var m = new GetMigrationMetricsResponse
        {
            MachineId = 7,
            Counters = new MigrationCounters { FaultsRaised = 10, FaultsEnded = 10, PagesMoved = 10, BytesMoved = 40960, RoundTrips = 10, ResidentPages = 10 },
        };
        m.BucketUpperBoundsUs.AddRange(Enumerable.Range(0, 33).Select(n => n == 32 ? 0UL : 1UL << (n + 1)));
        m.Histograms.Add(H(FaultPhase.Queued, (4, 9), (5, 1)));
        m.Histograms.Add(H(FaultPhase.Handling, (12, 10)));
        m.Histograms.Add(H(FaultPhase.Waking, (3, 10)));
        m.Histograms.Add(H(FaultPhase.Total, (12, 10)));
        m.Processes.Add(new ProcessBlocktime { MmId = 9, BlocktimeNs = 2_500_000, Threads = { new ThreadBlocktime { ThreadId = 11, BlocktimeNs = 2_500_000 } } });
        return m;
    }

    [Fact]
    public void The_svg_has_a_title_labelled_axes_a_legend_and_a_bar_per_phase_and_bucket()
    {
        var svg = LatencyHistogramSvg.Render(Sample(), "postcopy: 10 faults");
        Assert.Equal(svg, LatencyHistogramSvg.Render(Sample(), "postcopy: 10 faults"));
        var doc = XDocument.Parse(svg);
        XNamespace ns = "http://www.w3.org/2000/svg";
        var root = doc.Root!;
        Assert.Equal(ns + "svg", root.Name);
        Assert.Equal("postcopy: 10 faults", root.Element(ns + "title")!.Value);
        string Text(string cls) => root.Descendants(ns + "text").Single(t => (string?)t.Attribute("class") == cls).Value;
        Assert.Equal("postcopy: 10 faults", Text("title"));
        Assert.Equal("faults", Text("ylabel"));
        Assert.Contains("µs", Text("xlabel"), StringComparison.Ordinal);
        Assert.Equal(["queued", "handling", "waking"], root.Elements(ns + "g").Where(g => (string?)g.Attribute("class") == "legend").Select(g => g.Element(ns + "text")!.Value));

        // Buckets 3..12 (the lowest to the highest non-empty), three bars each.
        var groups = root.Elements(ns + "g").Where(g => (string?)g.Attribute("class") == "bucket").ToList();
        Assert.Equal(Enumerable.Range(3, 10).Select(n => n.ToString(System.Globalization.CultureInfo.InvariantCulture)), groups.Select(g => (string)g.Attribute("data-bucket")!));
        Assert.All(groups, g => Assert.Equal(3, g.Elements(ns + "rect").Count()));
        Assert.Equal("4.1ms", groups[^1].Element(ns + "text")!.Value);
        double Height(int bucket, string phase) => double.Parse(
            (string)groups[bucket - 3].Elements(ns + "rect").Single(r => ((string)r.Attribute("class")!).EndsWith(phase, StringComparison.Ordinal)).Attribute("height")!,
            System.Globalization.CultureInfo.InvariantCulture);
        // Ten handling samples at 4–8 ms: the tallest bar, as tall as the ten waking ones at 8 µs; nine queued at 16 µs are 9/10 of it.
        Assert.Equal(Height(12, "handling"), Height(3, "waking"));
        Assert.Equal(0.9 * Height(12, "handling"), Height(4, "queued"), precision: 1);
        Assert.Equal(0, Height(12, "queued"));
        // The total phase is not drawn.
        Assert.DoesNotContain("total", svg, StringComparison.Ordinal);
    }

    [Fact]
    public void Metrics_without_samples_still_render_an_empty_chart()
    {
        var svg = LatencyHistogramSvg.Render(new GetMigrationMetricsResponse(), "nothing");
        var root = XDocument.Parse(svg).Root!;
        Assert.Equal(8, root.Elements().Count(e => (string?)e.Attribute("class") == "bucket"));
    }

    [Fact]
    public void The_report_prints_counters_blocktime_and_a_row_per_distribution()
    {
        var w = new StringWriter { NewLine = "\n" };
        MigrationMetricsReport.Print(w, Sample());
        var lines = w.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("migration metrics: machine 7", lines[0]);
        Assert.Contains("round trips 10; pages moved 10; bytes moved 40960; resident pages 10", lines[1], StringComparison.Ordinal);
        Assert.Contains("blocktime of process 9: 2.5 ms", lines[2], StringComparison.Ordinal);
        Assert.Contains("11: 2.5 ms", lines[2], StringComparison.Ordinal);
        var rows = lines.Skip(4).Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)).ToList();
        Assert.Equal(["queued", "handling", "waking", "total"], rows.Select(r => r[2]));
        // handling: 10 samples in [4096, 8192) µs: mean 6144 µs, every quantile at most 8.19 ms.
        Assert.Equal(["missing", "copy", "handling", "10", "6.14", "ms", "8.19", "ms", "8.19", "ms", "8.19", "ms"], rows[1]);
        // queued: p50 in bucket 4 (≤ 32 µs), p99 in bucket 5 (≤ 64 µs).
        Assert.Equal(["32", "µs", "64", "µs"], rows[0][6..10]);
    }
}

using System.Globalization;
using System.Security;
using System.Text;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>
/// A fault-resolution latency histogram as an SVG picture: one group of bars per 2^N µs
/// bucket, one bar per phase (queued, handling, waking) summed over the classes and outcomes
/// shown, labelled axes, a legend and a title. Plain text, BCL only, and deterministic: the
/// same metrics give the same bytes.
/// </summary>
public static class LatencyHistogramSvg
{
    private const int Width = 760;
    private const int Height = 360;
    private const int Left = 64;
    private const int Right = 16;
    private const int Top = 40;
    private const int Bottom = 64;

    private static readonly CultureInfo s_inv = CultureInfo.InvariantCulture;
    private static readonly (FaultPhase Phase, string Color)[] s_phases =
        [(FaultPhase.Queued, "#4e79a7"), (FaultPhase.Handling, "#f28e2b"), (FaultPhase.Waking, "#59a14f")];

    /// <summary>
    /// The SVG of <paramref name="metrics"/>' histograms (only <paramref name="faultClass"/>
    /// when given), titled <paramref name="title"/>. Buckets run from the lowest to the
    /// highest non-empty one.
    /// </summary>
    public static string Render(GetMigrationMetricsResponse metrics, string title, FaultClass faultClass = FaultClass.Unspecified)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        var buckets = metrics.BucketUpperBoundsUs.Count == 0 ? 33 : metrics.BucketUpperBoundsUs.Count;
        var counts = new ulong[s_phases.Length, buckets];
        foreach (var h in metrics.Histograms.Where(h => faultClass == FaultClass.Unspecified || h.FaultClass == faultClass))
        {
            var p = Array.FindIndex(s_phases, x => x.Phase == h.Phase);
            if (p < 0)
                continue;
            for (var n = 0; n < Math.Min(buckets, h.Counts.Count); n++)
                counts[p, n] += h.Counts[n];
        }
        int first = buckets, last = -1;
        ulong max = 0;
        for (var n = 0; n < buckets; n++)
        {
            for (var p = 0; p < s_phases.Length; p++)
            {
                if (counts[p, n] == 0)
                    continue;
                first = Math.Min(first, n);
                last = Math.Max(last, n);
                max = Math.Max(max, counts[p, n]);
            }
        }
        if (last < 0)
            (first, last, max) = (0, 0, 1);
        // Show at least 8 buckets so that a single spike still reads as a distribution.
        last = Math.Min(buckets - 1, Math.Max(last, first + 7));
        var yMax = NiceCeiling(max);

        var sb = new StringBuilder();
        void Line(string s) => sb.Append(s).Append('\n');
        string F(double v) => v.ToString("0.##", s_inv);
        Line($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{Width}\" height=\"{Height}\" viewBox=\"0 0 {Width} {Height}\" font-family=\"sans-serif\" font-size=\"11\">");
        Line($"<title>{SecurityElement.Escape(title)}</title>");
        Line($"<rect width=\"{Width}\" height=\"{Height}\" fill=\"white\"/>");
        Line($"<text class=\"title\" x=\"{Width / 2}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{SecurityElement.Escape(title)}</text>");
        var plotW = Width - Left - Right;
        var plotH = Height - Top - Bottom;
        var x0 = Left;
        var y0 = Top + plotH;
        // Axes and the y grid.
        Line($"<g class=\"axes\" stroke=\"black\"><line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0 + plotW}\" y2=\"{y0}\"/><line x1=\"{x0}\" y1=\"{Top}\" x2=\"{x0}\" y2=\"{y0}\"/></g>");
        for (var i = 0; i <= 4; i++)
        {
            var v = yMax * (ulong)i / 4;
            var y = y0 - (plotH * i / 4.0);
            Line($"<g class=\"ytick\"><line x1=\"{x0 - 4}\" y1=\"{F(y)}\" x2=\"{x0 + plotW}\" y2=\"{F(y)}\" stroke=\"#ddd\"/><text x=\"{x0 - 6}\" y=\"{F(y + 4)}\" text-anchor=\"end\">{v.ToString(s_inv)}</text></g>");
        }
        Line($"<text class=\"ylabel\" x=\"16\" y=\"{Top + (plotH / 2)}\" transform=\"rotate(-90 16 {Top + (plotH / 2)})\" text-anchor=\"middle\">faults</text>");
        Line($"<text class=\"xlabel\" x=\"{x0 + (plotW / 2)}\" y=\"{Height - 12}\" text-anchor=\"middle\">fault-resolution latency (2^N µs buckets, lower bound)</text>");
        var groups = last - first + 1;
        var groupW = plotW / (double)groups;
        var barW = groupW * 0.8 / s_phases.Length;
        for (var n = first; n <= last; n++)
        {
            var gx = x0 + ((n - first) * groupW) + (groupW * 0.1);
            Line($"<g class=\"bucket\" data-bucket=\"{n}\">");
            for (var p = 0; p < s_phases.Length; p++)
            {
                var c = counts[p, n];
                var h = plotH * (c / (double)yMax);
                Line($"<rect class=\"bar {MigrationMetricsReport.Name(s_phases[p].Phase)}\" x=\"{F(gx + (p * barW))}\" y=\"{F(y0 - h)}\" width=\"{F(barW)}\" height=\"{F(h)}\" fill=\"{s_phases[p].Color}\"><title>{MigrationMetricsReport.Name(s_phases[p].Phase)}: {c.ToString(s_inv)}</title></rect>");
            }
            Line($"<text class=\"xtick\" x=\"{F(gx + (groupW * 0.4))}\" y=\"{y0 + 16}\" text-anchor=\"middle\">{SecurityElement.Escape(MigrationMetricsReport.BucketLabel(n))}</text>");
            Line("</g>");
        }
        for (var p = 0; p < s_phases.Length; p++)
        {
            var lx = x0 + plotW - 260 + (p * 88);
            Line($"<g class=\"legend\"><rect x=\"{lx}\" y=\"{Top - 8}\" width=\"10\" height=\"10\" fill=\"{s_phases[p].Color}\"/><text x=\"{lx + 14}\" y=\"{Top + 1}\">{MigrationMetricsReport.Name(s_phases[p].Phase)}</text></g>");
        }
        Line("</svg>");
        return sb.ToString();
    }

    /// <summary>Writes <see cref="Render"/>'s SVG to <paramref name="path"/> (UTF-8, no BOM).</summary>
    public static void Write(string path, GetMigrationMetricsResponse metrics, string title, FaultClass faultClass = FaultClass.Unspecified) =>
        File.WriteAllText(path, Render(metrics, title, faultClass), new UTF8Encoding(false));

    /// <summary>1, 2 or 5 times a power of ten, at least <paramref name="v"/>.</summary>
    private static ulong NiceCeiling(ulong v)
    {
        ulong p = 1;
        while (true)
        {
            foreach (var m in (ReadOnlySpan<ulong>)[1, 2, 5])
            {
                if (m * p >= v)
                    return m * p;
            }
            p *= 10;
        }
    }
}

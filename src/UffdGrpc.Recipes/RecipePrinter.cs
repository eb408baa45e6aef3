using System.Globalization;
using UffdGrpc.Client;

namespace UffdGrpc.Recipes;

/// <summary>The text every recipe run prints: what ran, the check's verdict, the roles' notes and counters.</summary>
public static class RecipePrinter
{
    public static void Print(RecipeResult r, RecipeOptions o, string mode, TextWriter w)
    {
        var pages = o.Pages > 0 ? $", {o.Pages} pages" : "";
        w.WriteLine($"recipe {r.Recipe}: handler {r.Handler}, seed {o.Seed.ToString(CultureInfo.InvariantCulture)}{pages}, {mode}, machine {r.MachineId.ToString(CultureInfo.InvariantCulture)}, {r.Elapsed.TotalMilliseconds.ToString("0", CultureInfo.InvariantCulture)} ms");
        foreach (var n in r.Report.Notes)
            w.WriteLine("  note: " + n);
        // Counters whose name starts with '_' carry data for the check, not for people.
        var shown = r.Report.Counters.Where(kv => !kv.Key.StartsWith('_')).ToList();
        if (shown.Count > 0)
            w.WriteLine("  counters: " + string.Join(", ", shown.Select(kv => $"{kv.Key} {kv.Value.ToString(CultureInfo.InvariantCulture)}")));
        if (r.Metrics is { } m)
            MigrationMetricsReport.Print(w, m, $"migration metrics of machine {r.MachineId.ToString(CultureInfo.InvariantCulture)}");
        w.WriteLine("check: " + r.Check);
    }

    /// <summary>Writes the run's latency histogram (<see cref="LatencyHistogramSvg"/>) to <paramref name="path"/>; false when the server gave no metrics.</summary>
    public static bool WriteSvg(RecipeResult r, RecipeOptions o, string path)
    {
        if (r.Metrics is not { } m)
            return false;
        if (Path.GetDirectoryName(Path.GetFullPath(path)) is { } dir)
            Directory.CreateDirectory(dir);
        LatencyHistogramSvg.Write(path, m, $"recipe {r.Recipe}, handler {r.Handler}, seed {o.Seed.ToString(CultureInfo.InvariantCulture)}: fault-resolution latency");
        return true;
    }
}

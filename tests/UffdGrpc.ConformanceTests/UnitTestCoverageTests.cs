using System.Text;
using Xunit.Abstractions;

namespace UffdGrpc.ConformanceTests;

/// <summary>
/// tests/conformance/uffd-unit-tests-coverage.tsv against uffd-unit-tests-cases.tsv: the
/// kernel's own userfaultfd unit test (Linux 6.18 uffd-unit-tests.c), one row per case ×
/// memory type, each naming the scenario that ports it or why none can.
/// </summary>
public static class UnitTestCoverage
{
    public sealed record Row(int Line, string Case, string Memory, string Status, string Scenario, string Key, string Note);

    public static string Folder => Path.Combine(ScenarioFolders.RepoRoot, "tests", "conformance");

    /// <summary>The (case, memory type) pairs uffd-unit-tests runs, in its order ("-" for the UFFDIO_API checks).</summary>
    public static List<(string Case, string Memory)> Cases() =>
        DataLines(Path.Combine(Folder, "uffd-unit-tests-cases.tsv"))
            .SelectMany(l =>
            {
                var f = l.Text.Split('\t');
                if (f.Length != 3)
                    throw new FormatException($"uffd-unit-tests-cases.tsv line {l.Line}: want 3 tab-separated fields");
                return f[1].Split(',').Select(m => (f[0], m));
            })
            .ToList();

    public static List<Row> Rows() =>
        DataLines(Path.Combine(Folder, "uffd-unit-tests-coverage.tsv"))
            .Select(l =>
            {
                var f = l.Text.Split('\t');
                if (f.Length != 6)
                    throw new FormatException($"uffd-unit-tests-coverage.tsv line {l.Line}: want 6 tab-separated fields");
                return new Row(l.Line, f[0], f[1], f[2], f[3], f[4], f[5]);
            })
            .ToList();

    /// <summary>A ported row's scenario script: scenarios/NAME.scn, or shared/NAME.scn in shared/conformance.</summary>
    public static string? ScenarioPath(string scenario)
    {
        if (scenario.StartsWith("shared/", StringComparison.Ordinal))
            return ScenarioFolders.Shared is { } s ? Path.Combine(s, scenario["shared/".Length..] + ".scn") : null;
        return Path.Combine(ScenarioFolders.Project, scenario + ".scn");
    }

    /// <summary>Every way the table disagrees with the case list or the scenario folders.</summary>
    public static List<string> Problems(List<(string Case, string Memory)> cases, List<Row> rows)
    {
        var problems = new List<string>();
        var expected = cases.ToHashSet();
        foreach (var g in rows.GroupBy(r => (r.Case, r.Memory)).Where(g => g.Count() > 1))
            problems.Add($"{g.Key.Case} on {g.Key.Memory}: {g.Count()} rows (lines {string.Join(", ", g.Select(r => r.Line))})");
        foreach (var (c, m) in cases.Where(p => !rows.Any(r => (r.Case, r.Memory) == p)))
            problems.Add($"{c} on {m}: no row (a case of uffd-unit-tests.c the table misses)");
        foreach (var r in rows.Where(r => !expected.Contains((r.Case, r.Memory))))
            problems.Add($"line {r.Line}: {r.Case} on {r.Memory} is not a case of uffd-unit-tests.c");
        foreach (var r in rows)
        {
            switch (r.Status)
            {
                case "ported":
                    var path = ScenarioPath(r.Scenario);
                    if (path is null || !File.Exists(path))
                        problems.Add($"line {r.Line}: scenario {r.Scenario} does not exist");
                    else if (!File.Exists(Path.ChangeExtension(path, ".out")))
                        problems.Add($"line {r.Line}: scenario {r.Scenario} has no real-kernel golden");
                    break;
                case "n/a":
                    if (r.Scenario != "-" || r.Key is "" or "-" || string.IsNullOrWhiteSpace(r.Note))
                        problems.Add($"line {r.Line}: an n/a row needs scenario '-', a reason key and a note");
                    break;
                default:
                    problems.Add($"line {r.Line}: status '{r.Status}' is neither ported nor n/a");
                    break;
            }
        }
        return problems;
    }

    /// <summary>"ported N / n/a N (key N, ...) / total N".</summary>
    public static string Counts(List<Row> rows)
    {
        var ported = rows.Count(r => r.Status == "ported");
        var na = rows.Where(r => r.Status == "n/a").GroupBy(r => r.Key).OrderBy(g => g.Key, StringComparer.Ordinal)
            .Select(g => $"{g.Key} {g.Count()}");
        return $"ported {ported} / n/a {rows.Count(r => r.Status == "n/a")} ({string.Join(", ", na)}) / total {rows.Count}";
    }

    private static IEnumerable<(int Line, string Text)> DataLines(string path) =>
        File.ReadAllLines(path)
            .Select((text, i) => (Line: i + 1, Text: text))
            .Where(l => l.Text.Length > 0 && !l.Text.StartsWith('#'));
}

public class UnitTestCoverageTests(ITestOutputHelper output)
{
    [Fact]
    public void Table_has_one_row_per_case_and_memory_type_and_names_existing_scenarios()
    {
        var problems = UnitTestCoverage.Problems(UnitTestCoverage.Cases(), UnitTestCoverage.Rows());
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }

    [Fact]
    public void Problems_reports_a_missing_case_an_unknown_scenario_and_a_stray_row()
    {
        var cases = new List<(string, string)> { ("zeropage", "anon"), ("zeropage", "shmem") };
        var rows = new List<UnitTestCoverage.Row>
        {
            new(1, "zeropage", "anon", "ported", "u99-no-such-scenario", "-", "x"),
            new(2, "move", "anon", "ported", "u03-ut-zeropage", "-", "x"),
            new(3, "zeropage", "anon", "n/a", "-", "", ""),
        };
        var problems = UnitTestCoverage.Problems(cases, rows);
        Assert.Contains(problems, p => p.Contains("zeropage on shmem: no row"));
        Assert.Contains(problems, p => p.Contains("u99-no-such-scenario does not exist"));
        Assert.Contains(problems, p => p.Contains("move on anon is not a case"));
        Assert.Contains(problems, p => p.Contains("zeropage on anon: 2 rows"));
        Assert.Contains(problems, p => p.Contains("n/a row needs"));
    }

    public static TheoryData<string> PortedScenarios()
    {
        var data = new TheoryData<string>();
        foreach (var s in UnitTestCoverage.Rows().Where(r => r.Status == "ported").Select(r => r.Scenario).Distinct())
            data.Add(s);
        return data;
    }

    /// <summary>A scenario the table lists must replay its real-kernel golden byte for byte.</summary>
    [Theory]
    [MemberData(nameof(PortedScenarios))]
    public async Task Ported_scenario_replays_its_golden(string scenario)
    {
        var path = UnitTestCoverage.ScenarioPath(scenario);
        Assert.True(path is not null && File.Exists(path), $"{scenario}: no such scenario");
        var expected = await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"));
        var diff = Replay.FirstDifference(expected, await Replay.RunAsync(path));
        Assert.True(diff is null, $"{scenario}: {diff}");
    }

    /// <summary>The counts (also written to artifacts/uffd-unit-tests-coverage.txt), one line per row.</summary>
    [Fact]
    public async Task Coverage_report()
    {
        var rows = UnitTestCoverage.Rows();
        var report = new StringBuilder();
        var diverging = 0;
        var replayed = new Dictionary<string, string?>();
        foreach (var r in rows)
        {
            if (r.Status == "ported" && !replayed.ContainsKey(r.Scenario))
            {
                var path = UnitTestCoverage.ScenarioPath(r.Scenario);
                replayed[r.Scenario] = path is null || !File.Exists(path)
                    ? "no such scenario"
                    : Replay.FirstDifference(await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out")), await Replay.RunAsync(path));
            }
            var verdict = r.Status == "ported"
                ? replayed[r.Scenario] is { } d ? $"DIVERGES {r.Scenario}: {d}" : $"ported {r.Scenario}"
                : $"n/a ({r.Key})";
            if (verdict.StartsWith("DIVERGES", StringComparison.Ordinal))
                diverging++;
            report.Append($"{r.Case} on {r.Memory}: {verdict}\n");
        }
        var counts = "uffd-unit-tests coverage: " + UnitTestCoverage.Counts(rows);
        report.Append(counts).Append('\n');
        output.WriteLine(report.ToString());
        var artifacts = Path.Combine(ScenarioFolders.RepoRoot, "artifacts");
        Directory.CreateDirectory(artifacts);
        await File.WriteAllTextAsync(Path.Combine(artifacts, "uffd-unit-tests-coverage.txt"), report.ToString());
        Console.WriteLine(counts);
        Assert.Equal(UnitTestCoverage.Cases().Count, rows.Count);
        Assert.Equal(0, diverging);
    }
}

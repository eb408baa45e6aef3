using System.Text;
using System.Text.RegularExpressions;
using UffdGrpc.Mm;
using Xunit.Abstractions;

namespace UffdGrpc.ConformanceTests;

/// <summary>
/// The Linux 6.1 goldens: the project's scenarios recorded on a real 6.1 with the QEMU kit
/// (tests/conformance/scenarios/k61/NAME.out) and the shared scenarios' 6.1 traces
/// (shared/conformance/k61/goldens/NAME.out), each replayed with the 6.1 profile.
/// </summary>
public static partial class K61Goldens
{
    /// <summary>tests/conformance/scenarios/k61.</summary>
    public static string Project => Path.Combine(ScenarioFolders.Project, "k61");

    /// <summary>shared/conformance/k61/goldens, or null when absent.</summary>
    public static string? Shared =>
        ScenarioFolders.Shared is { } s && Path.GetFullPath(Path.Combine(s, "..", "k61", "goldens")) is var d && Directory.Exists(d) ? d : null;

    /// <summary>tests/conformance/README.md, whose "6.1: not yet modelled" section lists the known differences.</summary>
    public static string Readme => Path.Combine(ScenarioFolders.RepoRoot, "tests", "conformance", "README.md");

    /// <summary>Every 6.1 golden whose scenario exists, as (suite, name): suites "k61" (project) and "shared-k61".</summary>
    public static IEnumerable<(string Suite, string Name)> All()
    {
        foreach (var (suite, goldens, scenarios) in Folders())
        {
            foreach (var g in Directory.GetFiles(goldens, "*.out").Order(StringComparer.Ordinal))
            {
                var name = Path.GetFileNameWithoutExtension(g);
                if (!name.EndsWith(".flaky", StringComparison.Ordinal) && File.Exists(Path.Combine(scenarios, name + ".scn")))
                    yield return (suite, name);
            }
        }
    }

    private static IEnumerable<(string Suite, string Goldens, string Scenarios)> Folders()
    {
        yield return ("k61", Project, ScenarioFolders.Project);
        if (Shared is { } s && ScenarioFolders.Shared is { } scn)
            yield return ("shared-k61", s, scn);
    }

    public static string ScenarioPath(string suite, string name) =>
        Path.Combine(suite == "k61" ? ScenarioFolders.Project : ScenarioFolders.Shared!, name + ".scn");

    public static string GoldenPath(string suite, string name) =>
        Path.Combine(suite == "k61" ? Project : Shared!, name + ".out");

    [GeneratedRegex(@"^\|\s*`?(?<key>(?:shared-)?k61/[A-Za-z0-9-]+)`?\s*\|\s*(?<reason>.+?)\s*\|\s*$")]
    private static partial Regex KnownRow();

    /// <summary>
    /// The table of tests/conformance/README.md's "## 6.1: not yet modelled" section: key
    /// ("k61/NAME" or "shared-k61/NAME") → reason. These are reported as known, not failed.
    /// </summary>
    public static IReadOnlyDictionary<string, string> NotYetModelled()
    {
        var known = new Dictionary<string, string>(StringComparer.Ordinal);
        var inSection = false;
        foreach (var line in File.ReadLines(Readme))
        {
            if (line.StartsWith("## ", StringComparison.Ordinal))
                inSection = line.StartsWith("## 6.1: not yet modelled", StringComparison.Ordinal);
            else if (inSection && KnownRow().Match(line) is { Success: true } m)
                known[m.Groups["key"].Value] = m.Groups["reason"].Value;
        }
        return known;
    }

    /// <summary>The theory rows: every 6.1 golden that is not listed as not yet modelled.</summary>
    public static TheoryData<string, string> Modelled()
    {
        var known = NotYetModelled();
        var data = new TheoryData<string, string>();
        foreach (var (suite, name) in All())
        {
            if (!known.ContainsKey($"{suite}/{name}"))
                data.Add(suite, name);
        }
        return data;
    }

    /// <summary>
    /// Replays every 6.1 golden with <paramref name="replay"/> and writes one line each: PASS,
    /// FAIL (first difference), or KNOWN (listed in "6.1: not yet modelled", with its reason).
    /// Returns the report and the problems: failures, known entries that now pass or have no
    /// golden.
    /// </summary>
    public static async Task<(string Report, List<string> Problems, int Pass)> ReportAsync(string mode, Func<string, Task<string>> replay)
    {
        var known = NotYetModelled();
        var report = new StringBuilder();
        var problems = new List<string>();
        if (Shared is null)
            report.Append("NOTE shared/conformance/k61/goldens not found beside the repository: only the project's 6.1 goldens run\n");
        int pass = 0, fail = 0, knownCount = 0;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (suite, name) in All())
        {
            var key = $"{suite}/{name}";
            seen.Add(key);
            var expected = await File.ReadAllTextAsync(GoldenPath(suite, name));
            var diff = Replay.FirstDifference(expected, await replay(ScenarioPath(suite, name)));
            if (known.TryGetValue(key, out var reason))
            {
                knownCount++;
                if (diff is null)
                {
                    report.Append($"NOW-PASSES {key}: remove it from the \"6.1: not yet modelled\" list\n");
                    problems.Add($"{key} passes but is listed as not yet modelled");
                }
                else
                {
                    report.Append($"KNOWN {key} (6.1: not yet modelled: {reason}): {diff}\n");
                }
            }
            else if (diff is null)
            {
                pass++;
                report.Append($"PASS {key}\n");
            }
            else
            {
                fail++;
                report.Append($"FAIL {key}: {diff}\n");
                problems.Add($"{key}: {diff}");
            }
        }
        foreach (var key in known.Keys.Where(k => !seen.Contains(k) && (Shared is not null || !k.StartsWith("shared-", StringComparison.Ordinal))))
        {
            report.Append($"MISSING {key}: listed as not yet modelled but has no 6.1 golden\n");
            problems.Add($"{key} has no 6.1 golden");
        }
        report.Append($"conformance 6.1{mode}: {pass} passed, {fail} failed, {knownCount} known (6.1: not yet modelled)\n");
        return (report.ToString(), problems, pass);
    }

    public static async Task WriteArtifactAsync(string file, string text)
    {
        var artifacts = Path.Combine(ScenarioFolders.RepoRoot, "artifacts");
        Directory.CreateDirectory(artifacts);
        await File.WriteAllTextAsync(Path.Combine(artifacts, file), text);
    }
}

/// <summary>The 6.1 goldens replayed in-process with the 6.1 profile.</summary>
public class K61Suite(ITestOutputHelper output)
{
    [Theory]
    [MemberData(nameof(K61Goldens.Modelled), MemberType = typeof(K61Goldens))]
    public async Task Scenario_replays_the_linux_6_1_trace(string suite, string name)
    {
        var expected = await File.ReadAllTextAsync(K61Goldens.GoldenPath(suite, name));
        var actual = await Replay.RunAsync(K61Goldens.ScenarioPath(suite, name), KernelProfile.V6_1);
        var diff = Replay.FirstDifference(expected, actual);
        Assert.True(diff is null, $"{suite}/{name} (6.1 profile): {diff}");
    }

    /// <summary>One line per 6.1 golden, also written to artifacts/conformance-k61-report.txt.</summary>
    [Fact]
    public async Task K61_conformance_report()
    {
        var (report, problems, pass) = await K61Goldens.ReportAsync("", p => Replay.RunAsync(p, KernelProfile.V6_1));
        output.WriteLine(report);
        await K61Goldens.WriteArtifactAsync("conformance-k61-report.txt", report);
        Assert.True(pass > 0, "no 6.1 golden ran");
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }
}

/// <summary>The 6.1 goldens replayed through the server (a 6.1 machine per replay).</summary>
public class K61ServerModeSuite(TestServerFixture server, ITestOutputHelper output) : IClassFixture<TestServerFixture>
{
    [Theory]
    [MemberData(nameof(K61Goldens.Modelled), MemberType = typeof(K61Goldens))]
    public async Task Scenario_replays_the_linux_6_1_trace_over_grpc(string suite, string name)
    {
        var expected = await File.ReadAllTextAsync(K61Goldens.GoldenPath(suite, name));
        var actual = await ServerModeSuite.ReplayAsync(server, K61Goldens.ScenarioPath(suite, name), KernelProfile.V6_1);
        var diff = Replay.FirstDifference(expected, actual);
        Assert.True(diff is null, $"{suite}/{name} (6.1 profile) over gRPC: {diff}");
    }

    /// <summary>Over gRPC every 6.1 golden gives the same result as in-process; written to artifacts/conformance-k61-server-report.txt.</summary>
    [Fact]
    public async Task K61_server_mode_report()
    {
        var differ = new List<string>();
        var (report, problems, pass) = await K61Goldens.ReportAsync(" --server", async p =>
        {
            var overGrpc = await ServerModeSuite.ReplayAsync(server, p, KernelProfile.V6_1);
            if (Replay.FirstDifference(await Replay.RunAsync(p, KernelProfile.V6_1), overGrpc) is { } d)
                differ.Add($"DIFFER {p}: in-process vs gRPC: {d}");
            return overGrpc;
        });
        // The summary stays the last line: "...; N differ from in-process".
        var body = report.TrimEnd('\n');
        var cut = body.LastIndexOf('\n') + 1;
        var text = body[..cut] + string.Concat(differ.Select(d => d + "\n")) + body[cut..] + $"; {differ.Count} differ from in-process\n";
        output.WriteLine(text);
        await K61Goldens.WriteArtifactAsync("conformance-k61-server-report.txt", text);
        Assert.True(pass > 0, "no 6.1 golden ran");
        Assert.True(problems.Count == 0, string.Join("\n", problems));
        Assert.Empty(differ);
    }
}

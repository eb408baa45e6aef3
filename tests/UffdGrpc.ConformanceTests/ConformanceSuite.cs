using System.Text;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios;
using Xunit.Abstractions;

namespace UffdGrpc.ConformanceTests;

/// <summary>Locates scenario folders: the project's own and shared/conformance beside the repository.</summary>
public static class ScenarioFolders
{
    public static string RepoRoot
    {
        get
        {
            var dir = new DirectoryInfo(AppContext.BaseDirectory);
            while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "UffdGrpc.sln")))
                dir = dir.Parent;
            return dir?.FullName ?? throw new InvalidOperationException("UffdGrpc.sln not found above " + AppContext.BaseDirectory);
        }
    }

    public static string Project => Path.Combine(RepoRoot, "tests", "conformance", "scenarios");

    /// <summary>shared/conformance/scenarios (UFFDGRPC_SHARED overrides shared/), or null when absent.</summary>
    public static string? Shared
    {
        get
        {
            var shared = Environment.GetEnvironmentVariable("UFFDGRPC_SHARED") ?? Path.Combine(RepoRoot, "..", "shared");
            var dir = Path.GetFullPath(Path.Combine(shared, "conformance", "scenarios"));
            return Directory.Exists(dir) ? dir : null;
        }
    }

    /// <summary>Every scenario that has a golden trace, as (suite, path).</summary>
    public static IEnumerable<(string Suite, string Path)> All()
    {
        foreach (var f in Directory.GetFiles(Project, "*.scn").Order(StringComparer.Ordinal))
        {
            if (File.Exists(Path.ChangeExtension(f, ".out")))
                yield return ("project", f);
        }
        if (Shared is { } s)
        {
            foreach (var f in Directory.GetFiles(s, "*.scn").Order(StringComparer.Ordinal))
            {
                if (File.Exists(Path.ChangeExtension(f, ".out")))
                    yield return ("shared", f);
            }
        }
    }
}

/// <summary>Replays a scenario in-process and compares the whole trace with its golden.</summary>
public static class Replay
{
    public static async Task<string> RunAsync(string scenarioPath, KernelProfile profile = KernelProfile.V6_18)
    {
        var sw = new StringWriter { NewLine = "\n" };
        await using var backend = new InProcessBackend(new Kernel(profile));
        using var reader = new StreamReader(scenarioPath);
        await new ScenarioInterpreter(backend, sw).RunAsync(reader);
        return sw.ToString();
    }

    /// <summary>null when equal, else a description of the first differing line.</summary>
    public static string? FirstDifference(string expected, string actual)
    {
        if (expected == actual)
            return null;
        var e = expected.Split('\n');
        var a = actual.Split('\n');
        for (var i = 0; i < Math.Max(e.Length, a.Length); i++)
        {
            var el = i < e.Length ? e[i] : "<end of trace>";
            var al = i < a.Length ? a[i] : "<end of trace>";
            if (el != al)
                return $"line {i + 1}: expected «{el}» got «{al}»";
        }
        return "traces differ (line endings)";
    }
}

public class ConformanceSuite(ITestOutputHelper output)
{
    public static TheoryData<string, string> Scenarios()
    {
        var data = new TheoryData<string, string>();
        foreach (var (suite, path) in ScenarioFolders.All())
            data.Add(suite, Path.GetFileName(path));
        return data;
    }

    private static string PathOf(string suite, string name) =>
        Path.Combine(suite == "shared" ? ScenarioFolders.Shared! : ScenarioFolders.Project, name);

    [Theory]
    [MemberData(nameof(Scenarios))]
    public async Task Scenario_replays_the_real_kernel_trace(string suite, string name)
    {
        var path = PathOf(suite, name);
        var expected = await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"));
        var actual = await Replay.RunAsync(path);
        var diff = Replay.FirstDifference(expected, actual);
        Assert.True(diff is null, $"{suite}/{name}: {diff}");
    }

    /// <summary>One line per scenario and a summary, also written to artifacts/conformance-report.txt.</summary>
    [Fact]
    public async Task Conformance_report()
    {
        var report = new StringBuilder();
        if (ScenarioFolders.Shared is null)
            report.Append("NOTE shared/conformance/scenarios not found beside the repository: only the project's own scenarios run\n");
        int pass = 0, fail = 0;
        foreach (var (suite, path) in ScenarioFolders.All())
        {
            var expected = await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"));
            var diff = Replay.FirstDifference(expected, await Replay.RunAsync(path));
            var name = $"{suite}/{Path.GetFileNameWithoutExtension(path)}";
            if (diff is null)
            {
                pass++;
                report.Append($"PASS {name}\n");
            }
            else
            {
                fail++;
                report.Append($"FAIL {name}: {diff}\n");
            }
        }
        report.Append($"conformance: {pass} passed, {fail} failed\n");
        output.WriteLine(report.ToString());
        var artifacts = Path.Combine(ScenarioFolders.RepoRoot, "artifacts");
        Directory.CreateDirectory(artifacts);
        await File.WriteAllTextAsync(Path.Combine(artifacts, "conformance-report.txt"), report.ToString());
        Assert.True(pass > 0, "no scenario ran");
        Assert.Equal(0, fail);
    }
}

using System.Diagnostics;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>
/// The built CLI: a recipe with every role in its own OS process (this CLI re-invoked as
/// <c>recipe NAME --role R ...</c>), and the postcopy handler written in Python in place of
/// the C# one, against the server the CLI hosts.
/// </summary>
public sealed class RecipeCliTests(ITestOutputHelper output)
{
    private static string RepoRoot()
    {
        var d = new DirectoryInfo(AppContext.BaseDirectory);
        while (d is not null && !File.Exists(Path.Combine(d.FullName, "UffdGrpc.sln")))
            d = d.Parent;
        return d?.FullName ?? throw new InvalidOperationException("no UffdGrpc.sln above the test directory");
    }

    private static readonly string s_cli = Path.Combine(RepoRoot(), "src", "UffdGrpc.Cli", "bin", "Release", "net10.0", "UffdGrpc.Cli.dll");

    private async Task<(int Rc, string Output)> CliAsync(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = RepoRoot() };
        psi.ArgumentList.Add(s_cli);
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await p.WaitForExitAsync(cts.Token);
        var text = await stdout + await stderr;
        output.WriteLine(text);
        return (p.ExitCode, text);
    }

    [Fact]
    public async Task Postcopy_with_each_role_in_its_own_process_passes_and_writes_its_histogram()
    {
        var svg = Path.Combine(Path.GetTempPath(), $"recipe-{Guid.NewGuid():N}.svg");
        var (rc, text) = await CliAsync("recipe", "postcopy", "--processes", "--svg", svg);
        Assert.True(rc == 0, text);
        Assert.Contains("roles as processes", text, StringComparison.Ordinal);
        Assert.Contains("check: PASS: destination vs source at switch-over: 64 pages equal byte for byte", text, StringComparison.Ordinal);
        Assert.Contains("migration metrics of machine", text, StringComparison.Ordinal);
        Assert.Contains("latency histogram: " + svg, text, StringComparison.Ordinal);
        Assert.StartsWith("<svg", await File.ReadAllTextAsync(svg), StringComparison.Ordinal);
        File.Delete(svg);
    }

    [Fact]
    public async Task Postcopy_handler_in_python_passes_the_same_check()
    {
        const string python = "/usr/bin/python3";
        Assert.True(File.Exists(python), "python3 is missing (.ci/apt-packages installs python3-grpcio and python3-grpc-tools)");
        var script = Path.Combine(RepoRoot(), "tools", "recipes", "postcopy_handler.py");
        var svg = Path.Combine(Path.GetTempPath(), $"recipe-{Guid.NewGuid():N}.svg");
        var (rc, text) = await CliAsync("recipe", "postcopy", "--processes", "--role-command", $"handler={python} {script}", "--svg", svg);
        Assert.True(rc == 0, text);
        Assert.Contains("python-handler 1", text, StringComparison.Ordinal);
        Assert.Contains("check: PASS: destination vs source at switch-over: 64 pages equal byte for byte", text, StringComparison.Ordinal);

        (rc, text) = await CliAsync("recipe", "postcopy", "--processes", "--role-command", $"handler={python} {script}", "--wrong-handler", "stale-page", "--svg", svg);
        Assert.True(rc == 1, text);
        Assert.Contains("check: FAIL: destination vs source at switch-over:", text, StringComparison.Ordinal);
        File.Delete(svg);
    }
}

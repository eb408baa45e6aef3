using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>
/// The built CLI: a recipe with every role in its own OS process (this CLI re-invoked as
/// <c>recipe NAME --role R ...</c>), and the postcopy handler written in Python in place of
/// the C# one, against the server the CLI hosts.
/// </summary>
public sealed class RecipeCliTests(ITestOutputHelper output)
{
    private Task<(int Rc, string Output)> CliAsync(params string[] args) => BuiltCli.RunAsync(output, TimeSpan.FromSeconds(120), args);

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
        var script = Path.Combine(BuiltCli.RepoRoot, "tools", "recipes", "postcopy_handler.py");
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

using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>
/// The snapshot-restore handler written in Node (clients/node/snapshot_handler.js, @grpc/grpc-js)
/// in place of the C# one, every role in its own process: the protocol is the product. Skipped,
/// with the reason, where node is not installed or its packages cannot be installed (offline).
/// </summary>
public sealed class SnapshotRestoreNodeTests(ITestOutputHelper output)
{
    private static string? OnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator).Select(dir => Path.Combine(dir, name)).FirstOrDefault(File.Exists);

    private Task<(int Rc, string Output)> RunAsync(string file, IEnumerable<string> args, string cwd) =>
        BuiltCli.RunProcessAsync(output, file, args, cwd, TimeSpan.FromSeconds(180));

    [SkippableFact]
    public async Task NodeHandlerPassesTheSnapshotRestoreCheckAndItsInOrderModeFailsIt()
    {
        // Arrange: node, and the pinned packages (npm ci from package-lock.json when missing).
        var node = OnPath("node");
        Skip.If(node is null, "node is not installed (the Node handler test needs node >= 18 and npm)");
        var dir = Path.Combine(BuiltCli.RepoRoot, "clients", "node");
        if (!Directory.Exists(Path.Combine(dir, "node_modules", "@grpc", "grpc-js")))
        {
            var npm = OnPath("npm");
            Skip.If(npm is null, "npm is not installed, and clients/node/node_modules is missing");
            var (npmRc, npmText) = await RunAsync(npm!, ["ci", "--no-audit", "--no-fund"], dir);
            Skip.If(npmRc != 0, "npm ci in clients/node failed (offline?): " + npmText.Split('\n').LastOrDefault(l => l.Length > 0));
        }
        var cli = BuiltCli.Dll;
        string[] Args(params string[] extra) => [cli, "recipe", "snapshot-restore", "--processes", "--role-command", $"handler={node} {Path.Combine(dir, "snapshot_handler.js")}", .. extra];

        // Act
        var (rc, text) = await RunAsync("dotnet", Args(), BuiltCli.RepoRoot);
        var (wrongRc, wrongText) = await RunAsync("dotnet", Args("--wrong-handler", "in-order"), BuiltCli.RepoRoot);

        // Assert
        Assert.True(rc == 0, text);
        Assert.Contains("node-handler 1", text, StringComparison.Ordinal);
        Assert.Contains("check: PASS: guest memory vs the snapshot with the balloon's releases and the guest's writes: 256 pages equal byte for byte", text, StringComparison.Ordinal);
        Assert.True(wrongRc == 1, wrongText);
        Assert.Contains("node-handler 1", wrongText, StringComparison.Ordinal);
        Assert.Contains("check: FAIL: guest memory vs the snapshot with the balloon's releases and the guest's writes: 1 of 256 pages differ; first: page 64 ", wrongText, StringComparison.Ordinal);
    }
}

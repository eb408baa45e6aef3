using System.Diagnostics;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>The repository and the built CLI (Release), and a child process run to its end with its output logged.</summary>
internal static class BuiltCli
{
    public static string RepoRoot { get; } = FindRepoRoot();

    public static string Dll { get; } = Path.Combine(RepoRoot, "src", "UffdGrpc.Cli", "bin", "Release", "net10.0", "UffdGrpc.Cli.dll");

    private static string FindRepoRoot()
    {
        var d = new DirectoryInfo(AppContext.BaseDirectory);
        while (d is not null && !File.Exists(Path.Combine(d.FullName, "UffdGrpc.sln")))
            d = d.Parent;
        return d?.FullName ?? throw new InvalidOperationException("no UffdGrpc.sln above the test directory");
    }

    /// <summary>Runs the built CLI with <paramref name="args"/> from the repository root.</summary>
    public static Task<(int Rc, string Output)> RunAsync(ITestOutputHelper output, TimeSpan timeout, params string[] args) =>
        RunProcessAsync(output, "dotnet", [Dll, .. args], RepoRoot, timeout);

    /// <summary>Runs <paramref name="file"/> to its end: its exit status and its stdout then stderr, also written to the test output. Past <paramref name="timeout"/> the process and everything it started are killed and the wait throws.</summary>
    public static async Task<(int Rc, string Output)> RunProcessAsync(ITestOutputHelper output, string file, IEnumerable<string> args, string cwd, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = cwd };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            // Out of time: nothing it started (the bench's servers, a recipe's roles) outlives the test.
            p.Kill(entireProcessTree: true);
            throw;
        }
        var text = await stdout + await stderr;
        output.WriteLine(text);
        return (p.ExitCode, text);
    }
}

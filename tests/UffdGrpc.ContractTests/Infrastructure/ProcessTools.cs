using System.Diagnostics;

namespace UffdGrpc.ContractTests.Infrastructure;

/// <summary>The repository and child processes (the Python client, the CLI).</summary>
public static class ProcessTools
{
    /// <summary>The checkout's root (the folder holding UffdGrpc.sln).</summary>
    public static string RepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "UffdGrpc.sln")))
            dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("UffdGrpc.sln not found");
    }

    /// <summary>Runs <paramref name="exe"/> to its end (at most 120 s) and returns its exit code and output (stdout, then stderr).</summary>
    public static async Task<(int Rc, string Output)> RunAsync(string exe, string[] args, string cwd)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = cwd };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(120));
        return (p.ExitCode, await stdout + await stderr);
    }
}

using System.Diagnostics;

namespace UffdGrpc.ContractTests.Infrastructure;

public sealed partial class ServerProcess
{
    /// <summary>
    /// Runs the server process with <paramref name="environment"/> and <paramref name="args"/>
    /// until it exits by itself (at most <paramref name="timeout"/>; then it is killed and the
    /// test fails); returns its exit status and standard error.
    /// </summary>
    public static async Task<(int ExitCode, string Stderr, string Stdout)> RunToExitAsync(IReadOnlyDictionary<string, string> environment, IEnumerable<string> args, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = AppContext.BaseDirectory,
        };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "UffdGrpc.Server.dll"));
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        psi.Environment["DOTNET_NOLOGO"] = "1";
        psi.Environment.Remove("ASPNETCORE_URLS");
        foreach (var (key, value) in environment)
            psi.Environment[key] = value;
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"the server did not exit within {timeout.TotalSeconds} s");
        }
        return (p.ExitCode, await stderr, await stdout);
    }
}

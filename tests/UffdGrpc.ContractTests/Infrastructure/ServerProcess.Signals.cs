using System.Diagnostics;

namespace UffdGrpc.ContractTests.Infrastructure;

/// <summary>The server process's pid and a SIGTERM, for the CPU and graceful-shutdown tests.</summary>
public sealed partial class ServerProcess
{
    public int Pid => _process.Id;

    public bool HasExited => _process.HasExited;

    /// <summary>Sends SIGTERM (what `docker stop` and systemd send) and returns how long the process took to exit.</summary>
    public async Task<TimeSpan> TerminateAsync(TimeSpan limit)
    {
        var sw = Stopwatch.StartNew();
        using (var kill = Process.Start(new ProcessStartInfo("kill") { ArgumentList = { "-TERM", Pid.ToString(System.Globalization.CultureInfo.InvariantCulture) } })!)
            await kill.WaitForExitAsync();
        using var timeout = new CancellationTokenSource(limit);
        await _process.WaitForExitAsync(timeout.Token);
        return sw.Elapsed;
    }
}

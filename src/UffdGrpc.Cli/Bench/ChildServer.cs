using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// A server process the bench starts on a loopback port it picks and kills when done: the
/// product (UffdGrpc.Server.dll, copied beside the CLI) or the floor (this CLI's
/// <c>bench-floor</c>). Both run with <c>DOTNET_TC_CallCountingDelayMs=0</c>, so tiered JIT
/// promotes hot methods after their first 30 calls instead of after a 100 ms quiet period.
/// </summary>
internal sealed class ChildServer : IAsyncDisposable
{
    private readonly Process _process;

    private ChildServer(Process p, string url)
    {
        _process = p;
        Url = url;
    }

    public string Url { get; }

    /// <summary>CPU time (user + system, all threads) the server process has used so far, in seconds.</summary>
    public double CpuSeconds
    {
        get
        {
            _process.Refresh();
            return _process.TotalProcessorTime.TotalSeconds;
        }
    }

    public static async Task<ChildServer> StartAsync(string what, CancellationToken ct)
    {
        var port = FreePort();
        var url = $"http://127.0.0.1:{port}";
        var dir = AppContext.BaseDirectory;
        var dll = what == "product" ? Path.Combine(dir, "UffdGrpc.Server.dll") : Path.Combine(dir, "UffdGrpc.Cli.dll");
        var host = Environment.ProcessPath is { } pp && Path.GetFileNameWithoutExtension(pp) == "dotnet" ? pp : "dotnet";
        var psi = new ProcessStartInfo(host) { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(dll);
        if (what != "product")
            psi.ArgumentList.Add("bench-floor");
        psi.ArgumentList.Add("--urls");
        psi.ArgumentList.Add(url);
        psi.Environment["DOTNET_TC_CallCountingDelayMs"] = "0";
        psi.Environment["ASPNETCORE_ENVIRONMENT"] = "Production";
        psi.Environment.Remove("ASPNETCORE_URLS");
        var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {dll}");
        p.OutputDataReceived += (_, _) => { };
        p.ErrorDataReceived += (_, _) => { };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        var child = new ChildServer(p, url);
        var until = Stopwatch.StartNew();
        while (true)
        {
            if (p.HasExited)
                throw new InvalidOperationException($"the {what} server exited with status {p.ExitCode}");
            try
            {
                using var tcp = new TcpClient();
                await tcp.ConnectAsync(IPAddress.Loopback, port, ct).ConfigureAwait(false);
                return child;
            }
            catch (SocketException) when (until.Elapsed.TotalSeconds < 30)
            {
                await Task.Delay(100, ct).ConfigureAwait(false);
            }
        }
    }

    /// <summary>
    /// Waits until the server has gone quiet — at most one clock tick (10 ms) of CPU in a
    /// 200 ms window — or <see cref="SettleLimit"/> has passed. What a finished run leaves
    /// behind (the collection of its garbage, a stream still draining) then lands in no
    /// measured row: before this, the first round-trip row's server CPU carried the previous
    /// throughput run's collection, about 0.3 s of both CPUs.
    /// </summary>
    public async Task SettleAsync(CancellationToken ct)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < SettleLimit)
        {
            var before = CpuSeconds;
            await Task.Delay(200, ct).ConfigureAwait(false);
            if (CpuSeconds - before <= 0.010)
                return;
        }
    }

    /// <summary>The longest <see cref="SettleAsync(CancellationToken)"/> waits.</summary>
    public static readonly TimeSpan SettleLimit = TimeSpan.FromSeconds(5);

    /// <summary>Settles every server given (null: one the bench did not start, so cannot watch).</summary>
    public static Task SettleAsync(CancellationToken ct, params ChildServer?[] servers) =>
        Task.WhenAll(servers.Where(s => s is not null).Select(s => s!.SettleAsync(ct)));

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
            await _process.WaitForExitAsync().ConfigureAwait(false);
        }
        _process.Dispose();
    }
}

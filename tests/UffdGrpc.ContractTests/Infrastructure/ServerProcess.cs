using System.Diagnostics;
using System.Text.RegularExpressions;

namespace UffdGrpc.ContractTests.Infrastructure;

/// <summary>
/// The server as a separate process on a real Kestrel port: <c>dotnet UffdGrpc.Server.dll
/// --urls http://127.0.0.1:0</c>, exactly as the README runs it (h2c from appsettings).
/// The bound port is read from the "Now listening on" line.
/// </summary>
public sealed partial class ServerProcess : IAsyncDisposable
{
    private readonly Process _process;

    private ServerProcess(Process process, string address)
    {
        _process = process;
        Address = address;
    }

    public string Address { get; }

    /// <summary>Starts the server with <paramref name="environment"/> on top of appsettings.json (configuration keys with <c>__</c> for <c>:</c>).</summary>
    public static async Task<ServerProcess> StartAsync(IReadOnlyDictionary<string, string>? environment = null)
    {
        var dll = Path.Combine(AppContext.BaseDirectory, "UffdGrpc.Server.dll");
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = AppContext.BaseDirectory,
        };
        psi.ArgumentList.Add(dll);
        psi.ArgumentList.Add("--urls");
        psi.ArgumentList.Add("http://127.0.0.1:0");
        psi.Environment["DOTNET_NOLOGO"] = "1";
        psi.Environment.Remove("ASPNETCORE_URLS");
        foreach (var (key, value) in environment ?? new Dictionary<string, string>())
            psi.Environment[key] = value;
        var p = Process.Start(psi)!;
        var found = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is not null && ListeningLine().Match(e.Data) is { Success: true } m)
                found.TrySetResult(m.Groups[1].Value);
        };
        p.ErrorDataReceived += (_, _) => { };
        p.Exited += (_, _) => found.TrySetException(new InvalidOperationException("the server exited before listening"));
        p.EnableRaisingEvents = true;
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        try
        {
            var address = await found.Task.WaitAsync(TimeSpan.FromSeconds(60));
            return new ServerProcess(p, address);
        }
        catch
        {
            if (!p.HasExited)
                p.Kill(entireProcessTree: true);
            p.Dispose();
            throw;
        }
    }

    [GeneratedRegex(@"Now listening on: (http://127\.0\.0\.1:\d+)")]
    private static partial Regex ListeningLine();

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
        }
        _process.Dispose();
    }
}

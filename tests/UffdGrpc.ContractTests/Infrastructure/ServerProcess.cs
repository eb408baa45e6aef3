using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.RegularExpressions;

namespace UffdGrpc.ContractTests.Infrastructure;

/// <summary>
/// The server as a separate process on a real Kestrel port: <c>dotnet UffdGrpc.Server.dll
/// --urls http://127.0.0.1:0</c>, exactly as the README runs it (h2c from appsettings).
/// The bound port is read from the "Now listening on" line. Settings go in as environment
/// variables (<c>Auth__Tokens__alice=…</c>, <c>Limits__StreamsPerPrincipal=…</c>), as an
/// operator would pass them; error and critical log lines are kept in <see cref="Errors"/>.
/// </summary>
public sealed partial class ServerProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly ConcurrentQueue<string> _errors;

    private ServerProcess(Process process, string address, ConcurrentQueue<string> errors, ConcurrentQueue<string> listening)
    {
        _process = process;
        Address = address;
        _errors = errors;
        Listening = listening;
    }

    public string Address { get; }

    /// <summary>Every address the server logged "Now listening on" for, in order (the first is <see cref="Address"/>).</summary>
    public IReadOnlyCollection<string> Listening { get; }

    /// <summary>The server's log entries at Error or Critical: each "fail:"/"crit:" line with the two lines after it (message, exception).</summary>
    public IReadOnlyCollection<string> Errors => _errors;

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
        var errors = new ConcurrentQueue<string>();
        var listening = new ConcurrentQueue<string>();
        var found = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        // UFFDGRPC_SERVER_LOG=FILE keeps every server log line, for a failure's post-mortem.
        var logFile = Environment.GetEnvironmentVariable("UFFDGRPC_SERVER_LOG");
        var logLock = new object();
        string? entry = null;
        var entryLines = 0;
        void Line(string? line)
        {
            if (line is null)
                return;
            lock (logLock)
            {
                if (logFile is not null)
                    File.AppendAllText(logFile, line + Environment.NewLine);
                // An error entry: its "fail:"/"crit:" line and the first lines after it (message, exception).
                if (line.StartsWith("fail:", StringComparison.Ordinal) || line.StartsWith("crit:", StringComparison.Ordinal))
                {
                    if (entry is not null)
                        errors.Enqueue(entry);
                    entry = line;
                    entryLines = 1;
                }
                else if (entry is not null && line.StartsWith(' ') && entryLines < 3)
                {
                    entry += " | " + line.Trim();
                    if (++entryLines == 3)
                    {
                        errors.Enqueue(entry);
                        entry = null;
                    }
                }
                else if (entry is not null)
                {
                    errors.Enqueue(entry);
                    entry = null;
                }
            }
        }
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is not null && ListeningLine().Match(e.Data) is { Success: true } m)
            {
                listening.Enqueue(m.Groups[1].Value);
                found.TrySetResult(m.Groups[1].Value);
            }
            Line(e.Data);
        };
        p.ErrorDataReceived += (_, e) => Line(e.Data);
        p.Exited += (_, _) => found.TrySetException(new InvalidOperationException("the server exited before listening"));
        p.EnableRaisingEvents = true;
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        try
        {
            var address = await found.Task.WaitAsync(TimeSpan.FromSeconds(60));
            return new ServerProcess(p, address, errors, listening);
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

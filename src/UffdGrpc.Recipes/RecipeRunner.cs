using System.Diagnostics;
using System.Globalization;
using UffdGrpc.Client;

namespace UffdGrpc.Recipes;

/// <summary>
/// Runs a recipe: setup, every role at once (as tasks of this process, or as OS processes
/// through <see cref="Launch"/>), then the check. Role processes speak a line protocol on
/// their standard streams (<see cref="RoleProcess"/>): signals they raise and the counters
/// and notes they report come out on stdout, signals other roles raised go in on stdin.
/// </summary>
public sealed class RecipeRunner(Recipe recipe, RecipeContext ctx)
{
    /// <summary>
    /// Starts a role in its own process: given the role and the arguments it needs
    /// (<see cref="RoleArguments"/>), the process to start (the CLI re-invokes itself as
    /// <c>recipe NAME --role R ...</c>). Null: roles run as tasks of this process.
    /// </summary>
    public Func<string, IReadOnlyList<string>, ProcessStartInfo>? Launch { get; init; }

    /// <summary>The server URL role processes connect to (required with <see cref="Launch"/>).</summary>
    public string? ServerUrl { get; init; }

    /// <summary>The longest a run may take before every role is stopped (default 2 minutes).</summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromMinutes(2);

    /// <summary>Destroy the machine after the check (default true).</summary>
    public bool DestroyMachine { get; init; } = true;

    public async Task<RecipeResult> RunAsync(CancellationToken ct)
    {
        var sw = Stopwatch.StartNew();
        var setup = await recipe.SetupAsync(ctx, ct).ConfigureAwait(false);
        var report = new RoleReport();
        try
        {
            using var run = CancellationTokenSource.CreateLinkedTokenSource(ct);
            run.CancelAfter(Timeout);
            if (Launch is null)
                await RunInProcessAsync(setup, report, run).ConfigureAwait(false);
            else
                await RunProcessesAsync(setup, report, run.Token).ConfigureAwait(false);
            var check = await recipe.CheckAsync(ctx, setup, report, ct).ConfigureAwait(false);
            var elapsed = sw.Elapsed;
            Contracts.V1.GetMigrationMetricsResponse? metrics = null;
            try
            {
                metrics = await ctx.Client.Metrics.GetMigrationMetricsAsync(new Contracts.V1.GetMigrationMetricsRequest { MachineId = setup.MachineId }, cancellationToken: ct).ConfigureAwait(false);
            }
            catch (Grpc.Core.RpcException e) when (e.StatusCode == Grpc.Core.StatusCode.Unimplemented)
            {
                // A server without the metrics service.
            }
            return new RecipeResult(recipe.Name, ctx.Options.WrongHandler ?? "correct", check, report, setup.MachineId, elapsed) { Metrics = metrics };
        }
        finally
        {
            if (DestroyMachine)
                await ctx.Client.DestroyMachineAsync(setup.MachineId, CancellationToken.None).ConfigureAwait(false);
        }
    }

    private async Task RunInProcessAsync(RecipeSetup setup, RoleReport report, CancellationTokenSource run)
    {
        var board = new SignalBoard();
        var tasks = recipe.Roles.Select(async role =>
        {
            var rc = new RoleContext(ctx.Client, setup.MachineId, setup.State, ctx.Options, board, report, ctx.Output) { Shared = setup.Private };
            try
            {
                await Task.Yield();
                await recipe.RunRoleAsync(role, rc, run.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (run.IsCancellationRequested)
            {
                report.Note($"{role}: stopped (the run was cancelled or timed out)");
            }
            catch (Exception e)
            {
                report.Note($"{role}: failed: {e.Message}");
                await run.CancelAsync().ConfigureAwait(false);
            }
        }).ToList();
        await Task.WhenAll(tasks).ConfigureAwait(false);
    }

    /// <summary>The arguments a role process receives after <c>--role ROLE</c>.</summary>
    public static IReadOnlyList<string> RoleArguments(string role, string server, RecipeSetup setup, RecipeOptions o)
    {
        var a = new List<string> { "--role", role, "--server", server, "--machine", setup.MachineId.ToString(CultureInfo.InvariantCulture) };
        foreach (var (k, v) in setup.State)
            a.AddRange(["--state", $"{k}={v}"]);
        a.AddRange(["--seed", o.Seed.ToString(CultureInfo.InvariantCulture), "--stall-ms", ((long)o.Stall.TotalMilliseconds).ToString(CultureInfo.InvariantCulture)]);
        if (o.Pages > 0)
            a.AddRange(["--pages", o.Pages.ToString(CultureInfo.InvariantCulture)]);
        if (o.WrongHandler is { } w)
            a.AddRange(["--wrong-handler", w]);
        foreach (var (k, v) in o.Settings)
            a.AddRange(["--set", $"{k}={v}"]);
        return a;
    }

    private async Task RunProcessesAsync(RecipeSetup setup, RoleReport report, CancellationToken ct)
    {
        var server = ServerUrl ?? throw new InvalidOperationException("role processes need the server's URL");
        var procs = new List<(string Role, Process Process)>();
        var board = new SignalBoard();
        var stdinLock = new SemaphoreSlim(1, 1);
        board.OnRaised = async name =>
        {
            await stdinLock.WaitAsync(CancellationToken.None).ConfigureAwait(false);
            try
            {
                foreach (var (_, p) in procs)
                {
                    try
                    {
                        await p.StandardInput.WriteLineAsync(RoleProcess.Prefix + "signal " + name).ConfigureAwait(false);
                        await p.StandardInput.FlushAsync(CancellationToken.None).ConfigureAwait(false);
                    }
                    catch (IOException)
                    {
                        // That role already ended.
                    }
                }
            }
            finally
            {
                stdinLock.Release();
            }
        };
        var outputLock = new Lock();
        try
        {
            await stdinLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                foreach (var role in recipe.Roles)
                {
                    var psi = Launch!(role, RoleArguments(role, server, setup, ctx.Options));
                    psi.RedirectStandardInput = true;
                    psi.RedirectStandardOutput = true;
                    psi.RedirectStandardError = true;
                    psi.UseShellExecute = false;
                    var p = Process.Start(psi) ?? throw new InvalidOperationException($"could not start role {role}");
                    procs.Add((role, p));
                }
            }
            finally
            {
                stdinLock.Release();
            }
            var readers = procs.Select(rp => Task.WhenAll(
                PumpAsync(rp.Role, rp.Process.StandardOutput, board, report, outputLock, protocol: true),
                PumpAsync(rp.Role, rp.Process.StandardError, board, report, outputLock, protocol: false))).ToList();
            foreach (var (role, p) in procs)
            {
                try
                {
                    await p.WaitForExitAsync(ct).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    report.Note($"{role}: killed (the run timed out)");
                }
            }
            await Task.WhenAll(readers).WaitAsync(TimeSpan.FromSeconds(10), CancellationToken.None).ConfigureAwait(false);
            foreach (var (role, p) in procs)
            {
                if (p.HasExited && p.ExitCode != 0)
                    report.Note($"{role}: exited with status {p.ExitCode}");
            }
        }
        finally
        {
            foreach (var (_, p) in procs)
            {
                if (!p.HasExited)
                    p.Kill(entireProcessTree: true);
                p.Dispose();
            }
            stdinLock.Dispose();
        }
    }

    private async Task PumpAsync(string role, StreamReader reader, SignalBoard board, RoleReport report, Lock outputLock, bool protocol)
    {
        while (await reader.ReadLineAsync().ConfigureAwait(false) is { } line)
        {
            if (protocol && line.StartsWith(RoleProcess.Prefix, StringComparison.Ordinal))
            {
                if (RoleProcess.Apply(line, report) is { } signal)
                    await board.RaiseAsync(signal).ConfigureAwait(false);
                continue;
            }
            lock (outputLock)
                ctx.Output.WriteLine($"[{role}] {line}");
        }
    }
}

/// <summary>
/// The role side of the process protocol: runs one role with signals from stdin and its
/// signals, counters and notes on stdout as <c>@recipe signal NAME</c>, <c>@recipe count
/// KEY VALUE</c> and <c>@recipe note TEXT</c> lines. A handler written in another language
/// speaks the same lines (see tools/recipes/postcopy_handler.py).
/// </summary>
public static class RoleProcess
{
    public const string Prefix = "@recipe ";

    /// <summary>Runs <paramref name="role"/> of <paramref name="recipe"/> as this process's job; returns its exit status.</summary>
    public static async Task<int> RunAsync(Recipe recipe, string role, UffdClient client, long machineId, IReadOnlyDictionary<string, string> state, RecipeOptions options, CancellationToken ct)
    {
        var stdout = Console.Out;
        var outLock = new SemaphoreSlim(1, 1);
        async Task WriteAsync(string line)
        {
            await outLock.WaitAsync(CancellationToken.None).ConfigureAwait(false);
            try
            {
                await stdout.WriteLineAsync(line).ConfigureAwait(false);
                await stdout.FlushAsync(CancellationToken.None).ConfigureAwait(false);
            }
            finally
            {
                outLock.Release();
            }
        }
        var board = new SignalBoard { OnRaised = name => WriteAsync(Prefix + "signal " + name) };
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var stdin = Task.Run(async () =>
        {
            while (await Console.In.ReadLineAsync(stop.Token).ConfigureAwait(false) is { } line)
            {
                if (line.StartsWith(Prefix + "signal ", StringComparison.Ordinal))
                    board.Accept(line[(Prefix.Length + 7)..]);
            }
        }, CancellationToken.None);
        var report = new RoleReport();
        var log = new LineWriter(WriteAsync);
        var rc = 0;
        try
        {
            await recipe.RunRoleAsync(role, new RoleContext(client, machineId, state, options, board, report, log), ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            report.Note($"{role}: failed: {e.Message}");
            rc = 1;
        }
        foreach (var (k, v) in report.Counters)
            await WriteAsync($"{Prefix}count {k} {v.ToString(CultureInfo.InvariantCulture)}").ConfigureAwait(false);
        foreach (var n in report.Notes)
            await WriteAsync($"{Prefix}note {n}").ConfigureAwait(false);
        await stop.CancelAsync().ConfigureAwait(false);
        outLock.Dispose();
        return rc;
    }

    /// <summary>Applies one protocol line to <paramref name="report"/>; returns the signal it raises, if any.</summary>
    public static string? Apply(string line, RoleReport report)
    {
        var body = line[Prefix.Length..];
        if (body.StartsWith("signal ", StringComparison.Ordinal))
            return body[7..];
        if (body.StartsWith("count ", StringComparison.Ordinal))
        {
            var parts = body.Split(' ');
            if (parts.Length == 3 && long.TryParse(parts[2], NumberStyles.Integer, CultureInfo.InvariantCulture, out var v))
                report.Add(parts[1], v);
        }
        else if (body.StartsWith("note ", StringComparison.Ordinal))
        {
            report.Note(body[5..]);
        }
        return null;
    }

    /// <summary>A writer whose lines go out whole through the role's output lock.</summary>
    private sealed class LineWriter(Func<string, Task> write) : StringWriter(CultureInfo.InvariantCulture)
    {
        public override void WriteLine(string? value) => write(value ?? "").GetAwaiter().GetResult();
        public override Task WriteLineAsync(string? value) => write(value ?? "");
    }
}

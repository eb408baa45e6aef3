using System.CommandLine;
using UffdGrpc.Client;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios;
using UffdGrpc.Scenarios.Host;

namespace UffdGrpc.Cli;

/// <summary>
/// The command line: <c>replay</c> runs a scenario script (in-process, or against a server
/// with <c>--server URL</c>), <c>demo</c> tells the seed's story across three processes, and
/// <c>bench</c> measures one fault round trip over the API and <c>bench-model</c> the model's
/// hot paths in-process.
/// </summary>
public static class CliCommands
{
    /// <summary>The server address when none is given.</summary>
    public const string DefaultServer = UffdClient.DefaultAddress;

    /// <summary>The environment variable holding the bearer token the client commands send (none: anonymous).</summary>
    public const string TokenVariable = "UFFDGRPC_TOKEN";

    /// <summary>A client for <paramref name="url"/>, with the token of <see cref="TokenVariable"/> when it is set.</summary>
    internal static UffdClient Connect(string url) =>
        new(url, Environment.GetEnvironmentVariable(TokenVariable) is { Length: > 0 } t ? t : null);

    public static RootCommand Build()
    {
        var root = new RootCommand("UffdGrpc: a model of Linux memory protection and userfaultfd write-protect.");
        root.Subcommands.Add(BuildReplay());
        root.Subcommands.Add(DemoCommand.Build());
        root.Subcommands.Add(DemoCommand.BuildHandler());
        root.Subcommands.Add(BenchCommand.Build());
        root.Subcommands.Add(BenchCommand.BuildFloor());
        root.Subcommands.Add(BuildBenchModel());
        root.Subcommands.Add(ExploreCommand.Build());
        root.Subcommands.Add(HealthCommand.Build());
        root.Subcommands.Add(SessionCommand.Build());
        root.Subcommands.Add(ProbeCommand.Build());
        root.Subcommands.Add(RecipeCommand.Build());
        return root;
    }

    private static Command BuildBenchModel()
    {
        var size = new Option<int>("--size-mib") { Description = "Populated range for the change_protection figures", DefaultValueFactory = _ => 64 };
        var scenarios = new Option<string?>("--scenarios") { Description = "A folder of .scn files to time the replay of" };
        var cmd = new Command("bench-model", "Print the in-process model's speed and memory figures (change_protection, faults, uffd-wp round trip, replay).") { size, scenarios };
        cmd.SetAction(async (parse, ct) => await ModelBench.RunAsync(Console.Out, parse.GetValue(size), parse.GetValue(scenarios)).ConfigureAwait(false));
        return cmd;
    }

    private static Command BuildReplay()
    {
        var file = new Argument<string>("file") { Description = "Scenario script (.scn), or - for standard input" };
        var profile = new Option<string>("--profile") { Description = "Kernel profile: 6.18 (default), 6.1 or v5.7", DefaultValueFactory = _ => "6.18" };
        var server = new Option<string?>("--server") { Description = "Replay against a UffdGrpc server at this URL (e.g. http://127.0.0.1:5051) instead of the in-process model" };
        var seed = new Option<ulong?>("--schedule-seed") { Description = "Run the in-process model under this schedule seed (see explore)" };
        var diff = new Option<bool>("--diff") { Description = "Run the scenario (or every .scn in a folder) on the model and on the real kernel (the kuffd harness; root or vm.unprivileged_userfaultfd=1, gcc) and print the first divergence; exit 1 when any diverges" };
        var profileFile = new Option<string?>("--profile-file") { Description = "Model the host a `probe --out FILE` profile describes: the built-in profile with its kernel interface, and its machine settings (THP, zero page, soft-dirty, memory-failure, swap)" };
        var cmd = new Command("replay", "Replay a scenario script against the model and print the trace (kuffd format).") { file, profile, server, seed, diff, profileFile };
        cmd.SetAction(async (parse, ct) =>
        {
            var path = parse.GetValue(file)!;
            var prof = ParseProfile(parse.GetValue(profile));
            if (prof is null)
            {
                await Console.Error.WriteLineAsync("replay: unknown profile (use 6.18, 6.1 or v5.7)").ConfigureAwait(false);
                return 1;
            }
            var url = parse.GetValue(server);
            HostProfile? hostProfile = null;
            if (parse.GetValue(profileFile) is { } pf)
            {
                try
                {
                    hostProfile = HostProfile.FromJson(await File.ReadAllTextAsync(pf, ct).ConfigureAwait(false));
                    if (hostProfile.ToKernel(out var why) is null)
                    {
                        await Console.Error.WriteLineAsync($"replay: --profile-file {pf}: {why}").ConfigureAwait(false);
                        return 1;
                    }
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Text.Json.JsonException)
                {
                    await Console.Error.WriteLineAsync($"replay: --profile-file {pf}: {e.Message}").ConfigureAwait(false);
                    return 1;
                }
                if (url is not null)
                {
                    await Console.Error.WriteLineAsync("replay: --profile-file runs the in-process model (no --server)").ConfigureAwait(false);
                    return 1;
                }
            }
            Kernel NewKernel()
            {
                var k = hostProfile?.ToKernel(out _) ?? new Kernel(prof.Value);
                k.SetSchedule(parse.GetValue(seed));
                return k;
            }
            if (parse.GetValue(diff))
            {
                if (url is not null || path == "-")
                {
                    await Console.Error.WriteLineAsync("replay --diff: takes a file or folder and runs the in-process model (no --server, no standard input)").ConfigureAwait(false);
                    return 1;
                }
                return await ReplayDiff.RunAsync(Console.Out, path, NewKernel, ct).ConfigureAwait(false);
            }
            if (url is not null && !Uri.TryCreate(url, UriKind.Absolute, out _))
            {
                await Console.Error.WriteLineAsync($"replay: --server: not an absolute URL: {url}").ConfigureAwait(false);
                return 1;
            }
            TextReader reader;
            try
            {
                reader = path == "-" ? Console.In : new StreamReader(path);
            }
            catch (IOException e)
            {
                await Console.Error.WriteLineAsync($"replay: {path}: {e.Message}").ConfigureAwait(false);
                return 1;
            }
            catch (UnauthorizedAccessException e)
            {
                await Console.Error.WriteLineAsync($"replay: {path}: {e.Message}").ConfigureAwait(false);
                return 1;
            }
            using (reader)
            {
                var stdout = new StreamWriter(Console.OpenStandardOutput()) { AutoFlush = false, NewLine = "\n" };
                await using (stdout.ConfigureAwait(false))
                {
                    using var client = url is null ? null : Connect(url);
                    var kernel = NewKernel();
                    IKernelBackend backend = client is null ? new InProcessBackend(kernel) : new GrpcBackend(client, prof.Value);
                    await using (backend.ConfigureAwait(false))
                    {
                        int rc;
                        try
                        {
                            rc = await new ScenarioInterpreter(backend, stdout).RunAsync(reader).ConfigureAwait(false);
                        }
                        catch (Grpc.Core.RpcException e) when (client is not null)
                        {
                            await stdout.FlushAsync(ct).ConfigureAwait(false);
                            await Console.Error.WriteLineAsync($"replay: server {url}: {e.Status.StatusCode}: {e.Status.Detail}").ConfigureAwait(false);
                            return 1;
                        }
                        await stdout.FlushAsync(ct).ConfigureAwait(false);
                        return rc;
                    }
                }
            }
        });
        return cmd;
    }

    /// <summary>Runs a client command; a server that cannot be reached or refuses a call is a one-line error, exit status 1.</summary>
    internal static async Task<int> GuardAsync(string command, Func<Task<int>> run)
    {
        try
        {
            return await run().ConfigureAwait(false);
        }
        catch (Grpc.Core.RpcException e)
        {
            await Console.Error.WriteLineAsync($"{command}: {e.Status.StatusCode}: {e.Status.Detail}").ConfigureAwait(false);
            return 1;
        }
        catch (UffdErrnoException e)
        {
            await Console.Error.WriteLineAsync($"{command}: {e.Message}").ConfigureAwait(false);
            return 1;
        }
    }

    internal static KernelProfile? ParseProfile(string? s) => s switch
    {
        "6.18" or "v6.18" or "6" or "v6" => KernelProfile.V6_18,
        "6.1" or "v6.1" => KernelProfile.V6_1,
        "5.7" or "v5.7" => KernelProfile.V5_7,
        _ => null,
    };
}

using System.CommandLine;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios;

namespace UffdGrpc.Cli;

/// <summary>The command line: <c>replay</c> runs a scenario script and prints its trace.</summary>
public static class CliCommands
{
    public static RootCommand Build()
    {
        var root = new RootCommand("UffdGrpc: a model of Linux memory protection and userfaultfd write-protect.");
        root.Subcommands.Add(BuildReplay());
        root.Subcommands.Add(BuildBench());
        return root;
    }

    private static Command BuildBench()
    {
        var size = new Option<int>("--size-mib") { Description = "Populated range for the change_protection figures", DefaultValueFactory = _ => 64 };
        var scenarios = new Option<string?>("--scenarios") { Description = "A folder of .scn files to time the replay of" };
        var cmd = new Command("bench", "Print the model's speed and memory figures (change_protection, faults, uffd-wp round trip, replay).") { size, scenarios };
        cmd.SetAction(async (parse, ct) => await ModelBench.RunAsync(Console.Out, parse.GetValue(size), parse.GetValue(scenarios)).ConfigureAwait(false));
        return cmd;
    }

    private static Command BuildReplay()
    {
        var file = new Argument<string>("file") { Description = "Scenario script (.scn), or - for standard input" };
        var profile = new Option<string>("--profile") { Description = "Kernel profile: 6.18 (default) or v5.7", DefaultValueFactory = _ => "6.18" };
        var cmd = new Command("replay", "Replay a scenario script against the model and print the trace (kuffd format).") { file, profile };
        cmd.SetAction(async (parse, ct) =>
        {
            var path = parse.GetValue(file)!;
            var prof = ParseProfile(parse.GetValue(profile));
            if (prof is null)
            {
                await Console.Error.WriteLineAsync("replay: unknown profile (use 6.18 or v5.7)").ConfigureAwait(false);
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
                    await using var backend = new InProcessBackend(new Kernel(prof.Value));
                    var interp = new ScenarioInterpreter(backend, stdout);
                    var rc = await interp.RunAsync(reader).ConfigureAwait(false);
                    await stdout.FlushAsync(ct).ConfigureAwait(false);
                    return rc;
                }
            }
        });
        return cmd;
    }

    internal static KernelProfile? ParseProfile(string? s) => s switch
    {
        "6.18" or "v6.18" or "6" or "v6" => KernelProfile.V6_18,
        "5.7" or "v5.7" => KernelProfile.V5_7,
        _ => null,
    };
}

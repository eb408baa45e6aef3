using System.CommandLine;
using UffdGrpc.Cli.Bench;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>bench</c>: the fixed performance run (<see cref="BenchSuite"/>) — the model beside the
/// kernel, the product's fault round trips and throughput beside a bare gRPC floor measured
/// in the same run, scaling and memory — as one table. <c>--server URL</c> measures that
/// server instead of starting one. <c>bench-floor</c> is the floor server the run starts.
/// </summary>
internal static class BenchCommand
{
    public static Command Build()
    {
        var server = new Option<string?>("--server") { Description = "Measure the server at this URL instead of starting one (the floor is still started)" };
        var quick = new Option<bool>("--quick") { Description = "Fewer rounds and shorter runs (a smoke test; figures are noisier)" };
        var only = new Option<string?>("--only") { Description = $"Run only these parts (comma-separated: {string.Join(", ", BenchSuite.Sections)})" };
        var cmd = new Command("bench", "Run the fixed benchmark set and print one table: operation, figure, anchor (kernel or transport floor), ratio, target.") { server, quick, only };
        cmd.SetAction((parse, ct) => CliCommands.GuardAsync("bench", () => BenchSuite.RunAsync(Console.Out, parse.GetValue(server), parse.GetValue(quick), parse.GetValue(only), ct)));
        return cmd;
    }

    public static Command BuildFloor()
    {
        var urls = new Option<string>("--urls") { Description = "Where to listen (h2c)", DefaultValueFactory = _ => "http://127.0.0.1:0" };
        var cmd = new Command("bench-floor", "Serve the transport floor: the bench's RPC shapes with no model behind them.") { urls };
        cmd.Hidden = true;
        cmd.SetAction(async (parse, ct) =>
        {
            await FloorServer.RunAsync(parse.GetValue(urls)!, ct).ConfigureAwait(false);
            return 0;
        });
        return cmd;
    }
}
